"""Calibrated mixed precision under a byte budget: the allocation is the brute-force optimum, a mixed-precision
checkpoint loads in transformers and equals the original rounded unit by unit, and the plan's predicted bytes are
the bytes written."""

import importlib.util
import itertools
import json
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM

from mobe.cli.main import main
from mobe.config import QuantizeConfig
from mobe.fixtures import build_tiny_moe, heldout_text, trained_fixture_path
from mobe.plan.mixed import (
    UNIT_BITS,
    Branch,
    MixedPlan,
    execute_mixed,
    plan_mixed,
    score_choices,
    scores_table,
)
from mobe.plan.sizes import MATRICES
from mobe.quantize import QuantizeError, quantize_checkpoint, stored_bytes
from mobe.runtime import load_model

pytestmark = pytest.mark.skipif(importlib.util.find_spec("compressed_tensors") is None, reason="mobe[quant] missing")

IDS = torch.tensor([[3, 5, 7, 9, 11, 2, 4, 6, 8, 10, 12, 14]])
TOKENS, SEQ_LEN = 256, 128


def _synthetic_branch(seed: int) -> Branch:
    """Two layers with made-up errors (decreasing in bits) and bytes of the real ratios (down a bit larger)."""
    g = torch.Generator().manual_seed(seed)
    unit_bytes = {(m, b): (b * 100 + 13) * (3 if m == "down" else 2) for m in MATRICES for b in UNIT_BITS}
    errors = {}
    for layer in (0, 1):
        for m in MATRICES:
            scale = float(torch.rand(1, generator=g)) * 10
            for b in UNIT_BITS:
                errors[layer, m, b] = scale * 4.0 ** (-b) * (1 + 0.1 * float(torch.rand(1, generator=g)))
    return Branch(0.0, 8, rest_bytes=1000, unit_bytes=unit_bytes, prune_error={0: 0.0, 1: 0.5}, rounding_error=errors)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_allocation_is_the_brute_force_optimum(seed):
    branch = _synthetic_branch(seed)
    units = [(layer, m) for layer in (0, 1) for m in MATRICES]
    choices = UNIT_BITS
    every = []
    for combo in itertools.product(choices, repeat=len(units)):
        size = branch.rest_bytes + sum(branch.unit_bytes[m, b] for (_, m), b in zip(units, combo, strict=True))
        error = 0.5 + sum(branch.rounding_error[u[0], u[1], b] for u, b in zip(units, combo, strict=True))
        every.append((error, size, combo))
    smallest = min(size for _, size, _ in every)
    for budget in (smallest - 1, smallest, smallest + 700, smallest + 2500, 10**6):
        choice = branch.allocate(budget)
        within = [(e, s) for e, s, _ in every if s <= budget]
        if not within:
            assert choice is None
            continue
        best = min(e for e, _ in within)
        assert choice.stored_bytes <= budget
        assert choice.predicted_error == pytest.approx(best, rel=1e-12)


