"""Which tensors of a loaded compressed model a distillation mode trains; all others are frozen."""

from __future__ import annotations

from torch import nn

from ..architectures import MoeLayout
from ..export import FACTOR_PREFIX
from ..runtime import MobeExperts

# Per mode, the factor tensors of each compressed matrix that train besides the routers. The shared bases
# (`bases`, SLBF's `U`/`V`) always stay frozen: they hold most of the parameters and all experts depend on them.
FACTOR_FIELDS = {"router": (), "router+coef": ("coef",), "all-small": ("coef", "A")}


class DistillError(ValueError):
    """A distillation that cannot run on the given models or settings."""


def router_modules(model: nn.Module, layout: MoeLayout) -> dict[str, nn.Module]:
    """Each MoE layer's router: the `gate` module beside its routed experts (name -> module)."""
    out = {}
    for layer in layout.moe_layers:
        experts = layout.arch.experts_module.format(layer=layer)
        name = experts.rsplit(".", 1)[0] + ".gate"
        try:
            out[name] = model.get_submodule(name)
        except AttributeError as exc:
            raise DistillError(f"layer {layer} has no router at {name}") from exc
    return out


def select_trainable(model: nn.Module, layout: MoeLayout, mode: str) -> dict[str, nn.Parameter]:
    """Freeze `model` except what `mode` trains; returns those parameters by their names in `model`.

    Routers train through their weights (and biases where they have one). DeepSeek-style routers also hold an
    `e_score_correction_bias` buffer; it only decides which experts are chosen, never their weights, so it has
    no gradient and stays as it is.
    """
    for param in model.parameters():
        param.requires_grad_(False)
    names = {id(p): n for n, p in model.named_parameters()}
    chosen: dict[str, nn.Parameter] = {}
    for router in router_modules(model, layout).values():
        for param in router.parameters():
            chosen[names[id(param)]] = param
    fields = FACTOR_FIELDS[mode]
    if fields:
        experts = [m for m in model.modules() if isinstance(m, MobeExperts)]
        if not experts:
            raise DistillError(f"--train {mode} needs a native checkpoint (factored experts); this one is dense")
        for module in experts:
            for matrix in module.factored:
                factored = module.matrix(matrix)
                have = [f for f in fields if hasattr(factored, FACTOR_PREFIX + f)]
                if not have:
                    raise DistillError(
                        f"--train {mode} needs basis coefficients (methods mobe, slbf); the factors are "
                        f"{', '.join(factored.factors_cls.tensor_fields)}"
                    )
                for field in have:
                    param = getattr(factored, FACTOR_PREFIX + field)
                    chosen[names[id(param)]] = param
    for param in chosen.values():
        param.requires_grad_(True)
    return chosen
