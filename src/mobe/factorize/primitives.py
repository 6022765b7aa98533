"""Pure tensor primitives shared by the factorisations: grouping, SVD starts, the mixing of bases, chunking.

A leaf module: it imports torch only, so every method (and the output weighting) can build on it without an
import circle.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch import Tensor

ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "tanh": torch.tanh,
    "silu": torch.nn.functional.silu,
    "none": lambda x: x,
}


def activation_fn(name: str) -> Callable[[Tensor], Tensor]:
    if name not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {name!r}")
    return ACTIVATIONS[name]


def split_groups(num_items: int, num_parts: int) -> list[range]:
    """Contiguous, near-equal split of range(num_items) into num_parts ranges (sizes differ by <= 1)."""
    bounds = [i * num_items // num_parts for i in range(num_parts + 1)]
    return [range(bounds[i], bounds[i + 1]) for i in range(num_parts)]


def low_rank(matrices: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """Best rank-k factors (U S, Vh) of each matrix in a (n, p, d) stack, zero-padded if k > min(p, d)."""
    U, S, Vh = torch.linalg.svd(matrices, full_matrices=False)
    k = min(rank, S.shape[-1])
    left = matrices.new_zeros(*matrices.shape[:-1], rank)
    right = matrices.new_zeros(matrices.shape[0], rank, matrices.shape[-1])
    left[..., :k] = U[..., :k] * S[:, None, :k]
    right[:, :k] = Vh[:, :k]
    return left, right


def init_svd_groups(
    weights: Tensor, num_bases: int, rank: int, groups: int, init_logit: float
) -> tuple[Tensor, Tensor, Tensor]:
    """The paper's initialisation: experts split into m contiguous groups, one truncated SVD per group.

    The top-r right singular vectors of a group's vertically stacked experts become its basis B_j;
    each expert's rows of U*S become A_i; its logits are `init_logit` on its own basis, 0 elsewhere.
    Returns (A, bases, logits) for `weights` of shape (E, p, d).
    """
    num_experts, p, d = weights.shape
    per_group, bases_per_group = num_experts // groups, num_bases // groups
    A = weights.new_zeros(num_experts, p, rank)
    bases = weights.new_zeros(groups, bases_per_group, rank, d)
    logits = weights.new_zeros(num_experts, bases_per_group)
    for g in range(groups):
        for j, members in enumerate(split_groups(per_group, bases_per_group)):
            experts = [g * per_group + i for i in members]
            stacked = weights[experts].reshape(len(experts) * p, d)
            U, S, Vh = torch.linalg.svd(stacked, full_matrices=False)
            k = min(rank, S.numel())
            bases[g, j, :k] = Vh[:k]
            A[experts, :, :k] = (U[:, :k] * S[:k]).reshape(len(experts), p, k)
            logits[experts, j] = init_logit
    return A, bases, logits


def mix(coef: Tensor, bases: Tensor) -> Tensor:
    """sum_j coef_ij B_j for each row i of `coef` (n, m), over one group's bases (m, r, d): (n, r, d), no activation."""
    return (coef @ bases.reshape(bases.shape[0], -1)).view(coef.shape[0], *bases.shape[1:])


def mix_bases(coef: Tensor, bases: Tensor, group_of: Tensor, act: Callable[[Tensor], Tensor]) -> Tensor:
    """act(coef_i @ bases[group_of[i]]) for each row i, as one matmul per group (never an (n, m, r, d) copy)."""
    if bases.shape[0] == 1:  # the common case: one matmul, no group bookkeeping (it dominates decoding on small layers)
        return act(mix(coef, bases[0]))
    mixed = coef.new_empty(coef.shape[0], *bases.shape[2:])
    for g in group_of.unique().tolist():
        rows = group_of == g
        mixed[rows] = mix(coef[rows], bases[g])
    return act(mixed)


def softmax_mix(bases: Tensor, logits: Tensor, act: Callable[[Tensor], Tensor]) -> Tensor:
    """act(softmax(logits_i) @ bases) for experts of one group: (n, r, d); bases is (m/g, r, d)."""
    return act(mix(torch.softmax(logits, dim=-1), bases))


def expert_chunks(num_experts: int, groups: int, chunk: int) -> Iterator[tuple[int, slice]]:
    """(group, experts) in contiguous chunks of at most `chunk` experts that never straddle an expert group.

    Slices, not index tensors: a slice is a view, so neither the forward nor the backward copies the stack.
    """
    per_group = num_experts // groups
    for g in range(groups):
        for start in range(g * per_group, (g + 1) * per_group, chunk):
            yield g, slice(start, min(start + chunk, (g + 1) * per_group))


# glibc's malloc serves an allocation from its heap below its mmap threshold, which it raises (up to this, on 64-bit
# systems: DEFAULT_MMAP_THRESHOLD_MAX) to the size of each mmapped block freed; the heap keeps freed chunks resident
MMAP_THRESHOLD_MAX = 32 * 2**20


def chunk_bytes(rank: int, p: int, d: int) -> int:
    """float32 activations of one expert in a gradient-accumulation chunk (what `auto_chunk` budgets)."""
    return 4 * (3 * rank * d + 2 * p * d)


def auto_chunk(rank: int, p: int, d: int, budget_bytes: int = 1 << 30) -> int:
    """Experts per gradient-accumulation chunk so that a chunk's float32 activations stay near `budget_bytes`."""
    return max(1, budget_bytes // chunk_bytes(rank, p, d))


def orthonormal_rows(mixed: Tensor) -> Tensor:
    """Q_i with orthonormal rows spanning the rows of each M_i (n, r, d), r <= d: M_i^T = Q_i^T R_i with diag R_i > 0,
    which makes Q_i unique for a full-rank M_i (so any device computes the same basis). Computed in at least float32
    (Householder QR: accurate to about cond(M_i) times the unit roundoff), returned in M's dtype."""
    work = mixed.to(torch.promote_types(mixed.dtype, torch.float32)).transpose(-2, -1)
    Q, R = torch.linalg.qr(work)
    signs = torch.sign(R.diagonal(dim1=-2, dim2=-1))
    signs = torch.where(signs == 0, torch.ones_like(signs), signs)
    return (Q * signs.unsqueeze(-2)).transpose(-2, -1).to(mixed.dtype)


def coordinates_in(A: Tensor, rows: Tensor, new_rows: Tensor) -> Tensor:
    """A_i's products A_i R_i expressed in orthonormal rows Q_i (n, r, c): A_i R_i Q_i^T without forming A_i R_i,
    in float64, returned in A's dtype (exact where Q_i spans R_i's rows; the least-squares coordinates otherwise)."""
    return (A.double() @ (rows.double() @ new_rows.double().transpose(-2, -1))).to(A.dtype)
