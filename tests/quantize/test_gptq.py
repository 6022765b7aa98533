"""GPTQ against a reference written another way: the sequential update with the explicit inverse Hessian of the
columns still free (the optimal-brain-quantiser form GPTQ restates with a Cholesky factor and lazy blocks)."""

import pytest
import torch

from mobe.quantize.gptq import gptq_quantize, gptq_round, output_error
from mobe.quantize.groupwise import dequantize, fake_quantize, group_scales, pack, packed_shape, unpack


def _reference(weight, hessian, entry_scales, bits, damping=0.01):
    W = weight.double().clone()
    H = hessian.double().clone()
    H += damping * H.diagonal().mean() * torch.eye(H.shape[0], dtype=H.dtype)
    cols = W.shape[1]
    Q = torch.empty_like(W)
    for j in range(cols):
        free = torch.arange(j, cols)
        Hinv = torch.linalg.inv(H[free][:, free])  # inverse Hessian of the columns not yet rounded
        s = entry_scales[:, j].double()
        q = torch.clamp(torch.round((W[:, j].float() / s.float()).double()), -(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
        Q[:, j] = q
        read_back = (q.float() * s.float()).double()  # the stored weight, as float32 scales read it back
        W[:, free] -= torch.outer((W[:, j] - read_back) / Hinv[0, 0], Hinv[0])
    return Q


def _correlated_hessian(cols, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4 * cols, cols, generator=g) @ torch.randn(cols, cols, generator=g)
    return x.T @ x


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("block_size", [1, 5, 128])
def test_matches_the_sequential_reference(bits, block_size):
    torch.manual_seed(bits)
    weight, hessian = torch.randn(6, 12), _correlated_hessian(12, bits)
    scales = group_scales(weight, bits, 4).float().repeat_interleave(4, dim=-1)
    q = gptq_round(weight, hessian, scales, bits, block_size=block_size)
    assert torch.equal(q.double(), _reference(weight, hessian, scales, bits))


def test_identity_hessian_is_round_to_nearest():
    torch.manual_seed(0)
    weight = torch.randn(5, 40)
    q, scales = gptq_quantize(weight, torch.eye(40), 3, 16)
    assert torch.equal(dequantize(q, scales, 16, torch.float32), fake_quantize(weight, 3, 16))


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_lower_output_error_than_round_to_nearest(bits):
    torch.manual_seed(1)
    weight, hessian = torch.randn(3, 32, 64), torch.stack([_correlated_hessian(64, s) for s in range(3)])
    q, scales = gptq_quantize(weight, hessian, bits, 32)
    gptq_err = output_error(weight, dequantize(q, scales, 32, torch.float32), hessian)
    rtn_err = output_error(weight, fake_quantize(weight, bits, 32), hessian)
    assert (gptq_err < 0.8 * rtn_err).all(), (gptq_err, rtn_err)


def test_act_order_keeps_the_groups_scales_and_undoes_the_permutation():
    torch.manual_seed(2)
    weight, hessian = torch.randn(4, 24), _correlated_hessian(24, 7)
    q, scales = gptq_quantize(weight, hessian, 4, 8, act_order=True)
    assert torch.equal(scales, group_scales(weight, 4, 8))
    order = torch.argsort(hessian.diagonal(), descending=True)
    entry = scales.repeat_interleave(8, dim=-1)
    expected = _reference(weight[:, order], hessian[order][:, order], entry[:, order], 4)[:, torch.argsort(order)]
    assert torch.equal(q.double(), expected)


def test_dead_columns_round_to_zero():
    weight, hessian = torch.randn(3, 8), _correlated_hessian(8, 3)
    hessian[2, :] = hessian[:, 2] = 0
    q, _ = gptq_quantize(weight, hessian, 4, 8)
    assert (q[:, 2] == 0).all()


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("n", [1, 7, 8, 13, 64])
def test_pack_round_trip_and_density(bits, n):
    q = torch.randint(-(2 ** (bits - 1)), 2 ** (bits - 1), (3, n), dtype=torch.int8)
    packed = pack(q, bits)
    assert packed.shape == packed_shape(q.shape, bits) == (3, -(-n * bits // 8))
    assert torch.equal(unpack(packed, bits, n), q)


def test_four_bit_layout_is_two_nibbles_per_byte_even_entry_low():
    q = torch.tensor([[1, -2, 3, -8, 7]], dtype=torch.int8)
    assert pack(q, 4).tolist() == [[0x01 | 0xE0, 0x03 | 0x80, 0x07]]


def test_act_order_is_per_matrix_in_a_batch():
    torch.manual_seed(3)
    weight = torch.randn(3, 4, 24)
    hessian = torch.stack([_correlated_hessian(24, s) for s in range(3)])
    q, scales = gptq_quantize(weight, hessian, 3, 8, act_order=True)
    for i in range(3):
        qi, si = gptq_quantize(weight[i], hessian[i], 3, 8, act_order=True)
        assert torch.equal(q[i], qi) and torch.equal(scales[i], si)


def test_error_feedback_reads_the_weight_back_in_the_scales_dtype():
    """bf16 scales: each column's error is against bf16(q * s), the weight the stored checkpoint reads back."""
    torch.manual_seed(4)
    weight, hessian = torch.randn(8, 32).bfloat16(), _correlated_hessian(32, 4)
    scales = group_scales(weight, 4, 16).repeat_interleave(16, dim=-1)
    assert scales.dtype == torch.bfloat16
    q = gptq_round(weight, hessian, scales, 4, block_size=7)
    W = weight.double().clone()
    H = hessian.double() + 0.01 * hessian.diagonal().double().mean() * torch.eye(32, dtype=torch.float64)
    for j in range(32):  # the sequential form, with the bf16 read-back
        free = torch.arange(j, 32)
        Hinv = torch.linalg.inv(H[free][:, free])
        qj = torch.clamp(torch.round(W[:, j].float() / scales[:, j].float()), -8, 7)
        assert torch.equal(q[:, j].float(), qj)
        read_back = (qj.bfloat16() * scales[:, j]).double()
        W[:, free] -= torch.outer((W[:, j] - read_back) / Hinv[0, 0], Hinv[0])


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_mse_scales_are_the_best_shrink_of_each_group(bits):
    """The "mse" observer against a per-group search written out by hand: each group's scale is the grid's shrink of
    its min-max scale with the least rounding error, never worse than min-max itself."""
    from mobe.quantize.groupwise import SHRINK_GRID

    torch.manual_seed(bits)
    w = torch.randn(6, 40) * torch.rand(6, 40).pow(4) * 3  # heavy tails: clipping pays
    group = 16
    minmax = group_scales(w, bits, group)
    mse = group_scales(w, bits, group, observer="mse")
    qmax, qmin = 2 ** (bits - 1) - 1, -(2 ** (bits - 1))
    for row in range(6):
        for g in range(3):
            x = w[row, g * group : (g + 1) * group]

            def error(s: float, x=x) -> float:
                return float(((x / s).round().clamp(qmin, qmax) * s - x).pow(2).sum())

            best = min((float(minmax[row, g]) * a for a in SHRINK_GRID), key=error)
            assert float(mse[row, g]) == pytest.approx(best, rel=1e-6)
            assert error(float(mse[row, g])) <= error(float(minmax[row, g]))
    # identity Hessian: GPTQ is round to nearest on the chosen scales, so its weight error falls too
    q, s = gptq_quantize(w, torch.eye(40), bits, group, observer="mse")
    q0, s0 = gptq_quantize(w, torch.eye(40), bits, group)
    assert torch.equal(s, mse)
    assert (dequantize(q, s, group) - w).pow(2).sum() < (dequantize(q0, s0, group) - w).pow(2).sum()
    with pytest.raises(ValueError, match="observer"):
        group_scales(w, bits, group, observer="percentile")
