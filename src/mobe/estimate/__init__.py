"""Estimates, from a checkpoint's headers and the settings: the memory of every stage and the time of a compression.

`memory`: compression jobs, the calibration pass and statistics, native inference, quantisation, and the check
`mobe compress` runs against the device's free memory; `distill`: a distillation's memory; `timing`: compress time
from steps measured on small stacks. `mobe info` prints them.
"""

from .distill import DistillMemory, distill_memory, distill_memory_estimate
from .memory import (
    MemoryEstimate,
    MemoryRefusal,
    available_bytes,
    calibration_pass_bytes,
    check_compress_memory,
    compress_memory_estimate,
    compression_job_bytes,
    inference_bytes,
    memory_estimate,
    quantize_bytes,
)
from .timing import (
    Calibration,
    TimeEstimate,
    calibrate,
    calibrate_at,
    calibration_shape,
    estimate_compress_time,
    measure_step_seconds,
    step_flops,
)

__all__ = [
    "Calibration",
    "DistillMemory",
    "MemoryEstimate",
    "MemoryRefusal",
    "TimeEstimate",
    "available_bytes",
    "calibrate",
    "calibrate_at",
    "calibration_pass_bytes",
    "calibration_shape",
    "check_compress_memory",
    "compress_memory_estimate",
    "compression_job_bytes",
    "distill_memory",
    "distill_memory_estimate",
    "estimate_compress_time",
    "inference_bytes",
    "measure_step_seconds",
    "memory_estimate",
    "quantize_bytes",
    "step_flops",
]
