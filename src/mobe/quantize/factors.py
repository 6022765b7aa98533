"""Integer MoBE factors that keep the fit's accuracy: shared bases at high precision, expert factors in orthonormal
coordinates, each with the scales that suit it.

Rounding the factors of a fit as they are multiplies its error several times at 4 bits: the exactly solved A_i of a
fit against a mixed basis M_i with a spread of singular values is large and rests on cancellations, so a small
relative change of A_i is a large one of A_i M_i. Here:

1. the bases (shared by a whole layer: few bytes) are rounded first, to `shared_bits` (8 by default);
2. A_i is re-solved against the mixed basis of the rounded bases, in its orthonormal coordinates
   (`MobeFactors.in_orthonormal_coordinates`): A'_i = A_i M_i Q'_i^T, where a change of A'_i changes W_i by exactly
   as much (Q'_i has orthonormal rows);
3. A'_i is rounded with one scale per `group_size` entries of each of its columns (groups run along its rows): a
   column of A'_i is the weight of one basis direction, and directions differ in weight, so sharing a scale across a
   row would spend the grid on the heaviest direction. With a Hessian (`hessians`: E[x x^T] of each expert's inputs,
   in the coordinates of A'_i's rows) the rounding is GPTQ's, rows as columns; without, round to nearest, which is
   already GPTQ for the identity Hessian that orthonormal coordinates give the data-free loss.

Measured on a fine-grained trained layer (benchmarks/factor_rounding.py): int4 factors this way leave the weight
error at the quadrature sum of the fit's and of dense int4 (0.147 against 0.107 and 0.101), where rounding the
fit's factors as they are gave 0.58.

Without calibration, the Hessians come from the weights (`proxy`: gate's and up's input-side Gram, down's
intermediate activations on Gaussian inputs shaped by it): trained weights' large input directions follow the inputs'
energy, so GPTQ on them moves A's rounding error out of the directions the inputs fill, which round to nearest (best
for the weights) leaves there; the weight error grows, as GPTQ's does. `observer="mse"` fixes each group's scale as
the clip of its range with the least rounding error, which at 3 and 4 bits lowers the error of A' further.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from ..factorize import MobeFactors
from ..factorize.slbf import SlbfFactors
from . import groupwise
from .gptq import DAMPING, gptq_quantize, gptq_round
from .proxy import input_gram

SHARED_BITS = 8  # the bases: shared by a layer's experts, so their bytes are few and their errors reach every expert


@dataclasses.dataclass
class StoredFactor:
    """A factor as stored: integer values (logical shape, int8), their scales, bits, group size and whether the
    groups run down the columns (the stored values are then the transpose, groups along its last dimension)."""

    values: Tensor
    scales: Tensor
    bits: int
    group_size: int
    column_groups: bool = False

    def dequantize(self, dtype: torch.dtype | None = None) -> Tensor:
        out = groupwise.dequantize(self.values, self.scales, self.group_size, dtype)
        return out.transpose(-2, -1) if self.column_groups else out

    def packed(self) -> Tensor:
        return groupwise.pack(self.values, self.bits)


def quantize_factor(
    tensor: Tensor,
    bits: int,
    group_size: int,
    *,
    column_groups: bool = False,
    hessian: Tensor | None = None,
    observer: str = "minmax",
) -> StoredFactor:
    """Round one factor tensor (..., rows, cols): group-wise along its rows, or down its columns; by GPTQ on
    `hessian` (..., rows, rows) when given (column groups only: the rows are then GPTQ's input dimension).
    `observer`: how each group's scale is fixed (`groupwise.group_scales`)."""
    work = tensor.transpose(-2, -1) if column_groups else tensor
    if hessian is not None:
        if not column_groups:
            raise ValueError("a Hessian over the rows of a factor needs column groups")
        values, scales = gptq_quantize(work, hessian, bits, group_size, dtype=tensor.dtype, observer=observer)
    else:
        scales = groupwise.group_scales(work, bits, group_size, tensor.dtype, observer)
        values = groupwise.round_to_scales(work, scales, bits, group_size)
    return StoredFactor(values, scales, bits, group_size, column_groups)


def quantize_mobe(
    factors: MobeFactors | SlbfFactors,
    bits: int,
    group_size: int,
    *,
    shared_bits: int | None = SHARED_BITS,
    grams: Tensor | None = None,
    inputs_on_rows: bool | None = None,
    observer: str = "minmax",
    targets: Tensor | None = None,
) -> tuple[MobeFactors | SlbfFactors, dict[str, StoredFactor]]:
    """Integer MoBE factors (module docstring): the factors the integers stand for (A in orthonormal coordinates,
    dequantised) and the stored form of A and, unless `shared_bits` is None (kept in floating point), the bases
    (`shared_fields`: MoBE's `bases`; SLBF's low-rank `U` and `V`, whose A_i multiplies a mixed basis the same way).

    `grams` (E, k, k) or one (k, k) for all, optional: second moments S_i of each expert's inputs (calibration, or
    the data-free stand-ins of `mobe.quantize.proxy`). A' is then rounded by GPTQ on them in its own coordinates:
    over its rows with H = S_i where the inputs meet the rows of the fitted products (`inputs_on_rows`: down, or
    gate/up fitted transposed), else over its columns with H = Q_i S_i Q_i^T. The stored form is the same as without.
    `observer` fixes A's scales ("mse": the clip of each group's range with the least rounding error); the bases
    keep min-max scales at their 8 bits. `targets` (E, rows, cols), with `grams`: the original weights in the fitted
    orientation; A' is then first re-solved against them in the grams' metric (`resolve_to_targets`), so the
    rounding starts from the factors that are best on those inputs, not from the data-free fit.
    """
    stored: dict[str, StoredFactor] = {}
    shared: dict[str, Tensor] = {}
    if shared_bits is not None:
        for field in factors.shared_fields:
            tensor = getattr(factors, field)
            stored[field] = quantize_factor(tensor, shared_bits, group_size)
            shared[field] = stored[field].dequantize(tensor.dtype)
    orthonormal = factors.in_orthonormal_coordinates(**shared)
    if targets is not None and grams is not None:
        if inputs_on_rows is None:
            raise ValueError("targets need inputs_on_rows: on which side of the fitted products the inputs are")
        orthonormal = resolve_to_targets(orthonormal, targets, grams, inputs_on_rows)
    if grams is None or inputs_on_rows:
        stored["A"] = quantize_factor(
            orthonormal.A, bits, group_size, column_groups=True, hessian=grams, observer=observer
        )
    else:
        if inputs_on_rows is None:
            raise ValueError("grams need inputs_on_rows: on which side of the fitted products the inputs are")
        stored["A"] = _gptq_down_columns(orthonormal, grams, bits, group_size, observer)
    rounded = dataclasses.replace(orthonormal, A=stored["A"].dequantize(factors.A.dtype))
    return rounded, stored


def resolve_to_targets(
    orthonormal: MobeFactors | SlbfFactors,
    targets: Tensor,
    grams: Tensor,
    inputs_on_rows: bool,
    damping: float = DAMPING,
    chunk: int = 16,
) -> MobeFactors | SlbfFactors:
    """A' re-solved (orthonormal coordinates, Q_i fixed) to minimise each expert's output error against its original
    weights W_i on inputs with second moments S_i: inputs on the columns, A'_i = W_i S_i Q_i^T (Q_i S_i Q_i^T +
    lambda I)^-1 with GPTQ's damping lambda (a share of the mean diagonal); on the rows, the error is
    tr((W_i - A'_i Q_i)^T S_i (W_i - A'_i Q_i)), least for A'_i = W_i Q_i^T whatever S_i. Experts whose S_i is zero
    (no input seen) keep their A'. float64, `chunk` experts at a time (one chunk of W_i in float64 at most)."""
    A = orthonormal.A.clone()
    for start in range(0, orthonormal.num_experts, chunk):
        experts = torch.arange(start, min(start + chunk, orthonormal.num_experts))
        Q = orthonormal.row_bases(experts).double()
        W = targets[experts].double()
        if inputs_on_rows:
            A[experts] = (W @ Q.transpose(1, 2)).to(A.dtype)
            continue
        S = (grams if grams.dim() == 2 else grams[experts]).double().expand(len(experts), -1, -1)
        QS = Q @ S
        G = QS @ Q.transpose(1, 2)
        diag = G.diagonal(dim1=-2, dim2=-1)
        seen = diag.sum(-1) > 0
        diag.add_(damping * diag.mean(-1, keepdim=True))
        G[~seen] = torch.eye(G.shape[-1], dtype=G.dtype)  # solved, then not used
        solved = torch.linalg.solve(G, QS @ W.transpose(1, 2)).transpose(1, 2)
        A[experts[seen]] = solved[seen].to(A.dtype)
    return dataclasses.replace(orthonormal, A=A)


def _gptq_down_columns(
    orthonormal: MobeFactors | SlbfFactors, grams: Tensor, bits: int, group_size: int, observer: str
) -> StoredFactor:
    """A' (E, rows, r) rounded by GPTQ over its columns on H = Q S Q^T, with the scales of its column groups (one per
    `group_size` entries down each column, fixed from the unrounded A')."""
    A = orthonormal.A
    Q = orthonormal.row_bases().to(grams.dtype)
    scales = groupwise.group_scales(A.transpose(-2, -1), bits, group_size, A.dtype, observer)  # (E, r, rows/g)
    entry = scales.float().repeat_interleave(group_size, dim=-1)[..., : A.shape[-2]].transpose(-2, -1)
    values = gptq_round(A, Q @ grams @ Q.transpose(-2, -1), entry, bits)
    return StoredFactor(values.transpose(-2, -1).contiguous(), scales, bits, group_size, column_groups=True)


def weight_gram_hessian(factors: MobeFactors | SlbfFactors, inputs_on_rows: bool, chunk: int = 16) -> Tensor | None:
    """sum_e W_e^T W_e (k, k), float32, of the experts' products W_e (p, d) as `reconstruct` gives them, over their
    input side (`inputs_on_rows`: in the fitted orientation, as `quantize_mobe` takes it): the data-free stand-in
    for the inputs' second moments of gate and up (`proxy`). None where the inputs meet the rows of the unfitted
    products (down: each expert's own intermediate activations, `proxy.down_hessians`). `chunk` experts at a time,
    so no more than that many products are ever dense."""
    if inputs_on_rows != (factors.transposed == "1"):  # inputs on the rows of the (p, d) products: down
        return None
    spans = range(0, factors.num_experts, chunk)
    return input_gram(factors.reconstruct(torch.arange(s, min(s + chunk, factors.num_experts))) for s in spans).float()
