"""The `fast` MoBE schedule against the authors' (`paper`) schedule, side by side in one process.

Part 1, the trained fixture: each chosen (layer, matrix) stack is fitted by both schedules (same rank, m,
activation, threads); the table gives steps, wall time, final relative error, and the time `fast` needed to
reach the paper schedule's final error. Then both are run through `mobe.compress(..., reconstruct=True)` (which
fits again, identically) and the held-out perplexity of each result is measured.
Part 2, a synthetic layer (benchmarks/compare.py's, shared + expert-specific parts; p < d like real MoEs).
Writes results/schedules.json and results/schedules.png (relative error against wall time, log y).

    python benchmarks/schedules.py                 # full: 4 layers x gate, up at 10k paper steps, E=32 synthetic
    python benchmarks/schedules.py --quick         # a smoke run: 1 layer, few steps, small synthetic layer
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path

import torch

from compare import _perplexity, synthetic_layer
from mobe import CheckpointReader, MobeConfig, compress, fit_mobe
from mobe.architectures import moe_layout
from mobe.evaluate import weight_error
from mobe.factorize import budget_for_ratio, get_method
from mobe.factorize.base import oriented
from results_io import write_results

HERE = Path(__file__).resolve().parent
SCHEDULES = ("paper", "fast")


def _config(args: argparse.Namespace, schedule: str, rank: int | None, steps: int) -> MobeConfig:
    return MobeConfig(
        num_bases=args.bases,
        rank=rank,
        target_ratio=None if rank else args.ratio,
        activation=args.activation,
        schedule=schedule,
        steps=steps,
        matrices=tuple(args.matrices),
        layers=tuple(args.layers) if args.layers else None,
        device="cpu",
    )


def _rank(E: int, p: int, d: int, args: argparse.Namespace) -> int:
    config = MobeConfig(num_bases=args.bases)
    return get_method("mobe").rank_for_budget(E, p, d, config, budget_for_ratio(E, p, d, args.ratio, 2))


def _relative(weights: torch.Tensor, mse: float) -> float:
    return math.sqrt(mse / weights.double().pow(2).mean().item())


def _time_to_reach(trace: list[tuple[float, int, float]], error: float) -> float | None:
    """Seconds until the trace's relative error first falls to `error` (None if it never does)."""
    return next((seconds for seconds, _, rel in trace if rel <= error), None)


