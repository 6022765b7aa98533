"""The synthetic stacks have the spectrum and the shared subspace they are said to have."""

import pytest
import torch

from mobe.factorize.synthetic import realistic_stack


def test_without_sharing_each_expert_has_the_power_law_spectrum():
    W = realistic_stack(4, 12, 40, decay=0.5, shared=0.0)
    values = torch.linalg.svdvals(W.double())
    expected = torch.arange(1, 13, dtype=torch.float64) ** -0.5
    torch.testing.assert_close(values / values[:, :1], expected.expand(4, 12), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("shared", [0.3, 0.8])
def test_experts_row_spaces_overlap_by_c_to_the_fourth(shared):
    W = realistic_stack(6, 16, 2048, decay=0.0, shared=shared, seed=1).double()
    # row space of expert i ~ span(c V + s V_i): for i != j, ||Q_i^T Q_j||^2 / k = c^4 + O(k / d)
    Q = torch.linalg.svd(W, full_matrices=False)[2]  # (E, k, d), orthonormal rows
    overlap = (Q @ Q.transpose(1, 2).unsqueeze(1)).pow(2).sum((-1, -2)) / 16  # (E, E)
    pairs = overlap[~torch.eye(6, dtype=torch.bool)]
    assert pairs.mean().item() == pytest.approx(shared**4, abs=0.03)
    torch.testing.assert_close(overlap.diagonal(), torch.ones(6, dtype=torch.float64))


def test_scale_and_refusals():
    assert realistic_stack(2, 8, 16).std().item() == pytest.approx(0.02, rel=1e-5)
    with pytest.raises(ValueError, match="shared"):
        realistic_stack(2, 8, 16, shared=1.5)
