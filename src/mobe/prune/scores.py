"""REAP saliency of routed experts (router-weighted expert activation, arXiv 2510.13999), measured on calibration text.

For expert j and the calibration tokens X_j routed to it,

    S_j = (1 / |X_j|) * sum_{x in X_j} g_j(x) * ||f_j(x)||_2

with g_j(x) the routing weight the layer multiplies expert j's output by (after top-k and any renormalisation or
scaling) and f_j(x) that expert's output. An expert no token reaches scores 0: removing it changes nothing on this
text. The statistics come from a forward pre-hook on the fused experts module while the original model is streamed
one decoder layer at a time (`mobe.calibrate.LayerStream`).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..architectures import MoeLayout
from ..calibrate import LayerStream
from ..checkpoint import CheckpointReader


@dataclass
class ExpertScores:
    """One layer's REAP statistics per expert (float64 sums over the calibration tokens)."""

    weighted_norm: Tensor  # (E,) sum of g_j(x) * ||f_j(x)|| over the tokens routed to j
    gate: Tensor  # (E,) sum of g_j(x)
    counts: Tensor  # (E,) tokens routed to j

    @classmethod
    def zeros(cls, num_experts: int) -> ExpertScores:
        z = torch.zeros(num_experts, dtype=torch.float64)
        return cls(z.clone(), z.clone(), z.clone())

    @property
    def reap(self) -> Tensor:
        """S_j: the mean of g_j(x) * ||f_j(x)|| over the tokens routed to j (0 where none is)."""
        mean = self.weighted_norm / self.counts.clamp(min=1)
        return torch.where(self.counts > 0, mean, torch.zeros_like(mean))


def expert_output(module: nn.Module, expert: int, x: Tensor) -> Tensor:
    """f_j(x) of a fused experts module (`gate_up_proj` E x 2p x d, `down_proj` E x d x p), in float32."""
    p = module.down_proj.shape[-1]
    gate_up = x @ module.gate_up_proj[expert].float().T
    return (module.act_fn(gate_up[:, :p]) * gate_up[:, p:]) @ module.down_proj[expert].float().T


class ReapObserver:
    """Forward pre-hook on a fused experts module: accumulates `ExpertScores` from (hidden, top_k_index, weights)."""

    def __init__(self, scores: ExpertScores):
        self.scores = scores

    def __call__(self, module: nn.Module, hidden: Tensor, top_k_index: Tensor, top_k_weights: Tensor) -> None:
        x = hidden.reshape(-1, hidden.shape[-1]).float()
        index = top_k_index.reshape(x.shape[0], -1)
        weights = top_k_weights.reshape(x.shape[0], -1).float()
        for e in index.unique().tolist():
            chosen = index == e
            rows = chosen.any(dim=-1)
            g = (weights * chosen).sum(dim=-1)[rows].double()
            norms = expert_output(module, e, x[rows]).double().norm(dim=-1)
            self.scores.weighted_norm[e] += (g * norms).sum()
            self.scores.gate[e] += g.sum()
            self.scores.counts[e] += rows.sum()


def collect_reap_scores(
    reader: CheckpointReader,
    layout: MoeLayout,
    sequences: list[Tensor],
    *,
    progress: bool = False,
) -> Iterator[tuple[int, ExpertScores]]:
    """Yield (layer, scores) for every MoE layer, streaming the original model one decoder layer at a time."""
    stream = LayerStream(reader, layout)
    hidden = stream.embed(sequences)
    for layer in tqdm(range(layout.moe_layers[-1] + 1), desc="REAP scores", disable=not progress, leave=False):
        if layer in layout.moe_layers:
            scores = ExpertScores.zeros(layout.num_experts)
            hidden = stream.run_layer(layer, hidden, ReapObserver(scores))
            yield layer, scores
        else:
            hidden = stream.run_layer(layer, hidden)
