"""Synthetic expert stacks shaped like a real MoE layer, for benchmarks and cost estimates (no checkpoint needed).

Trained experts are neither random nor identical: each has a decaying singular-value profile, and experts share
part of their input subspace (the hidden states they read live near a common low-dimensional subspace). The stack
below has both: W_i = U_i diag(s) (c V_shared + sqrt(1 - c^2) V_i)^T, with s_k = k^-decay, orthonormal random
U_i, V_i and one V_shared, so that a shared basis can explain a fraction c^2 of each expert's energy.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def realistic_stack(
    num_experts: int,
    p: int,
    d: int,
    decay: float = 0.5,
    shared: float = 0.7,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> Tensor:
    """(E, p, d) float32 stack with a power-law spectrum (s_k = k^-decay) and a shared input subspace.

    `shared` (0..1) is the weight c of the common right factor; entries have a standard deviation near 0.02,
    as in trained checkpoints.
    """
    if not 0.0 <= shared <= 1.0 or decay < 0:
        raise ValueError(f"need 0 <= shared <= 1 and decay >= 0, got shared={shared}, decay={decay}")
    device = torch.device(device)  # generated there: DeepSeek-V3's stack takes minutes of QR on a CPU
    generator = torch.Generator(device=device).manual_seed(seed)
    k = min(p, d)
    spectrum = torch.arange(1, k + 1, dtype=torch.float32, device=device) ** -decay

    def orthonormal(rows: int, cols: int) -> Tensor:
        return torch.linalg.qr(torch.randn(rows, cols, generator=generator, device=device))[0]

    v_shared = orthonormal(d, k)
    stack = torch.empty(num_experts, p, d, device=device)
    for i in range(num_experts):
        right = shared * v_shared + math.sqrt(1.0 - shared**2) * orthonormal(d, k)
        stack[i] = (orthonormal(p, k) * spectrum) @ right.T
    stack *= 0.02 / stack.std()
    return stack
