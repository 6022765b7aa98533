"""Real-size compression jobs: one (layer, matrix) stack of Qwen3-30B-A3B and of DeepSeek-V3, every schedule.

NO GPU MEASUREMENT EXISTS YET: this script was written and checked on CPU only, at a tiny --scale (the smoke test
in tests/benchmarks/test_gpu_jobs.py). Run it on a GPU to get the figures; nothing in docs/ quotes it until then.

Per model (synthetic weights with a power-law spectrum and a shared input subspace, mobe.factorize.synthetic),
per matmul precision (fp32; TF32; bf16 autocast) and per schedule, it records: seconds per step, steps, steps to
reach the paper schedule's final error (same precision), final relative error, its change against fp32, and the
peak GPU memory (torch.cuda.max_memory_allocated; null on CPU).

    python benchmarks/gpu_jobs.py --device cuda                            # full size: hours for DeepSeek-V3
    python benchmarks/gpu_jobs.py --device cuda --paper-steps 1000         # a cheaper first look
    python benchmarks/gpu_jobs.py --device cpu --scale 0.02 --paper-steps 40 --steps 30 --out /tmp/gpu_jobs
"""

from __future__ import annotations

import argparse
import contextlib
import math
import time
from pathlib import Path

import torch

from mobe import MobeConfig, fit_mobe
from mobe.config import SCHEDULES
from mobe.devices import resolve_device
from mobe.evaluate import weight_error
from mobe.factorize.synthetic import realistic_stack
from results_io import add_run_options, pyplot, save_figure, write_results

HERE = Path(__file__).resolve().parent
# model -> (experts E, intermediate p, hidden d, bases m as published)
MODELS = {"qwen3-30b-a3b": (128, 768, 2048, 32), "deepseek-v3": (256, 2048, 7168, 64)}
PRECISIONS = ("fp32", "tf32", "bf16")


@contextlib.contextmanager
def matmul_precision(name: str, device: torch.device):
    """fp32: exact float32 matmuls; tf32: TensorFloat-32 where the device has it; bf16: autocast to bfloat16."""
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest" if name == "fp32" else "high")
    try:
        if name == "bf16":
            with torch.autocast(device.type, dtype=torch.bfloat16):
                yield
        else:
            yield
    finally:
        torch.set_float32_matmul_precision(before)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_job(weights: torch.Tensor, config: MobeConfig, precision: str, device: torch.device) -> dict:
    """One fit; the trace's MSE is turned into relative error (sqrt(MSE / mean W^2))."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    _sync(device)
    start = time.perf_counter()
    with matmul_precision(precision, device):
        factors, stats = fit_mobe(weights, config, device=device)
    _sync(device)
    seconds = time.perf_counter() - start
    mean_square = weights.double().pow(2).mean().item()
    steps = max(stats.steps, 1)
    return {
        "steps": stats.steps,
        "seconds": seconds,
        "seconds_per_step": seconds / steps,
        "initial_error": math.sqrt(stats.init_loss / mean_square),
        "final_error": weight_error(weights.cpu(), factors.reconstruct())[0],  # what a compress run would store
        "peak_gpu_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
        "trace": [(s, math.sqrt(loss / mean_square)) for _, s, loss in stats.trace],
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto", help="cuda, cuda:N, cpu or auto")
    parser.add_argument("--scale", type=float, default=1.0, help="multiplies p and d (E and m stay)")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--schedules", nargs="+", default=list(SCHEDULES), choices=list(SCHEDULES))
    parser.add_argument("--precisions", nargs="+", default=list(PRECISIONS), choices=list(PRECISIONS))
    parser.add_argument("--paper-steps", type=int, default=10000, help="steps of paper and adam")
    parser.add_argument("--steps", type=int, default=None, help="steps of fast (default: its own)")
    parser.add_argument("--activation", default="tanh", choices=["tanh", "silu"])
    add_run_options(parser, "gpu_jobs")
    args = parser.parse_args(argv)
    if args.scale <= 0:
        parser.error(f"--scale must be > 0, got {args.scale}")
    device = resolve_device(args.device)
    start = time.perf_counter()
    result: dict = {"device": str(device), "device_name": _device_name(device), "models": {}}
    for name in args.models:
        E, p, d, m = MODELS[name]
        p, d = max(2, round(p * args.scale)), max(2, round(d * args.scale))
        weights = realistic_stack(E, p, d, seed=0, device=device)
        print(f"{name}: E={E} p={p} d={d} m={m} r={p} on {device}", flush=True)
        rows = []
        for precision in args.precisions:
            for schedule in args.schedules:
                steps = args.steps if schedule == "fast" else args.paper_steps
                config = MobeConfig(
                    num_bases=m, rank=p, activation=args.activation, schedule=schedule, steps=steps, device=str(device)
                )
                row = {"precision": precision, "schedule": schedule, **run_job(weights, config, precision, device)}
                rows.append(row)
                print(
                    f"  {precision:>4} {schedule:>5}: {row['steps']:>6} steps, {row['seconds_per_step']:.4f} s/step, "
                    f"error {row['initial_error']:.4f} -> {row['final_error']:.4f}, peak "
                    f"{_gib(row['peak_gpu_bytes'])}",
                    flush=True,
                )
        _compare(rows)
        result["models"][name] = {"shape": {"E": E, "p": p, "d": d, "m": m, "r": p}, "rows": rows}
    write_results(result, args, start, plot, args.out)


def _compare(rows: list[dict]) -> None:
    """Steps to reach the paper's final error (same precision) and each fit's change of error against fp32."""
    for row in rows:
        paper = next((r for r in rows if r["schedule"] == "paper" and r["precision"] == row["precision"]), None)
        fp32 = next((r for r in rows if r["schedule"] == row["schedule"] and r["precision"] == "fp32"), None)
        row["steps_to_paper_final"] = (
            None if paper is None else next((s for s, err in row["trace"] if err <= paper["final_error"]), None)
        )
        row["error_change_vs_fp32"] = None if fp32 is None else row["final_error"] - fp32["final_error"]
        row["trace"] = row["trace"][:: max(1, len(row["trace"]) // 200)]  # enough for the plot


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def _gib(value: int | None) -> str:
    return "n/a (cpu)" if value is None else f"{value / 2**30:.2f} GiB"


def plot(result: dict, path: Path) -> None:
    plt = pyplot()

    models = result["models"]
    fig, axes = plt.subplots(1, len(models), figsize=(5.5 * len(models), 4.2), dpi=120, squeeze=False)
    for ax, (name, model) in zip(axes[0], models.items(), strict=True):
        for i, row in enumerate(model["rows"]):
            trace = row["trace"]
            style = {"fp32": "-", "tf32": "--", "bf16": ":"}[row["precision"]]
            ax.plot([s for s, _ in trace], [e for _, e in trace], style, color=f"C{i % 10}", lw=1, label=None)
            ax.plot([], [], style, color=f"C{i % 10}", label=f"{row['schedule']} {row['precision']}")
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel("relative error (log scale)")
        ax.set_title(f"{name} ({result['device_name']})")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    save_figure(fig, path)


if __name__ == "__main__":
    main()
