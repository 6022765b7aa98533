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
from .weighted import OutputWeighting


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
    weights: Tensor,
    rank: int,
    groups: int = 1,
    device: torch.device | str = "cpu",
    weighting: OutputWeighting | None = None,
) -> tuple[MolaeFactors, FitStats]:
    """Shared latent projection per group; with a `weighting`, B_g is found in whitened coordinates (the group's
    mean metric for gate/up, each expert's own for down) and A_i is the weighted least-squares optimum."""
    start = time.perf_counter()
    W = weights.to(device=device, dtype=torch.float32)
    E, p, d = W.shape
    per_group = E // groups
    weighting = None if weighting is None else weighting.to(device)
    right = weighting is not None and weighting.side == "right"
    B = W.new_zeros(groups, rank, d)
    for g in range(groups):
        members = slice(g * per_group, (g + 1) * per_group)
        if right:  # whiten the group with its mean metric, map the basis back
            Lg = weighting.mean(list(range(E))[members])
            stack = Lg.apply(W[members])
        else:
            stack = W[members] if weighting is None else weighting.apply(W[members], members)
        Vh = torch.linalg.svd(stack.reshape(-1, d), full_matrices=False)[2]
        k = min(rank, Vh.shape[0])
        B[g, :k] = Lg.unwhiten(Vh[:k][None])[0] if right else Vh[:k]
    Bs = B.repeat_interleave(per_group, dim=0)
    if right:  # A_i = W_i M_i B^T (B M_i B^T)^+, with X M_i = (X L_i) L_i (L_i symmetric)
        BM = weighting.apply(weighting.apply(Bs))
        A = torch.linalg.lstsq(torch.bmm(BM, Bs.transpose(1, 2)), torch.bmm(BM, W.transpose(1, 2))).solution
        A = A.transpose(1, 2)
    else:  # B has orthonormal rows: the projection is optimal (in a left metric as well)
        A = torch.bmm(W, Bs.transpose(1, 2))
    factors = MolaeFactors(A.cpu(), B.cpu())
    diff = factors.reconstruct().to(device) - W
    mse = (diff if weighting is None else weighting.apply(diff)).pow(2).mean().item()
    return factors, FitStats(mse, mse, 0, 0, time.perf_counter() - start)
