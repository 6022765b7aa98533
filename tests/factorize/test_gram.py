"""Factored Grams: exactly the Gram of the rows added (float64), in min(n_i, d) rows per expert; the metric built on
them is the damped, normalised Gram; saving and reading (old dense-Gram files included) changes nothing."""

import pytest
import torch

from mobe.calibrate.stats import LayerStats
from mobe.export import atomic_save_file
from mobe.factorize import weighted
from mobe.factorize.gram import GramFactor
from mobe.factorize.weighted import OutputWeighting

D = 12
# rows routed to each expert: none, fewer than d, exactly d, more than d in blocks that cross d and d/2 boundaries
ROWS = [0, 5, D, 3 * D + 7]


def _blocks(seed=0):
    g = torch.Generator().manual_seed(seed)
    X = [torch.randn(n, D, generator=g) * torch.linspace(0.1, 5.0, D) for n in ROWS]
    factor = GramFactor(len(ROWS), D)
    for e, rows in enumerate(X):
        for block in rows.split(5):
            factor.add(e, block)
    return X, factor


def test_the_factor_holds_the_gram_of_every_row_added_exactly():
    X, factor = _blocks()
    assert factor.counts.tolist() == ROWS
    for e, rows in enumerate(X):
        direct = rows.double().T @ rows.double()
        assert factor.factor(e).shape[0] == min(ROWS[e], D)
        assert torch.allclose(factor.gram([e])[0], direct, rtol=1e-12, atol=1e-12 * direct.abs().max().item())
    assert factor.factor(1).dtype == torch.float32  # rows kept as they came: an exact copy
    assert factor.factor(3).dtype == torch.float64 and torch.equal(factor.factor(3), factor.factor(3).triu())
    held = 4 * D * (ROWS[1]) + 8 * D * D * 2 + 8 * len(ROWS)  # rows of expert 1, R of experts 2 and 3, counts
    assert factor.nbytes == held


def test_tensors_round_trip_and_reject_a_mismatch():
    _, factor = _blocks()
    again = GramFactor.from_tensors(factor.tensors())
    assert torch.equal(again.gram(), factor.gram())
    bad = factor.tensors() | {"1.0": torch.zeros(3, D)}
    with pytest.raises(ValueError, match="factor of expert 1 has 3 rows, expected 5"):
        GramFactor.from_tensors(bad)


def test_an_old_dense_gram_file_is_read_into_factors(tmp_path):
    X, factor = _blocks()
    g = torch.Generator().manual_seed(1)
    H = [torch.randn(n, 7, generator=g) for n in ROWS]
    legacy = {
        "gram_in": factor.gram(),
        "gram_mid": torch.stack([h.double().T @ h.double() for h in H]),
        "counts": torch.tensor(ROWS),
    }
    atomic_save_file(legacy, tmp_path / "old.safetensors", {})
    stats = LayerStats.load(tmp_path / "old.safetensors")
    for matrix, name in (("gate", "gram_in"), ("down", "gram_mid")):
        assert stats.factor(matrix).counts.tolist() == ROWS
        assert torch.allclose(stats.gram(matrix), legacy[name], atol=1e-10 * legacy[name].abs().max().item())
    stats.save(tmp_path / "new.safetensors", {})  # and written in the factored layout from then on
    assert torch.allclose(LayerStats.load(tmp_path / "new.safetensors").gram("up"), legacy["gram_in"], atol=1e-8)


def test_only_the_factor_a_job_needs_is_read(tmp_path):
    _, factor = _blocks()
    stats = LayerStats(factor, GramFactor.from_tensors({k: v.clone() for k, v in factor.tensors().items()}))
    stats.save(tmp_path / "s.safetensors", {})
    down = LayerStats.load(tmp_path / "s.safetensors", matrices=("down",))
    assert down.inputs_factor.nbytes == 8 * len(ROWS) and down.mid_factor.nbytes == stats.mid_factor.nbytes


@pytest.mark.parametrize("damping,prior", [(0.01, None), (0.3, 2.0)])
def test_the_metric_is_the_damped_normalised_gram(damping, prior):
    """M_i = (G_i + (damping * mean diag G_i + prior * per-token diag) I) / (mean diagonal over the layer)."""
    X, factor = _blocks()
    weighting = OutputWeighting.from_factor(factor, "right", damping=damping, prior_tokens=prior)
    G = torch.stack([x.double().T @ x.double() for x in X])
    diag = G.diagonal(dim1=-2, dim2=-1).mean(-1)
    per_token = diag.sum() / sum(ROWS)
    M = G + (damping * diag + (D if prior is None else prior) * per_token)[:, None, None] * torch.eye(D)
    M = M / M.diagonal(dim1=-2, dim2=-1).mean()
    L = weighting.dense().double()
    assert torch.allclose(L, L.mT, atol=1e-6)  # the symmetric square root
    assert torch.allclose(L @ L.mT, M, atol=1e-5 * M.abs().max().item())
    assert weighting.nbytes < 4 * len(ROWS) * D * D  # never a d x d matrix per expert (expert 0 has no rows)
    mean = weighting.mean([1, 2, 3]).dense()[0].double()
    assert torch.allclose(mean @ mean, M[1:].mean(0), atol=1e-5 * M.abs().max().item())


@pytest.mark.parametrize("side", ["right", "left"])
def test_apply_and_unwhiten_are_the_dense_square_root_and_its_inverse(side, monkeypatch):
    _, factor = _blocks()
    weighting = OutputWeighting.from_factor(factor, side)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(len(ROWS), 5, D, generator=g)
    x = x if side == "right" else x.mT.contiguous()
    L = weighting.dense()
    expected = x @ L if side == "right" else L.mT @ x
    assert torch.allclose(weighting.apply(x), expected, atol=1e-5)
    monkeypatch.setattr(weighted, "CHUNK_ELEMENTS", 1)  # one expert at a time: same result
    assert torch.allclose(weighting.apply(x), expected, atol=1e-5)
    assert torch.allclose(weighting.unwhiten(weighting.apply(x)), x, atol=1e-4)
    assert torch.allclose(weighting.apply(x[1:3], torch.tensor([1, 2])), expected[1:3], atol=1e-5)


def test_an_undamped_metric_with_too_few_tokens_is_refused():
    _, factor = _blocks()
    with pytest.raises(ValueError, match="expert 0 is singular"):
        OutputWeighting.from_factor(factor, damping=0.0, prior_tokens=0.0)
