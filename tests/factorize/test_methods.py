"""The comparison methods: exactness at full rank, closed-form sizes, and rank-for-budget."""

import pytest
import torch

from mobe import MobeConfig
from mobe.evaluate import weight_error
from mobe.factorize import budget_for_ratio, fit_d2moe, fit_molae, fit_svd, get_method, method_names


def _experts(E=8, p=12, d=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(E, p, d, generator=g)


def test_registry_lists_all_methods():
    assert method_names() == ["d2moe", "mobe", "molae", "slbf", "svd"]
    with pytest.raises(ValueError, match="available: d2moe, mobe, molae, slbf, svd"):
        get_method("pruning")


def test_svd_full_rank_is_exact_and_truncation_is_optimal():
    W = _experts()
    full, _ = fit_svd(W, rank=12)
    assert weight_error(W, full.reconstruct())[0] < 1e-5
    low, _ = fit_svd(W, rank=3)
    # Eckart-Young: the error of the best rank-3 approximation is the tail of the singular values.
    S = torch.linalg.svdvals(W)
    expected = (S[:, 3:].pow(2).sum() / S.pow(2).sum()).sqrt().item()
    assert weight_error(W, low.reconstruct())[0] == pytest.approx(expected, rel=1e-4)


def test_d2moe_base_is_the_mean_and_full_rank_delta_is_exact():
    W = _experts()
    factors, _ = fit_d2moe(W, rank=12)
    torch.testing.assert_close(factors.base, W.mean(0))
    assert weight_error(W, factors.reconstruct())[0] < 1e-5
    rank0, _ = fit_d2moe(W, rank=0)
    torch.testing.assert_close(rank0.reconstruct(), W.mean(0).expand_as(W))


def test_molae_full_latent_is_exact_and_groups_have_own_projection():
    W = _experts()
    assert weight_error(W, fit_molae(W, rank=20)[0].reconstruct())[0] < 1e-5
    factors, _ = fit_molae(W, rank=5, groups=2)
    assert factors.B.shape == (2, 5, 20) and factors.A.shape == (8, 12, 5)
    # A_i is the projection of W_i onto its group's latent space: the residual is orthogonal to it.
    residual = W[6] - factors.reconstruct(torch.tensor([6]))[0]
    assert (residual @ factors.B[1].T).abs().max() < 1e-4


# SLBF's square A_i alone is min(p, d) / max(p, d) of a matrix: it needs a milder cut on this small stack.
@pytest.mark.parametrize(
    ("name", "ratio"), [("mobe", 0.4), ("svd", 0.4), ("d2moe", 0.4), ("molae", 0.4), ("slbf", 0.1)]
)
def test_parameters_match_fitted_factors_and_budget(name, ratio):
    E, p, d = 8, 12, 20
    config = MobeConfig(method=name, num_bases=2, rank=4, steps=2)
    method = get_method(name)
    factors, _ = method.fit(_experts(E, p, d), config, "cpu", None)
    assert factors.num_parameters() == method.parameters(E, p, d, config, 4)
    budget = budget_for_ratio(E, p, d, ratio, compressed=2)
    rank = method.rank_for_budget(E, p, d, config, budget)
    assert rank >= 1
    assert method.parameters(E, p, d, config, rank) <= budget < method.parameters(E, p, d, config, rank + 1)


def test_budget_for_ratio_closed_form():
    # (3 - k) E p d + k P = (1 - ratio) 3 E p d with k = 2: P = E p d (1 - 1.5 ratio)
    assert budget_for_ratio(4, 10, 10, 0.5, compressed=2) == 100
    assert budget_for_ratio(4, 10, 10, 0.25, compressed=3) == 300
