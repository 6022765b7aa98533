"""Stage 1b: calibration statistics of the routed experts (per-expert Grams, factored), streamed layer by layer."""

from .collect import (
    CalibrationError,
    LayerStream,
    StatsAccumulator,
    calibration_ids,
    collect_sequentially,
    collect_statistics,
    read_calibration_text,
    text_hash,
)
from .stats import LayerStats

__all__ = [
    "CalibrationError",
    "LayerStats",
    "LayerStream",
    "StatsAccumulator",
    "calibration_ids",
    "collect_sequentially",
    "collect_statistics",
    "read_calibration_text",
    "text_hash",
]
