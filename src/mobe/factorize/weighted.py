"""Output-error weighting of a fit: minimise sum_i ||X_i (W_i - What_i)^T||^2 instead of sum_i ||W_i - What_i||^2.

With the Gram G_i = X_i^T X_i of the tokens routed to expert i, ||X_i D^T||^2 = tr(D G_i D^T) = ||D L_i||^2 for
G_i = L_i L_i^T (Cholesky). Each fit then works in whitened coordinates (as ASVD / SVD-LLM do for dense layers).

The stacks fitted are (E, p, d). For gate and up the tokens multiply W_i from the right (`side="right"`, L_i is
d x d). A down matrix is fitted as its transpose W'_i = D_i^T (p x d) and its inputs are the intermediate
activations H_i (n_i x p): ||H_i (D_i - Dhat_i)^T||^2 = ||L_i^T (W'_i - W'hat_i)||^2 (`side="left"`, L_i is p x p).

The metric used is a regularised version of G_i scaled by one constant per layer (see `OutputWeighting.from_gram`):
its mean diagonal is 1, so Grams that are all the same multiple of the identity reproduce the unweighted fit
exactly, and the losses stay on the scale of the weight error.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

SIDES = ("right", "left")


@dataclass
class OutputWeighting:
    """Per-expert metric M_i = L_i L_i^T of the output error of one (E, p, d) stack."""

    factor: Tensor  # (E, k, k) lower-triangular L_i, k = d ("right") or p ("left")
    side: str = "right"

    def __post_init__(self) -> None:
        if self.side not in SIDES:
            raise ValueError(f"side must be one of {SIDES}, got {self.side!r}")

    @classmethod
    def from_gram(
        cls,
        gram: Tensor,
        counts: Tensor,
        side: str = "right",
        damping: float = 0.01,
        prior_tokens: float | None = None,
    ) -> OutputWeighting:
        """Metric from the Grams G_i (E, k, k) of n_i routed tokens each: the layer's output error, regularised.

        M_i = G_i + damping * mean(diag G_i) * I + prior_tokens * c * I, with c the mean diagonal of x x^T over all
        the layer's tokens, and all M_i scaled by one constant so that their mean diagonal is 1. Experts keep their
        share of the tokens (an expert used twice as often counts twice), and one that saw few or no tokens falls
        back to the plain weight error, as if it had seen `prior_tokens` (default k) isotropic tokens.
        """
        k = gram.shape[-1]
        prior = float(k if prior_tokens is None else prior_tokens)
        G = gram.to(torch.float64)
        diag = G.diagonal(dim1=-2, dim2=-1).mean(-1)  # (E,)
        per_token = diag.sum() / counts.to(torch.float64).sum().clamp(min=1)
        if per_token <= 0:  # no tokens at all: the plain weight error
            return cls.identity(gram.shape[0], k, side)
        eye = torch.eye(k, dtype=torch.float64)
        M = G + (damping * diag + prior * per_token).reshape(-1, 1, 1) * eye
        M = M / M.diagonal(dim1=-2, dim2=-1).mean()
        return cls(torch.linalg.cholesky(M).float(), side)

    @classmethod
    def identity(cls, num_experts: int, size: int, side: str = "right") -> OutputWeighting:
        return cls(torch.eye(size).expand(num_experts, size, size).clone(), side)

    def to(self, device: torch.device | str) -> OutputWeighting:
        return OutputWeighting(self.factor.to(device), self.side)

    def apply(self, diff: Tensor, experts: Tensor | slice | None = None) -> Tensor:
        """D L_i (right) or L_i^T D (left) for a stack of differences D (n, p, d) of the given experts."""
        L = self.factor if experts is None else self.factor[experts]
        return torch.bmm(diff, L) if self.side == "right" else torch.bmm(L.transpose(1, 2), diff)

    def unwhiten(self, whitened: Tensor, experts: Tensor | slice | None = None) -> Tensor:
        """Inverse of `apply`: D from D L_i (right) or from L_i^T D (left)."""
        L = self.factor if experts is None else self.factor[experts]
        if self.side == "right":  # D = Y L^{-1}: solve X L = Y
            return torch.linalg.solve_triangular(L, whitened, upper=False, left=False)
        return torch.linalg.solve_triangular(L.transpose(1, 2), whitened, upper=True)

    def squared_error(self, weights: Tensor, approx: Tensor) -> float:
        return self.apply(weights.float() - approx.float()).double().pow(2).sum().item()


def output_error(gram: Tensor, weights: Tensor, approx: Tensor, side: str = "right") -> float:
    """Relative output error on the calibration tokens: sqrt(sum_i tr(D_i G_i D_i^T) / sum_i tr(W_i G_i W_i^T)).

    `gram` is the raw Gram (no damping, no normalisation); for `side="left"` (down matrices fitted as transpose)
    the tokens act from the left: tr(D_i^T G_i D_i).
    """
    G = gram.to(torch.float64)
    W, D = weights.to(torch.float64), weights.to(torch.float64) - approx.to(torch.float64)
    if side == "right":
        num = torch.einsum("epd,edf,epf->", D, G, D)
        den = torch.einsum("epd,edf,epf->", W, G, W)
    else:
        num = torch.einsum("epd,epq,eqd->", D, G, D)
        den = torch.einsum("epd,epq,eqd->", W, G, W)
    return (num / den).sqrt().item() if den > 0 else float("nan")


def whitened_low_rank(W: Tensor, weighting: OutputWeighting, rank: int) -> tuple[Tensor, Tensor]:
    """Best rank-k factors (left (n, p, k), right (n, k, d)) of each W_i in the metric of `weighting`.

    Eckart-Young in whitened space: the truncated SVD of W_i L_i (right) or L_i^T W_i (left), mapped back. Its
    weighted error is the tail of the whitened spectrum.
    """
    from .svd import low_rank

    left, right = low_rank(weighting.apply(W), rank)
    if weighting.side == "right":
        return left, weighting.unwhiten(right)
    return weighting.unwhiten(left), right


def init_svd_groups_weighted(
    weights: Tensor, weighting: OutputWeighting, num_bases: int, rank: int, groups: int, init_logit: float
) -> tuple[Tensor, Tensor, Tensor]:
    """MoBE's SVD-group initialisation (`init_svd_groups`) in the output metric.

    Left metric (down): each expert's rows are whitened on their own, L_i^T W_i, the group's stack is split by SVD
    as usual, and A_i = L_i^{-T} (U S)_i. Right metric (gate, up): the basis is shared by the group, so the group
    is whitened with the Cholesky factor of its mean metric, B_j = Vh L_g^{-1}, A_i = (U S)_i.
    """
    from .mobe import init_svd_groups, split_groups

    if weighting.side == "left":
        A, bases, logits = init_svd_groups(weighting.apply(weights), num_bases, rank, groups, init_logit)
        return weighting.unwhiten(A), bases, logits
    num_experts, p, d = weights.shape
    per_group, bases_per_group = num_experts // groups, num_bases // groups
    L = weighting.factor
    group_factor = torch.empty(num_experts, d, d, dtype=L.dtype, device=L.device)  # L_g of each expert's SVD group
    basis_factor = torch.empty(groups, bases_per_group, d, d, dtype=L.dtype, device=L.device)
    for g in range(groups):
        for j, members in enumerate(split_groups(per_group, bases_per_group)):
            experts = [g * per_group + i for i in members]
            M = (L[experts] @ L[experts].transpose(1, 2)).double().mean(0)
            Lg = torch.linalg.cholesky(M).to(L.dtype)
            group_factor[experts] = Lg
            basis_factor[g, j] = Lg
    A, bases, logits = init_svd_groups(torch.bmm(weights, group_factor), num_bases, rank, groups, init_logit)
    bases = torch.linalg.solve_triangular(basis_factor, bases, upper=False, left=False)
    return A, bases, logits
