"""MoLAE-style shared latent projection: W_i ~ A_i B_g, with B_g (k x d) shared by a group of experts.

B_g is the top-k right singular subspace of the group's stacked experts and A_i = W_i B_g^T, the least-squares
optimum for an orthonormal B_g.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from .base import ExpertFactors, FitStats


@dataclass
class MolaeFactors(ExpertFactors):
    A: Tensor  # (E, p, k)
    B: Tensor  # (g, k, d)

    method: ClassVar[str] = "molae"
    tensor_fields: ClassVar[tuple[str, ...]] = ("A", "B")

    def reconstruct(self, experts: Tensor | None = None) -> Tensor:
        experts = self._experts(experts)
        group = experts // (self.A.shape[0] // self.B.shape[0])
        return torch.bmm(self.A.float()[experts], self.B.float()[group])


def fit_molae(
    weights: Tensor, rank: int, groups: int = 1, device: torch.device | str = "cpu"
) -> tuple[MolaeFactors, FitStats]:
    start = time.perf_counter()
    W = weights.to(device=device, dtype=torch.float32)
    E, p, d = W.shape
    per_group = E // groups
    B = W.new_zeros(groups, rank, d)
    for g in range(groups):
        Vh = torch.linalg.svd(W[g * per_group : (g + 1) * per_group].reshape(-1, d), full_matrices=False)[2]
        k = min(rank, Vh.shape[0])
        B[g, :k] = Vh[:k]
    A = torch.bmm(W, B.repeat_interleave(per_group, dim=0).transpose(1, 2))
    factors = MolaeFactors(A.cpu(), B.cpu())
    mse = (factors.reconstruct() - W.cpu()).pow(2).mean().item()
    return factors, FitStats(mse, mse, 0, 0, time.perf_counter() - start)
