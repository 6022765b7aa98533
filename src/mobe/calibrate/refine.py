"""Layer-local distillation: refine one MoE layer's factors on its calibration tokens.

The weight-space (or Gram-weighted) fit treats gate, up and down separately and ignores the non-linearity
act(gate x) * (up x) between them. Here the whole routed-experts output of the layer,

    y(x) = sum_k w_k(x) down_k(act(gate_k x) * up_k x)     (k over the experts the router picked for x)

is fitted directly: starting from the fitted factors, Adam minimises the mean squared error between the compressed
layer's y and the original layer's y on the tokens the ORIGINAL model fed to this layer, with the router's own
choices and weights. A held-out tenth of the calibration tokens decides when to stop (the best state on it is kept,
and the starting point counts), so the refinement cannot make the held-out output error worse than the fit's.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from ..factorize import ExpertFactors, oriented
from .stats import LayerStats

HOLDOUT_SHARE = 0.1
BATCH_TOKENS = 4096
EVAL_EVERY = 20
PATIENCE = 5  # evaluations without improvement before stopping


@dataclass
class RefineResult:
    before: float  # relative output error of the layer on the held-out calibration tokens, before
    after: float  # ... after (the kept state)
    best_step: int
    steps: int
    seconds: float


def routed_output(
    x: Tensor, index: Tensor, weights: Tensor, dense: dict[str, Tensor], act: Callable[[Tensor], Tensor]
) -> Tensor:
    """y(x) of the routed experts for tokens x (T, d); `dense` holds gate, up (E, p, d) and down (E, d, p)."""
    out = torch.zeros_like(x)
    for e in index.unique().tolist():
        if e >= dense["gate"].shape[0]:
            continue
        rows, pos = torch.where(index == e)
        xe = x[rows]
        h = act(xe @ dense["gate"][e].T) * (xe @ dense["up"][e].T)
        out = out.index_add(0, rows, (h @ dense["down"][e].T) * weights[rows, pos, None])
    return out


class _Trainable:
    """The factors of one matrix type as free tensors (a MoBE's coefficients as logits, so they stay convex)."""

    def __init__(self, factors: ExpertFactors):
        self.factors = factors
        self.params: dict[str, Tensor] = {}
        for name, tensor in factors.tensors().items():
            t = tensor.detach().float().clone()
            if factors.method == "mobe" and name == "coef":
                name, t = "logits", t.clamp(min=1e-12).log()
            self.params[name] = t.requires_grad_()

    def current(self) -> ExpertFactors:
        fields = dict(self.params)
        if "logits" in fields:
            fields["coef"] = torch.softmax(fields.pop("logits"), dim=-1)
        return dataclasses.replace(self.factors, **fields)

    def snapshot(self) -> dict[str, Tensor]:
        return {k: v.detach().clone() for k, v in self.params.items()}

    def restore(self, state: dict[str, Tensor]) -> None:
        with torch.no_grad():
            for k, v in state.items():
                self.params[k].copy_(v)


def refine_layer(
    factors: dict[str, ExpertFactors],
    originals: dict[str, Tensor],
    stats: LayerStats,
    act: Callable[[Tensor], Tensor],
    steps: int,
    lr: float = 1e-3,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> tuple[dict[str, ExpertFactors], RefineResult]:
    """Refine the compressed matrices' `factors` of one layer by distilling its routed-experts output.

    Args:
        factors: fitted factors of the compressed matrix types (gate / up / down; down as its transpose).
        originals: the original stacks of all three types in checkpoint orientation (gate, up: (E, p, d); down:
            (E, d, p)); the uncompressed ones are kept fixed.
        stats: the layer's calibration statistics with `inputs`, `top_k_index` and `top_k_weights`.
        act: the experts' activation (silu for most models).
        steps: Adam steps at most (one mini-batch of calibration tokens each).
        lr: Adam learning rate relative to each tensor's standard deviation.
    """
    if stats.inputs is None or stats.top_k_index is None or stats.top_k_weights is None:
        raise ValueError("refinement needs the calibration inputs (collect with keep_inputs=True)")
    start = time.perf_counter()
    x = stats.inputs.to(device=device, dtype=torch.float32)
    index, weights = stats.top_k_index.to(device), stats.top_k_weights.to(device=device, dtype=torch.float32)
    originals = {m: t.to(device=device, dtype=torch.float32) for m, t in originals.items()}
    with torch.no_grad():
        target = routed_output(x, index, weights, originals, act)
    n = x.shape[0]
    n_hold = max(1, int(n * HOLDOUT_SHARE)) if n > 1 else 0
    train = torch.arange(n - n_hold, device=device)
    hold = torch.arange(n - n_hold, n, device=device) if n_hold else train
    norm_hold = target[hold].pow(2).sum().clamp(min=1e-30)

    trainables = {m: _Trainable(f) for m, f in factors.items()}
    groups = []
    for t in trainables.values():
        for name, p in t.params.items():
            scale = 1.0 if name == "logits" else max(p.detach().std().item(), 1e-6)
            groups.append({"params": [p], "lr": lr * scale})
    optimizer = torch.optim.Adam(groups)

    def dense() -> dict[str, Tensor]:
        out = dict(originals)
        for m, t in trainables.items():
            out[m] = oriented(m, t.current().reconstruct())
        return out

    def hold_error() -> float:
        with torch.no_grad():
            y = routed_output(x[hold], index[hold], weights[hold], dense(), act)
            return ((y - target[hold]).pow(2).sum() / norm_hold).sqrt().item()

    generator = torch.Generator().manual_seed(seed)
    before = best = hold_error()
    best_state = {m: t.snapshot() for m, t in trainables.items()}
    best_step, bad, step = 0, 0, 0
    order = train[torch.randperm(train.numel(), generator=generator).to(device)]
    cursor = 0
    for step in range(1, steps + 1):
        if cursor + BATCH_TOKENS > order.numel():
            order, cursor = train[torch.randperm(train.numel(), generator=generator).to(device)], 0
        batch = order[cursor : cursor + BATCH_TOKENS]
        cursor += BATCH_TOKENS
        optimizer.zero_grad(set_to_none=True)
        y = routed_output(x[batch], index[batch], weights[batch], dense(), act)
        loss = (y - target[batch]).pow(2).sum() / target[batch].pow(2).sum().clamp(min=1e-30)
        loss.backward()
        optimizer.step()
        if step % EVAL_EVERY == 0 or step == steps:
            err = hold_error()
            if err < best:
                best, best_step, bad = err, step, 0
                best_state = {m: t.snapshot() for m, t in trainables.items()}
            else:
                bad += 1
                if bad >= PATIENCE:
                    break
    for m, t in trainables.items():
        t.restore(best_state[m])
    refined = {}
    with torch.no_grad():
        for m, t in trainables.items():
            f = t.current()
            refined[m] = f.to(factors[m].dtype) if math.isfinite(best) else factors[m]
    return refined, RefineResult(before, best, best_step, step, time.perf_counter() - start)
