"""SLBF: MoBE's form with low-rank shared bases, as many bases as experts (arXiv 2610.09342).

    W_i  ~  A_i act( sum_j alpha_ij U_j V_j^T ),   alpha_i = softmax(logits_i),   j = 1..m,  m = E

in the orientation where the rows are the smaller side: r = min(p, d) rows, c = max(p, d) columns (a stack with
p > d is fitted as its transpose). A_i is a square r x r matrix per expert, each basis U_j V_j^T (r x c) has rank
k, and basis j starts from expert j. The recipe, as the authors publish it: per-expert SVD start without the
singular values (A_i = left singular vectors, U_j = [I_k; 0], V_j = top-k right singular vectors; "the subspace
is right, the optimiser learns the scale"), own-basis logit 1.0, targets in float16 divided by one global std,
full-batch MSE, AdamW (betas 0.9/0.999, weight decay 0.02) with {A, logits} at the learning rate and {U, V} at a
tenth of it, cosine decay to 1e-4 without warm-up, best state looked at every `eval_every` steps.

Stored after a gauge fix: U_j V_j^T = U'_j V'_j with U'_j the identity on k pivot rows (chosen by LU with
partial pivoting, kept as integers) and U2 U1^-1 on the others, V'_j = U1 V_j^T; this drops m k^2 numbers and
leaves every product unchanged (checked in float64 before it is kept).
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from ..config import MobeConfig
from .base import ExpertFactors, FitStats
from .keep_best import keep_best
from .primitives import (
    activation_fn,
    auto_chunk,
    coordinates_in,
    expert_chunks,
    mix_bases,
    orthonormal_rows,
    softmax_mix,
)
from .weighted import OutputWeighting

DEFAULT_ACTIVATION = "silu"
UV_LR_SCALE = 0.1  # {U, V} learn at a tenth of the rate of {A, logits}: the product amplifies their steps
WEIGHT_DECAY = 0.02
MIN_LR = 1e-4  # cosine floor, the same absolute value for both groups


@dataclass
class SlbfFactors(ExpertFactors):
    """Gauge-fixed SLBF factors of one (E, p, d) stack; `A` carries the global scale back."""

    A: Tensor  # (E, r, r)
    U: Tensor  # (m, r - k, k): the non-pivot rows of U_j U1_j^-1
    V: Tensor  # (m, k, c): U1_j V_j^T
    pivots: Tensor  # (m, k) int64: the rows of basis j where U'_j is the identity
    coef: Tensor  # (E, m): softmax of the logits
    activation: str
    transposed: str  # "1": fitted as W_i^T (p > d)
    orthonormal: str = "0"  # "1": A holds coordinates in the orthonormalised mixed basis (integer factors)

    method: ClassVar[str] = "slbf"
    tensor_fields: ClassVar[tuple[str, ...]] = ("A", "U", "V", "pivots", "coef")
    meta_fields: ClassVar[tuple[str, ...]] = ("activation", "transposed", "orthonormal")
    meta_defaults: ClassVar[dict[str, str]] = {"orthonormal": "0"}
    index_fields: ClassVar[tuple[str, ...]] = ("pivots",)
    shared_fields: ClassVar[tuple[str, ...]] = ("U", "V")  # the layer's bases: few bytes, every expert's error

    @property
    def num_experts(self) -> int:
        return self.A.shape[0]

    def bases(self) -> Tensor:
        """The m bases U'_j V'_j (m, r, c) in float32."""
        return expand_gauge(self.U.float(), self.pivots, self.A.shape[1]) @ self.V.float()

    def mixed_bases(self, experts: Tensor | None = None) -> Tensor:
        """M_i = act(sum_j alpha_ij U'_j V'_j) (n, r, c) in float32."""
        experts = self._experts(experts)
        return mix_bases(self.coef.float()[experts], self.bases()[None], experts, activation_fn(self.activation))

    def row_bases(self, experts: Tensor | None = None) -> Tensor:
        """What A_i multiplies: M_i, or its orthonormalised rows where A is in those coordinates."""
        mixed = self.mixed_bases(experts)
        return orthonormal_rows(mixed) if self.orthonormal == "1" else mixed

    def reconstruct(self, experts: Tensor | None = None) -> Tensor:
        experts = self._experts(experts)
        out = torch.bmm(self.A.float()[experts], self.row_bases(experts))
        return out.transpose(1, 2) if self.transposed == "1" else out

    def in_orthonormal_coordinates(self, U: Tensor | None = None, V: Tensor | None = None) -> SlbfFactors:
        """The same products A_i M_i with A_i in orthonormal coordinates of the mixed basis built from `U` and `V`
        (default: the factors' own): A'_i = A_i M_i Q'_i^T, exact for the own bases, else the best A'_i for the new
        ones (least squares against the old products). float64 inside."""
        new = dataclasses.replace(self, U=self.U if U is None else U, V=self.V if V is None else V, orthonormal="1")
        return dataclasses.replace(new, A=coordinates_in(self.A, self.row_bases(), new.row_bases()))


def expand_gauge(free: Tensor, pivots: Tensor, rows: int) -> Tensor:
    """U'_j (m, rows, k): the identity on the pivot rows of each basis, `free` (m, rows - k, k) on the others."""
    m, k = pivots.shape
    full = free.new_zeros(m, rows, k)
    rest = torch.ones(m, rows, dtype=torch.bool, device=free.device)
    rest.scatter_(1, pivots, False)
    eye = torch.eye(k, dtype=free.dtype, device=free.device).expand(m, k, k)
    full.scatter_(1, pivots.unsqueeze(-1).expand(m, k, k), eye)
    full[rest] = free.reshape(-1, k)
    return full


def gauge_fix(U: Tensor, Vt: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(free rows, V', pivots) with expand_gauge(free, pivots) @ V' == U @ Vt, per basis; in float64."""
    m, r, k = U.shape
    U64, V64 = U.double(), Vt.double()
    P = torch.linalg.lu(U64)[0]  # U_j = P_j L_j R_j: P_j^T U_j has its best-conditioned rows first
    order = P.argmax(dim=1)  # row i of P_j^T U_j is row order[i] of U_j
    pivots = order[:, :k].sort(dim=1).values
    U1 = torch.gather(U64, 1, pivots.unsqueeze(-1).expand(m, k, k))
    rest = torch.ones(m, r, dtype=torch.bool, device=U.device)
    rest.scatter_(1, pivots, False)
    U2 = U64[rest].view(m, r - k, k)
    free = torch.linalg.solve(U1, U2, left=False)  # U2 U1^-1
    return free, U1 @ V64, pivots


def slbf_parameters(E: int, p: int, d: int, k: int) -> int:
    """Stored numbers of one stack with m = E bases of rank k (pivots included)."""
    r, c = min(p, d), max(p, d)
    m = E
    return E * r * r + m * (r - k) * k + m * k * c + m * k + E * m


def per_expert_start(rows: Tensor, k: int, init_logit: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The published start ('msign'): A_i = left singular vectors, U_j = [I_k; 0], V_j = top-k right singular
    vectors of expert j, no singular values; logits `init_logit` on the own basis, 0 elsewhere."""
    E, r, c = rows.shape
    left, _, right = torch.linalg.svd(rows, full_matrices=False)
    U = rows.new_zeros(E, r, k)
    U[:, :k] = torch.eye(k, dtype=rows.dtype, device=rows.device)
    logits = torch.eye(E, dtype=rows.dtype, device=rows.device) * init_logit
    return left.contiguous(), U, right[:, :k].contiguous(), logits


def fit_slbf(
    weights: Tensor,
    config: MobeConfig,
    device: torch.device | str = "cpu",
    desc: str | None = None,
    weighting: OutputWeighting | None = None,
) -> tuple[SlbfFactors, FitStats]:
    """Fit SLBF factors of basis rank `config.rank` to `weights` (E, p, d); `config.steps` AdamW steps.

    With a `weighting` (calibration) the loss is the output error sum_i ||(W_i - What_i) L_i||^2 / numel.
    """
    start = time.perf_counter()
    E, p, d = weights.shape
    r = min(p, d)
    k = config.rank or r
    if not 1 <= k <= r:
        raise ValueError(f"SLBF basis rank k={k} must be between 1 and min(p, d) = {r}")
    transposed = p > d
    activation = config.activation or DEFAULT_ACTIVATION
    act = activation_fn(activation)

    def rows_view(t: Tensor) -> Tensor:
        return t.transpose(1, 2) if transposed else t

    raw = weights.to(device=device, dtype=torch.float32)
    target16 = weights.to(device=device, dtype=torch.float16).float()
    scale = target16.std().item()
    target = target16 / scale  # (E, p, d), fitted in this orientation's metric
    A, U, Vt, logits = (t.requires_grad_() for t in per_expert_start(rows_view(raw), k, config.start_logit))
    optimizer = torch.optim.AdamW(
        [{"params": [A, logits], "lr": config.lr}, {"params": [U, Vt], "lr": config.lr * UV_LR_SCALE}],
        betas=(0.9, 0.999),
        weight_decay=WEIGHT_DECAY,
    )
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, config.steps), eta_min=MIN_LR)
    chunk = config.batch_experts or auto_chunk(r, r, 2 * max(p, d))
    numel = target.numel()
    weighting = None if weighting is None else weighting.to(device)

    def loss_and_backward(train: bool) -> float:
        total = 0.0
        for _, idx in expert_chunks(E, 1, chunk):
            with torch.set_grad_enabled(train):
                mixed = softmax_mix(U @ Vt, logits[idx], act)
                diff = rows_view(torch.bmm(A[idx], mixed)) - target[idx]
                if weighting is not None:
                    diff = weighting.apply(diff, idx)
                part = diff.pow(2).sum() / numel
                if train:
                    part.backward()
            total += part.item()
        return total

    kept = keep_best(
        loss_and_backward,
        (A, U, Vt, logits),
        optimizer,
        config.steps,
        config.eval_every,
        start=start,
        unit=scale**2,
        scheduler=schedule,
        desc=desc,
    )
    A_best, U_best, Vt_best, logits_best = kept.state
    free, V_fixed, pivots = gauge_fix(U_best, Vt_best)
    gap = (expand_gauge(free, pivots, r) @ V_fixed - U_best.double() @ Vt_best.double()).norm()
    if not torch.isfinite(gap) or gap > 1e-6 * (U_best.double() @ Vt_best.double()).norm():
        raise ArithmeticError(f"SLBF gauge fix changed the bases by {gap.item():.3e}")
    factors = SlbfFactors(
        A=(A_best * scale).cpu(),
        U=free.float().cpu(),
        V=V_fixed.float().cpu(),
        pivots=pivots.cpu(),
        coef=torch.softmax(logits_best, dim=-1).cpu(),
        activation=activation,
        transposed="1" if transposed else "0",
    )
    return factors, kept.fit_stats(config.steps, start, scale)
