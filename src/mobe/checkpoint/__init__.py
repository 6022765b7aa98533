"""Stage 1: read a Hugging Face checkpoint lazily, one tensor or one layer at a time."""

from .reader import CheckpointError, CheckpointReader, refuse_native, resolve_checkpoint

__all__ = ["CheckpointError", "CheckpointReader", "refuse_native", "resolve_checkpoint"]
