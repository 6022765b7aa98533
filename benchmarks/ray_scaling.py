"""Compression wall time with 1 and 2 Ray workers on this machine, and what that projects to for big models.

Side by side in one run, on one synthetic checkpoint with at least 8 MoE layers: a single process (no Ray),
then a local Ray cluster with 1 and with 2 one-CPU workers (jobs run one thread each, so every run must give the
same bits: the verdict compares a SHA-256 of every written tensor). Prints wall time, speedup and Ray's own
overhead per job; then projects the wall time of
DeepSeek-V3 and Kimi-K2 on 8, 64 and 256 GPUs as ceil(jobs / GPUs) x per-job time, with the per-job time
taken from the job's FLOP count at a sustained GPU throughput given by --gpu-tflops (an assumption, printed).

    python benchmarks/ray_scaling.py [--layers 8 --experts 16 --hidden 256 --intermediate 128 --steps 800]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import tempfile
import time
from pathlib import Path

import torch

from mobe import MobeConfig, compress
from mobe.fixtures import build_tiny_moe
from results_io import add_run_options, plain_statement, verdict_lines

HERE = Path(__file__).resolve().parent

# Published layer shapes and MoBE settings (the MoBE paper, docs/method.md): MoE layers, E, p, d, m, r, groups, steps.
MODELS = {
    "DeepSeek-V3": {"moe_layers": 58, "E": 256, "p": 2048, "d": 7168, "m": 64, "r": 2048, "groups": 1, "steps": 10000},
    "Kimi-K2": {"moe_layers": 60, "E": 384, "p": 2048, "d": 7168, "m": 128, "r": 2048, "groups": 2, "steps": 15000},
}
GPU_COUNTS = (8, 64, 256)
MIN_SPEEDUP = 1.5  # 2 one-CPU workers against 1 on 2 cores; the rest of 2x goes to shared memory bandwidth


def step_flops(E: int, p: int, d: int, m: int, r: int, groups: int) -> float:
    """Multiply-adds x 2 of one Adam step (forward + backward, backward = 2 x forward) over all E experts."""
    mix = 2 * E * (m // groups) * r * d  # coef_i @ bases of its group
    expand = 2 * E * p * r * d  # A_i @ mixed basis
    return 3.0 * (mix + expand)


def tensor_digest(folder: Path) -> str:
    """SHA-256 over every tensor (name, dtype, shape, bytes) of the safetensors files in `folder`."""
    from safetensors import safe_open

    digest = hashlib.sha256()
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(path, framework="pt") as f:
            for name in sorted(f.keys()):
                t = f.get_tensor(name).contiguous()
                digest.update(f"{path.name}:{name}:{t.dtype}:{tuple(t.shape)}".encode())
                digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def timed_compress(model: Path, out: Path, config: MobeConfig, ray_workers: int | None) -> dict:
    import ray

    start = time.perf_counter()
    if ray_workers:
        ray.init(address="local", num_cpus=ray_workers, log_to_driver=False, configure_logging=False)
    ready = time.perf_counter()
    report = compress(model, out, config, ray=bool(ray_workers), progress=False)
    done = time.perf_counter()
    if ray_workers:
        ray.shutdown()
    return {
        "runner": f"ray, {ray_workers} worker{'s' * (ray_workers > 1)}" if ray_workers else "single process",
        "workers": ray_workers or 1,
        "cluster_start_s": ready - start,
        "compress_s": done - ready,
        "job_seconds": [r.seconds for r in report.results],
        "jobs": len(report.results),
        "tensors_sha256": tensor_digest(out),
    }


def project(per_gflop_s: float, args: argparse.Namespace) -> list[dict]:
    rows = []
    for name, s in MODELS.items():
        jobs = s["moe_layers"] * 2  # gate and up, as published
        flops = s["steps"] * step_flops(s["E"], s["p"], s["d"], s["m"], s["r"], s["groups"])
        job_s = flops / (args.gpu_tflops * 1e12)
        for gpus in GPU_COUNTS:
            rows.append(
                {
                    "model": name,
                    "jobs": jobs,
                    "gpus": gpus,
                    "job_hours": job_s / 3600,
                    "wall_hours": math.ceil(jobs / gpus) * job_s / 3600,
                    "gpu_tflops_assumed": args.gpu_tflops,
                    "this_cpu_hours_per_job": flops / (per_gflop_s * 1e9) / 3600,
                }
            )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--experts", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--intermediate", type=int, default=128)
    parser.add_argument("--bases", type=int, default=4)
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--gpu-tflops", type=float, default=40.0, help="sustained fp32 TFLOP/s of one GPU (assumed)")
    add_run_options(parser, "ray_scaling")
    args = parser.parse_args()

    start = time.perf_counter()
    config = MobeConfig(  # the paper's schedule and matrices: every job runs all its steps, as the projections assume
        num_bases=args.bases,
        rank=args.rank,
        steps=args.steps,
        eval_every=100,
        threads=1,
        device="cpu",
        schedule="adam",
        basis_side="hidden",
        matrices=("gate", "up"),
    )
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        model = build_tiny_moe(
            Path(tmp) / "src",
            "qwen3_moe",
            num_layers=args.layers,
            num_experts=args.experts,
            hidden_size=args.hidden,
            moe_intermediate_size=args.intermediate,
        )
        for workers in (None, 1, 2):
            runs.append(timed_compress(model, Path(tmp) / f"out-{workers}", config, workers))
            print(f"{runs[-1]['runner']}: {runs[-1]['compress_s']:.1f} s", flush=True)

    single = runs[0]["compress_s"]
    print(
        f"\n{runs[0]['jobs']} jobs (layers x gate/up), E={args.experts}, p={args.intermediate}, d={args.hidden}, "
        f"m={args.bases}, r={args.rank}, {args.steps} steps, 1 thread per job"
    )
    print(f"{'runner':>18} {'start s':>8} {'wall s':>8} {'speedup':>8} {'sum of jobs s':>14} {'overhead/job s':>15}")
    for run in runs:
        busy = sum(run["job_seconds"])
        run["speedup_vs_single_process"] = single / run["compress_s"]
        run["overhead_per_job_s"] = (run["compress_s"] * run["workers"] - busy) / run["jobs"]
        print(
            f"{run['runner']:>18} {run['cluster_start_s']:>8.1f} {run['compress_s']:>8.1f} "
            f"{run['speedup_vs_single_process']:>7.2f}x {busy:>14.1f} {run['overhead_per_job_s']:>15.2f}"
        )
    ray1, ray2 = runs[1]["compress_s"], runs[2]["compress_s"]
    print(f"2 workers vs 1 worker: {ray1 / ray2:.2f}x")

    mean_job = sum(runs[0]["job_seconds"]) / runs[0]["jobs"]
    flops = args.steps * step_flops(args.experts, args.intermediate, args.hidden, args.bases, args.rank, 1)
    cpu_gflop_s = flops / mean_job / 1e9
    projections = project(cpu_gflop_s, args)
    print(
        f"\nthis CPU sustains {cpu_gflop_s:.1f} GFLOP/s per one-thread job; projection at an assumed "
        f"{args.gpu_tflops:g} TFLOP/s per GPU, gate and up of every MoE layer:"
    )
    print(f"{'model':>12} {'jobs':>5} {'GPUs':>5} {'h per job':>10} {'wall h':>8}")
    for row in projections:
        print(
            f"{row['model']:>12} {row['jobs']:>5} {row['gpus']:>5} {row['job_hours']:>10.2f} {row['wall_hours']:>8.2f}"
        )

    identical = len({run["tensors_sha256"] for run in runs}) == 1
    verdicts = {
        "same_bits": f"written tensors bit-identical across the {len(runs)} runs (SHA-256 of every tensor): "
        + ("yes" if identical else "NO, " + ", ".join(f"{r['runner']} {r['tensors_sha256'][:12]}" for r in runs)),
        "two_workers_faster": f"2 workers vs 1 worker: {ray1 / ray2:.2f}x faster (target >= {MIN_SPEEDUP}x): "
        + ("yes" if ray1 / ray2 >= MIN_SPEEDUP else "NO"),
    }
    print("\n" + "\n".join(verdicts.values()))

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {
        "args": vars(args),
        "torch_threads_default": torch.get_num_threads(),
        "runs": runs,
        "speedup_2_vs_1_workers": ray1 / ray2,
        "cpu_gflop_s_per_job": cpu_gflop_s,
        "projections": projections,
        "models": MODELS,
        "verdicts": verdicts,
        "seconds": time.perf_counter() - start,
    }
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {out.with_suffix('.json')}")


# --- tables for README.md and docs/ (written by benchmarks/tables.py from this script's JSON) ---
def table(result: dict) -> str:
    """ray_scaling.py: wall time per runner, the bit-identity verdict (if the JSON has it), and the projections."""
    a = result["args"]
    runs = result["runs"]
    lines = [
        f"{runs[0]['jobs']} jobs (gate and up of {a['layers']} MoE layers), E={a['experts']}, p={a['intermediate']}, "
        f"d={a['hidden']}, m={a['bases']}, r={a['rank']}, {a['steps']} Adam steps, one thread per job.",
        "",
        "| runner | cluster start | wall time | vs single process | summed job time | Ray overhead per job |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in runs:
        start = "-" if r["workers"] == 1 and r["runner"] == "single process" else f"{r['cluster_start_s']:.1f} s"
        lines.append(
            f"| {r['runner']} | {start} | {r['compress_s']:.1f} s | {r['speedup_vs_single_process']:.2f}x | "
            f"{sum(r['job_seconds']):.1f} s | {r['overhead_per_job_s']:.2f} s |"
        )
    one, two = runs[1], runs[2]
    lines += [
        "",
        f"2 workers against 1: {one['compress_s'] / two['compress_s']:.2f}x faster "
        f"({two['compress_s'] / one['compress_s']:.2f}x the time); "
        f"the summed fitting time of the jobs goes from {sum(one['job_seconds']):.1f} s to "
        f"{sum(two['job_seconds']):.1f} s (two jobs share the memory bandwidth).",
    ]
    if "tensors_sha256" not in runs[0]:
        lines.append(
            "This JSON predates the bit-identity check: it holds no digest of the written tensors (rerun "
            "`python benchmarks/ray_scaling.py` to check it)."
        )
    lines += verdict_lines(result)
    proj = result["projections"]
    gpus = sorted({p["gpus"] for p in proj})
    lines += [
        "",
        f"On paper, at an **assumed** sustained {proj[0]['gpu_tflops_assumed']:g} TFLOP/s fp32 per GPU (this CPU "
        f"sustained {result['cpu_gflop_s_per_job']:.1f} GFLOP/s per one-thread job): wall time = ceil(jobs / GPUs) x "
        "one job's FLOP count / that rate.",
        "",
        "| model | jobs | hours per job | " + " | ".join(f"{g} GPUs" for g in gpus) + " |",
        "|---|---:|---:|" + "---:|" * len(gpus),
    ]
    models = result.get("models", {})
    for model in dict.fromkeys(p["model"] for p in proj):
        rows = {p["gpus"]: p for p in proj if p["model"] == model}
        first = rows[gpus[0]]
        m = models.get(model)
        name = (
            f"{model} ({m['moe_layers']} MoE layers, E={m['E']}, m={m['m']}"
            + (f" in {m['groups']} groups" if m["groups"] > 1 else "")
            + f", {m['steps']:,} steps)"
            if m
            else model
        )
        lines.append(
            f"| {name} | {first['jobs']} | {first['job_hours']:.1f} | "
            + " | ".join(f"{rows[g]['wall_hours']:.1f} h" for g in gpus)
            + " |"
        )
    return "\n".join(lines) + "\n"


def summary(result: dict) -> str:
    """One sentence for docs/scale-out.md."""
    one, two = result["runs"][1], result["runs"][2]
    bits = (
        plain_statement(result["verdicts"]["same_bits"])
        if isinstance(result.get("verdicts"), dict)
        else "The bit-identity check is not in this JSON (it predates the check)."
    )
    return (
        f"Measured by `benchmarks/ray_scaling.py` (`benchmarks/results/ray_scaling.json`): 2 one-CPU Ray workers "
        f"finish in {two['compress_s'] / one['compress_s']:.2f}x the time of 1. {bits}\n"
    )


if __name__ == "__main__":
    main()
