"""How much rounding MoBE's factors to integers costs, per factor, and what a ridge in the exact A solve changes.

`benchmarks/equal_bytes.py` found that int4 factors of the default recipe lose far more perplexity than int4 of
the same fit's dense rebuild, and more than the paper's Adam fits did. This isolates the cause on one layer of each
trained fixture: each stack is fitted (default recipe at the cut, and the paper's settings: Adam, bases on the
hidden side), then A_i alone, the bases alone, or both are rounded to int4 (or int8) with the project's own
group-wise quantiser (group 64, as equal_bytes.py), and the relative weight error of the rebuilt experts against the
originals is measured. The default recipe is also fitted with a larger ridge in its exact A solves (the damping of
`--ridge`, relative to the mean diagonal of each M_i M_i^T; 1e-6 is the default).

    OMP_NUM_THREADS=1 python benchmarks/factor_rounding.py [--fixtures coarse fine] [--steps 300]

Prints a table and a verdict per fixture, writes benchmarks/results/factor_rounding.json and .png.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import torch

from mobe import CheckpointReader, MobeConfig, fit_mobe
from mobe.architectures import moe_layout
from mobe.config import DEFAULT_RIDGE
from mobe.fixtures import FINE_FIXTURE, TRAINED_FIXTURE, trained_fixture_path
from mobe.pipeline import resolve_settings
from mobe.quantize.groupwise import fake_quantize
from results_io import add_run_options, grouped_bars, pyplot, save_figure, verdict_lines, write_results
from schedules import _fixture_stack

HERE = Path(__file__).resolve().parent
FIXTURES = {"coarse": TRAINED_FIXTURE, "fine": FINE_FIXTURE}
ROUNDINGS = ("float", "A int4", "bases int4", "both int4", "both int8")
GROUP = 64


def _errors(weights: torch.Tensor, factors) -> dict[str, float]:
    """Relative weight error of the rebuilt stack for each rounding of the factors."""

    def error(A: torch.Tensor, bases: torch.Tensor) -> float:
        rebuilt = dataclasses.replace(factors, A=A, bases=bases).reconstruct()
        if rebuilt.shape != weights.shape:  # fitted transposed (bases on the wider side)
            rebuilt = rebuilt.transpose(1, 2)
        return ((rebuilt - weights).norm() / weights.norm()).item()

    A, bases = factors.A, factors.bases
    return {
        "float": error(A, bases),
        "A int4": error(fake_quantize(A, 4, GROUP), bases),
        "bases int4": error(A, fake_quantize(bases, 4, GROUP)),
        "both int4": error(fake_quantize(A, 4, GROUP), fake_quantize(bases, 4, GROUP)),
        "both int8": error(fake_quantize(A, 8, GROUP), fake_quantize(bases, 8, GROUP)),
    }


def run(args: argparse.Namespace) -> list[dict]:
    rows = []
    for name in args.fixtures:
        model = trained_fixture_path(FIXTURES[name])
        weights, layout = _fixture_stack(model, args.layer, args.matrix), moe_layout(CheckpointReader(model).config)
        base = MobeConfig(target_ratio=args.ratio, steps=args.steps, threads=args.threads)
        fits = [(f"default, ridge {r:g}", dataclasses.replace(base, ridge=r)) for r in args.ridges]
        paper = dataclasses.replace(base, schedule="adam", basis_side="hidden")
        fits.append(("paper settings (adam)", paper))
        for label, settings in fits:
            config = resolve_settings(layout, settings)
            torch.manual_seed(0)
            start = time.perf_counter()
            factors, _ = fit_mobe(weights, config)
            seconds = time.perf_counter() - start
            errors = _errors(weights, factors)
            rows.append({"fixture": name, "variant": label, "rank": config.rank, "seconds": seconds, "errors": errors})
            print(
                f"  {name:>6} {label:>24} r={config.rank:<4} "
                + " ".join(f"{k} {v:.4f}" for k, v in errors.items())
                + f"  ({seconds:.0f} s)",
                flush=True,
            )
    return rows


def verdicts(rows: list[dict], default_label: str) -> list[str]:
    out = []
    for name in dict.fromkeys(r["fixture"] for r in rows):
        by = {r["variant"]: r["errors"] for r in rows if r["fixture"] == name}
        default, paper = by[default_label], by["paper settings (adam)"]
        grow = {k: default[k] / default["float"] for k in ("A int4", "bases int4", "both int4")}
        grow_paper = {k: paper[k] / paper["float"] for k in ("A int4", "bases int4", "both int4")}
        best = min(by, key=lambda v: by[v]["both int4"])
        out.append(
            f"{name}: int4 multiplies the default fit's weight error by {grow['A int4']:.2f} (A), "
            f"{grow['bases int4']:.2f} (bases), {grow['both int4']:.2f} (both); the paper settings' by "
            f"{grow_paper['A int4']:.2f}, {grow_paper['bases int4']:.2f}, {grow_paper['both int4']:.2f}; "
            f"lowest error with both factors in int4: {best} ({by[best]['both int4']:.4f})"
        )
    return out


def plot(result: dict, path: Path) -> None:
    plt = pyplot()

    fixtures = list(dict.fromkeys(r["fixture"] for r in result["rows"]))
    fig, axes = plt.subplots(1, len(fixtures), figsize=(6.5 * len(fixtures), 4), dpi=120, squeeze=False)
    for ax, name in zip(axes[0], fixtures, strict=True):
        rows = [r for r in result["rows"] if r["fixture"] == name]
        grouped_bars(ax, ROUNDINGS, {row["variant"]: [row["errors"][k] for k in ROUNDINGS] for row in rows}, 8)
        ax.set_ylabel("relative weight error")
        ax.set_title(f"{name}: layer {result['args']['layer']} {result['args']['matrix']}")
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=7)
    save_figure(fig, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_options(parser, "factor_rounding", threads=1, fixtures=FIXTURES)
    parser.add_argument("--layer", type=int, default=1)
    parser.add_argument("--matrix", default="gate", choices=["gate", "up", "down"])
    parser.add_argument("--ratio", type=float, default=0.25)
    parser.add_argument("--steps", type=int, default=300, help="as equal_bytes.py")
    parser.add_argument("--ridges", type=float, nargs="+", default=[DEFAULT_RIDGE, 1e-3, 1e-2])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    rows = run(args)
    result = {"rows": rows, "verdicts": verdicts(rows, f"default, ridge {args.ridges[0]:g}")}
    print("\n" + "\n".join(result["verdicts"]))
    write_results(result, args, start, plot, args.out)


# --- tables for README.md and docs/ (written by benchmarks/tables.py from this script's JSON) ---
def table(result: dict) -> str:
    """factor_rounding.py: relative weight error of each fit (rows) with its factors rounded each way (columns)."""
    head = "| fixture | fit | r | " + " | ".join(ROUNDINGS) + " | s |"
    lines = [head, "|---|---|---:|" + "---:|" * (len(ROUNDINGS) + 1)]
    for r in result["rows"]:
        cells = " | ".join(f"{r['errors'][k]:.4f}" for k in ROUNDINGS)
        lines.append(f"| {r['fixture']} | {r['variant']} | {r['rank']} | {cells} | {r['seconds']:.0f} |")
    return "\n".join(lines + verdict_lines(result)) + "\n"


if __name__ == "__main__":
    main()
