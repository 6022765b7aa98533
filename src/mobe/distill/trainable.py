"""Which tensors of a loaded compressed model a distillation mode trains; all others are frozen."""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor, nn

from ..architectures import MoeLayout
from ..export import FACTOR_PREFIX
from ..runtime import MobeExperts
from .loss import router_logits

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


class RouterHooks:
    """While entered, every forward of router k calls `on_logits(k, its logits over the experts)` (with their graph).

    The teacher's targets record the original's routing through it and training reads the student's; leaving the
    block, normally or by an exception, removes the hooks from the caller's model.
    """

    def __init__(self, routers: list[nn.Module], on_logits: Callable[[int, Tensor], None]):
        self.routers, self.on_logits = routers, on_logits
        self.handles: list = []

    def __enter__(self) -> RouterHooks:
        self.handles = [router.register_forward_hook(self._hook(k)) for k, router in enumerate(self.routers)]
        return self

    def _hook(self, k: int):
        def hook(module, args, output) -> None:
            self.on_logits(k, router_logits(output))

        return hook

    def __exit__(self, *exc) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()


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
