"""A run killed mid-way resumes from its finished jobs and ends with the same checkpoint as an uninterrupted one."""

import json
import sys

from mobe.cli.main import main

ARGS = ["--bases", "2", "--rank", "8", "--steps", "1500", "--eval-every", "100", "--quiet"]


def test_killed_run_resumes_and_matches_uninterrupted(
    qwen3_checkpoint, tmp_path, checkpoint_contents, kill_after_first_job
):
    out = tmp_path / "out"
    work = tmp_path / "out.mobe-work"
    cmd = [sys.executable, "-m", "mobe", "compress", str(qwen3_checkpoint), "-o", str(out), *ARGS]
    finished = kill_after_first_job(cmd, work)
    assert 1 <= len(finished) < 4, finished  # killed after the first job and before the last
    assert not out.exists()

    assert main(["compress", str(qwen3_checkpoint), "-o", str(out), *ARGS]) == 0
    report = json.loads((out / "mobe_report.json").read_text())
    resumed = [f"layer{r['layer']:05d}.{r['matrix']}.safetensors" for r in report["results"] if r["resumed"]]
    assert resumed == finished
    assert not work.exists()

    assert main(["compress", str(qwen3_checkpoint), "-o", str(tmp_path / "ref"), *ARGS]) == 0
    assert checkpoint_contents(out) == checkpoint_contents(tmp_path / "ref")


def test_resume_with_other_settings_is_refused(qwen3_checkpoint, tmp_path, capsys):
    work = tmp_path / "out.mobe-work"
    work.mkdir()
    (work / "work.json").write_text(json.dumps({"source": "elsewhere", "config": {}}))
    code = main(["compress", str(qwen3_checkpoint), "-o", str(tmp_path / "out"), *ARGS])
    assert code != 0 and "other settings" in capsys.readouterr().err
