"""Per-expert Gram matrices G_i = X_i^T X_i kept as a factor F_i (F_i^T F_i = G_i) of min(n_i, dim) rows.

A d x d Gram per routed expert is 105 GB in float64 for one DeepSeek-V3 layer (256 experts, d = 7168), while a
calibration run routes a few hundred to a few thousand tokens to each expert. `GramFactor` keeps, for expert i:

- the rows X_i themselves while it has seen fewer than `dim` of them (in their own dtype: an exact copy);
- from the `dim`-th row on, the R factor (dim x dim, float64) of a QR of all rows seen: R^T R = X_i^T X_i. New rows
  are buffered and folded in by a QR of [R; rows] once `dim // 2` of them are waiting.

So an expert costs min(n_i, dim) * dim numbers instead of dim^2, every consumer gets G_i exactly (to float64
rounding) through `gram`, and an output error ||(W_i - What_i) X_i^T||^2 is ||(W_i - What_i) F_i^T||^2.
"""

from __future__ import annotations

import torch
from torch import Tensor


class GramFactor:
    """Factored Grams of `num_experts` experts whose rows have `dim` columns; see the module docstring."""

    def __init__(self, num_experts: int, dim: int):
        if num_experts < 0 or dim < 1:
            raise ValueError(f"GramFactor needs num_experts >= 0 and dim >= 1, got {num_experts}, {dim}")
        self.dim = dim
        self.counts = torch.zeros(num_experts, dtype=torch.int64)  # n_i: rows seen
        self._r: list[Tensor | None] = [None] * num_experts  # (dim, dim) float64 once n_i >= dim
        self._rows: list[list[Tensor]] = [[] for _ in range(num_experts)]  # rows not folded into R (yet)

    @property
    def num_experts(self) -> int:
        return self.counts.numel()

    def add(self, expert: int, rows: Tensor) -> None:
        """Account for `rows` (n, dim) routed to `expert`."""
        if rows.ndim != 2 or rows.shape[1] != self.dim:
            raise ValueError(f"rows must be (n, {self.dim}), got {tuple(rows.shape)}")
        if not rows.is_floating_point():
            raise ValueError(f"rows must be floating point, got {rows.dtype}")
        if rows.shape[0] == 0:
            return
        self._rows[expert].append(rows.detach().cpu())
        self.counts[expert] += rows.shape[0]
        waiting = sum(r.shape[0] for r in self._rows[expert])
        if self._r[expert] is None and self.counts[expert] >= self.dim:
            self._fold(expert)
        elif self._r[expert] is not None and waiting >= max(1, self.dim // 2):
            self._fold(expert)
        elif len(self._rows[expert]) > 1 and 2 * self._rows[expert][0].shape[0] <= waiting:
            self._merge(expert)  # blocks merged as they double: few blocks, O(n log n) copying

    def _merge(self, expert: int) -> None:
        rows = self._rows[expert]
        dtype = rows[0].dtype
        for r in rows[1:]:
            dtype = torch.promote_types(dtype, r.dtype)
        self._rows[expert] = [torch.cat([r.to(dtype) for r in rows])]

    def _fold(self, expert: int) -> None:
        """R <- R factor of [R; waiting rows] (float64); the waiting rows are freed."""
        parts = [r.to(torch.float64) for r in self._rows[expert]]
        if self._r[expert] is not None:
            parts.insert(0, self._r[expert])
        self._r[expert] = torch.linalg.qr(torch.cat(parts), mode="r").R
        self._rows[expert] = []

    def factor(self, expert: int) -> Tensor:
        """F_i (k_i, dim), k_i = min(n_i, dim), with F_i^T F_i = G_i: the rows themselves or R (float64)."""
        if self._r[expert] is not None and self._rows[expert]:
            self._fold(expert)
        if self._r[expert] is not None:
            return self._r[expert]
        if len(self._rows[expert]) > 1:
            self._merge(expert)
        return self._rows[expert][0] if self._rows[expert] else torch.zeros(0, self.dim)

    def compact(self) -> GramFactor:
        """Fold every expert's waiting rows into one tensor (its factor); returns self."""
        for e in range(self.num_experts):
            self.factor(e)
        return self

    def gram(self, experts: list[int] | None = None) -> Tensor:
        """The dense Grams (n, dim, dim) in float64, for checks and small layers (dim^2 numbers per expert)."""
        experts = list(range(self.num_experts)) if experts is None else experts
        out = torch.empty(len(experts), self.dim, self.dim, dtype=torch.float64)
        for j, e in enumerate(experts):
            F = self.factor(e).to(torch.float64)
            out[j] = F.T @ F
        return out

    def squared_norms(self) -> Tensor:
        """tr(G_i) = ||F_i||_F^2 per expert (float64)."""
        return torch.stack([self.factor(e).to(torch.float64).pow(2).sum() for e in range(self.num_experts)])

    @property
    def nbytes(self) -> int:
        """Bytes held now, counts included."""
        held = sum(t.numel() * t.element_size() for rows in self._rows for t in rows)
        held += sum(r.numel() * r.element_size() for r in self._r if r is not None)
        return held + self.counts.numel() * self.counts.element_size()

    def tensors(self) -> dict[str, Tensor]:
        """As plain tensors, without copying them: `counts` and one factor per expert under its index ("0", "1", ...):
        float32 rows while n_i < dim, the float64 R factor from then on."""
        return {"counts": self.counts, **{str(e): self.factor(e) for e in range(self.num_experts)}}

    @classmethod
    def from_tensors(cls, tensors: dict[str, Tensor]) -> GramFactor:
        counts = tensors["counts"]
        factors = [tensors[str(e)] for e in range(counts.numel())]
        out = cls(counts.numel(), factors[0].shape[1] if factors else 1)
        out.counts = counts.to(torch.int64).clone()
        for e, F in enumerate(factors):
            n = int(counts[e])
            if F.ndim != 2 or F.shape != (min(n, out.dim), out.dim):
                raise ValueError(
                    f"factor of expert {e} has shape {tuple(F.shape)}, expected {(min(n, out.dim), out.dim)} for "
                    f"{n} routed tokens"
                )
            if n >= out.dim:
                out._r[e] = F.to(torch.float64)
            elif n:
                out._rows[e] = [F]
        return out

    @classmethod
    def from_gram(cls, gram: Tensor, counts: Tensor) -> GramFactor:
        """Factors of given Grams (E, dim, dim): F_i = sqrt(w) V^T from the eigendecomposition G_i = V diag(w) V^T.

        For Grams saved by an older mobe; an expert with fewer than dim tokens keeps its n_i largest directions
        (a Gram of n_i tokens has rank <= n_i, so nothing is lost beyond rounding).
        """
        out = cls(gram.shape[0], gram.shape[-1])
        out.counts = counts.to(torch.int64).clone()
        for e in range(gram.shape[0]):
            n = int(counts[e])
            if n == 0:
                continue
            w, V = torch.linalg.eigh(gram[e].to(torch.float64))
            F = (w.clamp(min=0).sqrt()[:, None] * V.T).flip(0)  # largest first
            if n >= out.dim:
                out._r[e] = F
            else:
                out._rows[e] = [F[:n]]
        return out
