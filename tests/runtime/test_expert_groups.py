"""Expert groups > 1 (each group of experts has its own bases) end to end: compress, reconstruct, native load."""

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

import mobe  # noqa: F401  (registers the native model types)
from mobe import MobeConfig, compress, reconstruct
from mobe.architectures import moe_layout
from mobe.checkpoint import CheckpointReader
from mobe.fixtures import build_tiny_moe

GROUPS, BASES = 2, 4


@pytest.fixture(scope="module")
def grouped(tmp_path_factory):
    """A tiny Kimi-K2-style model (DeepSeek-V3 layout) compressed with 2 expert groups, and its reconstruction."""
    root = tmp_path_factory.mktemp("groups")
    source = build_tiny_moe(root / "src", "deepseek_v3", num_experts=8, initializer_range=0.2)
    config = MobeConfig(
        num_bases=BASES, groups=GROUPS, rank=8, steps=30, activation="tanh", matrices=("gate", "up", "down")
    )
    compress(source, root / "native", config, progress=False)
    reconstruct(root / "native", root / "dense", progress=False)
    return source, root / "native", root / "dense"


def _tensors(folder):
    out = {}
    for path in folder.glob("*.safetensors"):
        with safe_open(path, "pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})  # noqa: SIM118
    return out


def test_each_group_rebuilds_from_its_own_bases(grouped):
    """The dense experts equal A_e tanh(sum_j coef_ej B_{group(e), j}), computed here from the stored factors."""
    _, native, dense = grouped
    layout = moe_layout(CheckpointReader(native).config)
    factors, rebuilt = _tensors(native), _tensors(dense)
    E = layout.num_experts
    for layer in layout.moe_layers:
        prefix = layout.arch.experts_prefix(layer)
        for matrix in ("gate", "up", "down"):
            name = layout.arch.matrices[matrix]
            A, bases, coef = (factors[f"{prefix}.{name}.mobe_{f}"].double() for f in ("A", "bases", "coef"))
            assert bases.shape[:2] == (GROUPS, BASES // GROUPS) and coef.shape == (E, BASES // GROUPS)
            assert not torch.allclose(bases[0], bases[1])  # the groups really have bases of their own
            for e in range(E):
                group = e // (E // GROUPS)  # contiguous groups of experts
                mixed = torch.tanh(torch.einsum("j,jrd->rd", coef[e], bases[group]))
                expected = A[e] @ mixed
                if matrix == "down":  # down is fitted as its transpose
                    expected = expected.T
                stored = rebuilt[f"{prefix}.{e}.{name}.weight"].double()
                torch.testing.assert_close(stored, expected, rtol=1e-5, atol=1e-6)


def test_native_runtime_indexes_groups_like_the_reconstruction(grouped):
    source, native, dense = grouped
    ids = torch.randint(2, 128, (2, 24), generator=torch.Generator().manual_seed(0))
    native_model = AutoModelForCausalLM.from_pretrained(native, dtype=torch.float32).eval()
    dense_model = AutoModelForCausalLM.from_pretrained(dense, dtype=torch.float32).eval()
    original = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    routed = set()
    hooks = [
        m.register_forward_pre_hook(lambda mod, args: routed.update(args[1].unique().tolist()))
        for n, m in native_model.named_modules()
        if n.endswith("mlp.experts")
    ]
    with torch.no_grad():
        got, want, first = native_model(ids).logits, dense_model(ids).logits, original(ids).logits
    for h in hooks:
        h.remove()
    assert {e // 4 for e in routed} == {0, 1}  # tokens reached experts of both groups
    assert ((got - want).norm() / want.norm()).item() <= 1e-4
    assert not torch.allclose(want, first)  # a real compression, not an identity
