"""Schedules side by side on real-shape layers: wall time to reach the paper schedule's final error.

Every stack is fitted by each schedule in one process (same rank, m, activation, threads). Per schedule the table
gives steps, wall time, final relative error and the time it first reached the paper schedule's final error.
Layers (the paper's r = p and m = E/4, as for Qwen3-30B-A3B's 128 experts and 32 bases, on the p < d ones):

- p < d, the fine-grained trained fixture (64 experts, p=64, d=256), read through mobe's checkpoint reader;
- p < d, a synthetic layer of Qwen3-30B-A3B's proportions at reduced size (E=128, p=192, d=512; power-law
  spectrum and a shared input subspace, mobe.factorize.synthetic); --synthetic-paper-steps sets its paper
  reference (10k, the schedule's own, take about two hours on one CPU core), and the record says how many ran;
- p > d, the coarse trained fixture (16 experts, p=256, d=128) at the earlier settings (m=4, a 25% cut): the
  check that `fast` stays as good there.

Then each fixture is compressed with `fast` and with `paper` (the layers of --ppl-layers, gate and up) and the
held-out perplexity of each result is measured. The candidate for the default schedule is `fast`; the verdict
line says whether it reaches the paper's final error in at most a fifth of the paper's wall time on every p < d
layer. Writes results/schedules.json and results/schedules.png (relative error against wall time, log y).

    python benchmarks/schedules.py             # everything in one process: several hours on one core
    python benchmarks/schedules.py --quick     # smoke run: few steps, small synthetic layer, no perplexity

The parts can run as separate processes and be merged (how results/schedules.json was made):

    python benchmarks/schedules.py --threads 1 --parts fine --out /tmp/fine       # and likewise synthetic, coarse
    python benchmarks/schedules.py --threads 1 --parts perplexity --out /tmp/ppl
    python benchmarks/schedules.py --merge /tmp/fine.json /tmp/syn.json ... [--ppl-log /tmp/ppl.log]

and one stack's schedules can run side by side, one process (core) each, joined by --merge (a row whose paper
reference ran more steps supersedes a shorter one of the same stack):

    python benchmarks/schedules.py --threads 1 --parts synthetic --synthetic-paper-steps 10000 \
        --synthetic-fast-steps 2000 --schedules paper --out /tmp/syn_paper     # and --schedules fast in parallel
"""

from __future__ import annotations

import argparse
import json
import math
import re
import tempfile
import time
from pathlib import Path

import torch

from compare import _perplexity
from mobe import CheckpointReader, MobeConfig, compress, fit_mobe
from mobe.architectures import moe_layout
from mobe.evaluate import weight_error
from mobe.factorize import budget_for_ratio, get_method
from mobe.factorize.base import oriented
from mobe.factorize.synthetic import realistic_stack
from mobe.fixtures import FINE_FIXTURE, TRAINED_FIXTURE, trained_fixture_path
from results_io import plain_statement, pyplot, save_figure, write_results

HERE = Path(__file__).resolve().parent
SCHEDULES = ("paper", "fast")
CANDIDATE = "fast"  # the schedule proposed as the default
SPEEDUP_BAR = 5.0
PARTS = ("fine", "synthetic", "coarse", "perplexity")


def _relative(weights: torch.Tensor, mse: float) -> float:
    return math.sqrt(mse / weights.double().pow(2).mean().item())


def _time_to_reach(trace: list[tuple[float, int, float]], error: float) -> tuple[float, int] | tuple[None, None]:
    """(seconds, step) at which the trace's relative error first falls to `error`."""
    return next(((seconds, step) for seconds, step, rel in trace if rel <= error), (None, None))