def test_a_plan_chooses_the_branch_with_the_least_predicted_error():
    plain, pruned = _synthetic_branch(0), _synthetic_branch(1)
    pruned.share, pruned.prune_error = 0.25, {0: 1e-3, 1: 1e-3}
    pruned.unit_bytes = {k: v * 3 // 4 for k, v in pruned.unit_bytes.items()}
    plan = MixedPlan(4000, 20000, 128, "text", 0, [plain, pruned])
    chosen = plan.chosen
    assert chosen.predicted_error == min(plain.allocate(4000).predicted_error, pruned.allocate(4000).predicted_error)
    assert chosen.share == 0.25  # cheaper units and almost no pruning error: more bits for the same bytes
    assert "<- least predicted error" in plan.table() and "REAP 25%" in plan.table()
    assert plan.with_budget(1).chosen is None and "nothing fits" in plan.with_budget(1).table()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny random qwen3_moe with the trained fixture's tokenizer, and a calibration text."""
    root = tmp_path_factory.mktemp("mixed")
    path = build_tiny_moe(root / "qwen3_moe", "qwen3_moe", vocab_size=4096, initializer_range=0.2)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(trained_fixture_path() / name, path / name)
    text = root / "calibration.txt"
    text.write_text(heldout_text()[:8000])
    return path, text


def test_a_mixed_checkpoint_loads_and_equals_the_original_rounded_unit_by_unit(tiny, tmp_path):
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize
    from compressed_tensors.quantization.utils import compute_dynamic_scales_and_zp

    path, _ = tiny
    allocation = {(0, "gate"): 2, (0, "up"): 8, (0, "down"): 4, (1, "gate"): 3, (1, "up"): 4, (1, "down"): 2}
    out = tmp_path / "mixed"
    report = quantize_checkpoint(
        path, out, QuantizeConfig(bits=4, group_size=16), allocation=allocation, progress=False
    )
    assert "mixed" in report.table()
    groups = json.loads((out / "config.json").read_text())["quantization_config"]["config_groups"]
    assert sorted(g["weights"]["num_bits"] for g in groups.values()) == [2, 3, 4, 8]

    def rounded(w: torch.Tensor, bits: int) -> torch.Tensor:
        if bits == 16:
            return w
        args = QuantizationArgs(num_bits=bits, type="int", symmetric=True, strategy="group", group_size=16)
        scale, zp = compute_dynamic_scales_and_zp(w, args, module=None)
        return fake_quantize(w, scale, zp, args)

    reference = AutoModelForCausalLM.from_pretrained(path).eval()
    with torch.no_grad():
        for index, layer in enumerate(reference.model.layers):
            experts = layer.mlp.experts
            p = experts.down_proj.shape[-1]
            for e in range(experts.down_proj.shape[0]):
                experts.gate_up_proj[e, :p] = rounded(experts.gate_up_proj[e, :p], allocation[index, "gate"])
                experts.gate_up_proj[e, p:] = rounded(experts.gate_up_proj[e, p:], allocation[index, "up"])
                experts.down_proj[e] = rounded(experts.down_proj[e], allocation[index, "down"])
        expected = reference(IDS).logits
        got = load_model(out)(IDS).logits  # transformers alone decodes every expert with one group's bits
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    with pytest.raises(QuantizeError, match="allocation names"):
        quantize_checkpoint(path, tmp_path / "bad", QuantizeConfig(group_size=16), allocation={(7, "gate"): 4})


@pytest.fixture(scope="module")
def plan(tiny):
    path, text = tiny
    config = QuantizeConfig(calibration_tokens=TOKENS, calibration_seq_len=SEQ_LEN)
    return plan_mixed(path, 0.5, calibration=text, shares=(0.0, 0.25), quantize=config, progress=False)


def test_the_measurements_order_sensibly(plan):
    plain, pruned = plan.branches
    assert set(plain.prune_error.values()) == {0.0} and all(v > 0 for v in pruned.prune_error.values())
    for branch in plan.branches:
        for layer in branch.layers:
            for m in MATRICES:
                errors = [branch.rounding_error[layer, m, b] for b in UNIT_BITS]
                assert errors == sorted(errors, reverse=True) and errors[0] > 0  # fewer bits, more error
    assert pruned.rest_bytes < plain.rest_bytes  # the router lost rows
    assert pruned.unit_bytes["gate", 4] * plain.experts == plain.unit_bytes["gate", 4] * pruned.experts


@pytest.mark.parametrize("between", [0.3, 1.0])
def test_predicted_bytes_are_the_bytes_written(tiny, plan, between, tmp_path):
    """Budgets between the smallest plan (REAP 25% + int2) and the original at int4."""
    path, _ = tiny
    low, high = plan.uniform(2, 0.25).stored_bytes, plan.uniform(4).stored_bytes
    sized = plan.with_budget(int(low + between * (high - low)))
    chosen = execute_mixed(sized, path, tmp_path / "out", progress=False)
    assert chosen == sized.chosen and stored_bytes(tmp_path / "out") == chosen.stored_bytes <= sized.budget_bytes


def test_a_uniform_allocation_writes_what_mobe_quantize_writes(tiny, plan, tmp_path):
    """The planner's rounding is `mobe quantize --calibration`'s: a uniform int3 plan writes the same integers."""
    path, text = tiny
    config = QuantizeConfig(bits=3, calibration_tokens=TOKENS, calibration_seq_len=SEQ_LEN)
    execute_mixed(plan, path, tmp_path / "planned", config, choice=plan.uniform(3), progress=False)
    config = QuantizeConfig(
        bits=3,
        group_size=plan.group_size,
        calibration=str(text),
        calibration_tokens=TOKENS,
        calibration_seq_len=SEQ_LEN,
    )
    quantize_checkpoint(path, tmp_path / "direct", config, progress=False)
    from safetensors.torch import load_file

    for shard in (tmp_path / "direct").glob("*.safetensors"):
        direct, planned = load_file(shard), load_file(tmp_path / "planned" / shard.name)
        assert direct.keys() == planned.keys()
        for name, tensor in direct.items():
            assert torch.equal(tensor, planned[name]), name


def test_the_scored_loss_is_the_loss_of_what_is_written(tiny, plan, tmp_path):
    """`score_choices` streams each share's plan without writing it; its calibration loss equals the cross-entropy
    of the checkpoint `execute_mixed` writes for that choice (loaded whole, run on the same tokens), and the
    original's loss is the original's."""
    import torch.nn.functional as F

    from mobe.calibrate import calibration_ids

    path, text = tiny
    config = QuantizeConfig(calibration_tokens=TOKENS, calibration_seq_len=SEQ_LEN)
    sized = plan.with_budget(plan.uniform(3).stored_bytes)
    scored = score_choices(sized, path, config, progress=False)
    assert {s.choice.share for s in scored} == {0.0, 0.25} and scored[0].loss <= scored[1].loss
    sequences = calibration_ids(path, text, TOKENS, SEQ_LEN)

    def loss(model) -> float:
        with torch.no_grad():
            total = sum(
                F.cross_entropy(model(ids[None]).logits[0, :-1].double(), ids[1:], reduction="sum") for ids in sequences
            )
        return float(total) / sum(ids.numel() - 1 for ids in sequences)

    assert scored[0].original_loss == pytest.approx(loss(load_model(path, dtype=torch.float32)), rel=1e-4)
    for s in scored:
        out = tmp_path / f"share-{s.choice.share}"
        execute_mixed(sized, path, out, config, choice=s.choice, progress=False)
        assert s.loss == pytest.approx(loss(load_model(out, dtype=torch.float32)), rel=1e-4)
    assert "<- chosen" in scores_table(scored).splitlines()[1]


def test_cli_compress_to_a_budget_with_calibration(tiny, tmp_path, capsys):
    path, text = tiny
    out = tmp_path / "cli"
    args = ["compress", str(path), "-o", str(out), "--target-bytes", "0.97", "--calibration", str(text), "-q"]
    args += ["--calibration-tokens", str(TOKENS), "--calibration-seq-len", str(SEQ_LEN)]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "<- least predicted error" in printed and "bits by layer" in printed and f"wrote {out}" in printed
    measured = next(line for line in printed.splitlines() if line.endswith("<- chosen"))  # least calibration loss
    written = next(line for line in printed.splitlines() if line.startswith(f"wrote {out}: "))
    assert measured.split("  ")[0].strip() == written.split(": ", 1)[1]
    original = stored_bytes(path)
    assert stored_bytes(out) <= 0.97 * original


def test_cli_info_prints_the_calibrated_plan_and_writes_nothing(tiny, tmp_path, capsys):
    path, text = tiny
    before = sorted(p.name for p in path.parent.iterdir())
    args = [
        "info",
        str(path),
        "--target-bytes",
        "0.97",
        "--calibration",
        str(text),
        "--calibration-tokens",
        str(TOKENS),
    ]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "<- least predicted error" in printed and "REAP 25%" in printed and "cal. ppl" not in printed
    assert sorted(p.name for p in path.parent.iterdir()) == before


def test_bad_plans_are_refused(tiny):
    path, text = tiny
    with pytest.raises(ValueError, match="target_bytes must be a share"):
        plan_mixed(path, 1.5, calibration=text)
    with pytest.raises(ValueError, match="must include 0"):
        plan_mixed(path, 0.5, calibration=text, shares=(0.25,))
    with pytest.raises(ValueError, match="one of"):
        plan_mixed(path, calibration=text)
