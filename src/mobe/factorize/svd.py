"""Truncated SVD of each expert: W_i ~ U_i V_i, U_i = U[:, :k] S[:k] (p x k), V_i = Vh[:k] (k x d)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from .base import ExpertFactors, FitStats
from .primitives import low_rank
from .weighted import OutputWeighting, whitened_low_rank


@dataclass
class SvdFactors(ExpertFactors):
    U: Tensor  # (E, p, k)
    V: Tensor  # (E, k, d)

    method: ClassVar[str] = "svd"
    tensor_fields: ClassVar[tuple[str, ...]] = ("U", "V")

    def reconstruct(self, experts: Tensor | None = None) -> Tensor:
        experts = self._experts(experts)
        return torch.bmm(self.U.float()[experts], self.V.float()[experts])


def fit_svd(
    weights: Tensor, rank: int, device: torch.device | str = "cpu", weighting: OutputWeighting | None = None
) -> tuple[SvdFactors, FitStats]:
    """Truncated SVD per expert; with a `weighting`, in the output metric (whitened SVD, as SVD-LLM)."""
    start = time.perf_counter()
    W = weights.to(device=device, dtype=torch.float32)
    U, V = low_rank(W, rank) if weighting is None else whitened_low_rank(W, weighting.to(device), rank)
    factors = SvdFactors(U.cpu(), V.cpu())
    diff = factors.reconstruct().to(W.device) - W
    mse = (diff if weighting is None else weighting.apply(diff)).pow(2).mean().item()  # in the fit's metric
    return factors, FitStats(mse, mse, 0, 0, time.perf_counter() - start)
