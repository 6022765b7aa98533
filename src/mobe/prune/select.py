"""Which experts to remove: the lowest REAP scores, per layer or across all layers, equal counts wherever routed.

A transformers config holds one expert count for the whole model, so every MoE layer must keep as many experts as
every other; and where the router picks groups of contiguous experts first (DeepSeek-V3's `n_group`), every group
must keep as many as every other, or the groups of the smaller layer would no longer be the original ones.
"""

from __future__ import annotations

import torch
from torch import Tensor

BUDGETS = ("layer", "global")


class PruneError(ValueError):
    """Settings that cannot give a smaller checkpoint of the same architecture."""


def check_budget(num_experts: int, top_k: int, groups: int, topk_group: int, removed_per_group: int) -> None:
    """Refuse a cut that leaves the router fewer experts than it picks."""
    kept = num_experts // groups - removed_per_group
    if groups > 1 and kept < 2:
        raise PruneError(
            f"--target-ratio leaves {kept} expert(s) in each of the {groups} routing groups; the router scores a "
            "group by its best two"
        )
    if kept * (topk_group if groups > 1 else 1) < top_k:
        raise PruneError(f"--target-ratio leaves fewer experts than the router picks per token ({top_k})")


def experts_to_prune(
    scores: dict[int, Tensor],
    target_ratio: float,
    *,
    budget: str = "layer",
    top_k: int,
    groups: int = 1,
    topk_group: int = 1,
) -> dict[int, list[int]]:
    """The experts each MoE layer loses (sorted ids), lowest REAP score first; ties go to the higher id.

    Args:
        scores: per MoE layer, the REAP score of each of its E experts.
        target_ratio: share of the routed experts to remove (rounded to whole experts per routing group).
        budget: `layer` removes the same share from every layer; `global` removes the lowest scores of the whole
            model, which must come out as the same count in every layer (one expert count per config).
        groups / topk_group: the router's contiguous expert groups and how many it picks (DeepSeek-V3).
    """
    if not 0 <= target_ratio < 1:
        raise PruneError(f"--target-ratio must be in [0, 1) for expert pruning, got {target_ratio}")
    if budget not in BUDGETS:
        raise PruneError(f"--reap-budget must be one of {', '.join(BUDGETS)}, got {budget!r}")
    num_experts = next(iter(scores.values())).numel()
    if num_experts % groups:
        raise PruneError(f"{num_experts} experts do not split into {groups} routing groups")
    size = num_experts // groups
    # One unit per (layer, routing group): the lowest scores of a unit go first.
    units = {(layer, g): s[g * size : (g + 1) * size].double() for layer, s in scores.items() for g in range(groups)}
    if budget == "layer":
        per_unit = round(target_ratio * size)
        check_budget(num_experts, top_k, groups, topk_group, per_unit)
        chosen = {key: _lowest(s, per_unit) for key, s in units.items()}
    else:
        total = round(target_ratio * num_experts * len(scores))
        keys = list(units)
        flat = torch.cat([units[k] for k in keys])
        owner = [k for k in keys for _ in range(size)]
        positions = [int(i) for i in _lowest(flat, total)]
        chosen = {k: [] for k in keys}
        for pos in positions:
            chosen[owner[pos]].append(pos % size)
        counts = {k: len(v) for k, v in chosen.items()}
        if len(set(counts.values())) > 1:
            per_layer = {layer: sum(n for (lay, _), n in counts.items() if lay == layer) for layer in scores}
            raise PruneError(
                "--reap-budget global would remove different numbers of experts per layer "
                f"({', '.join(f'layer {k}: {v}' for k, v in per_layer.items())}); a transformers config holds one "
                "expert count per model: use --reap-budget layer"
            )
        check_budget(num_experts, top_k, groups, topk_group, next(iter(counts.values())))
    out: dict[int, list[int]] = {layer: [] for layer in scores}
    for (layer, g), ids in chosen.items():
        out[layer].extend(g * size + i for i in ids)
    return {layer: sorted(ids) for layer, ids in out.items()}


def _lowest(values: Tensor, n: int) -> list[int]:
    """Indices of the n lowest values; among equal values the higher index goes first (deterministic)."""
    order = sorted(range(values.numel()), key=lambda i: (values[i].item(), -i))
    return order[:n]
