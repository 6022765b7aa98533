"""--calibration end to end: statistics in the work folder, output errors in the report, refinement, bad input."""

import json

import pytest
import torch

from mobe import MobeConfig, compress
from mobe.calibrate.stats import stats_path
from mobe.cli.main import main
from mobe.fixtures import trained_fixture_path

CALIBRATION = "The :mod:`os` module provides a portable way of using operating system dependent functionality.\n" * 40


def _config(**extra):
    return MobeConfig(
        num_bases=2,
        rank=16,
        steps=4,
        eval_every=2,
        activation="silu",
        layers=(0, 3),
        matrices=("gate", "down"),
        device="cpu",
        calibration_tokens=600,
        calibration_seq_len=128,
        **extra,
    )


@pytest.fixture
def calibration_file(tmp_path):
    path = tmp_path / "calibration.txt"
    path.write_text(CALIBRATION)
    return path


def _held_out_layer_error(dense_path, layer: int, stats, act) -> float:
    """The relative error of a layer's routed-experts output, dense experts read from `dense_path` against the
    original's, on the held-out tail (a tenth) of the calibration tokens: computed here token by token."""
    from mobe.architectures import moe_layout
    from mobe.checkpoint import CheckpointReader

    experts = {}
    for path in (trained_fixture_path(), dense_path):
        reader = CheckpointReader(path)
        layout = moe_layout(reader.config)
        experts[path] = {m: layout.read_experts(reader, layer, m).double() for m in ("gate", "up", "down")}
    n_hold = max(1, int(stats.inputs.shape[0] * 0.1))
    x = stats.inputs[-n_hold:].double()
    index, weights = stats.top_k_index[-n_hold:], stats.top_k_weights[-n_hold:].double()

    def output(w):
        g, u, d = (w[m][index] for m in ("gate", "up", "down"))  # (T, k, p, d), (T, k, p, d), (T, k, d, p)
        h = act(torch.einsum("tkpd,td->tkp", g, x)) * torch.einsum("tkpd,td->tkp", u, x)
        return torch.einsum("tkdp,tkp,tk->td", d, h, weights)

    target = output(experts[trained_fixture_path()])
    return ((output(experts[dense_path]) - target).norm() / target.norm()).item()


def test_calibrated_compression_reports_output_errors(tmp_path, calibration_file):
    """The refined run's layer errors, before and after, are what the written checkpoints give on the held-out
    calibration tokens: after from the refined output, before from the same run without refinement."""
    from transformers.activations import ACT2FN

    from mobe import reconstruct
    from mobe.architectures import moe_layout
    from mobe.calibrate import LayerStats
    from mobe.checkpoint import CheckpointReader
    from mobe.pipeline import collect_calibration

    report = compress(
        trained_fixture_path(),
        tmp_path / "out",
        _config(calibration_refine_steps=4),
        calibration=calibration_file,
        progress=False,
    )
    assert [(r.layer, r.matrix) for r in report.results] == [(0, "gate"), (0, "down"), (3, "gate"), (3, "down")]
    for r in report.results:
        assert 0 < r.output_error < 1 and 0 < r.relative_error < 1
    assert "out.err" in report.table()
    saved = json.loads((tmp_path / "out" / "mobe_report.json").read_text())
    assert saved["config"]["calibration"] == str(calibration_file)

    compress(trained_fixture_path(), tmp_path / "plain", _config(), calibration=calibration_file, progress=False)
    for name in ("out", "plain"):
        reconstruct(tmp_path / name, tmp_path / f"{name}-dense", progress=False)
    reader = CheckpointReader(trained_fixture_path())
    config = _config(calibration=str(calibration_file), calibration_refine_steps=4)
    (tmp_path / "work").mkdir()
    collect_calibration(reader, moe_layout(reader.config), config, tmp_path / "work", [0, 3], progress=False)
    act = ACT2FN[reader.config.get("hidden_act", "silu")]
    for r in report.results:
        stats = LayerStats.load(stats_path(tmp_path / "work", r.layer), with_inputs=True)
        after = _held_out_layer_error(tmp_path / "out-dense", r.layer, stats, act)
        before = _held_out_layer_error(tmp_path / "plain-dense", r.layer, stats, act)
        # The checkpoints hold bfloat16 weights, whose rounding moves these errors by under 1% (refinement by ~15%).
        assert r.layer_error == pytest.approx(after, rel=0.02), (r.layer, r.matrix)
        assert r.layer_error_before == pytest.approx(before, rel=0.02), (r.layer, r.matrix)


