"""Shared fixtures: tiny MoE checkpoints of every supported architecture, built offline once per session."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from safetensors import safe_open

from mobe.architectures import canonical_model_types
from mobe.fixtures import build_tiny_moe

ARCHITECTURES = canonical_model_types()
# lm-eval tasks in the tests read local files: HF datasets must never reach for the network.
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` are skipped where torch sees no CUDA device."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (marked gpu)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory) -> dict[str, Path]:
    """Every registered family, saved in the layout its published checkpoints have: save_pretrained's, except where
    it differs (Qwen3.5-MoE, which save_pretrained writes per expert: `fuse_experts_on_disk` fuses them)."""
    root = tmp_path_factory.mktemp("tiny")
    return {arch: build_tiny_moe(root / arch, arch, max_shard_size="20KB") for arch in ARCHITECTURES}


@pytest.fixture
def qwen3_checkpoint(tiny_checkpoints) -> Path:
    return tiny_checkpoints["qwen3_moe"]


def _contents(folder: Path) -> dict:
    """Every file's bytes, except shards: their tensors' bytes and header metadata (whose key order varies)."""
    out: dict = {}
    for path in sorted(folder.iterdir()):
        if path.suffix == ".safetensors":
            with safe_open(path, "pt") as f:
                out[path.name] = (f.metadata(), {k: f.get_tensor(k).numpy().tobytes() for k in f.keys()})
        elif path.name != "mobe_report.json":  # holds timings
            out[path.name] = path.read_bytes()
    return out


@pytest.fixture
def checkpoint_contents():
    """Compare checkpoints bit for bit: `checkpoint_contents(a) == checkpoint_contents(b)`."""
    return _contents


def _kill_after_first_job(cmd: list[str], work: Path) -> list[str]:
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300  # worker start-up (torch, transformers) is slow on a loaded 2-core machine
    while not list(work.glob("layer*.safetensors")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    return sorted(p.name for p in work.glob("layer*.safetensors"))


@pytest.fixture
def kill_after_first_job():
    """Run a command, SIGKILL it as soon as a finished job appears in `work`; returns the finished job files."""
    return _kill_after_first_job
