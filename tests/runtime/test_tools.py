"""The Python tools around a model work on a native checkpoint: PEFT/LoRA training and torch.compile."""

import pytest
import torch
from transformers import AutoModelForCausalLM

import mobe  # noqa: F401  (registers the native model types)
from mobe import MobeConfig, compress
from mobe.runtime import MobeExperts

IDS = torch.randint(2, 128, (2, 10), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def native(tiny_checkpoints, tmp_path_factory):
    out = tmp_path_factory.mktemp("tools") / "native"
    compress(tiny_checkpoints["qwen3_moe"], out, MobeConfig(num_bases=4, rank=8, steps=10), progress=False)
    return out


def test_lora_on_attention_trains_and_leaves_the_factors_frozen(native):
    peft = pytest.importorskip("peft")
    base = AutoModelForCausalLM.from_pretrained(native, dtype=torch.float32)
    with torch.no_grad():
        reference = base(IDS).logits
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    with torch.no_grad():  # LoRA starts as the identity (B = 0)
        torch.testing.assert_close(model(IDS).logits, reference)
    model.train()
    loss = model(IDS, labels=IDS).loss
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert any(g is not None and g.abs().sum() > 0 for n, g in grads.items() if "lora_B" in n)
    factors = [p for m in model.modules() if isinstance(m, MobeExperts) for p in m.parameters()]
    assert factors and all(p.grad is None and not p.requires_grad for p in factors)
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5).step()
    model.eval()
    with torch.no_grad():
        assert not torch.allclose(model(IDS).logits, reference)


def test_compiled_experts_module_equals_eager(native):
    model = AutoModelForCausalLM.from_pretrained(native, dtype=torch.float32).eval()
    experts = next(m for m in model.modules() if isinstance(m, MobeExperts))
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(12, model.config.hidden_size, generator=g)
    index = torch.stack([torch.randperm(experts.num_experts, generator=g)[:2] for _ in range(12)])
    weights = torch.softmax(torch.randn(12, 2, generator=g), dim=-1)
    with torch.no_grad():
        eager = experts(hidden, index, weights)
        compiled = torch.compile(experts, backend="inductor", dynamic=False)(hidden, index, weights)
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
