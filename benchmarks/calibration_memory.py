"""Peak RAM of one MoE layer's calibration statistics: dense float64 Grams (before) against factored Grams (now).

For each shape (default: DeepSeek-V3, E=256 experts, d=7168, p=2048, top-8; and Qwen3-30B-A3B, E=128, d=2048,
p=768, top-8) and calibration token count, random routed inputs are streamed through each variant, sequence by
sequence as the calibration hook sees them: `--seq-len` tokens of random hidden states (d) and random intermediate
activations (p; no weights are needed for the statistics), routed top-k uniformly at random.

- gram: what mobe kept before, a d x d and a p x p float64 Gram per expert, updated by X_e^T X_e;
- factor: `mobe.factorize.gram.GramFactor` for the inputs and for the activations, compacted at the end.

Each variant runs in fresh subprocesses on SUBSETS of the experts (the dense Grams of a whole DeepSeek-V3 layer
are 114 GB): the peak RSS (resource.getrusage ru_maxrss) minus the same process's baseline after imports, for n
and 2n experts. Statistics are per expert, so the peak is linear in the experts kept: the difference of the two
runs gives the cost of one expert, what is left the fixed part (the streamed batch, the transient of one update),
and the layer's figure is fixed + E * per expert. The table says which subsets were measured. The formula column
is `mobe.estimate.memory`'s estimate for the whole layer with balanced routing (what `mobe info` prints); the
seconds are the statistics updates alone (one thread), scaled the same way.

    python benchmarks/calibration_memory.py [--tokens 4096 32768] [--gram-experts 2 --factor-experts 16]

Prints a table and a verdict, writes benchmarks/results/calibration_memory.json and .png.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

from results_io import add_run_options, pyplot, save_figure, write_results

HERE = Path(__file__).resolve().parent
SHAPES = {  # name: (E, d, p, top-k)
    "DeepSeek-V3": (256, 7168, 2048, 8),
    "Qwen3-30B-A3B": (128, 2048, 768, 8),
}


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _child(variant: str, shape: str, tokens: int, subset: int, seq_len: int, seed: int) -> dict:
    """Stream the routed rows of `subset` experts into `variant`'s statistics; report peak RSS over the baseline."""
    import torch

    from mobe.factorize.gram import GramFactor

    torch.set_num_threads(1)
    E, d, p, k = SHAPES[shape]
    torch.randn(8, 8) @ torch.randn(8, 8)  # libraries loaded before the baseline
    baseline = _peak_mib()
    seconds = 0.0
    if variant == "gram":
        stats = [torch.zeros(subset, d, d, dtype=torch.float64), torch.zeros(subset, p, p, dtype=torch.float64)]
    else:
        stats = [GramFactor(subset, d), GramFactor(subset, p)]
    g = torch.Generator().manual_seed(seed)
    counts = torch.zeros(subset, dtype=torch.int64)
    for first in range(0, tokens, seq_len):
        n = min(seq_len, tokens - first)
        x, h = torch.randn(n, d, generator=g), torch.randn(n, p, generator=g)
        routing = torch.rand(n, E, generator=g).topk(k, dim=-1).indices
        for e in range(subset):
            rows = (routing == e).any(-1)
            counts[e] += int(rows.sum())
            start = time.perf_counter()
            for s, data in zip(stats, (x[rows], h[rows]), strict=True):
                if variant == "gram":
                    s[e] += data.double().T @ data.double()
                else:
                    s.add(e, data)
            seconds += time.perf_counter() - start
    if variant == "factor":
        start = time.perf_counter()
        held = sum(s.compact().nbytes for s in stats)
        seconds += time.perf_counter() - start
    else:
        held = sum(s.numel() * s.element_size() for s in stats) + counts.numel() * 8
    return {
        "peak_mib": _peak_mib() - baseline,
        "baseline_mib": baseline,
        "held_bytes": held,
        "counts": counts.tolist(),
        "seconds": seconds,
    }


def _run(args: argparse.Namespace, variant: str, shape: str, tokens: int, subset: int) -> dict:
    argv = [sys.executable, __file__, "--child", variant, shape, str(tokens), str(subset), "--seq-len"]
    out = subprocess.run([*argv, str(args.seq_len), "--seed", str(args.seed)], capture_output=True)
    if out.returncode:
        raise SystemExit(f"{variant} {shape} {tokens} failed:\n{out.stderr.decode()[-2000:]}")
    return json.loads(out.stdout.decode().strip().splitlines()[-1])


def _gib(mib: float) -> str:
    return f"{mib / 1024:,.2f}"


