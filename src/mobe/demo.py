"""`mobe demo`: the whole job on a small model, offline: build, compress, reconstruct, load, generate."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from .config import MobeConfig
from .pipeline import compress, reconstruct


def _source_model(workdir: Path) -> Path:
    """The project's trained fixture if it ships with this checkout, else a small random Qwen3-MoE."""
    from . import fixtures

    trained = getattr(fixtures, "trained_fixture_path", None)
    if trained is not None:
        try:
            return trained()
        except FileNotFoundError:
            pass
    return fixtures.build_tiny_moe(workdir / "original", hidden_size=64, moe_intermediate_size=32, num_experts=16)


def run_demo(workdir: str | Path = "demo_output", steps: int = 300) -> None:
    from transformers import AutoModelForCausalLM

    workdir = Path(workdir)
    if workdir.exists():
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True)
    source = _source_model(workdir)
    print(f"source model: {source}")
    config = MobeConfig(num_bases=4, rank=None, activation="tanh", steps=steps, eval_every=50)
    report = compress(source, workdir / "mobe", config)
    print(report.table())
    reconstruct(workdir / "mobe", workdir / "dense")
    print(f"native MoBE checkpoint: {workdir / 'mobe'}\ndense reconstruction:  {workdir / 'dense'}")

    prompt = torch.tensor([[0, 5, 17, 42, 9, 3]])
    for name, path in (("original", source), ("reconstructed", workdir / "dense")):
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        with torch.no_grad():
            out = model.generate(prompt, max_new_tokens=8, do_sample=False)
        print(f"{name:>13} generates: {out[0, prompt.shape[1] :].tolist()}")
