"""Registry of factorisation methods: one entry each, with its closed-form size and rank-for-budget rule."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from ..config import MobeConfig
from .base import ExpertFactors, FitStats
from .d2moe import D2moeFactors, fit_d2moe
from .mobe import MobeFactors, fit_mobe, fitted_shape, mobe_parameters
from .molae import MolaeFactors, fit_molae
from .slbf import SlbfFactors, fit_slbf, slbf_parameters
from .svd import SvdFactors, fit_svd
from .weighted import OutputWeighting

# (weights, config, device, progress label, output weighting or None) -> (factors, stats)
FitFn = Callable[
    [Tensor, MobeConfig, torch.device | str, str | None, OutputWeighting | None], tuple[ExpertFactors, FitStats]
]
SizeFn = Callable[[int, int, int, MobeConfig, int], int]  # (E, p, d, config, rank) -> parameters


@dataclass(frozen=True)
class Method:
    """A factorisation of one (E, p, d) expert stack; `parameters` is affine in the rank."""

    name: str
    factors_cls: type[ExpertFactors]
    fit: FitFn
    parameters: SizeFn
    iterative: bool = False
    weighted: bool = True  # supports an output weighting (calibration)
    default_activation: str = "tanh"  # where the form has one, when the config names none
    max_rank: Callable[[int, int, int, MobeConfig], int] = lambda E, p, d, c: min(p, d)

    def rank_for_budget(self, E: int, p: int, d: int, config: MobeConfig, budget: int) -> int:
        """Largest rank whose parameter count fits in `budget` (0 if none does)."""
        if self.parameters(E, p, d, config, 2) - self.parameters(E, p, d, config, 1) != self.parameters(
            E, p, d, config, 1
        ) - self.parameters(E, p, d, config, 0):  # not affine in the rank: search (sizes grow up to max_rank)
            rank, limit = 0, self.max_rank(E, p, d, config)
            while rank < limit and self.parameters(E, p, d, config, rank + 1) <= budget:
                rank += 1
            return rank
        fixed = self.parameters(E, p, d, config, 0)
        per_rank = self.parameters(E, p, d, config, 1) - fixed
        return max(0, (budget - fixed) // per_rank)


_METHODS: dict[str, Method] = {}


def register_method(method: Method) -> None:
    if method.name in _METHODS:
        raise ValueError(f"method {method.name!r} is already registered")
    _METHODS[method.name] = method


def get_method(name: str) -> Method:
    if name not in _METHODS:
        raise ValueError(f"unknown method {name!r}; available: {', '.join(sorted(_METHODS))}")
    return _METHODS[name]


def method_names() -> list[str]:
    return sorted(_METHODS)


def _rank(config: MobeConfig, p: int, d: int) -> int:
    return config.rank or min(p, d)


register_method(
    Method(
        "mobe",
        MobeFactors,
        fit=lambda W, c, device, desc, weighting=None: fit_mobe(W, c, device=device, desc=desc, weighting=weighting),
        parameters=lambda E, p, d, c, r: mobe_parameters(E, p, d, c.num_bases, r, c.groups, c.basis_side),
        iterative=True,
        max_rank=lambda E, p, d, c: fitted_shape(p, d, c.basis_side)[1],  # the bases' width
    )
)
register_method(
    Method(
        "slbf",
        SlbfFactors,
        fit=lambda W, c, device, desc, weighting=None: fit_slbf(W, c, device=device, desc=desc, weighting=weighting),
        parameters=lambda E, p, d, c, k: slbf_parameters(E, p, d, k),
        iterative=True,
        default_activation="silu",
    )
)
register_method(
    Method(
        "svd",
        SvdFactors,
        fit=lambda W, c, device, desc, weighting=None: fit_svd(W, _rank(c, *W.shape[1:]), device, weighting),
        parameters=lambda E, p, d, c, r: E * r * (p + d),
    )
)
register_method(
    Method(
        "d2moe",
        D2moeFactors,
        fit=lambda W, c, device, desc, weighting=None: fit_d2moe(W, _rank(c, *W.shape[1:]), device, weighting),
        parameters=lambda E, p, d, c, r: p * d + E * r * (p + d),
    )
)
register_method(
    Method(
        "molae",
        MolaeFactors,
        fit=lambda W, c, device, desc, weighting=None: fit_molae(
            W, _rank(c, *W.shape[1:]), groups=c.groups, device=device, weighting=weighting
        ),
        parameters=lambda E, p, d, c, r: E * p * r + c.groups * r * d,
        max_rank=lambda E, p, d, c: d,  # the shared latent space may span all of R^d (then A_i = W_i B^T is exact)
    )
)


def budget_for_ratio(E: int, p: int, d: int, ratio: float, compressed: int) -> int:
    """Parameters per compressed matrix type that cut the layer's experts (gate, up, down) by `ratio`.

    With k of the 3 matrix types compressed: (3 - k) E p d + k P = (1 - ratio) 3 E p d.
    """
    return int(E * p * d * (3 * (1 - ratio) - (3 - compressed)) / compressed)
