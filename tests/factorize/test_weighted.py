"""Output-error weighting (calibration): the weighted losses, the identity case, whitened SVD, the other methods."""

import pytest
import torch

from mobe import MobeConfig
from mobe.factorize import fit_d2moe, fit_mobe, fit_molae, fit_svd
from mobe.factorize.gram import GramFactor
from mobe.factorize.weighted import OutputWeighting, output_error


def _layer(E=6, p=10, d=12, n=40, seed=0):
    """Experts W (E, p, d) and, per expert, n tokens X_i (n, d) with an outlier dimension and uneven scales."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(E, p, d, generator=g)
    X = torch.randn(E, n, d, generator=g) * torch.linspace(0.2, 3.0, d)
    X[..., 0] *= 8  # an outlier dimension, as in trained LLMs
    return W, X


def _gram(X):
    return torch.einsum("end,enf->edf", X.double(), X.double())


def _factor(X):
    """The factored Grams of tokens X (E, n, d): each expert's rows added in two blocks."""
    factor = GramFactor(X.shape[0], X.shape[-1])
    for e, rows in enumerate(X):
        factor.add(e, rows[: len(rows) // 2])
        factor.add(e, rows[len(rows) // 2 :])
    return factor


def test_weighted_loss_is_the_output_error_of_the_tokens():
    W, X = _layer()
    What = W + 0.1 * torch.randn_like(W)
    weighting = OutputWeighting.from_factor(_factor(X), "right", damping=0.0, prior_tokens=0.0)
    direct = sum(((X[i] @ (W[i] - What[i]).T).double().pow(2).sum()) for i in range(W.shape[0])).item()
    scale = _gram(X).diagonal(dim1=-2, dim2=-1).mean().item()  # the metric is G / its mean diagonal
    assert weighting.squared_error(W, What) * scale == pytest.approx(direct, rel=1e-4)
    num = direct
    den = sum((X[i] @ W[i].T).double().pow(2).sum() for i in range(W.shape[0])).item()
    assert output_error(_factor(X), W, What) == pytest.approx((num / den) ** 0.5, rel=1e-6)


def test_left_weighting_is_the_output_error_of_a_down_matrix():
    """Down D_i (d x p) is fitted as W'_i = D_i^T (p x d); its inputs H_i (n, p) act from the left of W'."""
    g = torch.Generator().manual_seed(1)
    E, d, p, n = 4, 12, 10, 30
    D = torch.randn(E, d, p, generator=g)
    H = torch.randn(E, n, p, generator=g) * torch.linspace(0.1, 2.0, p)
    Dhat = D + 0.1 * torch.randn(E, d, p, generator=g)
    G = _gram(H)
    weighting = OutputWeighting.from_factor(_factor(H), "left", damping=0.0, prior_tokens=0.0)
    direct = sum((H[i] @ (D[i] - Dhat[i]).T).double().pow(2).sum() for i in range(E)).item()
    scale = G.diagonal(dim1=-2, dim2=-1).mean().item()
    Wt, What_t = D.transpose(1, 2), Dhat.transpose(1, 2)
    assert weighting.squared_error(Wt, What_t) * scale == pytest.approx(direct, rel=1e-4)
    den = sum((H[i] @ D[i].T).double().pow(2).sum() for i in range(E)).item()
    assert output_error(_factor(H), Wt, What_t, "left") == pytest.approx((direct / den) ** 0.5, rel=1e-6)


def test_identity_grams_give_the_unweighted_fast_fit():
    """The fast schedule's start and first exact solve are the plain fit's; later steps agree in loss only (the
    orthogonalised basis step is computed in bfloat16 where the CPU has it, and amplifies 1e-7 differences)."""
    W, _ = _layer(E=8, p=12, d=16)
    gram = 50.0 * torch.eye(16, dtype=torch.float64).expand(8, 16, 16)
    weighting = OutputWeighting.from_factor(GramFactor.from_gram(gram, torch.full((8,), 50)), "right")
    for steps, tolerance in ((0, 1e-5), (30, 1e-2)):
        config = MobeConfig(num_bases=2, rank=6, steps=steps, eval_every=10, activation="silu", schedule="fast")
        plain, plain_stats = fit_mobe(W, config)
        weighted, weighted_stats = fit_mobe(W, config, weighting=weighting)
        assert weighted_stats.best_loss == pytest.approx(plain_stats.best_loss, rel=tolerance)
        if steps == 0:
            assert torch.allclose(plain.reconstruct(), weighted.reconstruct(), atol=1e-5)


def test_identity_grams_give_the_unweighted_fit():
    W, _ = _layer(E=8, p=12, d=16)
    config = MobeConfig(num_bases=2, rank=6, steps=30, eval_every=10, activation="silu", schedule="adam")
    gram = 50.0 * torch.eye(16, dtype=torch.float64).expand(8, 16, 16)
    weighting = OutputWeighting.from_factor(GramFactor.from_gram(gram, torch.full((8,), 50)), "right")
    assert torch.allclose(weighting.dense(), torch.eye(16).expand(8, 16, 16), atol=1e-6)
    torch.manual_seed(0)
    plain, plain_stats = fit_mobe(W, config)
    torch.manual_seed(0)
    weighted, weighted_stats = fit_mobe(W, config, weighting=weighting)
    assert torch.allclose(plain.reconstruct(), weighted.reconstruct(), atol=1e-5)
    assert weighted_stats.best_loss == pytest.approx(plain_stats.best_loss, rel=1e-5)


def test_few_tokens_fall_back_to_the_weight_error():
    _, X = _layer(E=3, d=12)
    factor = GramFactor(3, 12)
    factor.add(0, X[0])
    factor.add(2, X[2, :1])  # expert 1 saw no token, expert 2 one
    M = OutputWeighting.from_factor(factor, "right").dense()
    M = M @ M.transpose(1, 2)
    unseen = M[1] / M[1].diagonal().mean()
    assert torch.allclose(unseen, torch.eye(12), atol=1e-6)  # no tokens: isotropic, i.e. the weight error
    assert torch.linalg.eigvalsh(M[2].double()).min() > 0  # one token: still positive definite


def test_whitened_svd_is_eckart_young_in_the_output_metric():
    W, X = _layer()
    weighting = OutputWeighting.from_factor(_factor(X), "right", damping=0.0, prior_tokens=0.0)
    k = 4
    whitened, _ = fit_svd(W, k, weighting=weighting)
    plain, _ = fit_svd(W, k)
    # Its weighted error is the tail of the whitened spectrum, and it beats the plain SVD's output error.
    S = torch.linalg.svdvals(weighting.apply(W).double())
    assert weighting.squared_error(W, whitened.reconstruct()) == pytest.approx(S[:, k:].pow(2).sum().item(), rel=1e-3)
    assert output_error(_factor(X), W, whitened.reconstruct()) < output_error(_factor(X), W, plain.reconstruct())
    full, _ = fit_svd(W, 10, weighting=weighting)
    assert torch.allclose(full.reconstruct(), W, atol=1e-3)


@pytest.mark.parametrize("side", ["right", "left"])
def test_every_method_lowers_the_output_error_with_a_weighting(side):
    W, X = _layer(E=8, p=12, d=12)
    gram = _factor(X)
    weighting = OutputWeighting.from_factor(gram, side, damping=0.0, prior_tokens=0.0)
    config = MobeConfig(num_bases=2, rank=5, steps=200, eval_every=50, activation="silu")
    fits = {
        "svd": lambda w: fit_svd(W, 4, weighting=w),
        "d2moe": lambda w: fit_d2moe(W, 4, weighting=w),
        "molae": lambda w: fit_molae(W, 6, groups=2, weighting=w),
        "mobe": lambda w: fit_mobe(W, config, weighting=w),
    }
    for name, fit in fits.items():
        torch.manual_seed(0)
        plain = output_error(gram, W, fit(None)[0].reconstruct(), side)
        torch.manual_seed(0)
        weighted = output_error(gram, W, fit(weighting)[0].reconstruct(), side)
        assert weighted < plain, (name, weighted, plain)


def test_whitened_mobe_init_starts_lower_in_the_metric():
    W, X = _layer(E=8, p=12, d=16)
    weighting = OutputWeighting.from_factor(_factor(X), "right")
    config = MobeConfig(num_bases=2, rank=6, steps=0, activation="none", init_logit=20.0)
    plain, _ = fit_mobe(W, config)
    whitened, _ = fit_mobe(W, config, weighting=weighting)
    assert weighting.squared_error(W, whitened.reconstruct()) < weighting.squared_error(W, plain.reconstruct())
