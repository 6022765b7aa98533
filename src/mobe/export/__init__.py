"""Stage 3: write checkpoints (native MoBE factors, or dense experts rebuilt from them)."""

from .files import atomic_save_file, copy_side_files, write_json_atomic
from .writer import (
    FACTOR_PREFIX,
    FACTOR_SUFFIXES,
    dense_stacks,
    factor_tensor_names,
    replaced_tensor_names,
    write_checkpoint,
)

__all__ = [
    "FACTOR_PREFIX",
    "FACTOR_SUFFIXES",
    "atomic_save_file",
    "copy_side_files",
    "dense_stacks",
    "factor_tensor_names",
    "replaced_tensor_names",
    "write_checkpoint",
    "write_json_atomic",
]
