"""benchmarks/gpu_jobs.py at a tiny scale on the CPU: it runs, writes the fields it promises, and they are sane."""

import importlib
import json
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def test_gpu_jobs_runs_on_cpu_at_a_tiny_scale(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))  # the script imports its neighbour results_io
    gpu_jobs = importlib.import_module("gpu_jobs")
    stem = tmp_path / "gpu_jobs"
    argv = ["--device", "cpu", "--scale", "0.02", "--models", "qwen3-30b-a3b", "--paper-steps", "20", "--steps", "20"]
    gpu_jobs.main([*argv, "--out", str(stem)])
    result = json.loads(stem.with_suffix(".json").read_text())
    assert stem.with_suffix(".png").stat().st_size > 0
    model = result["models"]["qwen3-30b-a3b"]
    assert model["shape"] == {"E": 128, "p": 15, "d": 41, "m": 32, "r": 15}  # 768 and 2048 times 0.02, rounded
    rows = model["rows"]
    assert {(r["precision"], r["schedule"]) for r in rows} == {
        (precision, schedule) for precision in ("fp32", "tf32", "bf16") for schedule in ("fast", "adam", "paper")
    }
    by = {(r["precision"], r["schedule"]): r for r in rows}
    for row in rows:
        assert row["final_error"] < row["initial_error"] <= 1.01  # fitted below the start, which is at most ~W
        assert row["steps"] == 20 and 0 < row["seconds_per_step"] < row["seconds"]
        assert row["peak_gpu_bytes"] is None  # no GPU: nothing measured, nothing invented
        # against the fp32 fit of the same schedule (exactly 0 for the fp32 rows themselves)
        fp32 = by["fp32", row["schedule"]]
        assert row["error_change_vs_fp32"] == row["final_error"] - fp32["final_error"]
        assert abs(row["error_change_vs_fp32"]) < 0.05  # bf16 matmuls move the end, but not by much
    paper = {r["precision"]: r for r in rows if r["schedule"] == "paper"}
    for row in rows:  # the paper reaches its own final error; its step is within the run
        reach = row["steps_to_paper_final"]
        assert reach is None or 0 <= reach <= row["steps"]
        if row["final_error"] < paper[row["precision"]]["final_error"] * 0.99:
            assert reach is not None


@pytest.mark.gpu
def test_gpu_jobs_measures_peak_memory_on_cuda(tmp_path, monkeypatch):
    """On a GPU the same tiny run records the peak GPU memory of every fit (at least the weights it fits)."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    gpu_jobs = importlib.import_module("gpu_jobs")
    stem = tmp_path / "gpu_jobs"
    argv = ["--device", "cuda", "--scale", "0.02", "--models", "qwen3-30b-a3b", "--schedules", "fast", "paper"]
    gpu_jobs.main([*argv, "--paper-steps", "20", "--steps", "20", "--out", str(stem)])
    result = json.loads(stem.with_suffix(".json").read_text())
    assert result["device"].startswith("cuda")
    rows = result["models"]["qwen3-30b-a3b"]["rows"]
    weights_bytes = 128 * 15 * 41 * 4  # E p d float32
    assert len(rows) == 6 and all(r["peak_gpu_bytes"] >= weights_bytes for r in rows)
    for row in rows:
        assert row["final_error"] < row["initial_error"] <= 1.01
