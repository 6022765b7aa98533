"""Stage 4: run native MoBE checkpoints in transformers without rebuilding the dense experts."""

from .experts import MobeExperts
from .load import load_model

__all__ = ["MobeExperts", "load_model"]
