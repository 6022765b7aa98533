"""`distill`: train a compressed model's small tensors toward the original's outputs, write a new checkpoint.

Steps: (1) the teacher's top-k targets on the text, streaming the original one decoder layer at a time, saved in a
work folder (a rerun reuses them); (2) the student is the compressed checkpoint loaded as it runs (native factors
stay factored) with gradient checkpointing; only the mode's tensors train; (3) the output is the compressed
checkpoint with those tensors replaced, shard by shard, every other byte copied.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from ..architectures import base_model_type, moe_layout
from ..calibrate import calibration_ids
from ..calibrate.collect import EXPERT_TENSOR, module_names
from ..checkpoint import CheckpointReader, resolve_checkpoint
from ..config import DistillConfig, file_sha256
from ..devices import resolve_device
from ..evaluate.report import REPORT_FILE
from ..export.files import atomic_save_file, write_json_atomic
from .targets import TeacherTargets, compute_targets
from .train import evaluate, split, train
from .trainable import DistillError, router_modules, select_trainable

DISTILL_REPORT = "mobe_distill.json"
TARGETS_FILE = "teacher_topk.safetensors"


@dataclass
class DistillReport:
    original: str
    compressed: str
    output: str
    config: dict[str, Any]
    trained_params: int
    train_tokens: int
    heldout_tokens: int
    before: dict[str, float]
    after: dict[str, float]
    best_step: int
    kept_input: bool
    seconds: float
    history: list[dict] = field(default_factory=list)

    @property
    def gap_closed(self) -> float:
        """Share of the held-out KL to the original removed (1 = the original's outputs on that text)."""
        return 1 - self.after["kl"] / self.before["kl"] if self.before["kl"] > 0 else 0.0

    def table(self) -> str:
        b, a = self.before, self.after
        lines = [
            f"distill --train {self.config['train']}: {self.trained_params:,} parameters trained on "
            f"{self.train_tokens:,} tokens, {self.heldout_tokens:,} held out",
            f"{'':>10} {'KL':>10} {'perplexity':>11}",
            f"{'before':>10} {b['kl']:>10.5f} {b['perplexity']:>11.3f}",
            f"{'after':>10} {a['kl']:>10.5f} {a['perplexity']:>11.3f}",
            f"held-out KL {100 * self.gap_closed:.1f}% lower; best state at step {self.best_step}"
            + ("; no step beat the input, which is kept as it was" if self.kept_input else ""),
        ]
        return "\n".join(lines + ([self.hint] if self.hint else []))

    @property
    def hint(self) -> str:
        """What to try when the input was kept because the very first held-out check was already worse.

        Adam moves every trained entry by about the learning rate per step, whatever the gradient's size: a student
        already close to the original (a small KL) is thrown off by a rate that suits one that lost more."""
        checks = [row["heldout_kl"] for row in self.history]
        if not self.kept_input or len(checks) < 2 or checks[1] <= checks[0]:
            return ""
        lr = self.config["lr"]
        return (
            f"the held-out KL rose from the first check on: --lr {lr:g} is likely too high for a model this close "
            f"to the original; try --lr {lr / 10:g}"
        )

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "gap_closed": self.gap_closed}


def plot_history(report: DistillReport, path: Path) -> None:
    """Held-out KL and perplexity over optimiser steps (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [h["step"] for h in report.history]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.5))
    ax1.plot(steps, [h["heldout_kl"] for h in report.history], marker="o", label="held-out")
    trained = [h for h in report.history if h["train_kl"] is not None]
    ax1.plot([h["step"] for h in trained], [h["train_kl"] for h in trained], marker=".", label="training (mean)")
    ax1.set(xlabel="optimiser step", ylabel="KL(original || compressed)", title="KL per token")
    ax1.legend()
    ax2.plot(steps, [h["heldout_perplexity"] for h in report.history], marker="o")
    ax2.set(xlabel="optimiser step", ylabel="perplexity", title="held-out perplexity")
    fig.suptitle(f"distill --train {report.config['train']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _check_pair(original: CheckpointReader, compressed: CheckpointReader) -> None:
    a, b = original.config, compressed.config
    if base_model_type(b.get("model_type")) != base_model_type(a.get("model_type")):
        raise DistillError(
            f"{compressed.path} is a {b.get('model_type')} model, {original.path} a {a.get('model_type')} one: "
            "distil a compressed model toward its own original"
        )
    for key in ("vocab_size", "hidden_size", "num_hidden_layers"):
        if a.get(key) != b.get(key):
            raise DistillError(f"{key} differs: {original.path} has {a.get(key)}, {compressed.path} {b.get(key)}")
    if b.get("quantization_config") or (b.get("mobe") or {}).get("quantization"):
        raise DistillError(f"{compressed.path} holds quantised weights, which do not train: distil, then quantise")


def _targets(original: Path, text: Path, config: DistillConfig, work: Path, progress: bool) -> TeacherTargets:
    """The teacher's targets, from the work folder when a run with the same inputs already made them."""
    meta = {
        "original_config": file_sha256(original / "config.json"),
        "text": file_sha256(text),
        "top_k": str(config.top_k),
        "tokens": str(config.tokens),
        "seq_len": str(config.seq_len),
        "router_top_k": str(config.routing_top_k),
    }
    path = work / TARGETS_FILE
    if path.is_file():
        cached = TeacherTargets.load(path)
        if cached.meta == meta:
            return cached
    sequences = calibration_ids(original, text, config.tokens, config.seq_len)
    targets = compute_targets(
        original, sequences, config.top_k, meta, progress=progress, router_top_k=config.routing_top_k
    )
    work.mkdir(parents=True, exist_ok=True)
    targets.save(path)
    return targets


