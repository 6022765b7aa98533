"""A drop-in for transformers' fused experts module that keeps gate/up as MoBE factors.

It has the signature of `Qwen3MoeExperts` & co. (`forward(hidden_states, top_k_index, top_k_weights)`). Only the
experts that received tokens in a call get their mixed basis M_e = act(sum_j alpha_ej B_j) (r x d) built, at most
`workspace_experts` at a time, and x W_e^T is computed as (x M_e^T) A_e^T, so no dense p x d expert matrix ever
exists. An optional LRU cache keeps the mixed bases of recently used experts under `cache_mib`, for decoding.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import Tensor, nn

from ..factorize import MobeFactors, activation_fn, mix_bases


class MobeExperts(nn.Module):
    def __init__(
        self,
        act_fn: nn.Module,
        gate: MobeFactors | Tensor,
        up: MobeFactors | Tensor,
        down: MobeFactors | Tensor,
        workspace_experts: int = 16,
        cache_mib: float = 0.0,
    ):
        super().__init__()
        if workspace_experts < 1:
            raise ValueError(f"workspace_experts must be >= 1, got {workspace_experts}")
        self.act_fn = act_fn
        self.num_experts = (down.A if isinstance(down, MobeFactors) else down).shape[0]
        self.workspace_experts = workspace_experts
        self.cache_bytes = int(cache_mib * 2**20)
        self._cache: OrderedDict[tuple[str, int], Tensor] = OrderedDict()
        self._cached_bytes = 0
        self.factored: dict[str, str] = {}  # matrix -> activation of its mixed bases
        for name, proj in (("gate", gate), ("up", up), ("down", down)):
            if isinstance(proj, MobeFactors):
                self.register_parameter(f"{name}_A", nn.Parameter(proj.A, requires_grad=False))
                self.register_parameter(f"{name}_bases", nn.Parameter(proj.bases, requires_grad=False))
                self.register_parameter(f"{name}_coef", nn.Parameter(proj.coef, requires_grad=False))
                self.factored[name] = proj.activation
            else:
                self.register_parameter(f"{name}_proj", nn.Parameter(proj, requires_grad=False))

    def _mixed(self, matrix: str, experts: list[int]) -> dict[int, Tensor]:
        """Mixed bases of `experts` for `matrix`, from the cache where present."""
        out = {e: self._cache[(matrix, e)] for e in experts if (matrix, e) in self._cache}
        for e in out:
            self._cache.move_to_end((matrix, e))
        missing = [e for e in experts if e not in out]
        if missing:
            idx = torch.tensor(missing, device=getattr(self, f"{matrix}_A").device)
            bases, coef = getattr(self, f"{matrix}_bases"), getattr(self, f"{matrix}_coef")
            per_group = self.num_experts // bases.shape[0]
            mixed = mix_bases(coef[idx], bases, idx // per_group, activation_fn(self.factored[matrix]))
            for e, m in zip(missing, mixed.to(bases.dtype), strict=True):
                out[e] = m
                self._remember((matrix, e), m)
        return out

    def _remember(self, key: tuple[str, int], mixed: Tensor) -> None:
        size = mixed.numel() * mixed.element_size()
        if size > self.cache_bytes:
            return
        while self._cached_bytes + size > self.cache_bytes:
            _, old = self._cache.popitem(last=False)
            self._cached_bytes -= old.numel() * old.element_size()
        self._cache[key] = mixed
        self._cached_bytes += size

    def clear_cache(self) -> None:
        self._cache.clear()
        self._cached_bytes = 0

    def _project(self, matrix: str, x: Tensor, e: int, mixed: dict[str, dict[int, Tensor]]) -> Tensor:
        """x W_e^T without forming W_e: W = A M for gate/up; down is stored transposed, W_down^T = A M."""
        if matrix not in self.factored:
            return x @ getattr(self, f"{matrix}_proj")[e].T
        A, M = getattr(self, f"{matrix}_A")[e], mixed[matrix][e]
        return (x @ A) @ M if matrix == "down" else (x @ M.T) @ A.T

    def forward(self, hidden_states: Tensor, top_k_index: Tensor, top_k_weights: Tensor) -> Tensor:
        final = torch.zeros_like(hidden_states)
        hit = [e for e in top_k_index.unique().tolist() if 0 <= e < self.num_experts]
        for start in range(0, len(hit), self.workspace_experts):
            batch = hit[start : start + self.workspace_experts]
            mixed = {matrix: self._mixed(matrix, batch) for matrix in self.factored}
            for e in batch:
                token_idx, pos = torch.where(top_k_index == e)
                x = hidden_states[token_idx]
                h = self.act_fn(self._project("gate", x, e, mixed)) * self._project("up", x, e, mixed)
                out = self._project("down", h, e, mixed) * top_k_weights[token_idx, pos, None]
                final.index_add_(0, token_idx, out.to(final.dtype))
            del mixed
        return final
