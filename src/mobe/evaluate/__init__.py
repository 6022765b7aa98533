"""Stage 5: measure what compression cost (weight error, parameter counts, reports)."""

from .params import mobe_parameters
from .report import CompressionReport, MatrixResult, weight_error

__all__ = ["CompressionReport", "MatrixResult", "mobe_parameters", "weight_error"]
