"""Peak RAM of `mobe compress` must scale with one MoE layer, not with the model.

Builds two sharded checkpoints with identical layers (2 and 8 MoE layers by default, one layer's experts several
hundred MiB), compresses each in a fresh process, native and dense, and compares the peak RSS each compression adds
above its own process's baseline (Python, torch, transformers and mobe imported: ~0.5-0.8 GiB that would otherwise
drown the signal). The child resets the kernel's peak-RSS counter (VmHWM, via /proc/self/clear_refs) once the
imports are done and reports VmHWM minus VmRSS at that point. Prints a table and a verdict, writes JSON and PNG.

    python benchmarks/compress_memory.py [--hidden 1024 --experts 32 --intermediate 1024 --layers 2 8]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from results_io import add_run_options, pyplot, save_figure, verdict_lines, write_results

HERE = Path(__file__).resolve().parent
FORMATS = ("native", "dense")
MAX_RATIO = 1.2  # peak above baseline, large model over small model, when the model grows 4x


def _status_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def _child_build(args: argparse.Namespace, layers: int, path: str) -> None:
    from mobe.fixtures import build_tiny_moe

    build_tiny_moe(
        path,
        "qwen3_moe",
        hidden_size=args.hidden,
        moe_intermediate_size=args.intermediate,
        num_experts=args.experts,
        num_layers=layers,
        vocab_size=1024,
        max_shard_size="256MB",
    )


def _child_compress(args: argparse.Namespace, src: str, out: str, reconstruct: bool) -> None:
    """Compress `src` and print the peak RSS above the RSS this process had once everything was imported."""
    import torch

    torch.set_num_threads(args.threads)
    import transformers  # noqa: F401  (part of the baseline, as the pipeline imports it)

    import mobe.pipeline  # noqa: F401
    from mobe import MobeConfig, compress

    baseline = _status_mib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    start = time.perf_counter()
    compress(
        src,
        out,
        MobeConfig(num_bases=args.bases, rank=args.rank, steps=args.steps),
        reconstruct=reconstruct,
        progress=False,
    )
    seconds = time.perf_counter() - start
    peak = _status_mib("VmHWM")
    print(
        json.dumps(
            {
                "baseline_rss_mib": baseline,
                "peak_rss_mib": peak,
                "above_baseline_mib": peak - baseline,
                "seconds": seconds,
            }
        )
    )


def _run(argv: list[str]) -> dict:
    out = subprocess.run([sys.executable, __file__, *argv], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1]) if out.stdout.strip() else {}


def _dir_mib(path: Path) -> float:
    return sum(p.stat().st_size for p in path.glob("*.safetensors")) / 2**20


def plot(result: dict, path: Path) -> None:
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(6, 4))
    rows = result["rows"]
    layers = sorted({r["layers"] for r in rows})
    ax.plot(
        layers,
        [next(r["checkpoint_mib"] for r in rows if r["layers"] == n) for n in layers],
        "k--o",
        label="checkpoint",
    )
    for fmt in FORMATS:
        ax.plot(
            layers,
            [next(r["above_baseline_mib"] for r in rows if r["layers"] == n and r["format"] == fmt) for n in layers],
            "-o",
            label=f"peak RSS above baseline, {fmt}",
        )
    ax.axhline(rows[0]["layer_experts_mib"], color="grey", lw=0.8, label="one layer's experts")
    ax.set_xlabel("MoE layers")
    ax.set_ylabel("MiB")
    ax.set_xticks(layers)
    ax.legend(fontsize=8)
    ax.set_title("mobe compress: peak RAM against model size")
    save_figure(fig, path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--experts", type=int, default=32)
    parser.add_argument("--intermediate", type=int, default=1024)
    parser.add_argument("--bases", type=int, default=8)
    parser.add_argument("--rank", type=int, default=128)
    parser.add_argument("--steps", type=int, default=2, help="fitting steps (memory does not depend on them)")
    add_run_options(parser, "compress_memory", threads=2)
    parser.add_argument("--layers", type=int, nargs=2, default=[2, 8])
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, *rest = args.child
        if kind == "build":
            _child_build(args, int(rest[0]), rest[1])
        else:
            _child_compress(args, rest[0], rest[1], kind == "dense")
        return

    start = time.perf_counter()
    sizes = [
        f"--{k}={getattr(args, k)}" for k in ("hidden", "experts", "intermediate", "bases", "rank", "steps", "threads")
    ]
    layer_mib = 3 * args.experts * args.intermediate * args.hidden * 4 / 2**20  # float32 gate, up, down
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for layers in args.layers:
            src = Path(tmp) / f"src{layers}"
            print(f"building {layers} MoE layers ({layers * layer_mib:.0f} MiB of experts)", flush=True)
            _run([*sizes, "--child", "build", str(layers), str(src)])
            for fmt in FORMATS:
                out = Path(tmp) / f"out{layers}-{fmt}"
                result = _run([*sizes, "--child", fmt, str(src), str(out)])
                rows.append(
                    {
                        "layers": layers,
                        "format": fmt,
                        "checkpoint_mib": _dir_mib(src),
                        "layer_experts_mib": layer_mib,
                        **result,
                    }
                )
                print(
                    f"  {fmt}: {result['above_baseline_mib']:.0f} MiB above baseline, {result['seconds']:.0f} s",
                    flush=True,
                )
                shutil.rmtree(out)
            shutil.rmtree(src)  # the next, larger checkpoint needs the disk

    small, large = args.layers
    print(
        f"\nqwen3_moe, hidden {args.hidden}, {args.experts} experts of {args.intermediate} (float32): one layer's "
        f"experts {layer_mib:.0f} MiB; MoBE m={args.bases} r={args.rank}, {args.steps} steps"
    )
    print(
        f"{'layers':>6} {'format':>7} {'ckpt MiB':>9} {'baseline':>9} {'peak RSS':>9} {'above base':>11} "
        f"{'/ layer':>8} {'sec':>6}"
    )
    for r in rows:
        print(
            f"{r['layers']:>6} {r['format']:>7} {r['checkpoint_mib']:>9.0f} {r['baseline_rss_mib']:>9.0f} "
            f"{r['peak_rss_mib']:>9.0f} {r['above_baseline_mib']:>11.0f} {r['above_baseline_mib'] / layer_mib:>8.2f} "
            f"{r['seconds']:>6.0f}"
        )
    ratios, verdicts = {}, {}
    for fmt in FORMATS:
        a, b = (next(r for r in rows if r["layers"] == n and r["format"] == fmt) for n in (small, large))
        ratios[fmt] = b["above_baseline_mib"] / a["above_baseline_mib"]
        growth = b["checkpoint_mib"] / a["checkpoint_mib"]
        ok = ratios[fmt] <= MAX_RATIO
        verdicts[f"{fmt}_scales_with_one_layer"] = (
            f"peak RSS above baseline {large} vs {small} layers {ratios[fmt]:.3f}x while the checkpoint grows "
            f"{growth:.2f}x (target <= {MAX_RATIO}x): {'yes' if ok else 'NO'}"
        )
        under = b["above_baseline_mib"] < 0.5 * b["checkpoint_mib"]
        verdicts[f"{fmt}_{large}_layers_under_half_the_checkpoint"] = (
            f"{b['above_baseline_mib']:.0f} MiB above baseline for a {b['checkpoint_mib']:.0f} MiB checkpoint "
            f"({b['above_baseline_mib'] / b['checkpoint_mib']:.2f}x, target < 0.5x): {'yes' if under else 'NO'}"
        )
        signal = a["above_baseline_mib"] >= a["layer_experts_mib"]
        verdicts[f"{fmt}_signal_at_least_one_layer"] = (
            f"the measured peak ({a['above_baseline_mib']:.0f} MiB at {small} layers) is at least one layer's "
            f"experts ({a['layer_experts_mib']:.0f} MiB), so the comparison measures the layer, not noise: "
            f"{'yes' if signal else 'NO'}"
        )
    print()
    for name, line in verdicts.items():
        print(f"{name}: {line}")
    write_results({"rows": rows, "peak_ratio": ratios, "verdicts": verdicts}, args, start, plot, args.out)


# --- tables for README.md and docs/ (written by benchmarks/tables.py from this script's JSON) ---
def table(result: dict) -> str:
    """compress_memory.py: peak RSS above each process's baseline against the number of layers; its verdicts."""
    a = result["args"]
    lines = [
        f"qwen3_moe, hidden {a['hidden']}, {a['experts']} experts of {a['intermediate']} (float32), "
        f"MoBE m={a['bases']}, r={a['rank']}, {a['steps']} steps, {a['threads']} threads; "
        "each compression in a fresh process.",
        "",
        "| MoE layers | output | checkpoint MiB | one layer's experts MiB | baseline RSS MiB | peak RSS MiB "
        "| peak above baseline MiB | in layers | s |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['layers']} | {r['format']} | {r['checkpoint_mib']:.0f} | {r['layer_experts_mib']:.0f} | "
            f"{r['baseline_rss_mib']:.0f} | {r['peak_rss_mib']:.0f} | {r['above_baseline_mib']:.0f} | "
            f"{r['above_baseline_mib'] / r['layer_experts_mib']:.2f} | {r['seconds']:.0f} |"
        )
    checks = result.get("verdicts") or {}  # name: "<output format>_<check>"
    lines += verdict_lines({"verdicts": [f"{k.split('_')[0]} output: {v}" for k, v in checks.items()]})
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
