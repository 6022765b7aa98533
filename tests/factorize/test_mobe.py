import pytest
import torch

from mobe import MobeConfig
from mobe.evaluate import mobe_parameters, weight_error
from mobe.factorize import fit_mobe, init_svd_groups, split_groups


def _experts(num_experts=8, p=12, d=20, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    shared = torch.randn(p, d, generator=g)
    return torch.stack([shared + 0.5 * torch.randn(p, d, generator=g) for _ in range(num_experts)])


def test_split_groups_is_contiguous_and_balanced():
    parts = split_groups(10, 4)
    assert [list(r) for r in parts] == [[0, 1], [2, 3, 4], [5, 6], [7, 8, 9]]


def test_init_with_one_expert_per_basis_and_full_rank_is_exact():
    W = _experts()
    A, bases, logits = init_svd_groups(W, num_bases=8, rank=12, groups=1, init_logit=1.0)
    assert bases.shape == (1, 8, 12, 20) and A.shape == (8, 12, 12)
    assert torch.equal(logits.argmax(-1), torch.arange(8))
    rebuilt = torch.bmm(A, bases[0])  # expert e uses basis e exactly when the mixing is one-hot
    torch.testing.assert_close(rebuilt, W, atol=1e-4, rtol=1e-4)


def test_fit_at_zero_steps_reproduces_the_init_through_the_softmax():
    W = _experts()
    config = MobeConfig(schedule="adam", num_bases=8, rank=12, activation="none", steps=0, init_logit=60.0)
    factors, stats = fit_mobe(W, config)
    rel, _ = weight_error(W, factors.reconstruct())
    assert rel < 1e-5 and stats.best_step == 0


@pytest.mark.parametrize("activation", ["tanh", "silu", "none"])
def test_optimisation_lowers_the_error_below_the_init(activation):
    W = _experts(num_experts=8, p=12, d=20)
    factors, stats = fit_mobe(
        W, MobeConfig(schedule="adam", num_bases=2, rank=6, activation=activation, steps=150, eval_every=10)
    )
    _, mse = weight_error(W, factors.reconstruct())
    assert stats.best_loss < 0.7 * stats.init_loss
    assert mse == pytest.approx(stats.best_loss, rel=1e-3)  # the reported error is that of the returned factors


def test_parameter_count_matches_closed_form():
    E, p, d, m, r = 8, 12, 20, 4, 6
    factors, _ = fit_mobe(_experts(E, p, d), MobeConfig(schedule="adam", num_bases=m, rank=r, steps=2))
    assert factors.num_parameters() == E * p * r + m * r * d + E * m == mobe_parameters(E, p, d, m, r)


def test_expert_groups_have_their_own_bases():
    E, p, d, m, g = 8, 12, 20, 4, 2
    factors, _ = fit_mobe(_experts(E, p, d), MobeConfig(schedule="adam", num_bases=m, rank=6, groups=g, steps=5))
    assert factors.bases.shape == (g, m // g, 6, d) and factors.coef.shape == (E, m // g)
    assert factors.num_parameters() == mobe_parameters(E, p, d, m, 6, g)
    torch.testing.assert_close(factors.coef.sum(-1), torch.ones(E))


@pytest.mark.parametrize("groups", [1, 2])
def test_chunked_gradient_accumulation_equals_full_batch(groups):
    W = _experts()
    full, _ = fit_mobe(W, MobeConfig(schedule="adam", num_bases=4, rank=6, groups=groups, steps=20, batch_experts=8))
    chunked, _ = fit_mobe(W, MobeConfig(schedule="adam", num_bases=4, rank=6, groups=groups, steps=20, batch_experts=3))
    torch.testing.assert_close(full.reconstruct(), chunked.reconstruct(), atol=1e-4, rtol=1e-4)


def test_deterministic_on_cpu():
    W = _experts()
    a, _ = fit_mobe(W, MobeConfig(schedule="adam", num_bases=4, rank=6, steps=30))
    b, _ = fit_mobe(W, MobeConfig(schedule="adam", num_bases=4, rank=6, steps=30))
    assert torch.equal(a.A, b.A) and torch.equal(a.bases, b.bases) and torch.equal(a.coef, b.coef)


def test_refuses_more_bases_than_experts():
    with pytest.raises(ValueError, match="num_bases"):
        fit_mobe(_experts(num_experts=4), MobeConfig(schedule="adam", num_bases=8, steps=1))


def test_reconstruct_matches_the_formula_expert_by_expert():
    factors, _ = fit_mobe(
        _experts(), MobeConfig(schedule="adam", num_bases=4, rank=6, groups=2, activation="silu", steps=5)
    )
    for e in range(8):
        g = e // 4
        mixed = sum(factors.coef[e, j] * factors.bases[g, j] for j in range(2))
        expected = factors.A[e] @ torch.nn.functional.silu(mixed)
        torch.testing.assert_close(factors.reconstruct(torch.tensor([e]))[0], expected)
    torch.testing.assert_close(factors.reconstruct()[5], factors.reconstruct(torch.tensor([5]))[0])
