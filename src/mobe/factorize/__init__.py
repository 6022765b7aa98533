"""Stage 2: pure tensor maths. Nothing here reads files or touches transformers modules."""

from .base import ExpertFactors, FitStats, oriented
from .d2moe import D2moeFactors, fit_d2moe
from .mobe import MobeFactors, fit_mobe
from .molae import MolaeFactors, fit_molae
from .primitives import activation_fn, init_svd_groups, mix_bases, split_groups
from .registry import Method, budget_for_ratio, get_method, method_names, register_method
from .slbf import SlbfFactors, fit_slbf
from .svd import SvdFactors, fit_svd

__all__ = [
    "D2moeFactors",
    "ExpertFactors",
    "FitStats",
    "Method",
    "MobeFactors",
    "MolaeFactors",
    "SlbfFactors",
    "SvdFactors",
    "activation_fn",
    "budget_for_ratio",
    "fit_d2moe",
    "fit_mobe",
    "fit_molae",
    "fit_slbf",
    "fit_svd",
    "get_method",
    "init_svd_groups",
    "method_names",
    "mix_bases",
    "oriented",
    "register_method",
    "split_groups",
]