def thin_trace(
    trace: list[tuple[float, int, float]], reach: float | None = None, points: int = 300
) -> list[tuple[float, int, float]]:
    """About `points` evenly spaced entries plus the last, for the JSON and the plot (a full 10k-step trace per
    stack made the JSON 9 MB); also the first entry at or below `reach`, so _time_to_reach still finds it."""
    stride = max(1, len(trace) // points)
    first = None if reach is None else next((i for i, entry in enumerate(trace) if entry[2] <= reach), None)
    return [entry for i, entry in enumerate(trace) if i % stride == 0 or i == len(trace) - 1 or i == first]


def compare_fits(
    weights: torch.Tensor, settings: dict, steps: dict[str, int], label: str, kind: str, schedules=SCHEDULES
) -> dict:
    """Each of `schedules` on one stack; the paper's final error is its kept (best) state, as compress returns.

    A row with only some schedules keeps full traces, so --merge can join it with a row of the others."""
    out: dict = {"label": label, "kind": kind, "shape": list(weights.shape), **settings}
    for schedule in schedules:
        torch.manual_seed(0)
        config = MobeConfig(**settings, schedule=schedule, steps=steps[schedule], device="cpu")
        factors, stats = fit_mobe(weights, config)
        out[schedule] = {
            "steps": stats.steps,
            "seconds": stats.seconds,
            "relative_error": weight_error(weights, factors.reconstruct())[0],
            "trace": [(t, s, _relative(weights, loss)) for t, s, loss in stats.trace],
        }
        print(f"  {label:>14} {schedule}: {stats.steps} steps {stats.seconds:.1f} s", flush=True)
    return finish_row(out) if all(s in out for s in SCHEDULES) else out


def finish_row(out: dict) -> dict:
    """Time to the paper's final error and speedup of each schedule; traces thinned for the JSON."""
    paper = out["paper"]
    for schedule in SCHEDULES:
        run = out[schedule]
        run["reaches_paper_at"], run["reaches_paper_step"] = _time_to_reach(run["trace"], paper["relative_error"])
        run["speedup"] = paper["seconds"] / run["reaches_paper_at"] if run["reaches_paper_at"] else None
        run["trace"] = thin_trace(run["trace"], paper["relative_error"])
    fast = out[CANDIDATE]
    print(
        f"  {out['label']:>14} r={out['rank']:<4} m={out['num_bases']:<3} paper {paper['steps']:>6} steps "
        f"{paper['seconds']:7.1f} s err {paper['relative_error']:.5f} | {CANDIDATE} {fast['steps']:>5} steps "
        f"{fast['seconds']:6.1f} s err {fast['relative_error']:.5f} | reaches paper's error at "
        f"{_fmt(fast['reaches_paper_at'])} s, speedup {_fmt(fast['speedup'])}",
        flush=True,
    )
    return out


def merge_rows(rows: list[dict]) -> list[dict]:
    """Join rows of one stack that ran different schedules in separate processes, and keep, per label, the row
    whose paper reference ran the most steps (a shorter one is superseded by the faithful reference)."""
    joined: list[dict] = []
    partial: dict[str, dict] = {}
    for row in rows:
        if all(s in row for s in SCHEDULES):
            joined.append(row)
            continue
        other = partial.pop(row["label"], None)
        if other is None:
            partial[row["label"]] = row
            continue
        if other["shape"] != row["shape"] or other["rank"] != row["rank"] or other["num_bases"] != row["num_bases"]:
            raise SystemExit(f"--merge: the two partial rows of {row['label']!r} fitted different stacks or settings")
        joined.append(finish_row({**other, **{s: row[s] for s in SCHEDULES if s in row}}))
    if partial:
        raise SystemExit(f"--merge: no other schedules for the partial rows {sorted(partial)}")
    longest: dict[str, int] = {}
    for row in joined:
        longest[row["label"]] = max(longest.get(row["label"], 0), row["paper"]["steps"])
    first = {}  # each stack keeps the place where it first appeared in the parts
    for k, row in enumerate(rows):
        first.setdefault(row["label"], k)
    kept = [row for row in joined if row["paper"]["steps"] == longest[row["label"]]]
    return sorted(kept, key=lambda row: first[row["label"]])


def _fmt(value: float | None, spec: str = ".1f") -> str:
    return "never" if value is None else format(value, spec)


def _fixture_stack(model: Path, layer: int, matrix: str) -> torch.Tensor:
    reader = CheckpointReader(model)
    layout = moe_layout(reader.config)
    names = [layout.arch.tensor_name(layer, e, matrix) for e in range(layout.num_experts)]
    return oriented(matrix, torch.stack(list(reader.get_many(names).values()))).float()


def _coarse_rank(E: int, p: int, d: int, bases: int, ratio: float) -> int:
    config = MobeConfig(num_bases=bases)
    return get_method("mobe").rank_for_budget(E, p, d, config, budget_for_ratio(E, p, d, ratio, 2))


def run_fits(args: argparse.Namespace) -> list[dict]:
    rows = []
    fine = trained_fixture_path(FINE_FIXTURE)
    steps = {"paper": args.paper_steps, "fast": args.fast_steps}
    print(f"p < d: {fine.name}, layers {args.fine_layers}", flush=True)
    for layer in args.fine_layers if "fine" in args.parts else []:
        for matrix in ("gate", "up"):
            weights = _fixture_stack(fine, layer, matrix)
            E, p, _ = weights.shape
            settings = {"num_bases": E // 4, "rank": p, "activation": args.activation}
            rows.append(compare_fits(weights, settings, steps, f"fine {layer}.{matrix}", "p<d", args.schedules))
    if "synthetic" in args.parts:
        rows.append(_synthetic_row(args))
    coarse = trained_fixture_path(TRAINED_FIXTURE)
    print(f"p > d: {coarse.name}, layers {args.coarse_layers} (m=4, 25% cut, silu)", flush=True)
    for layer in args.coarse_layers if "coarse" in args.parts else []:
        for matrix in ("gate", "up"):
            weights = _fixture_stack(coarse, layer, matrix)
            settings = {"num_bases": 4, "rank": _coarse_rank(*weights.shape, 4, 0.25), "activation": "silu"}
            rows.append(compare_fits(weights, settings, steps, f"coarse {layer}.{matrix}", "p>d", args.schedules))
    return rows


def _synthetic_row(args: argparse.Namespace) -> dict:
    E, p, d = args.synthetic
    print(f"p < d: synthetic Qwen3-30B-A3B proportions E={E} p={p} d={d}", flush=True)
    weights = realistic_stack(E, p, d, seed=0)
    settings = {"num_bases": E // 4, "rank": p, "activation": args.activation}
    synthetic_steps = {"paper": args.synthetic_paper_steps, "fast": args.synthetic_fast_steps}
    return compare_fits(weights, settings, synthetic_steps, "synthetic", "p<d", args.schedules)


def run_perplexity(args: argparse.Namespace) -> dict:
    """Compress each fixture's --ppl-layers with each schedule (settings as in the fits) and score its held-out text."""
    from transformers import AutoTokenizer

    out = {}
    for name, bases, ratio, activation in (
        (FINE_FIXTURE, 16, None, args.activation),
        (TRAINED_FIXTURE, 4, 0.25, "silu"),
    ):
        if name not in args.ppl_fixtures:
            continue
        model = trained_fixture_path(name)
        tokenizer = AutoTokenizer.from_pretrained(model)
        ids = tokenizer((model / "heldout.txt").read_text(), return_tensors="pt").input_ids[0][: args.tokens]
        entry: dict = {
            "layers": list(args.ppl_layers),
            "tokens": int(ids.numel()),
            "original": _perplexity(model, ids, args.context, args.stride),
        }
        with tempfile.TemporaryDirectory() as tmp:
            for schedule in SCHEDULES:
                steps = args.paper_steps if schedule == "paper" else args.fast_steps
                config = MobeConfig(
                    num_bases=bases,
                    target_ratio=ratio,
                    activation=activation,
                    schedule=schedule,
                    steps=steps,
                    layers=tuple(args.ppl_layers),
                    device="cpu",
                )
                target = Path(tmp) / schedule
                start = time.perf_counter()
                report = compress(model, target, config, reconstruct=True, progress=False)
                entry[schedule] = {
                    "perplexity": _perplexity(target, ids, args.context, args.stride),
                    "compress_seconds": time.perf_counter() - start,
                    "mean_relative_error": report.summary()["mean_relative_error"],
                }
                print(
                    f"  {name} {schedule:>5}: ppl {entry[schedule]['perplexity']:.3f} (original "
                    f"{entry['original']:.3f}), {entry[schedule]['compress_seconds']:.0f} s",
                    flush=True,
                )
        out[name] = entry
        partial = Path(args.out).with_suffix(".partial.json")  # a long run stopped later keeps what it measured
        partial.write_text(json.dumps({"perplexity": out}, indent=2) + "\n")
    return out


def perplexity_from_log(path: Path, layers: list[int], token_cap: int) -> dict:
    """The perplexity lines a run printed (`  <fixture> <schedule>: ppl X (original Y), Z s`), for a run stopped
    before it wrote its JSON; the mean relative error is not printed, so it is absent."""
    out: dict = {}
    pattern = re.compile(r"^\s+(\S+)\s+(paper|fast): ppl ([\d.]+) \(original ([\d.]+)\), (\d+) s$")
    for line in path.read_text().splitlines():
        if match := pattern.match(line):
            name, schedule, ppl, original, seconds = match.groups()
            entry = out.setdefault(
                name,
                {"original": float(original), "layers": layers, "tokens_at_most": token_cap, "from_log": path.name},
            )
            entry[schedule] = {"perplexity": float(ppl), "compress_seconds": float(seconds)}
    return {name: entry for name, entry in out.items() if all(s in entry for s in SCHEDULES)}


def summarise(rows: list[dict], args: argparse.Namespace) -> dict:
    small = [r for r in rows if r["kind"] == "p<d"]
    meets = all(r[CANDIDATE]["speedup"] is not None and r[CANDIDATE]["speedup"] >= SPEEDUP_BAR for r in small) and bool(
        small
    )
    speedups = [r[CANDIDATE]["speedup"] for r in small]
    return {
        "candidate": CANDIDATE,
        "default_schedule": MobeConfig().schedule,
        "paper_steps": args.paper_steps,
        "synthetic_paper_steps": args.synthetic_paper_steps,
        "min_speedup_p_lt_d": None if None in speedups or not speedups else min(speedups),
        "meets_bar": meets,
        "verdict": "new default reaches paper final error in <= 1/5 time on every p<d layer: "
        + ("yes" if meets else "no"),
        "coarse_no_worse": all(
            r[CANDIDATE]["relative_error"] <= r["paper"]["relative_error"] * 1.002 for r in rows if r["kind"] == "p>d"
        ),
    }


def plot(result: dict, path: Path) -> None:
    plt = pyplot()

    rows = result["rows"]
    panels = [
        ("fine-grained fixture (p < d)", [r for r in rows if r["label"].startswith("fine")]),
        ("synthetic Qwen3-30B-A3B shape (p < d)", [r for r in rows if r["label"] == "synthetic"]),
        ("coarse fixture (p > d)", [r for r in rows if r["label"].startswith("coarse")]),
    ]
    panels = [(title, subset) for title, subset in panels if subset] or [("no fits in this run", [])]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.2), dpi=120, squeeze=False)
    for ax, (title, subset) in zip(axes[0], panels, strict=True):
        for i, row in enumerate(subset):
            color = f"C{i % 10}"
            for schedule, style in (("paper", ":"), ("fast", "-")):
                trace = row[schedule]["trace"]
                ax.plot([t for t, _, _ in trace], [e for _, _, e in trace], style, color=color, lw=1)
            ax.axhline(row["paper"]["relative_error"], color=color, lw=0.5, alpha=0.5)
        ax.set_yscale("log")
        ax.set_xlabel("wall time (s)")
        ax.set_ylabel("relative error (log scale)")
        ax.set_title(f"{title}\npaper dotted, fast solid", fontsize=9)
        ax.grid(alpha=0.3, which="both")
    save_figure(fig, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fine-layers", type=int, nargs="+", default=[1], help="MoE layers of the fine fixture")
    parser.add_argument("--coarse-layers", type=int, nargs="*", default=[1], help="MoE layers of the coarse one")
    parser.add_argument("--activation", default="tanh", choices=["silu", "tanh"], help="on the p < d layers")
    parser.add_argument("--paper-steps", type=int, default=10000, help="paper schedule on the fixtures")
    parser.add_argument("--fast-steps", type=int, default=2000)
    parser.add_argument("--synthetic", type=int, nargs=3, default=[128, 192, 512], metavar=("E", "P", "D"))
    parser.add_argument("--synthetic-paper-steps", type=int, default=10000, help="the paper schedule's own")
    parser.add_argument("--synthetic-fast-steps", type=int, default=2000, help="the fast schedule's own")
    parser.add_argument("--ppl-layers", type=int, nargs="+", default=[1], help="layers compressed for perplexity")
    parser.add_argument("--ppl-fixtures", nargs="+", default=[FINE_FIXTURE, TRAINED_FIXTURE], help="fixtures to score")
    parser.add_argument("--ppl-log", nargs="*", default=[], help="with --merge: perplexity lines of stopped runs' logs")
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--context", type=int, default=256)
    parser.add_argument("--stride", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-perplexity", action="store_true")
    parser.add_argument("--quick", action="store_true", help="smoke run: 100/50 steps, E=16 synthetic, no ppl")
    parser.add_argument(
        "--schedules", nargs="+", default=list(SCHEDULES), choices=list(SCHEDULES), help="run only these (then --merge)"
    )
    parser.add_argument("--parts", nargs="+", default=list(PARTS), choices=list(PARTS), help="what to run")
    parser.add_argument(
        "--merge", nargs="+", default=None, metavar="JSON", help="combine the results of runs of separate --parts"
    )
    parser.add_argument("--out", default=None, help="JSON/PNG path stem (default results/schedules[-quick])")
    args = parser.parse_args()
    if args.quick:
        args.paper_steps, args.fast_steps, args.no_perplexity = 100, 50, True
        args.synthetic, args.synthetic_paper_steps, args.synthetic_fast_steps = [16, 48, 128], 100, 60
    args.out = args.out or str(HERE / "results" / ("schedules-quick" if args.quick else "schedules"))
    torch.set_num_threads(args.threads)

    start = time.perf_counter()
    if args.merge:  # runs of separate parts, side by side in time on a shared machine
        parts = [json.loads(Path(path).read_text()) for path in args.merge]
        rows = merge_rows([row for part in parts for row in part["rows"]])
        result: dict = {"rows": rows, "parts": [part["args"] for part in parts]}
        result["perplexity"] = {}
        for path in args.ppl_log:
            result["perplexity"].update(perplexity_from_log(Path(path), args.ppl_layers, args.tokens))
        for part in parts:
            result["perplexity"].update(part.get("perplexity", {}))
        args.no_perplexity = True  # already measured
    else:
        fit_mobe(torch.randn(4, 16, 16), MobeConfig(num_bases=2, rank=4, steps=5, schedule="fast"))  # warm up kernels
        rows = run_fits(args)
        result = {"rows": rows}
        if set(args.schedules) != set(SCHEDULES):  # one side of a split run: raw rows for --merge, no verdict
            args.no_perplexity = True
            write_results(result, args, start, lambda result, path: None, args.out)
            return
    result["summary"] = summarise(rows, args)
    print(
        f"\n{'stack':>14} {'kind':>4} {'rank':>4} {'m':>3} {'paper steps':>11} {'paper s':>8} {'paper err':>9} "
        f"{'fast steps':>10} {'fast s':>7} {'fast err':>8} {'reach s':>8} {'speedup':>7}"
    )
    for r in rows:
        p, f = r["paper"], r["fast"]
        print(
            f"{r['label']:>14} {r['kind']:>4} {r['rank']:>4} {r['num_bases']:>3} {p['steps']:>11} {p['seconds']:>8.1f} "
            f"{p['relative_error']:>9.5f} {f['steps']:>10} {f['seconds']:>7.1f} {f['relative_error']:>8.5f} "
            f"{_fmt(f['reaches_paper_at']):>8} {_fmt(f['speedup']):>7}"
        )
    if not args.no_perplexity and "perplexity" in args.parts:
        result["perplexity"] = run_perplexity(args)
    for name, entry in result.get("perplexity", {}).items():
        print(
            f"{name} (layers {entry['layers']}): held-out perplexity original {entry['original']:.3f}, "
            + ", ".join(f"{s} {entry[s]['perplexity']:.3f}" for s in SCHEDULES)
        )
    result["verdicts"] = [
        result["summary"]["verdict"],
        f"p > d no worse than paper (within 0.2%): {'yes' if result['summary']['coarse_no_worse'] else 'no'}",
    ]
    print("\n".join(result["verdicts"]))
    write_results(result, args, start, plot, args.out)


# --- tables for README.md and docs/ (written by benchmarks/tables.py from this script's JSON) ---
def table(result: dict) -> str:
    """Per stack: each schedule's steps, seconds and final error, and when `fast` reached the paper's final error."""
    lines = [
        "| stack | E x p x d | r | m | paper steps | paper s | paper error | fast steps | fast s | fast error "
        "| fast reaches paper's error at | (step) | speedup |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in result["rows"]:
        paper, fast = row["paper"], row["fast"]
        best = min(paper["relative_error"], fast["relative_error"])
        errors = [
            f"**{e:.5f}**" if e == best else f"{e:.5f}" for e in (paper["relative_error"], fast["relative_error"])
        ]
        reach = "never" if fast["reaches_paper_at"] is None else f"{fast['reaches_paper_at']:.1f} s"
        step = "" if fast["reaches_paper_step"] is None else str(fast["reaches_paper_step"])
        speedup = "" if fast["speedup"] is None else f"{fast['speedup']:.1f}x"
        lines.append(
            f"| {row['label']} ({row['kind']}) | {' x '.join(map(str, row['shape']))} | {row['rank']} | "
            f"{row['num_bases']} | {paper['steps']} | {paper['seconds']:.1f} | {errors[0]} | {fast['steps']} | "
            f"{fast['seconds']:.1f} | {errors[1]} | {reach} | {step} | {speedup} |"
        )
    summary = result["summary"]
    lines += [
        "",
        f"{plain_statement(summary['verdict'])[:-1]} (the default schedule is `{summary['default_schedule']}`).",
    ]
    for name, entry in result.get("perplexity", {}).items():
        cells = ", ".join(
            f"{s} {entry[s]['perplexity']:.3f} ({entry[s]['perplexity'] - entry['original']:+.3f}"
            + (
                f", mean relative error {entry[s]['mean_relative_error']:.4f}"
                if "mean_relative_error" in entry[s]
                else ""
            )
            + f", compress {entry[s]['compress_seconds']:.0f} s)"
            for s in ("paper", "fast")
        )
        tokens = f"{entry['tokens']} tokens" if "tokens" in entry else f"at most {entry['tokens_at_most']} tokens"
        source = f"; read from the printed lines of `{entry['from_log']}`" if "from_log" in entry else ""
        lines.append(
            f"Held-out perplexity of `{name}` with MoE layer(s) {', '.join(map(str, entry['layers']))} compressed "
            f"(gate and up, {tokens}{source}): original {entry['original']:.3f}; {cells}."
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
