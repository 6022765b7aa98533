"""Native checkpoints open through transformers' own `from_pretrained`, and never as random experts."""

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import mobe  # noqa: F401  (registers the native model types)
from mobe import MobeConfig, compress, load_model, reconstruct
from mobe.architectures import canonical_model_types, get_arch
from mobe.architectures.derive import model_class
from mobe.runtime import MissingFactorsError, MobeExperts

CONFIG = MobeConfig(num_bases=4, rank=8, steps=10)


@pytest.fixture(scope="module")
def pairs(tiny_checkpoints, tmp_path_factory):
    """arch -> (native, dense reconstruction); gate and down compressed, up left dense (a mixed layer)."""
    root = tmp_path_factory.mktemp("auto")
    config = MobeConfig(num_bases=4, rank=8, steps=10, matrices=("gate", "down"))
    out = {}
    for arch, src in tiny_checkpoints.items():
        compress(src, root / f"{arch}-n", config, progress=False)
        reconstruct(root / f"{arch}-n", root / f"{arch}-d", progress=False)
        out[arch] = (root / f"{arch}-n", root / f"{arch}-d")
    return out


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


IDS = torch.randint(2, 128, (2, 12), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("arch", canonical_model_types())
def test_from_pretrained_equals_dense_and_round_trips(arch, pairs, tmp_path):
    native_path, dense_path = pairs[arch]
    native = AutoModelForCausalLM.from_pretrained(native_path, dtype=torch.float32).eval()
    dense = load_model(dense_path, dtype=torch.float32)  # AutoModelForCausalLM, or the family's class it lacks
    # The family's class (AutoModelForCausalLM's, or the multimodal one that holds the checkpoint's names).
    assert type(native).__name__ == "Mobe" + model_class(arch, get_arch(arch).model_class).__name__
    experts = [m for m in native.modules() if isinstance(m, MobeExperts)]
    assert experts and all(m.factored == ("gate", "down") for m in experts)
    dense_stacks = {n.rsplit(".", 1)[-1] for n, _ in native.named_parameters() if ".experts." in n and "mobe_" not in n}
    quirk = get_arch(arch).quirk
    assert dense_stacks == {get_arch(arch).matrices["up"], *(quirk.biases if quirk else ())}
    with torch.no_grad():
        reference = dense(IDS).logits
        assert _relative(native(IDS).logits, reference) <= 1e-4

    native.save_pretrained(tmp_path / "again")
    names = lambda folder: set(json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"])  # noqa: E731
    if (tmp_path / "again" / "model.safetensors.index.json").exists():
        assert names(tmp_path / "again") == names(native_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "again", dtype=torch.float32).eval()
    with torch.no_grad():
        assert _relative(again(IDS).logits, reference) <= 1e-4


def test_dtype_and_device_map(pairs):
    native_path, dense_path = pairs["qwen3_moe"]
    model = AutoModelForCausalLM.from_pretrained(native_path, dtype=torch.bfloat16, device_map="auto")
    factors = [p for n, p in model.named_parameters() if "mobe_" in n]
    assert factors and all(p.dtype == torch.bfloat16 and p.device.type == "cpu" for p in factors)
    dense = AutoModelForCausalLM.from_pretrained(dense_path, dtype=torch.float32)
    with torch.no_grad():
        assert _relative(model(IDS).logits.float(), dense(IDS).logits) < 0.05  # bf16 rounding only


def test_without_mobe_transformers_refuses(pairs):
    native_path, _ = pairs["qwen3_moe"]
    code = f"from transformers import AutoModelForCausalLM; AutoModelForCausalLM.from_pretrained({str(native_path)!r})"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode != 0
    assert "mobe_qwen3_moe" in run.stderr


def test_missing_factor_tensor_is_refused(pairs, tmp_path):
    native_path, _ = pairs["olmoe"]
    copy = tmp_path / "broken"
    copy.mkdir()
    index = json.loads((native_path / "model.safetensors.index.json").read_text())
    victim = next(n for n in index["weight_map"] if n.endswith("gate_proj.mobe_bases"))
    for f in native_path.iterdir():
        if f.suffix == ".safetensors":
            tensors = load_file(f)
            save_file({k: v for k, v in tensors.items() if k != victim}, copy / f.name, metadata={"format": "pt"})
        else:
            (copy / f.name).write_bytes(f.read_bytes())
    index["weight_map"].pop(victim)
    (copy / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(MissingFactorsError, match="mobe_bases"):
        AutoModelForCausalLM.from_pretrained(copy)


def test_checkpoints_written_before_native_types_still_load(pairs, tmp_path):
    """Native checkpoints that declared the plain family (and no factor shapes) open through `load_model`."""
    native_path, dense_path = pairs["mixtral"]
    old = tmp_path / "old"
    old.mkdir()
    for f in native_path.iterdir():
        (old / f.name).write_bytes(f.read_bytes())
    config = json.loads((native_path / "config.json").read_text())
    section = config["mobe"]
    config["model_type"], config["architectures"] = section.pop("base_model_type"), section.pop("base_architectures")
    section.pop("factor_shapes")
    (old / "config.json").write_text(json.dumps(config))
    with torch.no_grad():
        a = load_model(old, dtype=torch.float32)(IDS).logits
        b = AutoModelForCausalLM.from_pretrained(dense_path, dtype=torch.float32)(IDS).logits
    assert _relative(a, b) <= 1e-4


@pytest.mark.parametrize("method", ["svd", "d2moe", "molae"])
def test_every_method_native_format_opens(method, qwen3_checkpoint, tmp_path):
    """Comparison methods' native factors run through the same experts module (touched experts rebuilt)."""
    compress(qwen3_checkpoint, tmp_path / "n", MobeConfig(method=method, rank=6), progress=False)
    reconstruct(tmp_path / "n", tmp_path / "d", progress=False)
    native = AutoModelForCausalLM.from_pretrained(tmp_path / "n", dtype=torch.float32).eval()
    dense = AutoModelForCausalLM.from_pretrained(tmp_path / "d", dtype=torch.float32).eval()
    assert any(isinstance(m, MobeExperts) for m in native.modules())
    with torch.no_grad():
        assert _relative(native(IDS).logits, dense(IDS).logits) <= 1e-4
