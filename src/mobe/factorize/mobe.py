"""MoBE factorisation of one stack of expert matrices: W_i ~ A_i act(sum_j alpha_ij B_j).

Shapes: W (E, p, d); A (E, p, r); bases (g, m/g, r, d), one set per expert group; coef (E, m/g), the
softmax of each expert's logits over its group's bases. Expert e belongs to group e // (E/g).

Where the bases sit: the paper shares them along the hidden size d (`basis_side="hidden"`). With
`basis_side="wider"` a stack whose experts are wider than the hidden size (p > d: Mixtral, the coarse fixture) is
fitted as its transpose, W_i^T ~ A_i act(sum_j alpha_ij B_j) with A_i (d, r) and B_j (r, p): the shared bases take
the larger side, so each unit of rank costs E d + m p numbers instead of E p + m d (SLBF orients its fits the same
way). On p <= d stacks, every fine-grained MoE, both sides are the same fit.

Orthonormal coordinates (`orthonormal="1"`): A_i may instead hold the coordinates of W_i in an orthonormal basis
of the mixed basis' row space, Q_i = R_i^-T M_i with M_i^T = Q_i^T R_i (QR, diag R_i > 0), so W_i ~ A_i Q_i. The
product is the same (A_i Q_i = (A_i R_i^-T) M_i), but an A_i fitted against a mixed basis with a spread of singular
values is large and rests on cancellations, and rounding it multiplies the error; in orthonormal coordinates a
rounding error of A_i is exactly the error it adds to W_i. Integer factors are stored so (`mobe.quantize`).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from ..config import MobeConfig
from .base import ExpertFactors, FitStats
from .keep_best import keep_best
from .primitives import (
    MMAP_THRESHOLD_MAX,
    activation_fn,
    auto_chunk,
    chunk_bytes,
    coordinates_in,
    expert_chunks,
    init_svd_groups,
    mix_bases,
    orthonormal_rows,
    softmax_mix,
)
from .schedule import fit_fast
from .weighted import OutputWeighting, init_svd_groups_weighted

DEFAULT_ACTIVATION = "tanh"  # the paper's DeepSeek-V3 setting


@dataclass
class MobeFactors(ExpertFactors):
    """Factors of one layer's matrix type; `A` already carries the global scale back."""

    A: Tensor
    bases: Tensor
    coef: Tensor
    activation: str
    transposed: str = "0"  # "1": fitted as W_i^T (bases on the wider side of a p > d stack)
    orthonormal: str = "0"  # "1": A holds coordinates in the orthonormalised mixed basis (module docstring)

    method: ClassVar[str] = "mobe"
    tensor_fields: ClassVar[tuple[str, ...]] = ("A", "bases", "coef")
    meta_fields: ClassVar[tuple[str, ...]] = ("activation", "transposed", "orthonormal")
    meta_defaults: ClassVar[dict[str, str]] = {"transposed": "0", "orthonormal": "0"}
    shared_fields: ClassVar[tuple[str, ...]] = ("bases",)  # the layer's bases: few bytes, every expert's error

    @property
    def num_experts(self) -> int:
        return self.A.shape[0]

    @property
    def groups(self) -> int:
        return self.bases.shape[0]

    def mixed_bases(self, experts: Tensor | None = None) -> Tensor:
        """act(sum_j alpha_ij B_j) for the given experts (all by default): (n, r, d)."""
        experts = torch.arange(self.num_experts) if experts is None else experts
        return mix_bases(
            self.coef.float()[experts],
            self.bases.float(),
            experts // (self.num_experts // self.groups),
            activation_fn(self.activation),
        )

    def row_bases(self, experts: Tensor | None = None) -> Tensor:
        """What A_i multiplies: the mixed bases, or their orthonormalised rows where A is in those coordinates."""
        mixed = self.mixed_bases(experts)
        return orthonormal_rows(mixed) if self.orthonormal == "1" else mixed

    def reconstruct(self, experts: Tensor | None = None) -> Tensor:
        """Dense expert matrices (n, p, d) in float32."""
        experts = torch.arange(self.num_experts) if experts is None else experts
        out = torch.bmm(self.A.float()[experts], self.row_bases(experts))
        return out.transpose(1, 2) if self.transposed == "1" else out

    def in_orthonormal_coordinates(self, bases: Tensor | None = None) -> MobeFactors:
        """The same products A_i M_i with A_i in orthonormal coordinates of the mixed basis built from `bases`
        (default: the factors' own), A'_i = A_i M_i Q'_i^T: exact when `bases` are the factors' own; otherwise the
        best A'_i for the new bases (least squares against the old products). float64 inside."""
        new = dataclasses.replace(self, bases=self.bases if bases is None else bases, orthonormal="1")
        return dataclasses.replace(new, A=coordinates_in(self.A, self.row_bases(), new.row_bases()))


