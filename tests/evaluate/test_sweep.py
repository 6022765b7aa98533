"""`mobe sweep`: the frontier it reports is each method's real fit at the size it says."""

import json

import pytest
import torch

from mobe.cli.main import main
from mobe.evaluate.sweep import sweep
from mobe.factorize import get_method


def test_sweep_points_are_exact_for_svd_and_reach_is_reported(qwen3_checkpoint):
    points = sweep(
        qwen3_checkpoint, matrices=("up",), methods=("svd", "slbf"), ratios=(0.25, 0.5), steps=5, progress=False
    )
    E, p, d = 8, 16, 32
    svd = [pt for pt in points if pt.method == "svd"]
    from mobe.checkpoint import CheckpointReader

    reader = CheckpointReader(qwen3_checkpoint)
    W = torch.stack([reader.get(f"model.layers.0.mlp.experts.{e}.up_proj.weight") for e in range(E)]).float()
    S = torch.linalg.svdvals(W)
    for pt in svd:  # Eckart-Young: the best rank-k error is the singular-value tail
        assert (
            pt.parameters == get_method("svd").parameters(E, p, d, None, pt.rank) <= (1 - pt.target_ratio) * E * p * d
        )
        tail = (S[:, pt.rank :].pow(2).sum() / S.pow(2).sum()).sqrt().item()
        assert pt.relative_error == pytest.approx(tail, rel=1e-4)
    slbf_half = next(pt for pt in points if pt.method == "slbf" and pt.target_ratio == 0.5)
    assert slbf_half.rank is None  # its square A_i alone is half of each 16 x 32 matrix


def test_sweep_command_writes_table_json_and_plot(qwen3_checkpoint, tmp_path, capsys):
    args = [
        "sweep",
        str(qwen3_checkpoint),
        "--layer",
        "1",
        "--matrices",
        "gate",
        "--methods",
        "svd,mobe",
        "--ratios",
        "0.3",
        "--steps",
        "3",
        "--json",
        str(tmp_path / "s.json"),
        "--plot",
        str(tmp_path / "s.png"),
        "-q",
    ]
    assert main(args) == 0
    assert "svd" in capsys.readouterr().out
    data = json.loads((tmp_path / "s.json").read_text())
    assert {d["method"] for d in data} == {"svd", "mobe"} and (tmp_path / "s.png").stat().st_size > 0
    assert main(["sweep", str(qwen3_checkpoint), "--layer", "7", "-q"]) == 2  # not an MoE layer: one line, exit 2
