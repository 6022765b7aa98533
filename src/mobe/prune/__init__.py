"""Stage: expert pruning (REAP). Removes whole routed experts; the output is a smaller checkpoint of the same
architecture, unlike the factorisations, which keep every expert."""

from .pipeline import prune_experts, write_pruned
from .report import LayerPruning, PruneReport
from .scores import ExpertScores, ReapObserver, collect_reap_scores, expert_output
from .select import BUDGETS, PruneError, experts_to_prune

__all__ = [
    "BUDGETS",
    "ExpertScores",
    "LayerPruning",
    "PruneError",
    "PruneReport",
    "ReapObserver",
    "collect_reap_scores",
    "expert_output",
    "experts_to_prune",
    "prune_experts",
    "write_pruned",
]
