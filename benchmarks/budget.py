"""What `mobe compress --target-bytes F` chooses at several budgets, and what the choice costs in perplexity.

For each trained fixture the planner measures every candidate once (the original at 16/8/4/3/2 bits, MoBE at 25%,
37% and 50% cuts with 16-bit, int8, int4, int3 and int2 factors; weight error on the middle MoE layer), then chooses
at each budget F (a share of the original's stored bytes). Each chosen recipe is written (`execute_plan`: the
original quantised, or the default recipe at `--steps` with integer factors), its stored bytes are checked against
the prediction and its held-out perplexity is measured (the settings of `benchmarks/data_free.py`). Where
benchmarks/results/low_bit_factors.json holds perplexities of other recipes within the same budget, the best of
them is shown beside the choice.

    OMP_NUM_THREADS=1 python benchmarks/budget.py [--fixtures coarse fine] [--budgets 0.25 0.3 0.35 0.4]

Prints a table and verdicts, writes benchmarks/results/budget.json and .png.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoTokenizer

from compare import _perplexity
from mobe import MobeConfig
from mobe.fixtures import FINE_FIXTURE, TRAINED_FIXTURE, trained_fixture_path
from mobe.plan import execute_plan, plan_budget
from mobe.quantize import stored_bytes
from results_io import add_run_options, pyplot, rewrite_verdicts, save_figure, verdict_lines, write_results

HERE = Path(__file__).resolve().parent
FIXTURES = {"coarse": TRAINED_FIXTURE, "fine": FINE_FIXTURE}


def _best_measured(name: str, budget: int) -> dict | None:
    """The lowest-perplexity recipe within `budget` among those other benchmarks measured on the same fixture:
    benchmarks/low_bit_factors.py (MoBE and the original rounded to nearest, groups of 64) and
    benchmarks/gptq_baselines.py (the original by round-to-nearest, llm-compressor's GPTQ and mobe's)."""
    candidates = []
    path = HERE / "results" / "low_bit_factors.json"
    if path.exists():
        for r in json.loads(path.read_text())["fixtures"].get(name, {}).get("rows", []):
            bits = "16-bit" if r["bits"] == 16 else f"int{r['bits']}"
            label = f"{r['variant']} {bits} {r['scheme']} g64"
            candidates.append({"label": label, "perplexity": r["perplexity"], "stored_bytes": r["stored_bytes"]})
    path = HERE / "results" / "gptq_baselines.json"
    if path.exists():
        fixture = json.loads(path.read_text())["fixtures"].get(name, {})
        for r in fixture.get("rows", []):
            if r["method"] != "original":
                label = f"original int{r['bits']} {r['method']} g{r['group_size']}"
                candidates.append({"label": label, "perplexity": r["perplexity"], "stored_bytes": r["bytes"]})
    within = [c for c in candidates if c["stored_bytes"] <= budget]
    return min(within, key=lambda c: c["perplexity"]) if within else None


def _refresh_best_measured(result: dict) -> None:
    """Each choice's comparison with the other benchmarks' recipes, as their JSON stands now."""
    for name, fixture in result["fixtures"].items():
        for row in fixture["rows"]:
            if row.get("chosen"):
                row["best_measured"] = _best_measured(name, row["budget_bytes"])


def run_fixture(name: str, args: argparse.Namespace, tmp: Path) -> dict:
    fixture = trained_fixture_path(FIXTURES[name])
    ids = AutoTokenizer.from_pretrained(fixture)((fixture / "heldout.txt").read_text(), return_tensors="pt").input_ids
    ids = ids[0][: args.tokens]
    original = _perplexity(fixture, ids, args.context, args.stride)
    measured = plan_budget(fixture, 1.0, steps=args.plan_steps)
    print(measured.table(), flush=True)
    rows, written = [], {}
    for share in args.budgets:
        plan = measured.with_budget(int(share * measured.original_bytes))
        chosen = plan.chosen
        row = {"budget": share, "budget_bytes": plan.budget_bytes}
        if chosen is None:
            rows.append({**row, "chosen": None})
            continue
        recipe = chosen.recipe
        if recipe not in written:
            out = tmp / f"{name}-{len(written)}"
            start = time.perf_counter()
            execute_plan(plan, fixture, out, MobeConfig(steps=args.steps, device="cpu"), progress=False)
            seconds = time.perf_counter() - start
            written[recipe] = (stored_bytes(out), _perplexity(out, ids, args.context, args.stride), seconds)
        size, ppl, seconds = written[recipe]
        row.update(
            chosen=recipe.label(),
            predicted_bytes=chosen.stored_bytes,
            stored_bytes=size,
            weight_error=chosen.error,
            perplexity=ppl,
            perplexity_change=ppl - original,
            seconds=seconds,
            best_measured=_best_measured(name, plan.budget_bytes),
        )
        rows.append(row)
        print(f"  F={share}: {recipe.label()} {size / 2**20:.2f} MiB ppl {ppl:.3f} ({ppl - original:+.3f})", flush=True)
    return {
        "fixture": FIXTURES[name],
        "original_perplexity": original,
        "original_bytes": measured.original_bytes,
        "plan_seconds": measured.seconds,
        "options": [
            {"recipe": o.recipe.label(), "stored_bytes": o.stored_bytes, "weight_error": o.error}
            for o in measured.options
        ],
        "rows": rows,
    }


NOISE = 0.001  # relative perplexity difference below which two measurements are not told apart


def verdicts(result: dict) -> list[str]:
    """Per budget: the bytes as predicted, and the choice against the best other recipe measured within the budget
    (benchmarks/low_bit_factors.py; its groups are 64 wide, the planner's the largest that tiles: up to 128)."""
    out = []
    for name, fixture in result["fixtures"].items():
        for row in fixture["rows"]:
            if row.get("chosen") is None:
                smallest = min(fixture["options"], key=lambda o: o["stored_bytes"])
                out.append(
                    f"{name} F={row['budget']}: nothing fits (the smallest candidate, {smallest['recipe']}, needs "
                    f"{100 * smallest['stored_bytes'] / fixture['original_bytes']:.1f}% of the bytes)"
                )
                continue
            exact = row["predicted_bytes"] == row["stored_bytes"]
            line = f"{name} F={row['budget']}: {row['chosen']}, bytes as predicted: {'yes' if exact else 'NO'}"
            best = row.get("best_measured")
            if best:
                if row["perplexity"] <= best["perplexity"] * (1 + NOISE):
                    verdict = "no worse (within 0.1%)"
                else:
                    verdict = f"worse by {100 * (row['perplexity'] / best['perplexity'] - 1):.2f}%"
                line += (
                    f"; perplexity {row['perplexity']:.3f} against the best other recipe measured within the budget "
                    f"({best['label']}, {best['perplexity']:.3f}): {verdict}"
                )
            out.append(line)
    return out


def table(result: dict) -> str:
    lines = []
    for name, fixture in result["fixtures"].items():
        lines += [
            f"**{name}** (`{fixture['fixture']}`, {fixture['original_bytes'] / 2**20:.2f} MiB, perplexity "
            f"{fixture['original_perplexity']:.2f}; plan measured in {fixture['plan_seconds']:.0f} s)",
            "",
            "| budget | chosen | MiB stored | d ppl | best other measured within the budget |",
            "|---:|---|---:|---:|---|",
        ]
        for r in fixture["rows"]:
            if r.get("chosen") is None:
                lines.append(f"| {100 * r['budget']:.0f}% | nothing fits | | | |")
                continue
            best = r.get("best_measured")
            other = f"{best['label']}: {best['perplexity'] - fixture['original_perplexity']:+.3f}" if best else ""
            lines.append(
                f"| {100 * r['budget']:.0f}% | {r['chosen']} | {r['stored_bytes'] / 2**20:.2f} | "
                f"{r['perplexity_change']:+.3f} | {other} |"
            )
        lines.append("")
    return "\n".join(lines + verdict_lines(result)).rstrip() + "\n"


def plot(result: dict, path: Path) -> None:
    plt = pyplot()
    names = list(result["fixtures"])
    fig, axes = plt.subplots(1, len(names), figsize=(6 * len(names), 4), dpi=120, squeeze=False)
    for ax, name in zip(axes[0], names, strict=True):
        fixture = result["fixtures"][name]
        options = fixture["options"]
        ax.scatter(
            [o["stored_bytes"] / 2**20 for o in options],
            [o["weight_error"] for o in options],
            s=12,
            color="grey",
            label="candidates (weight error, sample layer)",
        )
        rows = [r for r in fixture["rows"] if r.get("chosen")]
        ax.scatter(
            [r["stored_bytes"] / 2**20 for r in rows],
            [r["weight_error"] for r in rows],
            s=40,
            marker="o",
            facecolors="none",
            edgecolors="C3",
            label="chosen at a budget",
        )
        for r in rows:
            ax.axvline(r["budget_bytes"] / 2**20, color="C0", alpha=0.2)
        ax.set_xlabel("MiB stored")
        ax.set_ylabel("relative weight error")
        ax.set_title(name)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    save_figure(fig, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.25, 0.3, 0.35, 0.4])
    parser.add_argument("--plan-steps", type=int, default=200, help="steps of the planner's sample fits")
    parser.add_argument("--steps", type=int, default=300, help="steps of a chosen MoBE recipe's fits")
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--context", type=int, default=256)
    parser.add_argument("--stride", type=int, default=128)
    add_run_options(parser, "budget", threads=1, fixtures=list(FIXTURES))
    parser.add_argument(
        "--reverdict",
        action="store_true",
        help="recompute the comparison with the other benchmarks' recipes and the verdicts of the JSON at --out",
    )
    args = parser.parse_args()
    if args.reverdict:
        return rewrite_verdicts(args.out, verdicts, _refresh_best_measured)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        result = {"fixtures": {name: run_fixture(name, args, Path(tmp)) for name in args.fixtures}}
    result["verdicts"] = verdicts(result)
    print("\n" + table(result))
    print("\n".join(result["verdicts"]))
    write_results(result, args, start, plot, args.out)


if __name__ == "__main__":
    main()