def _plot(result: dict, path: Path) -> None:
    plt = pyplot()

    rows = result["rows"]
    labels = [f"{r['shape']}\n{r['tokens']} tokens" for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    xs = range(len(rows))
    ax.bar([x - 0.2 for x in xs], [r["gram_layer_gib"] for r in rows], 0.4, label="dense Grams (before)")
    ax.bar([x + 0.2 for x in xs], [r["factor_layer_gib"] for r in rows], 0.4, label="factored Grams")
    ax.set_yscale("log")
    ax.set_xticks(list(xs), labels, fontsize=8)
    ax.set_ylabel("peak RSS of one layer's statistics (GiB, log)")
    ax.set_title("One MoE layer's calibration statistics (subsets of experts, extrapolated)", fontsize=10)
    ax.legend()
    save_figure(fig, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--tokens", type=int, nargs="+", default=[4096, 32768], help="calibration tokens")
    parser.add_argument("--gram-experts", type=int, default=2, help="experts measured with dense Grams")
    parser.add_argument("--factor-experts", type=int, default=16, help="experts measured with factored Grams")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    add_run_options(parser, "calibration_memory")
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        variant, shape, tokens, subset = args.child
        print(json.dumps(_child(variant, shape, int(tokens), int(subset), args.seq_len, args.seed)))
        return

    from mobe.estimate.memory import balanced_counts, factor_stats_bytes, gram_stats_bytes

    start = time.perf_counter()
    rows = []
    for shape in args.shapes:
        E, d, p, k = SHAPES[shape]
        for tokens in args.tokens:
            row = {"shape": shape, "E": E, "d": d, "p": p, "top_k": k, "tokens": tokens}
            for variant, n in (("gram", args.gram_experts), ("factor", args.factor_experts)):
                n = max(1, min(E // 2, n))
                small, large = _run(args, variant, shape, tokens, n), _run(args, variant, shape, tokens, 2 * n)
                per_expert = (large["peak_mib"] - small["peak_mib"]) / n
                fixed = small["peak_mib"] - n * per_expert
                row[variant] = {"experts_measured": [n, 2 * n], "runs": [small, large], "fixed_mib": fixed}
                row[f"{variant}_layer_gib"] = (fixed + E * per_expert) / 1024
                row[f"{variant}_seconds_layer"] = large["seconds"] * E / (2 * n)
                row[f"{variant}_held_layer_gib"] = large["held_bytes"] * E / (2 * n) / 2**30
            row["gram_formula_gib"] = gram_stats_bytes(E, p, d) / 2**30
            row["factor_formula_gib"] = factor_stats_bytes(balanced_counts(E, tokens, k), p, d, True) / 2**30
            row["reduction"] = row["gram_layer_gib"] / row["factor_layer_gib"]
            rows.append(row)
            print(f"measured {shape} {tokens} tokens", file=sys.stderr)

    print(
        f"{'shape':<14} {'tokens':>6} {'rows/expert':>11} {'Grams GiB':>10} {'formula':>8} "
        f"{'factored GiB':>12} {'formula':>8} {'reduction':>9} {'s Grams':>8} {'s factored':>10}"
    )
    for r in rows:
        counts = r["factor"]["runs"][1]["counts"]
        mean_rows = sum(counts) / len(counts)
        print(
            f"{r['shape']:<14} {r['tokens']:>6} {mean_rows:>11.0f} {r['gram_layer_gib']:>10.2f} "
            f"{r['gram_formula_gib']:>8.2f} {r['factor_layer_gib']:>12.2f} {r['factor_formula_gib']:>8.2f} "
            f"{r['reduction']:>8.1f}x {r['gram_seconds_layer']:>8.0f} {r['factor_seconds_layer']:>10.0f}"
        )
    print(
        f"(measured on {args.gram_experts} and {2 * args.gram_experts} experts with dense Grams, "
        f"{args.factor_experts} and {2 * args.factor_experts} with factors: peak RSS over each process's baseline, "
        "extrapolated linearly to all E experts of the layer; seconds: the updates alone, one thread, scaled)"
    )
    deepseek = [r for r in rows if r["shape"] == "DeepSeek-V3"]
    verdicts = {
        "deepseek_factored_at_least_10x_smaller": all(r["reduction"] >= 10 for r in deepseek) if deepseek else None,
        "formula_within_25pct_of_measured": all(
            abs(r["factor_formula_gib"] - r["factor_layer_gib"]) <= 0.25 * r["factor_layer_gib"] for r in rows
        ),
        "factored_never_above_grams_by_more_than_25pct": all(r["reduction"] >= 0.8 for r in rows),
    }
    for name, ok in verdicts.items():
        print(f"{name}: {'PASS' if ok else 'FAIL' if ok is not None else 'not measured'}")
    write_results({"rows": rows, "verdicts": verdicts}, args, start, _plot, args.out)


# --- tables for README.md and docs/ (written by benchmarks/tables.py from this script's JSON) ---
def table(result: dict) -> str:
    """One layer's calibration statistics: dense Grams against factored Grams, measured and estimated."""
    lines = [
        "| model shape | tokens | rows per expert | dense Grams GiB (formula) | factored GiB (formula) | smaller by "
        "| s Grams | s factored |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        counts = r["factor"]["runs"][-1]["counts"]
        lines.append(
            f"| {r['shape']} (E={r['E']}, d={r['d']}, p={r['p']}, top-{r['top_k']}) | {r['tokens']} "
            f"| {sum(counts) / len(counts):.0f} | {r['gram_layer_gib']:.2f} ({r['gram_formula_gib']:.2f}) "
            f"| {r['factor_layer_gib']:.2f} ({r['factor_formula_gib']:.2f}) | {r['reduction']:.1f}x "
            f"| {r['gram_seconds_layer']:.0f} | {r['factor_seconds_layer']:.0f} |"
        )
    gram, factor = result["rows"][0]["gram"], result["rows"][0]["factor"]
    lines.append("")
    lines.append(
        f"Measured on {' and '.join(map(str, gram['experts_measured']))} experts with dense Grams and "
        f"{' and '.join(map(str, factor['experts_measured']))} with factors, extrapolated to all E experts."
    )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
