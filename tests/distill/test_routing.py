"""The routing loss and the learning-rate schedule of distillation."""

import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from mobe.architectures import moe_layout
from mobe.checkpoint import CheckpointReader
from mobe.distill import DistillConfig, compute_targets, teacher_topk
from mobe.distill.train import lr_factor, routing_kl
from mobe.distill.trainable import RouterHooks, router_modules
from mobe.fixtures import build_tiny_moe

VOCAB = 512


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("routing")
    return {arch: build_tiny_moe(root / arch, arch, vocab_size=VOCAB) for arch in ("qwen3_moe", "mixtral")}


def _sequences():
    return [torch.randint(2, VOCAB, (n,), generator=torch.Generator().manual_seed(n)) for n in (12, 7)]


def _model(path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@pytest.mark.parametrize("arch", ["qwen3_moe", "mixtral"])
def test_streamed_teacher_records_each_layers_routing(arch, tiny):
    """The streamed routing equals the router logits that transformers' own full forward reports."""
    sequences = _sequences()
    targets = compute_targets(tiny[arch], sequences, top_k=5, meta={}, router_top_k=3)
    model = _model(tiny[arch])
    layers = len(moe_layout(CheckpointReader(tiny[arch]).config).moe_layers)
    for i, ids in enumerate(sequences):
        with torch.no_grad():
            reported = model(ids[None], output_router_logits=True).router_logits
        assert targets.router_logprobs[i].shape == (layers, ids.numel(), 3)
        for k, logits in enumerate(reported):
            values, indices, tail = teacher_topk(logits.reshape(ids.numel(), -1), 3)
            torch.testing.assert_close(targets.router_logprobs[i][k], values, rtol=1e-4, atol=1e-4)
            assert torch.equal(targets.router_indices[i][k].long(), indices)
            torch.testing.assert_close(targets.router_tail[i][k], tail, rtol=1e-4, atol=1e-4)


def test_routing_kl_is_zero_for_the_original_and_grows_with_a_changed_router(tiny):
    path = tiny["qwen3_moe"]
    sequences = _sequences()
    experts = moe_layout(CheckpointReader(path).config).num_experts
    targets = compute_targets(path, sequences, top_k=5, meta={}, router_top_k=experts)  # k = E: the full KL
    model = _model(path)
    routers = list(router_modules(model, moe_layout(CheckpointReader(path).config)).values())
    routed = [None] * len(routers)
    with RouterHooks(routers, routed.__setitem__):
        with torch.no_grad():
            model(sequences[0][None])
        assert routing_kl(routed, targets, 0).abs().max() < 1e-5

        # Only the last layer's router changed: its logits are known, so the full KL is known in closed form.
        with torch.no_grad():
            teacher_logits = routed[-1].clone()
            routers[-1].weight.mul_(-1.0)  # negated weights: negated logits, the same inputs
            model(sequences[0][None])
        t, s = torch.log_softmax(teacher_logits.double(), -1), torch.log_softmax(-teacher_logits.double(), -1)
        expected = (t.exp() * (t - s)).sum(-1) / len(routers)
        torch.testing.assert_close(routing_kl(routed, targets, 0).double(), expected, rtol=1e-4, atol=1e-6)
    assert all(not r._forward_hooks for r in routers)  # leaving the block removes the hooks


def test_lr_factor_is_a_warmup_then_a_cosine():
    total, warmup = 100, 0.1  # 10 warmup steps
    assert [lr_factor(s, total, warmup) for s in (0, 4, 9)] == pytest.approx([0.1, 0.5, 1.0])
    assert lr_factor(10, total, warmup) == pytest.approx(1.0)
    assert lr_factor(55, total, warmup) == pytest.approx(0.5)  # halfway through the decay
    assert lr_factor(99, total, warmup) == pytest.approx(0.5 * (1 + math.cos(math.pi * 89 / 90)))
    assert lr_factor(0, total, 0.0) == pytest.approx(1.0)


def test_distill_settings_are_checked():
    with pytest.raises(ValueError, match="schedule"):
        DistillConfig(schedule="linear")
    with pytest.raises(ValueError, match="router_weight"):
        DistillConfig(router_weight=-1.0)
