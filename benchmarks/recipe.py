"""How the default recipe was found: each change to MoBE's published settings, one at a time, on real layers.

One MoE layer of each trained fixture (the coarse one, p > d, and the fine-grained one, p < d), each matrix type
given, each cut of that matrix's parameters: the relative weight error ||W - What|| / ||W|| of every variant, fitted
side by side in one process at the same number of steps, and its wall time. The variants build up the default:

    paper      MoBE as published: Adam (lr 0.07), m = E/4, tanh, bases along the hidden size
    +fast      the `fast` schedule: variable projection (A solved exactly) with orthogonalised basis steps
    +wider     bases on the wider side of each matrix (a p > d stack fitted transposed) = the default recipe
    m=E/8, m=E/2, silu   the default with one setting changed, to show the choice made
    slbf       SLBF as published (m = E low-rank bases), the strongest data-free method of the family

    python benchmarks/recipe.py [--steps 1000] [--ratios 0.25 0.5] [--matrices gate down] [--threads 1]

Prints a table and its verdict (is the default's error below both published recipes' on every stack and cut? the
one-setting variants show where a choice was close), writes
benchmarks/results/recipe.json and .png.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import torch

from mobe import CheckpointReader, MobeConfig
from mobe.architectures import moe_layout
from mobe.evaluate import weight_error
from mobe.factorize import budget_for_ratio, get_method, oriented
from results_io import add_run_options, plain_statement, pyplot, save_figure, write_results

HERE = Path(__file__).resolve().parent
FIXTURES = {"coarse": "qwen3-moe-trained", "fine": "qwen2-moe-fine-trained"}
PAPER = {"schedule": "adam", "basis_side": "hidden", "activation": "tanh"}
VARIANTS: dict[str, dict] = {
    "paper": PAPER,
    "+fast": {**PAPER, "schedule": "fast"},
    "+wider (default)": {},
    "default, m=E/8": {"num_bases": -8},
    "default, m=E/2": {"num_bases": -2},
    "default, silu": {"activation": "silu"},
    "slbf": {"method": "slbf"},
}
DEFAULT = "+wider (default)"


def _config(variant: dict, E: int, steps: int, threads: int) -> MobeConfig:
    settings = dict(variant)
    share = settings.pop("num_bases", -4)  # -k: E/k bases (m = E/4 is the paper's and the default's)
    return MobeConfig(
        **settings, num_bases=max(1, E // -share), steps=steps, eval_every=max(1, steps // 10), threads=threads
    )


def run_stack(fixture: str, layer: int, matrix: str, args: argparse.Namespace) -> list[dict]:
    reader = CheckpointReader(HERE.parent / "fixtures" / FIXTURES[fixture])
    layout = moe_layout(reader.config)
    moe_layer = layout.moe_layers[layer]
    weights = oriented(matrix, layout.read_experts(reader, moe_layer, matrix)).float()
    E, p, d = layout.num_experts, layout.intermediate_size, layout.hidden_size
    rows = []
    for ratio in args.ratios:
        budget = budget_for_ratio(E, p, d, ratio, compressed=3)  # this matrix's own cut
        for label, variant in VARIANTS.items():
            config = _config(variant, E, args.steps, args.threads)
            method = get_method(config.method)
            rank = min(method.rank_for_budget(E, p, d, config, budget), method.max_rank(E, p, d, config))
            row = {"fixture": fixture, "layer": moe_layer, "matrix": matrix, "ratio": ratio, "variant": label}
            if rank < 1:
                rows.append({**row, "unreachable": True})
                continue
            config = dataclasses.replace(config, rank=rank)
            start = time.perf_counter()
            factors, _ = method.fit(weights, config, "cpu", None, None)
            seconds = time.perf_counter() - start
            error = weight_error(weights, factors.reconstruct())[0]
            rows.append(
                {
                    **row,
                    "shape": [E, p, d],
                    "rank": rank,
                    "num_bases": config.num_bases,
                    "parameters": factors.num_parameters(),
                    "dense_parameters": E * p * d,
                    "relative_error": error,
                    "seconds": seconds,
                }
            )
            print(
                f"{fixture} layer {moe_layer} {matrix} @ {ratio:.2f}: {label:>18} r={rank:<4} "
                f"kept {factors.num_parameters() / (E * p * d):.3f} err {error:.4f} {seconds:6.1f} s",
                flush=True,
            )
    return rows


def summary(rows: list[dict]) -> dict:
    """Per (stack, cut): the best variant; the verdict is whether the default is best everywhere."""
    cases: dict[tuple, list[dict]] = {}
    for r in rows:
        if "relative_error" in r:
            cases.setdefault((r["fixture"], r["layer"], r["matrix"], r["ratio"]), []).append(r)
    best = {
        f"{k[0]} layer {k[1]} {k[2]} @ {k[3]:.2f}": min(v, key=lambda r: r["relative_error"]) for k, v in cases.items()
    }
    published = ("paper", "slbf")  # the default must beat both published recipes; the others are its ablations
    wins = all(
        min((r for r in v if r["variant"] in (DEFAULT, *published)), key=lambda r: r["relative_error"])["variant"]
        == DEFAULT
        for v in cases.values()
    )
    gains = []
    for case in cases.values():
        by = {r["variant"]: r["relative_error"] for r in case}
        gains.append({k: by[k] / by["paper"] for k in by})
    return {
        "best": {k: v["variant"] for k, v in best.items()},
        "default_below_published_everywhere": wins,
        "mean_error_vs_paper": {
            k: sum(g[k] for g in gains) / len(gains) for k in VARIANTS if all(k in g for g in gains)
        },
        "verdict": "default recipe below MoBE's published settings and SLBF on every stack and cut: "
        + ("yes" if wins else "no"),
    }


def plot(result: dict, path: Path) -> None:
    plt = pyplot()

    rows = [r for r in result["rows"] if "relative_error" in r]
    stacks = list(dict.fromkeys((r["fixture"], r["matrix"]) for r in rows))
    fig, axes = plt.subplots(1, len(stacks), figsize=(4.5 * len(stacks), 4), dpi=120, squeeze=False)
    for ax, (fixture, matrix) in zip(axes[0], stacks, strict=True):
        for variant in VARIANTS:
            pts = sorted(
                (1 - r["parameters"] / r["dense_parameters"], r["relative_error"])
                for r in rows
                if (r["fixture"], r["matrix"], r["variant"]) == (fixture, matrix, variant)
            )
            if pts:
                style = "o-" if variant == DEFAULT else ("s--" if variant in ("paper", "slbf") else ".:")
                ax.plot([100 * x for x, _ in pts], [y for _, y in pts], style, label=variant)
        ax.set_title(f"{fixture} {matrix}")
        ax.set_xlabel("parameters of the matrix removed (%)")
        ax.set_ylabel("relative weight error")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    save_figure(fig, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_options(parser, "recipe", threads=1, fixtures=FIXTURES)
    parser.add_argument("--layer", type=int, default=1, help="index among each fixture's MoE layers")
    parser.add_argument("--matrices", nargs="+", default=["gate", "down"], choices=["gate", "up", "down"])
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.25, 0.5])
    parser.add_argument("--steps", type=int, default=1000)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    rows = [r for f in args.fixtures for m in args.matrices for r in run_stack(f, args.layer, m, args)]
    result = {"rows": rows, "summary": summary(rows)}
    print("\nmean error relative to the paper's settings:")
    for variant, ratio in result["summary"]["mean_error_vs_paper"].items():
        print(f"  {variant:>18}: {ratio:.3f}")
    print(result["summary"]["verdict"])
    write_results(result, args, start, plot, args.out)


# --- tables for README.md and docs/ (written by benchmarks/tables.py from this script's JSON) ---
def table(result: dict) -> str:
    """recipe.py: relative weight error of each variant (rows) on each stack and cut (columns); best bold."""
    rows = [r for r in result["rows"] if "relative_error" in r]
    cases = list(dict.fromkeys((r["fixture"], r["layer"], r["matrix"], r["ratio"]) for r in rows))
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    by = {(r["fixture"], r["layer"], r["matrix"], r["ratio"], r["variant"]): r for r in rows}
    head = [f"{f} L{layer} {m} {100 * ratio:.0f}%" for f, layer, m, ratio in cases]
    lines = ["| variant | " + " | ".join(head) + " | mean vs paper | s (total) |", "|---|" + "---:|" * (len(cases) + 2)]
    best = {c: min(by[(*c, v)]["relative_error"] for v in variants if (*c, v) in by) for c in cases}
    mean = result["summary"]["mean_error_vs_paper"]
    for v in variants:
        cells = []
        for c in cases:
            r = by.get((*c, v))
            cell = "" if r is None else f"{r['relative_error']:.4f}"
            cells.append(f"**{cell}**" if r is not None and r["relative_error"] == best[c] else cell)
        seconds = sum(by[(*c, v)]["seconds"] for c in cases if (*c, v) in by)
        ratio = f"{mean[v]:.3f}" if v in mean else ""
        lines.append(f"| {v} | " + " | ".join(cells) + f" | {ratio} | {seconds:.0f} |")
    steps = result["args"]["steps"]
    lines.append("")
    lines.append(
        f"Relative weight error after {steps} steps of each iterative fit. "
        + plain_statement(result["summary"]["verdict"])
    )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
