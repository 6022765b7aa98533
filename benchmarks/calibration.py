"""Calibration-aware fitting against the plain weight-space fit, at the same parameter budget.

For each expert-parameter reduction and each set of compressed matrix types, the trained fixture is compressed
three ways at the same rank: plain (weight error), `--calibration` (each fit minimises the output error on the
tokens routed to each expert, through the per-expert Gram matrices), and `--calibration` with
`--calibration-refine-steps` (then a layer-local distillation of each layer's whole routed-experts output). The
held-out perplexity of each (reconstructed) model is compared with the original's.

The calibration text is taken from the TRAINING side of the fixture's document split (scripts/train_fixture.py):
one excerpt of whole lines from each of many training documents, never a held-out document, so it does not overlap
`heldout.txt`. Needs the Debian package python3.11-doc (as the fixture's training does), or pass --calibration-text.

    python benchmarks/calibration.py [--ratios 0.25 0.4] [--matrix-sets gate,up,down gate,up] [--steps 2000]

Prints a table, writes benchmarks/results/calibration.json and .png.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

from compare import _perplexity  # same directory: run as python benchmarks/calibration.py
from mobe import MobeConfig, compress
from results_io import add_run_options, bold, grouped_bars, pyplot, save_figure, verdict_lines, write_results

HERE = Path(__file__).resolve().parent
VARIANTS = ("plain", "calibrated", "refined")


def training_side_text(
    max_bytes: int = 400_000,
    excerpt_lines: int = 40,
    seed: int = 0,
    sources: Path | None = None,
    pattern: str = "*.rst.txt",
    package: str = "python3.11-doc",
) -> str:
    """Excerpts of a fixture's training documents (never held-out ones), one per document in a shuffled order.

    The default is the coarse fixture's corpus; pass the fine-grained fixture's `sources`/`pattern`/`package`
    (recorded in its training_stats.json) for that one."""
    sys.path.insert(0, str(HERE.parent / "scripts"))
    from train_fixture import DEFAULT_SOURCES, split_documents

    train, _ = split_documents(sources or DEFAULT_SOURCES, 5, pattern, package)
    rng = random.Random(seed)
    docs = [f.read_text(encoding="utf-8", errors="replace").splitlines(keepends=True) for f in train]
    order = list(range(len(docs)))
    rng.shuffle(order)
    out, size = [], 0
    for i in order * 3:
        lines = docs[i]
        if len(lines) < 10:
            continue
        start = rng.randrange(0, max(1, len(lines) - excerpt_lines))
        chunk = "".join(lines[start : start + excerpt_lines])[:1500]
        out.append(chunk)
        size += len(chunk.encode())
        if size > max_bytes:
            break
    return "\n\n".join(out)


def _config(variant: str, ratio: float, matrices: tuple[str, ...], args: argparse.Namespace) -> MobeConfig:
    return MobeConfig(
        method=args.method,
        target_ratio=ratio,
        num_bases=args.bases,
        activation=args.activation,
        steps=args.steps,
        eval_every=args.eval_every,
        matrices=matrices,
        device="cpu",
        threads=args.threads,
        calibration=None if variant == "plain" else args.calibration_text,
        calibration_tokens=args.calibration_tokens,
        calibration_seq_len=args.context,
        calibration_refine_steps=args.refine_steps if variant == "refined" else 0,
    )


def run(args: argparse.Namespace) -> dict:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    ids = tokenizer(Path(args.text).read_text(), return_tensors="pt").input_ids[0][: args.tokens]
    original = _perplexity(Path(args.model), ids, args.context, args.stride)
    print(f"original held-out perplexity {original:.3f} ({ids.numel()} tokens)", flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for ratio in args.ratios:
            for matrix_set in args.matrix_sets:
                matrices = tuple(matrix_set.split(","))
                for variant in args.variants:
                    out = Path(tmp) / f"{variant}-{ratio}-{matrix_set}"
                    start = time.perf_counter()
                    report = compress(
                        args.model, out, _config(variant, ratio, matrices, args), reconstruct=True, progress=False
                    )
                    seconds = time.perf_counter() - start
                    ppl = _perplexity(out, ids, args.context, args.stride)
                    summary = report.summary()
                    outs = [r.output_error for r in report.results if r.output_error is not None]
                    rows.append(
                        {
                            "variant": variant,
                            "target_ratio": ratio,
                            "matrices": matrix_set,
                            "rank": report.config["rank"],
                            "expert_reduction": summary["expert_reduction"],
                            "mean_relative_error": summary["mean_relative_error"],
                            "mean_output_error": sum(outs) / len(outs) if outs else None,
                            "perplexity": ppl,
                            "perplexity_change": ppl - original,
                            "seconds": seconds,
                            "results": [r.__dict__ for r in report.results],
                        }
                    )
                    print(
                        f"  {variant:>10} @ {ratio:.2f} {matrix_set:>12}: err {summary['mean_relative_error']:.4f} "
                        f"ppl {ppl:.3f} ({ppl - original:+.3f}) {seconds:.0f} s",
                        flush=True,
                    )
                    for path in out.iterdir():
                        path.unlink()
    for row in rows:  # the perplexity increase against the plain fit's at the same setting
        plain = (
            next(
                r
                for r in rows
                if r["variant"] == "plain"
                and r["target_ratio"] == row["target_ratio"]
                and r["matrices"] == row["matrices"]
            )
            if "plain" in args.variants
            else None
        )
        row["increase_cut"] = (
            1 - row["perplexity_change"] / plain["perplexity_change"]
            if plain and plain["perplexity_change"] > 0
            else None
        )
    return {"original_perplexity": original, "tokens": int(ids.numel()), "rows": rows}


def verdicts(result: dict) -> list[str]:
    """Per cut and matrix set: the variant with the smallest perplexity increase, and the share of the plain
    fit's increase each calibrated variant removes (the claim: calibration lowers it)."""
    out = []
    rows = result["rows"]
    for ratio, matrices in dict.fromkeys((r["target_ratio"], r["matrices"]) for r in rows):
        group = [r for r in rows if (r["target_ratio"], r["matrices"]) == (ratio, matrices)]
        best = min(group, key=lambda r: r["perplexity_change"])
        cuts = ", ".join(
            f"{r['variant']} cuts {100 * r['increase_cut']:.0f}%"
            for r in group
            if r["increase_cut"] is not None and r["variant"] != "plain"
        )
        out.append(
            f"{ratio:.2f} {matrices}: best {best['variant']} ({best['perplexity_change']:+.3f})"
            + (f"; {cuts} of plain's increase" if cuts else "")
        )
    return out


