"""The calibration loss of a planned checkpoint, computed before it is written: stream the model one decoder layer
at a time and run each MoE layer with its experts rounded as `execute_mixed` would round them.

The planner's proxy (`mobe.plan.mixed`) adds the squared errors of the MoE layers' outputs, pruning and rounding
alike, as if a unit of each cost the model the same. It does not: on a trained fixture REAP 25% + int4 is predicted
better than GPTQ mixes without pruning that measure better in held-out perplexity. So where several pruning shares
fit the budget, each share's best allocation is scored by what it is meant to keep, the next-token cross-entropy
on calibration tokens, and the least loss wins.

What is scored is what gets written: the branch's model (REAP-pruned at its share, or the original) with each MoE
layer's experts rounded by GPTQ at the allocation's bits on the Grams of the tokens that layer routes to them,
collected on the unrounded branch's own hidden states (`quantize_checkpoint`'s non-sequential calibration). Two
streams of hidden states advance together, the unrounded one (Grams) and the rounded one (loss). Peak memory: one
decoder layer, its statistics, the two streams' hidden states and one sequence's logits.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..calibrate import LayerStats, LayerStream, StatsAccumulator
from ..config import QuantizeConfig
from ..quantize.checkpoint import gptq_stack
from .sizes import MATRICES


def calibration_loss(
    stream: LayerStream,
    sequences: list[torch.Tensor],
    allocation: dict[tuple[int, str], int],
    quantize: QuantizeConfig,
    *,
    progress: bool = False,
) -> tuple[float, float]:
    """Mean next-token cross-entropy (nats) on `sequences` of `stream`'s model with every MoE layer's (layer, matrix)
    rounded by GPTQ at `allocation`'s bits (see the module docstring), and of the same model unrounded (for the
    unpruned branch: the original's). `quantize`: group size and GPTQ settings."""
    layout, reader = stream.layout, stream.reader
    E, p, d = layout.num_experts, layout.intermediate_size, layout.hidden_size
    unrounded = stream.embed(sequences)
    rounded = [h.clone() for h in unrounded]
    for layer in tqdm(range(stream.config.num_hidden_layers), desc="Scoring", disable=not progress, leave=False):
        if layer not in layout.moe_layers:
            unrounded = stream.run_layer(layer, unrounded)
            rounded = stream.run_layer(layer, rounded)
            continue
        accumulator = StatsAccumulator(LayerStats.empty(E, p, d), keep_inputs=False)
        unrounded = stream.run_layer(layer, unrounded, accumulator)
        stats = accumulator.finish()
        experts = {
            m: gptq_stack(
                layout.read_experts(reader, layer, m), stats.factor(m), stats.counts, quantize, allocation[layer, m]
            )[2]
            for m in MATRICES
        }
        del stats, accumulator
        rounded = stream.run_layer(layer, rounded, experts=experts)
        del experts
    return _cross_entropy(stream, sequences, rounded), _cross_entropy(stream, sequences, unrounded)


def model_loss(stream: LayerStream, sequences: list[torch.Tensor], *, progress: bool = False) -> float:
    """Mean next-token cross-entropy (nats) on `sequences` of `stream`'s model as stored."""
    hidden = stream.embed(sequences)
    for layer in tqdm(range(stream.config.num_hidden_layers), desc="Scoring", disable=not progress, leave=False):
        hidden = stream.run_layer(layer, hidden)
    return _cross_entropy(stream, sequences, hidden)


def _cross_entropy(stream: LayerStream, sequences: list[torch.Tensor], hidden: list[torch.Tensor]) -> float:
    total, count = 0.0, 0
    for ids, logits in zip(sequences, stream.logits(hidden), strict=True):
        labels = ids.reshape(-1)[1:]
        total += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1])[:-1].double(), labels, reduction="sum"))
        count += labels.numel()
    return total / count
