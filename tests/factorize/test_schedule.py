"""The `fast` schedule against expectations that do not come from its own code."""

import pytest
import torch

from mobe import MobeConfig
from mobe.evaluate import weight_error
from mobe.factorize import activation_fn, fit_mobe, schedule
from mobe.factorize.schedule import (
    least_squares_factor,
    orthogonalize,
    projected_loss_backward,
    row_space_targets,
)


def _experts(num_experts=8, p=12, d=20, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    shared = torch.randn(p, d, generator=g)
    return torch.stack([shared + 0.5 * torch.randn(p, d, generator=g) for _ in range(num_experts)])


def _fast(**kwargs) -> MobeConfig:
    return MobeConfig(schedule="fast", **kwargs)


def test_each_schedule_has_its_own_default_step_count():
    assert MobeConfig().steps == 2000 and MobeConfig(schedule="adam").steps == 10000
    assert MobeConfig(schedule="paper").steps == 10000 and MobeConfig(schedule="fast", steps=7).steps == 7


def test_fast_starts_sharper_unless_told_and_other_schedules_keep_the_authors_logit():
    assert _fast().start_logit == 4.0 and _fast(init_logit=0.5).start_logit == 0.5
    assert MobeConfig(schedule="adam").start_logit == 1.0 and MobeConfig(schedule="paper").start_logit == 1.0
    assert MobeConfig().start_logit == 4.0  # fast is the default schedule
    assert MobeConfig(method="slbf", schedule="fast").start_logit == 1.0  # SLBF's published start


def test_row_space_targets_rebuild_the_stack_with_orthonormal_u():
    W = _experts(p=30, d=20)
    U, C = row_space_targets(W)
    assert U.shape == (8, 30, 20) and C.shape == (8, 20, 20)
    torch.testing.assert_close(torch.bmm(U, C), W, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(U.transpose(1, 2) @ U, torch.eye(20).expand(8, 20, 20), atol=1e-5, rtol=0)


def test_row_space_targets_by_chunks_of_experts_rebuild_the_whitened_stack():
    """Computed a few experts at a time, in a right metric: U_i C_i is W_i L_i (L_i formed densely here), U_i
    orthonormal, and the row space is the one of the whole stack at once."""
    from mobe.factorize.gram import GramFactor
    from mobe.factorize.weighted import OutputWeighting

    W = _experts(num_experts=7, p=12, d=20)
    g = torch.Generator().manual_seed(2)
    factor = GramFactor(7, 20)
    for e in range(7):
        factor.add(e, torch.randn(5 + 3 * e, 20, generator=g))  # 5 to 23 tokens: low-rank and dense metrics
    metric = OutputWeighting.from_factor(factor, "right")
    U, C = row_space_targets(W, chunk=3, metric=metric)
    whitened = W.double() @ metric.dense().double()
    torch.testing.assert_close(torch.bmm(U, C).double(), whitened, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(U.transpose(1, 2) @ U, torch.eye(12).expand(7, 12, 12), atol=1e-5, rtol=0)
    U_all, C_all = row_space_targets(W)
    torch.testing.assert_close(row_space_targets(W, chunk=3), (U_all, C_all), atol=1e-5, rtol=1e-5)


def test_least_squares_factor_equals_lstsq():
    g = torch.Generator().manual_seed(1)
    C, M = torch.randn(5, 12, 20, generator=g), torch.randn(5, 6, 20, generator=g)
    expected = torch.linalg.lstsq(M.double().transpose(1, 2), C.double().transpose(1, 2)).solution.transpose(1, 2)
    torch.testing.assert_close(least_squares_factor(C, M).double(), expected, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(least_squares_factor(C, M, exact=False).double(), expected, atol=1e-3, rtol=1e-3)


def test_projected_gradient_equals_the_gradient_of_the_reduced_loss():
    """Envelope theorem: the partial gradient at the optimal A is the gradient of min_A loss (checked in float64)."""
    g = torch.Generator().manual_seed(2)
    C = torch.randn(6, 10, 16, generator=g, dtype=torch.float64)
    bases = torch.randn(2, 3, 5, 16, generator=g, dtype=torch.float64)
    logits = torch.randn(6, 3, generator=g, dtype=torch.float64)
    act = activation_fn("silu")

    def reduced(bases: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        total = 0.0
        for grp, idx in ((0, slice(0, 3)), (1, slice(3, 6))):
            M = act(torch.einsum("em,mrd->erd", torch.softmax(logits[idx], -1), bases[grp]))
            A = torch.linalg.lstsq(M.transpose(1, 2), C[idx].transpose(1, 2)).solution.transpose(1, 2)
            total = total + (A @ M - C[idx]).pow(2).sum()
        return total / C.numel()

    b, lg = bases.clone().requires_grad_(), logits.clone().requires_grad_()
    expected_loss = reduced(b, lg)
    expected_loss.backward()
    b2, lg2 = bases.clone().requires_grad_(), logits.clone().requires_grad_()
    loss = projected_loss_backward(b2, lg2, C, act, chunk=2, numel=C.numel())
    assert loss == pytest.approx(expected_loss.item(), rel=1e-6)
    torch.testing.assert_close(b2.grad, b.grad, atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(lg2.grad, lg.grad, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("shape", [(3, 6, 10), (3, 10, 6)])
def test_orthogonalize_keeps_the_directions_and_flattens_the_spectrum(shape):
    G = torch.randn(*shape, generator=torch.Generator().manual_seed(3))
    G[..., 0, :] *= 50  # an ill-conditioned update
    out = orthogonalize(G)
    U, _, Vh = torch.linalg.svd(G, full_matrices=False)
    polar = U @ Vh
    assert torch.linalg.svdvals(out).min() > 0.5 and torch.linalg.svdvals(out).max() < 1.3
    cosine = (out * polar).sum((-1, -2)) / (out.norm(dim=(-1, -2)) * polar.norm(dim=(-1, -2)))
    assert cosine.min() > 0.95


@pytest.mark.parametrize("activation", ["tanh", "silu"])
def test_full_rank_bases_are_lossless_at_any_step(activation):
    """r = d makes every mixed basis square, so an exact A exists whenever it is invertible."""
    W = _experts(p=30, d=10)
    factors, stats = fit_mobe(W, _fast(num_bases=2, rank=10, activation=activation, steps=0, basis_side="hidden"))
    assert weight_error(W, factors.reconstruct())[0] < 1e-3 and stats.steps == 0


def test_one_basis_per_expert_at_full_rank_is_exact():
    W = _experts()
    factors, _ = fit_mobe(W, _fast(num_bases=8, rank=12, activation="none", steps=0, init_logit=60.0))
    assert weight_error(W, factors.reconstruct())[0] < 1e-4


@pytest.mark.parametrize("activation", ["tanh", "silu", "none"])
def test_lowers_the_error_and_reports_the_returned_factors(activation):
    W = _experts()
    config = _fast(num_bases=2, rank=6, activation=activation, steps=200, eval_every=20, init_logit=1.0)
    factors, stats = fit_mobe(W, config)
    _, mse = weight_error(W, factors.reconstruct())
    assert stats.best_loss < 0.7 * stats.init_loss
    assert mse == pytest.approx(stats.best_loss, rel=1e-3)
    projected = [loss for _, step, loss in stats.trace if step >= 30]  # after the 15% joint phase
    assert stats.best_loss <= min(projected) * (1 + 1e-6)  # the kept state is the best one visited


def test_stop_rule_stops_early_and_zero_disables_it():
    W = _experts()
    eager, eager_stats = fit_mobe(W, _fast(num_bases=2, rank=6, steps=400, eval_every=10, stop_tol=0.5))
    full, full_stats = fit_mobe(W, _fast(num_bases=2, rank=6, steps=400, eval_every=10, stop_tol=0))
    assert eager_stats.steps < 400 and full_stats.steps == 400
    assert full_stats.trace[-1][1] == 400 and eager_stats.trace[-1][1] == eager_stats.steps


@pytest.mark.parametrize("groups", [1, 2])
def test_chunking_does_not_change_the_fit(groups, monkeypatch):
    W = _experts()
    # 20 steps: both phases run; much later, the normalised basis step (unit size however small the gradient)
    # amplifies the rounding differences of the summation order, as any orthogonalised update would. The
    # orthogonalisation runs in float32 here: bfloat16 would turn those differences into different roundings.
    monkeypatch.setattr(schedule, "newton_schulz_dtype", lambda device: torch.float32)
    full, _ = fit_mobe(W, _fast(num_bases=4, rank=6, groups=groups, steps=20, batch_experts=8))
    chunked, _ = fit_mobe(W, _fast(num_bases=4, rank=6, groups=groups, steps=20, batch_experts=3))
    assert full.bases.shape == (groups, 4 // groups, 6, 20)
    torch.testing.assert_close(full.reconstruct(), chunked.reconstruct(), atol=1e-4, rtol=1e-4)


def test_deterministic_on_cpu():
    W = _experts()
    a, _ = fit_mobe(W, _fast(num_bases=4, rank=6, steps=60))
    b, _ = fit_mobe(W, _fast(num_bases=4, rank=6, steps=60))
    assert torch.equal(a.A, b.A) and torch.equal(a.bases, b.bases) and torch.equal(a.coef, b.coef)


def _ridge_residual(W: torch.Tensor, factors, ridge: float) -> float:
    """Relative residual of A_i (M_i M_i^T + lambda_i I) = W_i M_i^T, lambda_i = ridge x mean diag(M_i M_i^T)."""
    M, A = factors.mixed_bases().double(), factors.A.double()
    gram = M @ M.transpose(1, 2)
    lam = ridge * gram.diagonal(dim1=1, dim2=2).mean(-1)
    lhs = A @ (gram + lam[:, None, None] * torch.eye(gram.shape[-1], dtype=gram.dtype))
    rhs = W.double() @ M.transpose(1, 2)
    return ((lhs - rhs).norm() / rhs.norm()).item()


def test_ridge_solves_each_A_from_the_ridge_normal_equations():
    """`ridge` (--ridge) makes every A_i of the fast schedule the ridge solution for its fitted mixed bases, checked in
    float64; the default ridge's fit satisfies its own equations and not the larger ridge's."""
    g = torch.Generator().manual_seed(5)
    W = torch.randn(6, 8, 16, generator=g)
    ridged, _ = fit_mobe(W, _fast(num_bases=2, rank=5, steps=30, eval_every=10, ridge=0.05))
    plain, _ = fit_mobe(W, _fast(num_bases=2, rank=5, steps=30, eval_every=10))
    assert _ridge_residual(W, ridged, 0.05) < 1e-4
    assert _ridge_residual(W, plain, 0.05) > 1e-2
    assert _ridge_residual(W, plain, MobeConfig().ridge) < 1e-4
