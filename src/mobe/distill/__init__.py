"""Stage 5: knowledge distillation of a compressed model toward its original (routers, then small factors)."""

from ..config import DISTILL_MODES, DistillConfig
from .loss import teacher_topk, topk_kl
from .run import DistillReport, distill
from .targets import TeacherTargets, compute_targets
from .trainable import DistillError, select_trainable

__all__ = [
    "DISTILL_MODES",
    "DistillConfig",
    "DistillError",
    "DistillReport",
    "TeacherTargets",
    "compute_targets",
    "distill",
    "select_trainable",
    "teacher_topk",
    "topk_kl",
]
