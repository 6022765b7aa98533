"""Stage 3: write checkpoints (native MoBE factors, or dense experts rebuilt from them), and read native ones."""

from .files import atomic_save_file, copy_side_files, write_json_atomic
from .native import (
    FACTOR_PREFIX,
    FACTOR_SUFFIXES,
    NativeFormatError,
    dense_config,
    factor_meta,
    factor_shapes,
    factor_tensor_names,
    is_factor_tensor,
    native_section,
    output_config,
    read_native_factors,
    run_section,
)
from .writer import (
    dense_shard_plan,
    dense_stacks,
    replaced_tensor_names,
    write_checkpoint,
    write_output,
)

__all__ = [
    "FACTOR_PREFIX",
    "FACTOR_SUFFIXES",
    "NativeFormatError",
    "atomic_save_file",
    "copy_side_files",
    "dense_config",
    "dense_shard_plan",
    "dense_stacks",
    "factor_meta",
    "factor_shapes",
    "factor_tensor_names",
    "is_factor_tensor",
    "native_section",
    "output_config",
    "read_native_factors",
    "replaced_tensor_names",
    "run_section",
    "write_checkpoint",
    "write_json_atomic",
    "write_output",
]
