"""GPTQ: round a weight matrix column by column, spreading each column's rounding error over the columns not yet
rounded, so that the output error on the inputs that `hessian` summarises is small, not the weight error.

For W (rows, cols) applied to inputs x (cols), the loss of a rounded copy Q is tr((W - Q) H (W - Q)^T) with
H = E[x x^T]. Frantar et al. (arXiv 2210.17323) round one column j at a time and move the rest of the row by
-(w_j - q_j) / [H^-1]_jj * [H^-1]_{j, j+1:}, the optimal correction given the columns still free; the inverse
Hessians of the shrinking free sets are the rows of the upper Cholesky factor of H^-1, and the updates are
applied lazily, `block_size` columns at a time. Pure tensor maths (batched over leading dimensions); where the
Hessian comes from is the caller's business: X^T X of calibration inputs for a dense weight, M_i M_i^T for a MoBE
factor A_i whose product with the mixed basis M_i is what matters.

The scales are fixed before rounding from the unrounded weight (min-max, symmetric, one per `group_size` columns
of a row, `groupwise.group_scales`), as llm-compressor's GPTQModifier fixes them with its observer, so the result
stores exactly like a round-to-nearest one.

Against llm-compressor 0.14 (`modifiers/gptq/gptq_quantize.py`): the same algorithm with the same defaults
(memoryless min-max observer on the original weight, scales fixed up front; damping 0.01 of the mean diagonal;
blocks of 128; the error of a column against its read-back value in the scales' dtype; dead columns zeroed), and
`act_order=True` is its default `actorder="static"` (a per-matrix column order; the group scales stay put).
Differences: float64 working precision here (float32 there; on a stored expert they round identically, see
tests/quantize/test_gptq_reference.py), no fallback to round-to-nearest when the damped Hessian is not positive
definite (Cholesky raises instead), and `actorder="weight"` / "group" are not offered.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .groupwise import BITS, group_scales

DAMPING = 0.01  # of the mean diagonal of H, added to its diagonal (the GPTQ paper's and llm-compressor's default)
BLOCK_SIZE = 128


def inverse_cholesky(hessian: Tensor, damping: float = DAMPING) -> Tensor:
    """Upper Cholesky factor of (H + damping * mean(diag H) I)^-1, batched; float64 for the solve's stability."""
    H = hessian.double().clone()
    diag = H.diagonal(dim1=-2, dim2=-1)
    diag.add_(damping * diag.mean(-1, keepdim=True).clamp_min(1e-30))
    lower = torch.linalg.cholesky(H)
    return torch.linalg.cholesky(torch.cholesky_inverse(lower), upper=True)


def gptq_round(
    weight: Tensor,
    hessian: Tensor,
    scales: Tensor,
    bits: int,
    *,
    damping: float = DAMPING,
    block_size: int = BLOCK_SIZE,
    order: Tensor | None = None,
) -> Tensor:
    """Integer values (..., rows, cols) in [-2^(b-1), 2^(b-1) - 1] of `weight` rounded by GPTQ on `hessian`
    (..., cols, cols), with the per-entry `scales` (broadcastable to `weight`).

    Each rounded column's error is taken against the weight as it is read back, q * s in the scales' dtype (what
    `groupwise.dequantize` and compressed-tensors' decompression give: bf16 scales read back a bf16 product), as
    llm-compressor's GPTQ takes it; with that, float64 here and its float32 round alike (tests/quantize/
    test_gptq_reference.py).

    Columns whose Hessian diagonal is zero (inputs never seen) are rounded to 0. `order` (cols,) or (..., cols), one
    per matrix, permutes the columns before rounding (act-order: the columns with the largest diagonal first) and
    back after.
    """
    if bits not in BITS:
        raise ValueError(f"bits must be one of {BITS}, got {bits}")
    W = weight.double().clone()
    H = hessian.double().clone()
    read = scales.dtype  # the dtype the stored weight is read back in
    S = torch.broadcast_to(scales.double(), W.shape).clone()
    if order is not None:
        W, S = _take_columns(W, order), _take_columns(S, order)
        H = _take_columns(torch.take_along_dim(H, order.unsqueeze(-1), dim=-2), order)
    diag = H.diagonal(dim1=-2, dim2=-1)
    dead = diag == 0
    diag.masked_fill_(dead, 1.0)
    W.masked_fill_(dead.unsqueeze(-2), 0.0)
    Hinv = inverse_cholesky(H, damping)
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    cols = W.shape[-1]
    Q = torch.empty_like(W)
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        block = W[..., i1:i2].clone()
        errors = torch.zeros_like(block)
        Hinv1 = Hinv[..., i1:i2, i1:i2]
        for i in range(i2 - i1):
            w, s = block[..., i], S[..., i1 + i]
            q = torch.clamp(torch.round((w.float() / s.float()).double()), qmin, qmax)  # float32 ratio: ties as RTN
            Q[..., i1 + i] = q
            err = (w - (q.to(read) * s.to(read)).double()) / Hinv1[..., i, i].unsqueeze(-1)
            block[..., i:] -= err.unsqueeze(-1) * Hinv1[..., i, i:].unsqueeze(-2)
            errors[..., i] = err
        W[..., i2:] -= errors @ Hinv[..., i1:i2, i2:]
    if order is not None:
        Q = _take_columns(Q, torch.argsort(order, dim=-1))
    return Q.to(torch.int8)


def _take_columns(x: Tensor, order: Tensor) -> Tensor:
    """x (..., n, cols) with its columns in `order` ((cols,) or one order per leading index)."""
    return torch.take_along_dim(x, order.unsqueeze(-2), dim=-1)


def gptq_quantize(
    weight: Tensor,
    hessian: Tensor,
    bits: int,
    group_size: int,
    *,
    damping: float = DAMPING,
    block_size: int = BLOCK_SIZE,
    act_order: bool = False,
    dtype: torch.dtype | None = None,
    observer: str = "minmax",
) -> tuple[Tensor, Tensor]:
    """(int8 values (..., rows, cols), scales (..., rows, ceil(cols / group_size)) in `dtype`), stored like
    `groupwise.quantize`'s and read back by `groupwise.dequantize`; `hessian` is (cols, cols) or batched.

    With `act_order`, each matrix's columns are rounded in the order of its Hessian's decreasing diagonal
    (llm-compressor's `actorder="static"`, its default); the scales stay those of the columns' own groups.
    `observer`: how the scales are fixed before rounding (`groupwise.group_scales`: "minmax" or "mse").
    """
    scales = group_scales(weight, bits, group_size, dtype, observer)
    entry_scales = scales.repeat_interleave(group_size, dim=-1)[..., : weight.shape[-1]]
    order = None
    if act_order:
        order = torch.argsort(hessian.diagonal(dim1=-2, dim2=-1), dim=-1, descending=True)
    q = gptq_round(weight, hessian, entry_scales, bits, damping=damping, block_size=block_size, order=order)
    return q, scales


def output_error(weight: Tensor, rounded: Tensor, hessian: Tensor) -> Tensor:
    """tr((W - Q) H (W - Q)^T) per leading index: the loss GPTQ minimises."""
    diff = (weight - rounded).double()
    return ((diff @ hessian.double()) * diff).sum((-2, -1))
