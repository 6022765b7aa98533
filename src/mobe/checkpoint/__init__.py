"""Stage 1: read a Hugging Face checkpoint lazily, one tensor or one layer at a time."""

from .reader import CheckpointError, CheckpointReader, resolve_checkpoint

__all__ = ["CheckpointError", "CheckpointReader", "resolve_checkpoint"]
