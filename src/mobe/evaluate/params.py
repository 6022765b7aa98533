"""Closed-form parameter counts (the maths lives with the factorisation; re-exported for reports)."""

from ..factorize.mobe import mobe_parameters

__all__ = ["mobe_parameters"]
