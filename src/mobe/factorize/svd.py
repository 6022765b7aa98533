"""Truncated SVD of each expert: W_i ~ U_i V_i, U_i = U[:, :k] S[:k] (p x k), V_i = Vh[:k] (k x d)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from .base import ExpertFactors, FitStats
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


def low_rank(matrices: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """Best rank-k factors (U S, Vh) of each matrix in a (n, p, d) stack, zero-padded if k > min(p, d)."""
    U, S, Vh = torch.linalg.svd(matrices, full_matrices=False)
    k = min(rank, S.shape[-1])
    left = matrices.new_zeros(*matrices.shape[:-1], rank)
    right = matrices.new_zeros(matrices.shape[0], rank, matrices.shape[-1])
    left[..., :k] = U[..., :k] * S[:, None, :k]
    right[:, :k] = Vh[:, :k]
    return left, right


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
