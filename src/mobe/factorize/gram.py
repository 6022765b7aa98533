"""Per-expert Gram matrices G_i = X_i^T X_i kept as a factor F_i (F_i^T F_i = G_i) of min(n_i, dim) rows.

A d x d Gram per routed expert is 105 GB in float64 for one DeepSeek-V3 layer (256 experts, d = 7168), while a
calibration run routes a few hundred to a few thousand tokens to each expert. `GramFactor` keeps, for expert i:

- the rows X_i themselves while it has seen fewer than `dim` of them (in their own dtype: an exact copy);
- from the `dim`-th row on, the R factor (dim x dim, float64) of a QR of all rows seen: R^T R = X_i^T X_i. New rows
  are buffered and folded in by a QR of [R; rows] once `dim // 2` of them are waiting (so between folds an expert
  holds up to 1.25 times a Gram's bytes, and a fold costs about twice the flops of the Gram updates it replaces).

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

    def _fold(self, expert: int) -> None:
        """R <- R factor of [R; waiting rows] (float64); the waiting rows are freed."""
        parts = [r.to(torch.float64) for r in self._rows[expert]]
        if self._r[expert] is not None:
            parts.insert(0, self._r[expert])
        self._r[expert] = torch.linalg.qr(torch.cat(parts), mode="r").R
        self._rows[expert] = []

    def factor(self, expert: int) -> Tensor:
        """F_i (k_i, dim), k_i = min(n_i, dim), with F_i^T F_i = G_i: the rows themselves or R (float64).

        An expert's rows stay in the blocks they came in (merging them would leave the freed blocks as holes in
        the heap, a third more peak RSS); here they are concatenated into a new tensor, not kept.
        """
        if self._r[expert] is not None and self._rows[expert]:
            self._fold(expert)
        if self._r[expert] is not None:
            return self._r[expert]
        blocks = self._rows[expert]
        if len(blocks) == 1:
            return blocks[0]
        if not blocks:
            return torch.zeros(0, self.dim)
        dtype = blocks[0].dtype
        for b in blocks[1:]:
            dtype = torch.promote_types(dtype, b.dtype)
        return torch.cat([b.to(dtype) for b in blocks])

    def compact(self) -> GramFactor:
        """Fold the rows waiting beside each R factor into it (the factor is then one tensor); returns self."""
        for e in range(self.num_experts):
            if self._r[e] is not None and self._rows[e]:
                self._fold(e)
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
        """As plain tensors, without copying them: `counts`, and under "E.J" block J of expert E: its rows as they
        came (n_i < dim) or its float64 R factor. An expert without rows has one empty block."""
        self.compact()
        out = {"counts": self.counts}
        for e in range(self.num_experts):
            blocks = [self._r[e]] if self._r[e] is not None else self._rows[e] or [torch.zeros(0, self.dim)]
            out |= {f"{e}.{j}": block for j, block in enumerate(blocks)}
        return out

    @classmethod
    def from_tensors(cls, tensors: dict[str, Tensor]) -> GramFactor:
        counts = tensors["counts"]
        blocks: dict[int, list[tuple[int, Tensor]]] = {e: [] for e in range(counts.numel())}
        for key, tensor in tensors.items():
            if key != "counts":
                e, j = (int(x) for x in key.split("."))
                blocks[e].append((j, tensor))
        dims = {t.shape[-1] for parts in blocks.values() for _, t in parts}
        if len(dims) != 1 or any(not parts for parts in blocks.values()):
            raise ValueError(f"factor tensors hold rows of widths {sorted(dims)} or miss an expert")
        out = cls(counts.numel(), dims.pop())
        out.counts = counts.to(torch.int64).clone()
        for e, parts in blocks.items():
            n, rows = int(counts[e]), [t for _, t in sorted(parts, key=lambda jt: jt[0]) if t.shape[0]]
            if sum(t.shape[0] for t in rows) != min(n, out.dim) or any(t.ndim != 2 for t in rows):
                raise ValueError(
                    f"factor of expert {e} has {sum(t.shape[0] for t in rows)} rows, expected {min(n, out.dim)} "
                    f"for {n} routed tokens"
                )
            if n >= out.dim:
                out._r[e] = rows[0].to(torch.float64)
            else:
                out._rows[e] = rows
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
