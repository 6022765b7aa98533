"""D2-MoE-style delta decompression: a shared base weight plus a low-rank delta per expert.

W_i ~ W_base + U_i V_i, with W_base the mean of the layer's experts (D2-MoE merges with Fisher weights from
calibration data; without data the mean is its unweighted case) and U_i V_i the rank-k SVD of W_i - W_base.
"""

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
class D2moeFactors(ExpertFactors):
    base: Tensor  # (p, d)
    U: Tensor  # (E, p, k)
    V: Tensor  # (E, k, d)

    method: ClassVar[str] = "d2moe"
    tensor_fields: ClassVar[tuple[str, ...]] = ("U", "V", "base")

    def reconstruct(self, experts: Tensor | None = None) -> Tensor:
        experts = self._experts(experts)
        return self.base.float() + torch.bmm(self.U.float()[experts], self.V.float()[experts])


def fit_d2moe(
    weights: Tensor, rank: int, device: torch.device | str = "cpu", weighting: OutputWeighting | None = None
) -> tuple[D2moeFactors, FitStats]:
    """Mean base plus a rank-k delta per expert; with a `weighting`, the delta is a whitened SVD."""
    start = time.perf_counter()
    W = weights.to(device=device, dtype=torch.float32)
    base = W.mean(dim=0)
    if weighting is None:
        U, V = low_rank(W - base, rank)
    else:
        U, V = whitened_low_rank(W - base, weighting.to(device), rank)
    factors = D2moeFactors(base.cpu(), U.cpu(), V.cpu())
    diff = factors.reconstruct().to(W.device) - W
    mse = (diff if weighting is None else weighting.apply(diff)).pow(2).mean().item()  # in the fit's metric
    return factors, FitStats(mse, mse, 0, 0, time.perf_counter() - start)
