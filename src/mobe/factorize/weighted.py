"""Output-error weighting of a fit: minimise sum_i ||X_i (W_i - What_i)^T||^2 instead of sum_i ||W_i - What_i||^2.

With the Gram G_i = X_i^T X_i of the tokens routed to expert i, ||X_i D^T||^2 = tr(D G_i D^T) = ||D L_i||^2 for any
L_i with L_i L_i^T = G_i. Each fit then works in whitened coordinates (as ASVD / SVD-LLM do for dense layers).

The stacks fitted are (E, p, d). For gate and up the tokens multiply W_i from the right (`side="right"`, L_i is
d x d). A down matrix is fitted as its transpose W'_i = D_i^T (p x d) and its inputs are the intermediate
activations H_i (n_i x p): ||H_i (D_i - Dhat_i)^T||^2 = ||L_i^T (W'_i - W'hat_i)||^2 (`side="left"`, L_i is p x p).

The metric used is a regularised version of G_i scaled by one constant per layer (see `OutputWeighting.from_factor`):
its mean diagonal is 1, so Grams that are all the same multiple of the identity reproduce the unweighted fit, and
the losses stay on the scale of the weight error. The Grams come as factors F_i (k_i x d, k_i = min(n_i, d),
`mobe.factorize.gram`) and L_i is never formed: it is the symmetric square root

    L_i = c_i I + V_i diag(s_i - c_i) V_i^T        (V_i: d x k_i, orthonormal; the right singular vectors of F_i)

so a layer's metric costs sum_i k_i * d numbers instead of E * d^2, and applying it to a p x d matrix costs
O(p d k_i) instead of O(p d^2). An expert that saw at least d tokens (k_i = d) keeps L_i as one dense symmetric
d x d matrix instead (the same numbers, one matmul).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor
from torch.nn.utils.rnn import pad_sequence

from .gram import GramFactor
from .primitives import init_svd_groups, low_rank, split_groups

SIDES = ("right", "left")
CHUNK_ELEMENTS = 1 << 26  # padded directions held at once when a metric is applied to many experts


def _spectrum(rows: Tensor) -> tuple[Tensor, Tensor]:
    """(sigma^2, V^T) of rows (k, d) in float64: rows^T rows = V diag(sigma^2) V^T, with min(k, d) directions."""
    k, d = rows.shape
    if k == 0:
        return rows.new_zeros(0), rows.new_zeros(0, d)
    if k < d:
        _, S, Vh = torch.linalg.svd(rows, full_matrices=False)
        return S.square(), Vh
    w, V = torch.linalg.eigh(rows.T @ rows)
    return w.clamp(min=0), V.T


def metric_loss_bytes(widest: int, size: int, rows: int, cols: int) -> int:
    """What applying a metric whose widest expert has `widest` directions of `size` numbers (`size` for a dense L_i)
    to one expert's (rows, cols) matrix inside a loss adds to a chunk's float32 activations: the directions padded
    to the widest, kept for the backward, and four (rows, cols) stacks (the scaled copy and the result, and their
    gradients)."""
    return 4 * (widest * size + 4 * rows * cols)


@dataclass
class OutputWeighting:
    """Per-expert metric M_i = L_i^2 of the output error of one (E, p, d) stack; L_i = c_i I + V_i diag(s_i - c_i) V_i^T
    is held as V_i (rows of `vectors`), s_i (`scales`) and c_i (`iso`)."""

    vectors: list[Tensor]  # per expert (k_i, size): the rows of V_i^T, orthonormal
    scales: list[Tensor]  # per expert (k_i,): s_i, L_i's eigenvalues along those directions
    iso: Tensor  # (E,): c_i, L_i's eigenvalue on the rest of the space
    side: str = "right"
    square: list[Tensor | None] = field(default_factory=list)  # per expert: L_i itself (size, size), or None

    def __post_init__(self) -> None:
        if self.side not in SIDES:
            raise ValueError(f"side must be one of {SIDES}, got {self.side!r}")
        self.square = self.square or [None] * len(self.vectors)
        if not len(self.vectors) == len(self.scales) == self.iso.numel() == len(self.square):
            raise ValueError("vectors, scales, iso and square must have one entry per expert")
        self._sizes = [v.shape[0] if L is None else 0 for v, L in zip(self.vectors, self.square, strict=True)]

    @classmethod
    def _build(cls, spectra: list[tuple[Tensor, Tensor, Tensor]], side: str) -> OutputWeighting:
        """From (s^2, V^T, c^2) per expert, float64: L = c I + V^T diag(s - c) V, dense where V spans the space."""
        vectors, scales, iso, square = [], [], [], []
        for s2, Vt, c2 in spectra:
            if Vt.shape[0] == Vt.shape[1]:
                square.append(((Vt.T * s2.sqrt()) @ Vt).float())
                vectors.append(Vt.new_zeros(0, Vt.shape[1]).float())
                scales.append(s2.new_zeros(0).float())
                iso.append(0.0)
            else:
                square.append(None)
                vectors.append(Vt.float())
                scales.append(s2.sqrt().float())
                iso.append(c2.sqrt().item())
        return cls(vectors, scales, torch.tensor(iso), side, square)

    @property
    def num_experts(self) -> int:
        return self.iso.numel()

    @property
    def size(self) -> int:
        return self.vectors[0].shape[1]

    @property
    def nbytes(self) -> int:
        tensors = [*self.vectors, *self.scales, self.iso, *(L for L in self.square if L is not None)]
        return sum(t.numel() * t.element_size() for t in tensors)

    @classmethod
    def from_factor(
        cls,
        factor: GramFactor,
        side: str = "right",
        damping: float = 0.01,
        prior_tokens: float | None = None,
    ) -> OutputWeighting:
        """Metric from the factored Grams G_i = F_i^T F_i (n_i tokens each): the layer's output error, regularised.

        M_i = G_i + damping * mean(diag G_i) * I + prior_tokens * c * I, with c the mean diagonal of x x^T over all
        the layer's tokens, and all M_i scaled by one constant so that their mean diagonal is 1. Experts keep their
        share of the tokens (an expert used twice as often counts twice), and one that saw few or no tokens falls
        back to the plain weight error, as if it had seen `prior_tokens` (default k) isotropic tokens.
        """
        k = factor.dim
        prior = float(k if prior_tokens is None else prior_tokens)
        diag = factor.squared_norms() / k  # (E,) mean diagonal of each G_i, float64
        per_token = diag.sum() / factor.counts.to(torch.float64).sum().clamp(min=1)
        if per_token <= 0:  # no tokens at all: the plain weight error
            return cls.identity(factor.num_experts, k, side)
        lam = damping * diag + prior * per_token
        norm = (diag + lam).mean()
        spectra = []
        for e in range(factor.num_experts):
            sigma2, Vt = _spectrum(factor.factor(e).to(torch.float64))
            spectra.append(((sigma2 + lam[e]) / norm, Vt, lam[e] / norm))
            smallest = min(sigma2.min().item() if sigma2.numel() else 0.0, 0.0 if Vt.shape[0] < k else float("inf"))
            if smallest + lam[e] <= 0:
                raise ValueError(
                    f"the output metric of expert {e} is singular ({int(factor.counts[e])} tokens for {k} "
                    "dimensions, no damping): use damping > 0 or prior_tokens > 0"
                )
        return cls._build(spectra, side)

    @classmethod
    def identity(cls, num_experts: int, size: int, side: str = "right") -> OutputWeighting:
        return cls([torch.zeros(0, size)] * num_experts, [torch.zeros(0)] * num_experts, torch.ones(num_experts), side)

    def loss_bytes(self, rows: int, cols: int) -> int:
        """What applying the metric to one expert's (rows, cols) matrix inside a loss adds to a chunk's float32
        activations (`metric_loss_bytes`, with this metric's widest expert)."""
        widest = max((self._width(i) for i in range(self.num_experts)), default=0)
        return metric_loss_bytes(widest, self.size, rows, cols)

    def to(self, device: torch.device | str) -> OutputWeighting:
        return OutputWeighting(
            [v.to(device) for v in self.vectors],
            [s.to(device) for s in self.scales],
            self.iso.to(device),
            self.side,
            [None if L is None else L.to(device) for L in self.square],
        )

    def _select(self, experts: Tensor | slice | list[int] | None) -> list[int]:
        if experts is None:
            return list(range(self.num_experts))
        if isinstance(experts, slice):
            return list(range(self.num_experts))[experts]
        if isinstance(experts, Tensor):
            return experts.tolist()
        return list(experts)

    def _transform(self, x: Tensor, experts: Tensor | slice | list[int] | None, inverse: bool) -> Tensor:
        idx = self._select(experts)
        if len(idx) == 1:  # one metric for every matrix of x (a group's mean metric)
            return self._block(x, idx, inverse)
        if len(idx) != x.shape[0]:
            raise ValueError(f"{x.shape[0]} matrices for {len(idx)} experts")
        parts, start = [], 0
        while start < len(idx):  # bounded padding: never all experts' directions at once
            end, widest = start + 1, self._width(idx[start])
            while end < len(idx):
                widest = max(widest, self._width(idx[end]))
                if (end + 1 - start) * max(widest, 1) * self.size > CHUNK_ELEMENTS:
                    break
                end += 1
            parts.append(self._block(x[start:end], idx[start:end], inverse))
            start = end
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def _width(self, expert: int) -> int:
        return self.size if self.square[expert] is not None else self._sizes[expert]

    def _block(self, x: Tensor, idx: list[int], inverse: bool) -> Tensor:
        """x L (right) or L x (left) for each expert of `idx`, or with L^{-1}; dense and low-rank experts apart."""
        dense = [j for j, i in enumerate(idx) if self.square[i] is not None]
        if len(dense) == len(idx):
            return self._dense_block(x, idx, inverse)
        if not dense:
            return self._low_rank_block(x, idx, inverse)
        low = [j for j, i in enumerate(idx) if self.square[i] is None]
        parts = torch.cat(
            [
                self._dense_block(x[dense], [idx[j] for j in dense], inverse),
                self._low_rank_block(x[low], [idx[j] for j in low], inverse),
            ]
        )
        return parts[torch.tensor(dense + low, device=x.device).argsort()]

    def _dense_block(self, x: Tensor, idx: list[int], inverse: bool) -> Tensor:
        L = torch.stack([self.square[i] for i in idx]).to(x.dtype)  # symmetric positive definite
        if inverse:  # by Cholesky: LU (linalg.solve) fails in MKL on some of these batches ("pivots ... >= 1")
            chol = torch.linalg.cholesky(L)
            if self.side == "left":
                return torch.cholesky_solve(x, chol)
            return torch.cholesky_solve(x.mT, chol).mT  # x L^-1 = (L^-1 x^T)^T, L symmetric
        return x @ L if self.side == "right" else L @ x

    def _low_rank_block(self, x: Tensor, idx: list[int], inverse: bool) -> Tensor:
        """L = c I + V^T diag(s - c) V (or its inverse, c^-1 I + V^T diag(1/s - c^-1) V)."""
        V = pad_sequence([self.vectors[i] for i in idx], batch_first=True).to(x.dtype)  # (n, K, size)
        s = pad_sequence([self.scales[i] for i in idx], batch_first=True, padding_value=1.0).to(x.dtype)
        sizes = torch.tensor([self._sizes[i] for i in idx], device=s.device)
        mask = torch.arange(s.shape[1], device=s.device) < sizes[:, None]
        c = self.iso[torch.tensor(idx, device=self.iso.device)].to(x.dtype)
        if inverse:  # c = 0 only where V spans the whole space (checked when built)
            c = torch.where(c > 0, 1 / c.clamp(min=torch.finfo(c.dtype).tiny), torch.zeros_like(c))
            coeff = (1 / s - c[:, None]) * mask
        else:
            coeff = (s - c[:, None]) * mask
        V = V.expand(x.shape[0], *V.shape[1:])  # one metric for many matrices: a view
        if self.side == "right":  # baddbmm: one (n, p, d) result besides c x
            return torch.baddbmm(c[:, None, None] * x, (x @ V.mT) * coeff[:, None, :], V)
        return torch.baddbmm(c[:, None, None] * x, V.mT, coeff[:, :, None] * (V @ x))

    def transposed(self) -> OutputWeighting:
        """The same metric for the transposed stack: ||D L_i|| = ||L_i^T D^T|| (L_i symmetric), right and left swap."""
        return OutputWeighting(
            self.vectors, self.scales, self.iso, "left" if self.side == "right" else "right", self.square
        )

    def apply(self, diff: Tensor, experts: Tensor | slice | list[int] | None = None) -> Tensor:
        """D L_i (right) or L_i^T D (left) for a stack of differences D (n, p, d) of the given experts."""
        return self._transform(diff, experts, inverse=False)

    def unwhiten(self, whitened: Tensor, experts: Tensor | slice | list[int] | None = None) -> Tensor:
        """Inverse of `apply`: D from D L_i (right) or from L_i^T D (left)."""
        return self._transform(whitened, experts, inverse=True)

    def mean(self, experts: list[int]) -> OutputWeighting:
        """The mean metric of `experts`, (1/n) sum_i M_i, as a one-expert weighting (a group's shared whitening).

        M_i = c_i^2 I + R_i^T R_i with R_i = diag(sqrt(s_i^2 - c_i^2)) V_i, or R_i = L_i (c_i = 0) for a dense L_i.
        """
        iso2 = torch.stack([self.iso[i].double().square() for i in experts]).mean()
        rows = []
        for i in experts:
            if self.square[i] is not None:
                rows.append(self.square[i].double())
            else:
                gap = (self.scales[i].double().square() - self.iso[i].double().square()).clamp(min=0)
                rows.append(gap.sqrt()[:, None] * self.vectors[i].double())
        sigma2, Vt = _spectrum(torch.cat(rows) / len(experts) ** 0.5)
        return OutputWeighting._build([(sigma2 + iso2, Vt, iso2)], self.side)

    def dense(self, experts: Tensor | slice | list[int] | None = None) -> Tensor:
        """L_i as dense (n, size, size) matrices, for checks and small layers."""
        idx = self._select(experts)
        eye = torch.eye(self.size, device=self.iso.device).expand(len(idx), self.size, self.size)
        return self._block(eye.contiguous(), idx, inverse=False)

    def squared_error(self, weights: Tensor, approx: Tensor) -> float:
        return self.apply(weights.float() - approx.float()).double().pow(2).sum().item()


def output_error(factor: GramFactor, weights: Tensor, approx: Tensor, side: str = "right") -> float:
    """Relative output error on the calibration tokens: sqrt(sum_i tr(D_i G_i D_i^T) / sum_i tr(W_i G_i W_i^T)).

    `factor` holds the raw Grams (no damping, no normalisation) as G_i = F_i^T F_i: for `side="right"` the sums are
    ||D_i F_i^T||^2; for `side="left"` (down matrices fitted as transpose, tokens acting from the left)
    tr(D_i^T G_i D_i) = ||F_i D_i||^2.
    """
    num = den = 0.0
    for e in range(weights.shape[0]):
        F = factor.factor(e).to(torch.float64)
        if F.shape[0] == 0:
            continue
        W = weights[e].to(torch.float64)
        D = W - approx[e].to(torch.float64)
        D, W = (D @ F.T, W @ F.T) if side == "right" else (F @ D, F @ W)
        num += D.pow(2).sum().item()
        den += W.pow(2).sum().item()
    return (num / den) ** 0.5 if den > 0 else float("nan")


def whitened_low_rank(W: Tensor, weighting: OutputWeighting, rank: int) -> tuple[Tensor, Tensor]:
    """Best rank-k factors (left (n, p, k), right (n, k, d)) of each W_i in the metric of `weighting`.

    Eckart-Young in whitened space: the truncated SVD of W_i L_i (right) or L_i^T W_i (left), mapped back. Its
    weighted error is the tail of the whitened spectrum.
    """
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
    is whitened with the square root of its mean metric, B_j = Vh L_g^{-1}, A_i = (U S)_i.
    """
    if weighting.side == "left":
        A, bases, logits = init_svd_groups(weighting.apply(weights), num_bases, rank, groups, init_logit)
        return weighting.unwhiten(A), bases, logits
    num_experts, p, d = weights.shape
    per_group, bases_per_group = num_experts // groups, num_bases // groups
    whitened = torch.empty_like(weights)
    group_metric: dict[tuple[int, int], OutputWeighting] = {}  # the mean metric of each SVD group
    for g in range(groups):
        for j, members in enumerate(split_groups(per_group, bases_per_group)):
            experts = [g * per_group + i for i in members]
            group_metric[g, j] = weighting.mean(experts).to(weights.device)
            whitened[experts] = group_metric[g, j].apply(weights[experts])
    A, bases, logits = init_svd_groups(whitened, num_bases, rank, groups, init_logit)
    for (g, j), metric in group_metric.items():
        bases[g, j] = metric.unwhiten(bases[g, j][None])[0]
    return A, bases, logits