def _write(compressed: CheckpointReader, output: Path, updates: dict[str, torch.Tensor], report: DistillReport) -> None:
    """The compressed checkpoint with `updates` (checkpoint name -> tensor) replaced; built aside, then renamed."""
    tmp = output.with_name(f".{output.name}.distill-tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    by_shard = compressed.tensors_by_shard()
    for item in sorted(compressed.path.iterdir()):
        if item.is_file() and not (item.name.endswith(".safetensors") and item.name in by_shard):
            shutil.copy2(item, tmp / item.name)
    for shard, names in by_shard.items():
        changed = [n for n in names if n in updates]
        if not changed:
            shutil.copy2(compressed.path / shard, tmp / shard)
            continue
        with safe_open(compressed.path / shard, framework="pt") as f:
            metadata = f.metadata()
            tensors = {n: f.get_tensor(n) for n in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
        for n in changed:
            tensors[n] = updates[n].to(tensors[n].dtype).reshape(tensors[n].shape)
        atomic_save_file(tensors, tmp / shard, metadata=metadata)
    report_path = tmp / REPORT_FILE
    if report_path.is_file():
        data = json.loads(report_path.read_text())
        data["distill"] = report.to_dict()
        write_json_atomic(data, report_path)
    write_json_atomic(report.to_dict(), tmp / DISTILL_REPORT)
    plot_history(report, tmp / DISTILL_REPORT.replace(".json", ".png"))
    if output.exists():  # replacing the input itself: swap, then drop the old folder
        old = output.with_name(f".{output.name}.distill-old")
        output.rename(old)
        tmp.rename(output)
        shutil.rmtree(old)
    else:
        tmp.rename(output)


def distill(
    original: str | Path,
    compressed: str | Path,
    output: str | Path,
    text: str | Path,
    config: DistillConfig | None = None,
    *,
    work_dir: str | Path | None = None,
    progress: bool = True,
) -> DistillReport:
    """Distil the compressed checkpoint toward the original on `text`; write the result to `output`.

    `output` may be `compressed` itself (replaced once the new one is complete). The result is never worse than
    the input on the held-out tenth of the text: when no step lowers its KL to the original, the input's tensors
    are written unchanged. The teacher's targets are kept in `work_dir` (default OUTPUT.mobe-distill-work, removed
    at the end; a folder you name is kept, so further runs on the same original and text reuse them).

    Example:
        >>> report = distill("./Qwen3-30B-A3B", "./q3-mobe", "./q3-mobe-kd", "c4_sample.txt")  # doctest: +SKIP
        >>> print(report.table())  # doctest: +SKIP
    """
    config = config or DistillConfig()
    device = resolve_device(config.device)
    original_path, compressed_path, output = resolve_checkpoint(original), Path(compressed), Path(output)
    text = Path(text)
    if not text.is_file():
        raise DistillError(f"distillation text {text} does not exist")
    if output.exists() and output.resolve() != compressed_path.resolve():
        raise DistillError(f"output {output} already exists")
    source, student_reader = CheckpointReader(original_path), CheckpointReader(compressed_path)
    _check_pair(source, student_reader)
    work = Path(work_dir) if work_dir else output.with_name(output.name + ".mobe-distill-work")
    start = time.perf_counter()
    targets = _targets(original_path, text, config, work, progress)

    from ..runtime import load_model

    layout = moe_layout(student_reader.config)
    if config.device == "auto" and torch.cuda.device_count() > 1:  # spread over every visible GPU (accelerate)
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(compressed_path, dtype=torch.float32, device_map="auto")
    else:
        model = load_model(compressed_path, dtype=torch.float32, device=device)
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable()  # activations recomputed in the backward pass: memory of one decoder layer's, not the model's
    params = select_trainable(model, layout, config.train)
    names = module_names(model, [n for n in student_reader.weight_map if not EXPERT_TENSOR.search(n)])
    missing = [n for n in params if n not in names]
    if missing:
        raise DistillError(f"{compressed_path}: no checkpoint tensor for the trained parameter {missing[0]}")
    stored = student_reader.get_many([names[n] for n in params])  # as on disk: written back if nothing helps

    routers = list(router_modules(model, layout).values())
    history, best_step = train(model, params, targets, config, progress=progress, routers=routers)
    train_idx, held_idx = split(len(targets), config.heldout_fraction)
    with torch.no_grad():  # judge what will be written: the trained tensors in the checkpoint's dtypes
        for n, p in params.items():
            p.copy_(p.to(stored[names[n]].dtype).float())
    after = evaluate(model, targets, held_idx)
    before = history[0]
    kept = best_step == 0 or after.kl >= before["heldout_kl"]  # no step, or rounding, beat the input
    if kept:
        after_dict = {"kl": before["heldout_kl"], "perplexity": before["heldout_perplexity"]}
        updates = stored
    else:
        after_dict = {"kl": after.kl, "perplexity": after.perplexity}
        updates = {names[n]: p.detach().cpu() for n, p in params.items()}
    report = DistillReport(
        original=str(original),
        compressed=str(compressed),
        output=str(output),
        config=config.to_dict(),
        trained_params=sum(p.numel() for p in params.values()),
        train_tokens=sum(targets.input_ids[i].numel() for i in train_idx),
        heldout_tokens=sum(targets.input_ids[i].numel() for i in held_idx),
        before={"kl": before["heldout_kl"], "perplexity": before["heldout_perplexity"]},
        after=after_dict,
        best_step=0 if kept else best_step,
        kept_input=kept,
        seconds=time.perf_counter() - start,
        history=history,
    )
    _write(student_reader, output, updates, report)
    if work_dir is None:  # a work folder the caller named keeps the targets for further runs
        shutil.rmtree(work, ignore_errors=True)
    return report
