"""A run killed mid-way resumes from its finished jobs and ends with the same checkpoint as an uninterrupted one."""

import json
import os
import signal
import subprocess
import sys
import time

from mobe.cli.main import main

ARGS = ["--bases", "2", "--rank", "8", "--steps", "1500", "--eval-every", "100", "--quiet"]


def test_killed_run_resumes_and_matches_uninterrupted(qwen3_checkpoint, tmp_path, checkpoint_contents):
    out = tmp_path / "out"
    work = tmp_path / "out.mobe-work"
    cmd = [sys.executable, "-m", "mobe", "compress", str(qwen3_checkpoint), "-o", str(out), *ARGS]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not list(work.glob("layer*.safetensors")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    finished = sorted(p.name for p in work.glob("layer*.safetensors"))
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