def test_statistics_are_reused_by_a_resumed_run(tmp_path, calibration_file):
    from mobe.architectures import moe_layout
    from mobe.calibrate import LayerStats
    from mobe.checkpoint import CheckpointReader
    from mobe.factorize.gram import GramFactor
    from mobe.pipeline import collect_calibration

    config = _config(calibration=str(calibration_file))
    fresh = compress(trained_fixture_path(), tmp_path / "a", config, work_dir=tmp_path / "w1", progress=False)
    # An interrupted run left layer 3's statistics in its work folder; tamper with them so that only a reuse sees it.
    work = tmp_path / "w2"
    work.mkdir()
    reader = CheckpointReader(trained_fixture_path())
    collect_calibration(reader, moe_layout(reader.config), config, work, [3], progress=False)
    stats = LayerStats.load(stats_path(work, 3))
    scale = torch.linspace(0.1, 10.0, stats.inputs_factor.dim)
    tensors = stats.inputs_factor.tensors()
    stats.inputs_factor = GramFactor.from_tensors({k: v if k == "counts" else v * scale for k, v in tensors.items()})
    stats.save(stats_path(work, 3), {})
    resumed = compress(trained_fixture_path(), tmp_path / "b", config, work_dir=work, progress=False)
    errors = {(r.layer, r.matrix): r.output_error for r in resumed.results}
    expected = {(r.layer, r.matrix): r.output_error for r in fresh.results}
    assert errors[0, "gate"] == expected[0, "gate"] and errors[3, "down"] == expected[3, "down"]
    assert errors[3, "gate"] != expected[3, "gate"]  # layer 3's inputs came from the saved (tampered) file


def test_fingerprint_holds_the_text_content_not_its_path(tmp_path, calibration_file):
    copy = tmp_path / "elsewhere.txt"
    copy.write_text(CALIBRATION)
    a, b = _config(calibration=str(calibration_file)), _config(calibration=str(copy))
    assert a.fingerprint() == b.fingerprint() != _config().fingerprint()
    copy.write_text(CALIBRATION + "more\n")
    assert b.fingerprint() != a.fingerprint()
    assert "calibration_tokens" not in _config().fingerprint()  # runs without calibration keep their fingerprint


def test_cli_refuses_bad_calibration_input(tmp_path, capsys, qwen3_checkpoint, calibration_file):
    fast = ["--bases", "2", "--rank", "8", "--steps", "3", "--quiet"]
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    cases = [
        (trained_fixture_path(), tmp_path / "missing.txt", "does not exist"),
        (trained_fixture_path(), empty, "is empty"),
        (qwen3_checkpoint, calibration_file, "has no tokenizer"),
    ]
    for i, (model, text, message) in enumerate(cases):
        out = tmp_path / f"out{i}"
        code = main(["compress", str(model), "-o", str(out), *fast, "--calibration", str(text)])
        err = capsys.readouterr().err.strip()
        assert code == 2 and err.startswith("mobe: error:") and len(err.splitlines()) == 1, err
        assert message in err
        assert not out.exists()
        assert not out.with_name(out.name + ".mobe-work").exists()
    code = main(
        [
            "compress",
            str(trained_fixture_path()),
            "-o",
            str(tmp_path / "ok"),
            *fast,
            "--layers",
            "3",
            "--calibration",
            str(calibration_file),
            "--calibration-tokens",
            "300",
            "--calibration-seq-len",
            "100",
        ]
    )
    assert code == 0
    assert "out.err" in capsys.readouterr().out