def fits_transposed(p: int, d: int, basis_side: str) -> bool:
    """Whether a (p, d) stack is fitted as its transpose: only with the bases on the wider side and p > d."""
    return basis_side == "wider" and p > d


def fitted_shape(p: int, d: int, basis_side: str) -> tuple[int, int]:
    """(rows of A_i, columns of the bases) of the fit of a (p, d) stack."""
    return (d, p) if fits_transposed(p, d, basis_side) else (p, d)


def mobe_parameters(
    num_experts: int, p: int, d: int, num_bases: int, rank: int, groups: int = 1, basis_side: str = "hidden"
) -> int:
    """Parameters of one MoBE-compressed matrix type: E*p*r + m*r*d + E*m/g (each expert mixes its group's bases);
    p and d swap where the stack is fitted transposed."""
    rows, cols = fitted_shape(p, d, basis_side)
    return num_experts * rows * rank + num_bases * rank * cols + num_experts * (num_bases // groups)


def weighted_chunk(chunk: int, rows: int, rank: int, p: int, d: int, loss_bytes: int) -> int:
    """Experts per chunk of a fit whose loss applies the metric to (rows, d) matrices, from the plain fit's `chunk`.

    The metric's transients join each chunk's (`loss_bytes` an expert, `OutputWeighting.loss_bytes`), so a chunk
    takes fewer experts, to hold no more than the plain fit's chunk; but where the plain chunk's (rows, d) float32
    stacks reach glibc's largest mmap threshold, not so few that they fall under it: they would churn through its
    heap, which keeps them resident (measured on a 64 x 128 x 2048 gate fit: about 100 MiB more at the peak in
    chunks of 30 experts than of 32).
    """
    plain = chunk_bytes(rank, p, d)
    fewer = chunk * plain // (plain + loss_bytes)
    stack = 4 * rows * d
    mapped = min(chunk, -(-MMAP_THRESHOLD_MAX // stack)) if chunk * stack >= MMAP_THRESHOLD_MAX else 1
    return max(1, fewer, mapped)


def _sum_squared_error(
    A: Tensor,
    bases: Tensor,
    logits: Tensor,
    target: Tensor,
    act: Callable[[Tensor], Tensor],
    chunk: int,
    weighting: OutputWeighting | None = None,
):
    """Yield the sum of squared errors of each chunk of experts (chunks never straddle an expert group).

    With a `weighting`, the error of expert i is measured in its output metric (||(W_i - What_i) L_i||^2).
    """
    for g, idx in expert_chunks(A.shape[0], bases.shape[0], chunk):
        diff = torch.bmm(A[idx], softmax_mix(bases[g], logits[idx], act)) - target[idx]
        yield (diff if weighting is None else weighting.apply(diff, idx)).pow(2).sum()


def fit_mobe(
    weights: Tensor,
    config: MobeConfig,
    device: torch.device | str = "cpu",
    desc: str | None = None,
    weighting: OutputWeighting | None = None,
) -> tuple[MobeFactors, FitStats]:
    """Fit MoBE factors to `weights` (E, p, d) by minimising the mean squared error.

    Works on W / std(W) (one global std) and returns float32 factors on the CPU with the scale folded back
    into A. `schedule="fast"` is schedule.fit_fast; `"adam"` (default) is the paper's Algorithm 1 (Adam,
    best state kept at every `eval_every`-th step and at the end); `"paper"` replays the authors' train.py
    exactly, quirks included (docs/method.md). With a `weighting` (calibration, adam and paper
    schedules), the loss is the output error sum_i ||(W_i - What_i) L_i||^2 / numel and the SVD-group
    initialisation is done in whitened coordinates (`mobe.factorize.weighted`).
    """
    transposed = fits_transposed(weights.shape[1], weights.shape[2], config.basis_side)
    if transposed:  # fit W_i^T: the same loss, the bases on the wider side; a right metric becomes a left one
        weights = weights.transpose(1, 2)
        weighting = None if weighting is None else weighting.transposed()
    num_experts, p, d = weights.shape
    rank = config.rank or min(p, d)
    if num_experts % config.groups:
        raise ValueError(f"groups ({config.groups}) must divide the number of experts ({num_experts})")
    if config.num_bases // config.groups > num_experts // config.groups:
        raise ValueError(f"num_bases ({config.num_bases}) must not exceed the number of experts ({num_experts})")
    if rank > d:
        raise ValueError(f"rank ({rank}) must not exceed the width of the bases ({d})")

    start = time.perf_counter()
    paper = config.schedule == "paper"
    if paper:  # the authors' train.py: fp16 targets, SVD of the unscaled weights, fit to W / std
        target16 = weights.to(device=device, dtype=torch.float16)
        scale = target16.std().item()
        init_source, target = target16.float(), (target16 / target16.std()).float()
    else:
        target = weights.to(device=device, dtype=torch.float32)
        scale = target.std().item()
        target = target / scale
        init_source = target
    act = activation_fn(config.activation or DEFAULT_ACTIVATION)
    chunk = config.batch_experts or auto_chunk(rank, p, d)
    if weighting is not None and not config.batch_experts and (config.schedule != "fast" or weighting.side == "right"):
        rows = rank if config.schedule == "fast" else p  # the metric multiplies the mixed bases, or the differences
        chunk = weighted_chunk(min(chunk, num_experts), rows, rank, p, d, weighting.loss_bytes(rows, d))
    if config.schedule == "fast":
        factors, stats = _fit_fast(target, scale, rank, config, act, chunk, desc, start, weighting)
        return dataclasses.replace(factors, transposed="1" if transposed else "0"), stats
    if weighting is not None:
        weighting = weighting.to(device)
        init = init_svd_groups_weighted(
            init_source, weighting, config.num_bases, rank, config.groups, config.start_logit
        )
    else:
        init = init_svd_groups(init_source, config.num_bases, rank, config.groups, config.start_logit)
    A, bases, logits = (t.requires_grad_() for t in init)
    numel = target.numel()

    def loss_and_backward(train: bool) -> float:
        loss = 0.0
        with torch.set_grad_enabled(train):
            for part in _sum_squared_error(A, bases, logits, target, act, chunk, weighting):
                part = part / numel
                if train:
                    part.backward()
                loss += part.item()
        return loss

    # The authors check every eval_every-th step the loss measured before that step, but keep the state after it;
    # `paper` reproduces that bookkeeping exactly (`late`).
    kept = keep_best(
        loss_and_backward,
        (A, bases, logits),
        torch.optim.Adam([A, bases, logits], lr=config.lr),
        config.steps,
        config.eval_every,
        start=start,
        unit=scale**2,
        late=paper,
        desc=desc,
    )
    A_best, bases_best, logits_best = kept.state
    factors = MobeFactors(
        A=(A_best * scale).cpu(),
        bases=bases_best.cpu(),
        coef=torch.softmax(logits_best, dim=-1).cpu(),
        activation=config.activation or DEFAULT_ACTIVATION,
        transposed="1" if transposed else "0",
    )
    return factors, kept.fit_stats(config.steps, start, scale)


def _fit_fast(
    target: Tensor,
    scale: float,
    rank: int,
    config: MobeConfig,
    act: Callable[[Tensor], Tensor],
    chunk: int,
    desc: str | None,
    start: float,
    weighting: OutputWeighting | None = None,
) -> tuple[MobeFactors, FitStats]:
    """The `fast` schedule on the scaled stack; losses and trace back in the original units."""
    offset = time.perf_counter() - start  # the trace counts from fit_mobe's start, as the other schedules' do
    A, bases, logits, stats = fit_fast(target, rank, config, act, chunk, desc, weighting)
    factors = MobeFactors(
        A=(A * scale).cpu(),
        bases=bases.cpu(),
        coef=torch.softmax(logits, dim=-1).cpu(),
        activation=config.activation or DEFAULT_ACTIVATION,
    )
    unit = scale**2
    trace = [(offset + seconds, step, loss * unit) for seconds, step, loss in stats.trace]
    return factors, FitStats(
        stats.init_loss * unit,
        stats.best_loss * unit,
        stats.best_step,
        stats.steps,
        time.perf_counter() - start,
        scale,
        trace,
    )
