"""Layer-local refinement moves toward a known optimum (not merely "never worse")."""

import pytest
import torch
import torch.nn.functional as F

from mobe.calibrate import LayerStats
from mobe.calibrate.refine import HOLDOUT_SHARE, refine_layer, routed_output
from mobe.factorize.svd import SvdFactors, low_rank


def test_refinement_recovers_a_perturbed_exact_solution():
    """Full-rank SVD factors reproduce the gate matrices exactly (output error 0); started from perturbed factors,
    the refinement must remove most of the error, and report the error its factors really have."""
    g = torch.Generator().manual_seed(0)
    E, p, d, T, k = 4, 8, 6, 400, 2
    originals = {
        "gate": torch.randn(E, p, d, generator=g),
        "up": torch.randn(E, p, d, generator=g),
        "down": torch.randn(E, d, p, generator=g) / p**0.5,
    }
    U, V = low_rank(originals["gate"], rank=d)
    torch.testing.assert_close(SvdFactors(U, V).reconstruct(), originals["gate"], rtol=1e-4, atol=1e-4)
    start = SvdFactors(U + 0.3 * U.std() * torch.randn(U.shape, generator=g), V.clone())

    stats = LayerStats.empty(E, p, d)
    stats.inputs = torch.randn(T, d, generator=g)
    stats.top_k_index = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)])
    stats.top_k_weights = torch.softmax(torch.randn(T, k, generator=g), dim=-1)

    refined, result = refine_layer({"gate": start}, originals, stats, F.silu, steps=400, lr=2e-2)
    assert result.before > 0.05  # the perturbation is visible in the output
    assert result.after < 0.25 * result.before  # and mostly removed: the optimum (0) is reachable

    hold = slice(T - max(1, int(T * HOLDOUT_SHARE)), T)  # recompute the held-out error from the returned factors
    x, index, weights = stats.inputs[hold], stats.top_k_index[hold], stats.top_k_weights[hold]
    target = routed_output(x, index, weights, originals, F.silu)
    got = routed_output(x, index, weights, {**originals, "gate": refined["gate"].reconstruct()}, F.silu)
    assert ((got - target).norm() / target.norm()).item() == pytest.approx(result.after, rel=1e-3, abs=1e-6)
