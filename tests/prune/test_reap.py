"""REAP expert pruning: scores against a brute-force count through the transformers model, and the smaller
checkpoint against the original model with the removed experts masked out of its router."""

import importlib.util
import json
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer

from mobe import MobeConfig, compress
from mobe.architectures import get_arch
from mobe.cli.main import main
from mobe.config import QuantizeConfig
from mobe.fixtures import build_tiny_moe, heldout_text, trained_fixture_path
from mobe.prune import PruneError, experts_to_prune, prune_experts
from mobe.quantize import QuantizeError, stored_bytes

ARCHITECTURES = ["deepseek_v3", "mixtral", "olmoe", "qwen2_moe", "qwen3_moe"]  # the families pruning is tested on
RATIO = 0.25  # 2 of the tiny models' 8 experts (one per routing group for DeepSeek-V3's two)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Tiny random MoEs of every architecture with the trained fixture's tokenizer (so calibration text tokenizes)."""
    root = tmp_path_factory.mktemp("reap")
    out = {}
    for arch in ARCHITECTURES:
        path = build_tiny_moe(root / arch, arch, vocab_size=4096)
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(trained_fixture_path() / name, path / name)
        out[arch] = path
    return out


@pytest.fixture(scope="module")
def calibration(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "calibration.txt"
    path.write_text(heldout_text()[:3000])
    return path


@pytest.fixture(scope="module")
def pruned(tiny, calibration, tmp_path_factory):
    root = tmp_path_factory.mktemp("pruned")
    return {
        arch: (
            prune_experts(
                tiny[arch],
                root / arch,
                target_ratio=RATIO,
                calibration=calibration,
                calibration_seq_len=64,
                calibration_tokens=256,
                progress=False,
            ),
            root / arch,
        )
        for arch in ARCHITECTURES
    }


def sample_ids(vocab: int = 4096) -> torch.Tensor:
    return torch.randint(2, vocab, (2, 24), generator=torch.Generator().manual_seed(0))


def logits_without_mobe(paths: list, ids: torch.Tensor) -> list[torch.Tensor]:
    """Logits of each checkpoint opened by plain transformers in a fresh interpreter that never imports mobe."""
    script = (
        "import sys, torch\n"
        "from transformers import AutoModelForCausalLM\n"
        "paths, ids, out = sys.argv[1:-2], torch.load(sys.argv[-2]), sys.argv[-1]\n"
        "with torch.no_grad():\n"
        "    models = [AutoModelForCausalLM.from_pretrained(p, dtype=torch.float32).eval() for p in paths]\n"
        "    logits = [model(ids).logits for model in models]\n"
        "assert 'mobe' not in sys.modules\n"
        "torch.save(logits, out)\n"
    )
    folder = paths[0].parent
    torch.save(ids, folder / "ids.pt")
    subprocess.run(
        [sys.executable, "-c", script, *map(str, paths), str(folder / "ids.pt"), str(folder / "logits.pt")],
        check=True,
        capture_output=True,
    )
    return torch.load(folder / "logits.pt")


@torch.no_grad()
def masked_logits(path, arch: str, removed: dict[int, list[int]], ids: torch.Tensor) -> torch.Tensor:
    """The original model's logits with the removed experts masked out of its routers, patched in memory."""
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    masks = {}
    for layer, experts in removed.items():
        router = model.get_submodule(f"model.layers.{layer}.mlp.gate")  # in memory, every family names it so
        if hasattr(router, "e_score_correction_bias"):  # sigmoid router: the bias decides the choice
            router.e_score_correction_bias[experts] = float("-inf")
        else:  # softmax router: -inf logits take no probability and are never picked
            mask = torch.zeros(router.weight.shape[0])
            mask[experts] = float("-inf")
            masks[id(router.weight)] = mask
    linear = F.linear

    def masked_linear(x, weight, bias=None):
        out = linear(x, weight, bias)
        return out + masks[id(weight)] if id(weight) in masks else out

    F.linear = masked_linear
    try:
        return model(ids).logits
    finally:
        F.linear = linear


def test_pruned_checkpoints_load_without_mobe_and_equal_the_masked_original(tiny, pruned, calibration, tmp_path):
    ids = sample_ids()
    removed = {arch: {lay.layer: lay.pruned for lay in report.layers} for arch, (report, _) in pruned.items()}
    zero = {arch: tmp_path / f"zero-{arch}" for arch in ARCHITECTURES}
    for arch in ARCHITECTURES:
        prune_experts(
            tiny[arch], zero[arch], target_ratio=0.0, calibration=calibration, calibration_tokens=64, progress=False
        )
    got = logits_without_mobe([pruned[a][1] for a in ARCHITECTURES] + [zero[a] for a in ARCHITECTURES], ids)
    for i, arch in enumerate(ARCHITECTURES):
        report, path = pruned[arch]
        config = json.loads((path / "config.json").read_text())
        assert all(len(ids) == 2 for ids in removed[arch].values())
        assert [config.get(k) for k in get_arch(arch).num_experts_keys if k in config] == [6]
        expected = masked_logits(tiny[arch], arch, removed[arch], ids)
        assert not torch.allclose(expected, masked_logits(tiny[arch], arch, {}, ids), atol=1e-4)  # the cut matters
        torch.testing.assert_close(got[i], expected, rtol=1e-5, atol=1e-5, msg=arch)
        # (a) removing nothing reproduces the original exactly
        assert torch.equal(got[len(ARCHITECTURES) + i], masked_logits(tiny[arch], arch, {}, ids)), arch


@pytest.mark.parametrize("arch", ["qwen3_moe", "deepseek_v3"])
def test_scores_equal_a_brute_force_count_with_hooks(arch, tiny, pruned, calibration, tmp_path):
    report, _ = pruned[arch]
    tokenizer = AutoTokenizer.from_pretrained(tiny[arch])
    ids = tokenizer(heldout_text()[:3000], return_tensors="pt").input_ids[0][:256]
    model = AutoModelForCausalLM.from_pretrained(tiny[arch], dtype=torch.float32).eval()
    seen = {}
    hooks = []
    for lay in report.layers:
        experts = model.get_submodule(get_arch(arch).experts_module.format(layer=lay.layer))
        seen[lay.layer] = []
        hooks.append(experts.register_forward_pre_hook(lambda m, a, layer=lay.layer: seen[layer].append((m, *a))))
    with torch.no_grad():
        for seq in ids.split(64):
            model(seq[None])
    for h in hooks:
        h.remove()
    by_frequency = {}
    if arch == "qwen3_moe":  # the baseline criterion: the experts the fewest calibration tokens reach go first
        out = prune_experts(
            tiny[arch],
            tmp_path / "freq",
            target_ratio=RATIO,
            calibration=calibration,
            calibration_seq_len=64,
            calibration_tokens=256,
            criterion="frequency",
            progress=False,
        )
        by_frequency = {lay.layer: lay.pruned for lay in out.layers}
    for lay in report.layers:
        E = lay.experts_before
        total, counts = torch.zeros(E, dtype=torch.float64), torch.zeros(E, dtype=torch.float64)
        for module, hidden, index, weights in seen[lay.layer]:
            with torch.no_grad():
                for j in range(E):
                    alone = module(hidden, torch.full((hidden.shape[0], 1), j), torch.ones(hidden.shape[0], 1))
                    norms = alone.double().norm(dim=-1)
                    for t in range(hidden.shape[0]):
                        if j in index[t].tolist():
                            total[j] += weights[t][index[t] == j].double().sum() * norms[t]
                            counts[j] += 1
        expected = torch.where(counts > 0, total / counts.clamp(min=1), torch.zeros_like(total))
        torch.testing.assert_close(torch.tensor(lay.scores, dtype=torch.float64), expected, rtol=1e-4, atol=1e-7)
        assert lay.tokens_routed == counts.long().tolist()
        lowest = sorted(range(E), key=lambda e: expected[e].item())
        if arch == "qwen3_moe":  # without routing groups the lowest scores go
            assert set(lay.pruned) == set(lowest[:2])
            rarest = sorted(range(E), key=lambda e: (counts[e].item(), -e))[:2]
            assert by_frequency[lay.layer] == sorted(rarest)


def test_unrouted_experts_score_zero_and_go_first(tiny, calibration, tmp_path):
    # 3 tokens, top-2 of 8 experts: at least 2 experts of every layer see none of them
    report = prune_experts(
        tiny["qwen3_moe"],
        tmp_path / "out",
        target_ratio=RATIO,
        calibration=calibration,
        calibration_tokens=3,
        progress=False,
    )
    model = AutoModelForCausalLM.from_pretrained(tiny["qwen3_moe"], dtype=torch.float32).eval()
    ids = AutoTokenizer.from_pretrained(tiny["qwen3_moe"])(calibration.read_text()).input_ids[:3]
    routed = {}
    for lay in report.layers:
        experts = model.get_submodule(f"model.layers.{lay.layer}.mlp.experts")
        experts.register_forward_pre_hook(
            lambda m, a, layer=lay.layer: routed.setdefault(layer, set()).update(a[1].flatten().tolist())
        )
    with torch.no_grad():
        model(torch.tensor([ids]))
    for lay in report.layers:
        never = set(range(8)) - routed[lay.layer]
        assert len(never) >= 2
        assert all(lay.scores[e] == 0.0 for e in never)
        assert all(lay.scores[e] > 0.0 for e in routed[lay.layer])
        assert set(lay.pruned) <= never


def test_selection_per_layer_global_and_by_routing_group():
    scores = {0: torch.tensor([5.0, 1.0, 3.0, 0.0]), 1: torch.tensor([2.0, 4.0, 1.5, 6.0])}
    assert experts_to_prune(scores, 0.5, top_k=1) == {0: [1, 3], 1: [0, 2]}
    assert experts_to_prune(scores, 0.5, budget="global", top_k=1) == {0: [1, 3], 1: [0, 2]}
    with pytest.raises(PruneError, match="layer 0: 2, layer 1: 0"):  # the two lowest are in layer 0
        experts_to_prune(scores, 0.25, budget="global", top_k=1)
    # two routing groups of three: each loses its own lowest, not the layer's two lowest (experts 0 and 1)
    grouped = {0: torch.tensor([0.0, 1.0, 5.0, 6.0, 7.0, 2.0])}
    assert experts_to_prune(grouped, 1 / 3, top_k=1, groups=2, topk_group=2) == {0: [0, 5]}
    with pytest.raises(PruneError, match="routing groups"):  # a group must keep the two it is scored by
        experts_to_prune(grouped, 2 / 3, top_k=1, groups=2, topk_group=2)
    with pytest.raises(PruneError, match="fewer experts than the router picks"):
        experts_to_prune(scores, 0.75, top_k=2)
    with pytest.raises(PruneError, match=r"\[0, 1\)"):
        experts_to_prune(scores, 1.0, top_k=1)


def test_cli_reap_and_its_bad_input(tiny, calibration, tmp_path, capsys):
    out = tmp_path / "cli"
    args = ["compress", str(tiny["olmoe"]), "-o", str(out), "--method", "reap", "--target-ratio", "0.5"]
    assert main([*args, "--calibration", str(calibration), "--calibration-tokens", "128", "-q"]) == 0
    report = json.loads((out / "mobe_report.json").read_text())
    assert report["summary"]["experts_per_layer_after"] == 4
    assert report["summary"]["expert_reduction"] == pytest.approx(0.5)
    printed = capsys.readouterr().out
    assert "4/8" in printed and "50.0% fewer" in printed
    assert main(args[:-4] + ["-o", str(tmp_path / "x"), "--method", "reap", "--target-ratio", "0.5", "-q"]) == 2
    assert "--calibration" in capsys.readouterr().err
    bad = ["--target-ratio", "0.9", "--calibration", str(calibration), "-q"]
    assert main(["compress", str(tiny["olmoe"]), "-o", str(tmp_path / "y"), "--method", "reap", *bad]) == 2
    assert "fewer experts than the router picks" in capsys.readouterr().err
    assert not (tmp_path / "y").exists()
    compress(tiny["olmoe"], tmp_path / "native", MobeConfig(num_bases=2, steps=2), progress=False)
    assert main(["compress", str(tmp_path / "native"), "-o", str(tmp_path / "z"), "--method", "reap", *bad]) == 2
    assert "holds MoBE factors" in capsys.readouterr().err


@pytest.mark.skipif(importlib.util.find_spec("compressed_tensors") is None, reason="mobe[quant] missing")
def test_prune_then_quantize_is_one_call(tiny, calibration, pruned, tmp_path):
    """`prune_experts(quantize=)`: the same experts kept as without it, the weights then quantised, the stored bytes
    in the report; a group size that does not divide the experts is refused before any scoring."""
    out = tmp_path / "w4"
    kwargs = {"target_ratio": RATIO, "calibration": calibration, "calibration_seq_len": 64, "calibration_tokens": 256}
    report = prune_experts(tiny["olmoe"], out, quantize=QuantizeConfig(bits=4, group_size=16), progress=False, **kwargs)
    assert [lay.kept for lay in report.layers] == [lay.kept for lay in pruned["olmoe"][0].layers]
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["format"] == "pack-quantized" and config["mobe"]["format"] == "pruned"
    saved = json.loads((out / "mobe_report.json").read_text())
    assert saved["quantize"]["bits"] == 4 and saved["stored_bytes"]["after"] == stored_bytes(out)
    assert stored_bytes(out) < stored_bytes(pruned["olmoe"][1]) and "int4 weights" in report.table()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w4"]  # no temporary folder left
    with torch.no_grad():
        AutoModelForCausalLM.from_pretrained(out).eval()(sample_ids())
    with pytest.raises(QuantizeError, match="group-size 12"):
        prune_experts(tiny["olmoe"], tmp_path / "bad", quantize=QuantizeConfig(group_size=12), **kwargs)
    assert not (tmp_path / "bad").exists()
