"""Stage 2: pure tensor maths. Nothing here reads files or touches transformers modules."""

from .mobe import FitStats, MobeFactors, activation_fn, fit_mobe, init_svd_groups, split_groups

__all__ = ["FitStats", "MobeFactors", "activation_fn", "fit_mobe", "init_svd_groups", "split_groups"]