def thin_trace(
    trace: list[tuple[float, int, float]], reach: float | None = None, points: int = 300
) -> list[tuple[float, int, float]]:
    """About `points` evenly spaced entries plus the last, for the JSON and the plot (a full 10k-step trace per
    stack made the JSON 9 MB); also the first entry at or below `reach`, so _time_to_reach still finds it."""
    stride = max(1, len(trace) // points)
    first = None if reach is None else next((i for i, entry in enumerate(trace) if entry[2] <= reach), None)
    return [entry for i, entry in enumerate(trace) if i % stride == 0 or i == len(trace) - 1 or i == first]


def compare_fits(weights: torch.Tensor, rank: int, args: argparse.Namespace, label: str) -> dict:
    """Both schedules on one stack; the paper's final error is its kept (best) state, as compress returns."""
    out: dict = {"label": label, "shape": list(weights.shape), "rank": rank}
    for schedule in SCHEDULES:
        steps = args.paper_steps if schedule == "paper" else args.fast_steps
        torch.manual_seed(0)
        factors, stats = fit_mobe(weights, _config(args, schedule, rank, steps))
        out[schedule] = {
            "steps": stats.steps,
            "seconds": stats.seconds,
            "relative_error": weight_error(weights, factors.reconstruct())[0],
            "trace": [(t, s, _relative(weights, loss)) for t, s, loss in stats.trace],
        }
    paper, fast = out["paper"], out["fast"]
    out["fast_reaches_paper_at"] = _time_to_reach(fast["trace"], paper["relative_error"])
    fast["trace"], paper["trace"] = thin_trace(fast["trace"], paper["relative_error"]), thin_trace(paper["trace"])
    out["speedup"] = paper["seconds"] / out["fast_reaches_paper_at"] if out["fast_reaches_paper_at"] else None
    print(
        f"  {label:>12} r={rank:<4} paper {paper['steps']:>6} steps {paper['seconds']:7.1f} s err "
        f"{paper['relative_error']:.4f} | fast {fast['steps']:>5} steps {fast['seconds']:6.1f} s err "
        f"{fast['relative_error']:.4f} | fast reaches paper's error at {_fmt(out['fast_reaches_paper_at'])} s, "
        f"speedup {_fmt(out['speedup'], '.1f')}",
        flush=True,
    )
    return out


def _fmt(value: float | None, spec: str = ".1f") -> str:
    return "never" if value is None else format(value, spec)


def run_fixture(args: argparse.Namespace) -> dict:
    reader = CheckpointReader(args.model)
    layout = moe_layout(reader.config)
    layers = args.layers or list(layout.moe_layers)
    rows = []
    for layer in layers:
        for matrix in args.matrices:
            names = [layout.arch.tensor_name(layer, e, matrix) for e in range(layout.num_experts)]
            weights = oriented(matrix, torch.stack(list(reader.get_many(names).values()))).float()
            rows.append(compare_fits(weights, _rank(*weights.shape, args), args, f"{layer}.{matrix}"))
    result: dict = {"rows": rows}
    if not args.no_perplexity:
        result["perplexity"] = run_perplexity(args)
    return result


def run_perplexity(args: argparse.Namespace) -> dict:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    ids = tokenizer(Path(args.text).read_text(), return_tensors="pt").input_ids[0][: args.tokens]
    out = {"original": _perplexity(Path(args.model), ids, args.context, args.stride), "tokens": int(ids.numel())}
    with tempfile.TemporaryDirectory() as tmp:
        for schedule in SCHEDULES:
            steps = args.paper_steps if schedule == "paper" else args.fast_steps
            target = Path(tmp) / schedule
            start = time.perf_counter()
            report = compress(
                args.model, target, _config(args, schedule, None, steps), reconstruct=True, progress=False
            )
            out[schedule] = {
                "perplexity": _perplexity(target, ids, args.context, args.stride),
                "compress_seconds": time.perf_counter() - start,
                "mean_relative_error": report.summary()["mean_relative_error"],
            }
            print(
                f"  compress {schedule:>5}: ppl {out[schedule]['perplexity']:.3f} (original {out['original']:.3f}), "
                f"{out[schedule]['compress_seconds']:.0f} s",
                flush=True,
            )
    return out


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["fixture"]["rows"] + result["synthetic"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), dpi=120)
    for ax, subset, title in (
        (axes[0], result["fixture"]["rows"], "trained fixture (each matrix)"),
        (axes[1], result["synthetic"], "synthetic layer"),
    ):
        for i, row in enumerate(subset):
            color = f"C{i % 10}"
            for schedule, style in (("paper", ":"), ("fast", "-")):
                trace = row[schedule]["trace"]
                ax.plot([t for t, _, _ in trace], [e for _, _, e in trace], style, color=color, lw=1)
        ax.set_yscale("log")
        ax.set_xlabel("wall time (s)")
        ax.set_ylabel("relative error (log scale)")
        ax.set_title(f"{title}: paper dotted, fast solid")
        ax.grid(alpha=0.3, which="both")
    assert rows
    fig.tight_layout()
    fig.savefig(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="MoE checkpoint with a tokenizer (default: the trained fixture)")
    parser.add_argument("--text", default=None, help="held-out text (default: the fixture's heldout.txt)")
    parser.add_argument("--layers", type=int, nargs="*", default=None, help="MoE layers (default: all)")
    parser.add_argument("--matrices", nargs="+", default=["gate", "up"], choices=["gate", "up"])
    parser.add_argument("--bases", type=int, default=4)
    parser.add_argument("--ratio", type=float, default=0.25, help="expert-parameter reduction that sets the rank")
    parser.add_argument("--activation", default="silu", choices=["silu", "tanh"])
    parser.add_argument("--paper-steps", type=int, default=10000)
    parser.add_argument("--fast-steps", type=int, default=2000)
    parser.add_argument("--synthetic", type=int, nargs=4, default=[32, 128, 256, 8], metavar=("E", "P", "D", "M"))
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--context", type=int, default=256)
    parser.add_argument("--stride", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-perplexity", action="store_true")
    parser.add_argument("--quick", action="store_true", help="smoke run: layer 1, 600/200 steps, E=8 synthetic")
    parser.add_argument("--out", default=None, help="JSON/PNG path stem (default results/schedules[-quick])")
    args = parser.parse_args()
    if args.quick:
        args.layers, args.paper_steps, args.fast_steps = args.layers or [1], 600, 200
        args.synthetic, args.tokens = [8, 64, 128, 2], 2048
    args.out = args.out or str(HERE / "results" / ("schedules-quick" if args.quick else "schedules"))
    torch.set_num_threads(args.threads)
    if args.model is None or args.text is None:
        from mobe.fixtures import trained_fixture_path

        args.model = args.model or str(trained_fixture_path())
        args.text = args.text or str(trained_fixture_path() / "heldout.txt")

    start = time.perf_counter()
    fit_mobe(torch.randn(4, 16, 16), MobeConfig(num_bases=2, rank=4, steps=5, schedule="fast"))  # warm up kernels
    print(f"fixture {args.model}: m={args.bases}, {args.activation}, ratio {args.ratio}", flush=True)
    result: dict = {"fixture": run_fixture(args)}
    E, p, d, m = args.synthetic
    print(f"synthetic layer E={E} p={p} d={d}, m={m}", flush=True)
    synthetic_args = argparse.Namespace(**{**vars(args), "bases": m})
    weights = synthetic_layer(E, p, d)
    result["synthetic"] = [compare_fits(weights, _rank(E, p, d, synthetic_args), synthetic_args, "synthetic")]

    rows = result["fixture"]["rows"] + result["synthetic"]
    speedups = [r["speedup"] for r in rows]
    result["summary"] = {
        "paper_steps": args.paper_steps,
        "fast_steps": args.fast_steps,
        "min_speedup": None if None in speedups else min(speedups),
        "fast_lower_everywhere": all(r["fast"]["relative_error"] < r["paper"]["relative_error"] for r in rows),
    }
    print(
        f"\n{'matrix':>12} {'rank':>5} {'paper s':>8} {'paper err':>9} {'fast s':>7} {'fast err':>8} "
        f"{'reach s':>8} {'speedup':>7}"
    )
    for r in rows:
        print(
            f"{r['label']:>12} {r['rank']:>5} {r['paper']['seconds']:>8.1f} {r['paper']['relative_error']:>9.4f} "
            f"{r['fast']['seconds']:>7.1f} {r['fast']['relative_error']:>8.4f} {_fmt(r['fast_reaches_paper_at']):>8} "
            f"{_fmt(r['speedup']):>7}"
        )
    summary = result["summary"]
    result["verdicts"] = [
        f"fast ends below paper on every matrix: {'yes' if summary['fast_lower_everywhere'] else 'NO'}",
        "fast reaches paper's final error on every matrix: "
        + (f"yes, in at most 1/{summary['min_speedup']:.1f} of paper's time" if summary["min_speedup"] else "NO"),
    ]
    if "perplexity" in result["fixture"]:
        ppl = result["fixture"]["perplexity"]
        result["verdicts"].append(
            f"held-out perplexity: fast {ppl['fast']['perplexity']:.3f} vs paper {ppl['paper']['perplexity']:.3f} "
            f"({'fast' if ppl['fast']['perplexity'] <= ppl['paper']['perplexity'] else 'paper'} lower)"
        )
        print(
            f"held-out perplexity: original {ppl['original']:.3f}, paper {ppl['paper']['perplexity']:.3f}, "
            f"fast {ppl['fast']['perplexity']:.3f}"
        )
    print("\n".join(result["verdicts"]))
    write_results(result, args, start, plot, args.out)


if __name__ == "__main__":
    main()