def plot(result: dict, path: Path) -> None:
    plt = pyplot()

    settings = list(dict.fromkeys((r["target_ratio"], r["matrices"]) for r in result["rows"]))
    variants = list(dict.fromkeys(r["variant"] for r in result["rows"]))
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    change = {(r["target_ratio"], r["matrices"], r["variant"]): r["perplexity_change"] for r in result["rows"]}
    series = {v: [change.get((ratio, m, v), float("nan")) for ratio, m in settings] for v in variants}
    grouped_bars(ax, [f"{int(100 * r)}% cut\n{m}" for r, m in settings], series)
    ax.set_ylabel("held-out perplexity increase")
    ax.set_title(f"Calibration at the same budget (original {result['original_perplexity']:.2f})")
    ax.grid(alpha=0.3, axis="y")
    ax.legend()
    save_figure(fig, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="MoE checkpoint with a tokenizer (default: the trained fixture)")
    parser.add_argument("--text", default=None, help="held-out text (default: the fixture's heldout.txt)")
    parser.add_argument("--calibration-text", default=None, help="calibration text (default: training-side excerpts)")
    parser.add_argument("--method", default="mobe")
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.25, 0.4])
    parser.add_argument("--matrix-sets", nargs="+", default=["gate,up,down", "gate,up"])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--bases", type=int, default=4)
    parser.add_argument("--activation", default="silu")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--refine-steps", type=int, default=300)
    parser.add_argument("--calibration-tokens", type=int, default=32768)
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--context", type=int, default=256)
    parser.add_argument("--stride", type=int, default=128)
    add_run_options(parser, "calibration", threads=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.model is None or args.text is None:
        from mobe.fixtures import trained_fixture_path

        args.model = args.model or str(trained_fixture_path())
        args.text = args.text or str(trained_fixture_path() / "heldout.txt")
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        if args.calibration_text is None:
            args.calibration_text = str(Path(tmp) / "calibration.txt")
            Path(args.calibration_text).write_text(training_side_text())
            generated = True
        else:
            generated = False
        result = run(args)
    print(f"\noriginal held-out perplexity {result['original_perplexity']:.3f} ({result['tokens']} tokens)")
    print(
        f"{'variant':>10} {'target':>6} {'matrices':>12} {'rank':>5} {'rel.err':>8} {'out.err':>8} {'ppl':>8} "
        f"{'d ppl':>7} {'cut':>6} {'sec':>6}"
    )
    for r in result["rows"]:
        out = f"{r['mean_output_error']:>8.4f}" if r["mean_output_error"] is not None else f"{'-':>8}"
        cut = f"{100 * r['increase_cut']:>5.0f}%" if r["increase_cut"] is not None else f"{'-':>6}"
        print(
            f"{r['variant']:>10} {r['target_ratio']:>6.2f} {r['matrices']:>12} {r['rank']:>5} "
            f"{r['mean_relative_error']:>8.4f} {out} {r['perplexity']:>8.3f} {r['perplexity_change']:>+7.3f} {cut} "
            f"{r['seconds']:>6.0f}"
        )
    args.calibration_text = "training-side excerpts (benchmarks/calibration.py)" if generated else args.calibration_text
    result["verdicts"] = verdicts(result)
    print("\n" + "\n".join(result["verdicts"]))
    write_results(result, args, start, plot, args.out)


# --- tables for README.md and docs/ (written by benchmarks/tables.py from this script's JSON) ---
def table(result: dict) -> str:
    """calibration.py: plain, calibrated and refined fits per cut and matrix set; the best perplexity of each bold."""
    rows = result["rows"]
    best = {}
    for r in rows:
        key = (r["target_ratio"], r["matrices"])
        best[key] = min(best.get(key, r["perplexity"]), r["perplexity"])
    lines = [
        f"Original held-out perplexity {result['original_perplexity']:.3f} ({result['tokens']} tokens).",
        "",
        "| variant | target | matrices | rank | rel. weight error | rel. output error | perplexity | change | cut "
        "| s |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        on = r["perplexity"] == best[(r["target_ratio"], r["matrices"])]
        out = "" if r["mean_output_error"] is None else f"{r['mean_output_error']:.4f}"
        cut = "" if r["variant"] == "plain" else bold(f"{100 * r['increase_cut']:.0f}%", on)
        ppl, change = bold(f"{r['perplexity']:.3f}", on), bold(f"{r['perplexity_change']:+.3f}", on)
        lines.append(
            f"| {r['variant']} | {r['target_ratio']:.2f} | {r['matrices']} | {r['rank']} | "
            f"{r['mean_relative_error']:.4f} | {out} | {ppl} | {change} | {cut} | {r['seconds']:.0f} |"
        )
    lines.append("")
    for variant in dict.fromkeys(r["variant"] for r in rows if r["variant"] != "plain"):
        cuts = [100 * r["increase_cut"] for r in rows if r["variant"] == variant]
        lines.append(
            f"{variant}: the increase is {min(cuts):.0f}% to {max(cuts):.0f}% smaller than the plain fit's "
            f"({len(cuts)} settings)."
        )
    lines += [str(v) for v in verdict_lines(result)]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
