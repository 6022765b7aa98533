"""Bases on the wider side: a p > d stack is fitted as its transpose (the same loss, fewer numbers per unit of rank),
and the `fast` schedule in an output metric solves every A_i exactly in that metric."""

import pytest
import torch

from mobe import MobeConfig
from mobe.evaluate import mobe_parameters
from mobe.factorize import fit_mobe
from mobe.factorize.gram import GramFactor
from mobe.factorize.weighted import OutputWeighting


def _stack(E=6, p=24, d=10, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    shared = torch.randn(p, d, generator=g)
    return torch.stack([shared + 0.5 * torch.randn(p, d, generator=g) for _ in range(E)])


@pytest.mark.parametrize("schedule", ["adam", "fast"])
def test_a_wide_stack_is_fitted_as_its_transpose(schedule):
    W = _stack()
    config = MobeConfig(num_bases=2, rank=6, steps=30, eval_every=10, schedule=schedule, basis_side="wider")
    factors, stats = fit_mobe(W, config)
    reference, ref_stats = fit_mobe(W.transpose(1, 2), MobeConfig(**{**config.to_dict(), "basis_side": "hidden"}))
    assert factors.transposed == "1" and reference.transposed == "0"
    assert factors.A.shape == (6, 10, 6) and factors.bases.shape == (1, 2, 6, 24)  # A_i (d, r), B_j (r, p)
    torch.testing.assert_close(factors.reconstruct(), reference.reconstruct().transpose(1, 2), rtol=0, atol=0)
    assert stats.best_loss == ref_stats.best_loss
    # E d r + m r p + E m numbers, against E p r + m r d with the bases on the hidden side
    assert factors.num_parameters() == 6 * 10 * 6 + 2 * 6 * 24 + 6 * 2
    assert mobe_parameters(6, 24, 10, 2, 6, basis_side="wider") == factors.num_parameters()
    assert mobe_parameters(6, 24, 10, 2, 6) == 6 * 24 * 6 + 2 * 6 * 10 + 6 * 2


def test_a_narrow_stack_is_the_same_fit_on_either_side():
    W = _stack(p=8, d=20)
    config = MobeConfig(num_bases=2, rank=5, steps=20, eval_every=10, schedule="fast")
    wider, _ = fit_mobe(W, MobeConfig(**{**config.to_dict(), "basis_side": "wider"}))
    hidden, _ = fit_mobe(W, MobeConfig(**{**config.to_dict(), "basis_side": "hidden"}))
    assert wider.transposed == hidden.transposed == "0"
    torch.testing.assert_close(wider.reconstruct(), hidden.reconstruct(), rtol=0, atol=0)


def _metric(E: int, size: int, side: str, seed: int = 1) -> OutputWeighting:
    """A metric from routed tokens with unequal scales per direction (fewer tokens than `size` for one expert)."""
    g = torch.Generator().manual_seed(seed)
    factor = GramFactor(E, size)
    for e in range(E):
        rows = 3 if e == 0 else 4 * size
        factor.add(e, torch.randn(rows, size, generator=g) * torch.linspace(0.2, 3.0, size))
    return OutputWeighting.from_factor(factor, side)


@pytest.mark.parametrize(
    ("side", "p", "d", "basis_side"), [("right", 6, 14, "hidden"), ("left", 6, 14, "hidden"), ("right", 14, 6, "wider")]
)
def test_fast_in_an_output_metric_solves_each_A_exactly_in_that_metric(side, p, d, basis_side):
    """At the kept state, A_i minimises ||(A_i M_i - W_i) L_i|| (right) or ||L_i^T (A_i M_i - W_i)|| (left) for the
    fitted mixed bases M_i: checked against a float64 least-squares solve of each expert, and the reported loss is
    that metric's error of the reconstruction."""
    E = 5
    W = _stack(E=E, p=p, d=d, seed=2)
    weighting = _metric(E, d if side == "right" else p, side)
    config = MobeConfig(num_bases=2, rank=4, steps=40, eval_every=10, schedule="fast", basis_side=basis_side)
    factors, stats = fit_mobe(W, config, weighting=weighting)
    assert factors.transposed == ("1" if p > d else "0")
    L = weighting.dense().double()  # (E, size, size), symmetric
    approx = factors.reconstruct().double()
    residual = approx - W.double()
    weighted = residual @ L if side == "right" else L.transpose(1, 2) @ residual
    torch.testing.assert_close(weighted.pow(2).sum().item() / W.numel(), stats.best_loss, rtol=1e-4, atol=0)
    # Normal equations of A_i in the fitted orientation: zero gradient of the weighted loss in A_i.
    if factors.transposed == "1":  # fitted W^T: the right metric became a left one
        residual, weighted_side = residual.transpose(1, 2), "left"
    else:
        weighted_side = side
    M = factors.mixed_bases().double()
    if weighted_side == "right":
        gradient = (residual @ L @ L.transpose(1, 2)) @ M.transpose(1, 2)
    else:
        gradient = (L @ L.transpose(1, 2) @ residual) @ M.transpose(1, 2)
    scale = (W.double().norm() * M.norm()).item()
    assert gradient.abs().max().item() < 1e-4 * scale / W.shape[0]


def test_fast_in_an_output_metric_fits_that_metric_better_than_the_weight_fit():
    W = _stack(E=5, p=6, d=14, seed=3)
    weighting = _metric(5, 14, "right", seed=4)
    config = MobeConfig(num_bases=2, rank=3, steps=60, eval_every=10, schedule="fast")
    weighted, _ = fit_mobe(W, config, weighting=weighting)
    plain, _ = fit_mobe(W, config)
    assert weighting.squared_error(W, weighted.reconstruct()) < 0.9 * weighting.squared_error(W, plain.reconstruct())


def test_paper_schedule_puts_the_bases_along_the_hidden_size_unless_told_otherwise():
    """`--schedule paper` replays the authors' script, which never transposes: on a p > d stack its fit is the
    hidden-side fit (A_i of p rows), while the default schedule fits the same stack transposed."""
    W = torch.randn(4, 12, 6)
    paper, _ = fit_mobe(W, MobeConfig(num_bases=2, rank=4, steps=3, schedule="paper"))
    assert paper.transposed == "0" and paper.A.shape == (4, 12, 4)
    forced, _ = fit_mobe(W, MobeConfig(num_bases=2, rank=4, steps=3, schedule="paper", basis_side="wider"))
    assert forced.transposed == "1" and forced.A.shape == (4, 6, 4)
    default, _ = fit_mobe(W, MobeConfig(num_bases=2, rank=4, steps=3))
    assert default.transposed == "1"
    resolved = MobeConfig(schedule="paper")
    assert MobeConfig(**resolved.to_dict()).basis_side == resolved.basis_side == "hidden"
