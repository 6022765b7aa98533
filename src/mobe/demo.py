"""`mobe demo`: the whole job on a small model, offline: compress, reconstruct, load, generate, report."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from .config import MobeConfig
from .pipeline import compress, reconstruct

PROMPT = "The list type"


def _source_model(workdir: Path) -> Path:
    """The project's trained fixture when this checkout ships it, else a small random Qwen3-MoE."""
    from . import fixtures

    try:
        return fixtures.trained_fixture_path()
    except FileNotFoundError:
        return fixtures.build_tiny_moe(workdir / "original", hidden_size=64, moe_intermediate_size=32, num_experts=16)


def _generate(path: Path, max_new_tokens: int = 24) -> str:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(path) if (path / "tokenizer.json").exists() else None
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids if tokenizer else torch.tensor([[0, 5, 17, 42, 9, 3]])
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False)
    new = out[0, ids.shape[1] :]
    return repr(PROMPT + tokenizer.decode(new)) if tokenizer else str(new.tolist())


def run_demo(workdir: str | Path = "demo_output", steps: int = 300, target_ratio: float = 0.3) -> None:
    workdir = Path(workdir)
    if workdir.exists():
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True)
    source = _source_model(workdir)
    print(f"source model: {source}")
    config = MobeConfig(target_ratio=target_ratio, steps=steps, eval_every=50)  # the default recipe, fewer steps
    report = compress(source, workdir / "mobe", config)
    print(report.table())
    reconstruct(workdir / "mobe", workdir / "dense")
    print(f"native MoBE checkpoint: {workdir / 'mobe'}\ndense reconstruction:  {workdir / 'dense'}")
    for name, path in (("original", source), ("reconstructed", workdir / "dense")):
        print(f"{name:>13}: {_generate(path)}")
