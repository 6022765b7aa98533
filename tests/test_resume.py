"""A run killed mid-way resumes from its finished jobs and ends with the same checkpoint as an uninterrupted one."""

import json
import sys

from mobe.cli.main import main

ARGS = ["--bases", "2", "--rank", "8", "--steps", "1500", "--eval-every", "100", "--stop-tol", "0", "--quiet"]
JOBS = 2 * 3  # the tiny model's 2 MoE layers times gate, up and down


def test_killed_run_resumes_and_matches_uninterrupted(
    qwen3_checkpoint, tmp_path, checkpoint_contents, kill_after_first_job
):
    out = tmp_path / "out"
    work = tmp_path / "out.mobe-work"
    args = [*ARGS, "--threads", "1"]  # bit-identical across processes: the in-process runs share pytest's threads
    cmd = [sys.executable, "-m", "mobe", "compress", str(qwen3_checkpoint), "-o", str(out), *args]
    finished = kill_after_first_job(cmd, work)
    assert 1 <= len(finished) < JOBS, finished  # killed after the first job and before the last
    assert not out.exists()

    assert main(["compress", str(qwen3_checkpoint), "-o", str(out), *args]) == 0
    report = json.loads((out / "mobe_report.json").read_text())
    resumed = [f"layer{r['layer']:05d}.{r['matrix']}.safetensors" for r in report["results"] if r["resumed"]]
    assert resumed == finished
    assert not work.exists()

    assert main(["compress", str(qwen3_checkpoint), "-o", str(tmp_path / "ref"), *args]) == 0
    assert checkpoint_contents(out) == checkpoint_contents(tmp_path / "ref")


def test_resume_with_other_settings_is_refused(qwen3_checkpoint, tmp_path, capsys):
    work = tmp_path / "out.mobe-work"
    work.mkdir()
    (work / "work.json").write_text(json.dumps({"source": "elsewhere", "config": {}}))
    code = main(["compress", str(qwen3_checkpoint), "-o", str(tmp_path / "out"), *ARGS])
    assert code != 0 and "other settings" in capsys.readouterr().err


def test_resume_with_other_bases_steps_or_threads_is_refused(qwen3_checkpoint, tmp_path, capsys, kill_after_first_job):
    """A real half-finished work folder; any setting that changes the factors (threads too: CPU rounding) refuses."""
    out, work = tmp_path / "out", tmp_path / "out.mobe-work"
    cmd = [sys.executable, "-m", "mobe", "compress", str(qwen3_checkpoint), "-o", str(out), *ARGS, "--threads", "1"]
    assert kill_after_first_job(cmd, work)
    for changed in (["--bases", "4"], ["--steps", "1400"], ["--threads", "2"]):
        args = [*ARGS, "--threads", "1"]
        i = args.index(changed[0])
        args[i + 1] = changed[1]
        capsys.readouterr()
        assert main(["compress", str(qwen3_checkpoint), "-o", str(out), *args]) == 2, changed
        assert "other settings" in capsys.readouterr().err
    assert not out.exists()


def test_factors_that_are_not_finite_are_refused(qwen3_checkpoint, tmp_path, capsys, monkeypatch):
    """A fit that returns NaN stops the run with one line naming the layer, matrix and factor; nothing is written."""
    import dataclasses

    import torch

    from mobe.factorize import registry

    method = registry.get_method("svd")

    def broken(W, config, device, desc, weighting=None):
        factors, stats = method.fit(W, config, device, desc, weighting)
        return dataclasses.replace(factors, V=torch.full_like(factors.V, float("nan"))), stats

    monkeypatch.setitem(registry._METHODS, "svd", dataclasses.replace(method, fit=broken))
    code = main(
        ["compress", str(qwen3_checkpoint), "-o", str(tmp_path / "out"), "--method", "svd", "--rank", "4", "-q"]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "layer" in err[0] and "factor V is not finite" in err[0]
    assert not (tmp_path / "out").exists()
