"""Jobs spread over local worker processes give the single-process checkpoint; Ray stays optional."""

from __future__ import annotations

import sys

from mobe import MobeConfig, compress
from mobe.cli.main import main
from mobe.distribute import local_devices

CONFIG = MobeConfig(num_bases=2, rank=8, steps=300, eval_every=100, threads=1, device="cpu", matrices=("gate", "up"))


def test_device_pool_matches_single_process(qwen3_checkpoint, tmp_path, checkpoint_contents):
    compress(qwen3_checkpoint, tmp_path / "ref", CONFIG, progress=False)
    pooled = MobeConfig(**{**CONFIG.to_dict(), "device": "cpu,cpu"})
    report = compress(qwen3_checkpoint, tmp_path / "pool", pooled, progress=False)
    assert [(r.layer, r.matrix) for r in report.results] == [(0, "gate"), (0, "up"), (1, "gate"), (1, "up")]
    assert checkpoint_contents(tmp_path / "pool") == checkpoint_contents(tmp_path / "ref")


def test_device_list_parsing():
    assert local_devices("cpu") == ["cpu"]
    assert local_devices("cuda:0, cuda:1") == ["cuda:0", "cuda:1"]


def test_missing_ray_is_one_clear_line(qwen3_checkpoint, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray now raises ImportError
    out = tmp_path / "out"
    assert main(["compress", str(qwen3_checkpoint), "-o", str(out), "--ray", "--steps", "5", "-q"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "pip install 'mobe[ray]'" in err
    assert not out.exists() and not (tmp_path / "out.mobe-work").exists()
