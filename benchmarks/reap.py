"""Expert pruning (REAP) on both trained fixtures: held-out perplexity with 25% and 50% of the routed experts removed.

For each fixture and each cut, the experts are scored on excerpts of the fixture's own training documents (never
held-out ones; the same text as the calibrated runs of data_free.py), removed by REAP score and, as the baseline
the REAP paper compares with, by routing frequency; the smaller checkpoint's held-out perplexity is measured with the
same tokens, context and stride as benchmarks/data_free.py. Where that benchmark's JSON holds the same cut and the
same evaluation settings, its best factorisation (MoBE, SLBF, ...) is shown beside it: read from the file, not re-run.

    python benchmarks/reap.py [--fixtures coarse fine] [--ratios 0.25 0.5] [--calibration-tokens 32768]

Prints a table per fixture, writes benchmarks/results/reap.json and .png.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from compare import _perplexity  # same directory: run as python benchmarks/reap.py
from data_free import FIXTURES, _calibration_text
from mobe.prune import prune_experts
from results_io import add_run_options, pyplot, save_figure, write_results

HERE = Path(__file__).resolve().parent
CRITERIA = ("reap", "frequency")


def run_fixture(name: str, args: argparse.Namespace, tmp: Path) -> dict:
    from transformers import AutoTokenizer

    fixture = HERE.parent / "fixtures" / FIXTURES[name]
    tokenizer = AutoTokenizer.from_pretrained(fixture)
    ids = tokenizer((fixture / "heldout.txt").read_text(), return_tensors="pt").input_ids[0][: args.tokens]
    original = _perplexity(fixture, ids, args.context, args.stride)
    print(f"\n{name} fixture {fixture.name}: original perplexity {original:.3f} ({ids.numel()} tokens)", flush=True)
    calibration = _calibration_text(fixture, tmp)
    rows = []
    for ratio in args.ratios:
        for criterion in args.criteria:
            out = tmp / f"{name}-{criterion}-{ratio}"
            start = time.perf_counter()
            report = prune_experts(
                fixture,
                out,
                target_ratio=ratio,
                calibration=calibration,
                criterion=criterion,
                calibration_tokens=args.calibration_tokens,
                calibration_seq_len=args.context,
                progress=False,
            )
            seconds = time.perf_counter() - start
            ppl = _perplexity(out, ids, args.context, args.stride)
            summary = report.summary()
            rows.append(
                {
                    "criterion": criterion,
                    "target_ratio": ratio,
                    "experts_per_layer": [summary["experts_per_layer_before"], summary["experts_per_layer_after"]],
                    "expert_reduction": summary["expert_reduction"],
                    "model_reduction": summary["model_reduction"],
                    "unrouted_removed": sum(
                        1 for lay in report.layers for e in lay.pruned if lay.tokens_routed[e] == 0
                    ),
                    "pruned": {str(lay.layer): lay.pruned for lay in report.layers},
                    "perplexity": ppl,
                    "perplexity_change": ppl - original,
                    "seconds": seconds,
                }
            )
            print(
                f"  {criterion:>9} @ {ratio:.2f}: {summary['experts_per_layer_after']}/"
                f"{summary['experts_per_layer_before']} experts, model {100 * summary['model_reduction']:.1f}% "
                f"smaller, ppl {ppl:.3f} ({ppl - original:+.3f}) {seconds:.0f} s",
                flush=True,
            )
            for path in out.iterdir():
                path.unlink()
            out.rmdir()
    return {
        "fixture": fixture.name,
        "original_perplexity": original,
        "tokens": int(ids.numel()),
        "calibration_tokens": report.calibration_tokens,
        "rows": rows,
        "factorisations": best_factorisations(name, args),
    }


def best_factorisations(name: str, args: argparse.Namespace) -> list[dict]:
    """Per cut, the lowest perplexity of data_free.py's methods (plain and calibrated), where it ran with the same
    held-out tokens, context and stride; rows are copied from its JSON."""
    out = []
    for stem in ("data_free", "data_free_calibrated"):
        path = HERE / "results" / f"{stem}.json"
        if not path.is_file():
            continue
        data = json.loads(path.read_text())
        same = all(data["args"].get(k) == getattr(args, k) for k in ("tokens", "context", "stride"))
        fixture = data["fixtures"].get(name)
        if not same or fixture is None:
            continue
        for ratio in args.ratios:
            rows = [r for r in fixture["rows"] if r["target_ratio"] == ratio and "perplexity" in r]
            if rows:
                best = min(rows, key=lambda r: r["perplexity"])
                out.append({"source": f"{stem}.json", **{k: best[k] for k in best if k != "results"}})
    return out


def verdicts(result: dict) -> list[str]:
    lines = []
    for name, fixture in result["fixtures"].items():
        for ratio in sorted({r["target_ratio"] for r in fixture["rows"]}):
            rows = {r["criterion"]: r for r in fixture["rows"] if r["target_ratio"] == ratio}
            if "reap" in rows and "frequency" in rows:
                reap, freq = rows["reap"]["perplexity_change"], rows["frequency"]["perplexity_change"]
                better = "REAP" if reap < freq else "frequency"
                lines.append(
                    f"{name} {int(100 * ratio)}%: {better} pruning is better (perplexity {reap:+.2f} by REAP score, "
                    f"{freq:+.2f} by frequency)"
                )
            for f in fixture["factorisations"]:
                if f["target_ratio"] == ratio and "reap" in rows:
                    kind = "calibrated " if f.get("calibrated") else ""
                    word = "below" if rows["reap"]["perplexity_change"] < f["perplexity_change"] else "above"
                    lines.append(
                        f"{name} {int(100 * ratio)}%: REAP {rows['reap']['perplexity_change']:+.2f} is {word} the best "
                        f"{kind}factorisation ({f['method']} {f['perplexity_change']:+.2f}, {f['source']})"
                    )
    return lines


def plot(result: dict, path: Path) -> None:
    plt = pyplot()

    names = list(result["fixtures"])
    fig, axes = plt.subplots(1, len(names), figsize=(5 * len(names), 3.8), dpi=120, squeeze=False)
    for ax, name in zip(axes[0], names, strict=True):
        fixture = result["fixtures"][name]
        for criterion in dict.fromkeys(r["criterion"] for r in fixture["rows"]):
            rows = [r for r in fixture["rows"] if r["criterion"] == criterion]
            ax.plot(
                [100 * r["expert_reduction"] for r in rows],
                [r["perplexity"] for r in rows],
                "o-",
                label=f"prune by {criterion}",
            )
        for f in fixture["factorisations"]:
            label = f"best factorisation{' (calibrated)' if f.get('calibrated') else ''}"
            style = ("s", "tab:brown") if f.get("calibrated") else ("^", "tab:red")
            ax.plot(100 * f["expert_reduction"], f["perplexity"], style[0], color=style[1], label=label)
        ax.axhline(fixture["original_perplexity"], color="gray", ls="--", label="original")
        ax.set_xlabel("routed-expert parameters removed (%)")
        ax.set_ylabel("held-out perplexity")
        ax.set_title(fixture["fixture"])
        ax.grid(alpha=0.3)
        handles, labels = ax.get_legend_handles_labels()
        unique = dict(zip(labels, handles, strict=True))
        ax.legend(unique.values(), unique.keys(), fontsize=8)
    save_figure(fig, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_options(parser, "reap", threads=2, fixtures=FIXTURES)
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.25, 0.5])
    parser.add_argument("--criteria", nargs="+", default=list(CRITERIA), choices=CRITERIA)
    parser.add_argument("--calibration-tokens", type=int, default=16384)
    parser.add_argument("--tokens", type=int, default=16384, help="held-out tokens scored")
    parser.add_argument("--context", type=int, default=256)
    parser.add_argument("--stride", type=int, default=128)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        result = {"fixtures": {name: run_fixture(name, args, Path(tmp)) for name in args.fixtures}}
    for name, fixture in result["fixtures"].items():
        print(f"\n{name}: {fixture['fixture']}, original perplexity {fixture['original_perplexity']:.3f}")
        print(f"{'removed by':>22} {'cut':>5} {'experts':>8} {'model cut':>9} {'ppl':>8} {'d ppl':>7} {'sec':>5}")
        for r in fixture["rows"]:
            before, after = r["experts_per_layer"]
            print(
                f"{r['criterion'] + ' score':>22} {100 * r['expert_reduction']:>4.0f}% {after:>3}/{before:<4} "
                f"{100 * r['model_reduction']:>8.1f}% {r['perplexity']:>8.3f} {r['perplexity_change']:>+7.3f} "
                f"{r['seconds']:>5.0f}"
            )
        for f in fixture["factorisations"]:
            label = f"{f['method']}{' (cal.)' if f.get('calibrated') else ''} [{f['source'].split('.')[0]}]"
            print(
                f"{label:>22} {100 * f['expert_reduction']:>4.0f}% {'all':>8} {'':>9} {f['perplexity']:>8.3f} "
                f"{f['perplexity_change']:>+7.3f} {f['seconds']:>5.0f}"
            )
    result["verdicts"] = verdicts(result)
    print()
    for line in result["verdicts"]:
        print(line)
    write_results(result, args, start, plot, args.out)


# --- tables for README.md and docs/ (written by benchmarks/tables.py from this script's JSON) ---
def table(result: dict) -> str:
    """Held-out perplexity after expert pruning, per fixture and cut, beside data_free.py's best factorisation."""
    lines = [
        "| fixture (original ppl) | cut | experts kept | model smaller | REAP: d ppl | frequency: d ppl | "
        "best factorisation: d ppl |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for fixture in result["fixtures"].values():
        for ratio in sorted({r["target_ratio"] for r in fixture["rows"]}):
            rows = {r["criterion"]: r for r in fixture["rows"] if r["target_ratio"] == ratio}
            first = next(iter(rows.values()))
            before, after = first["experts_per_layer"]
            cells = {c: f"{rows[c]['perplexity_change']:+.3f}" if c in rows else "-" for c in ("reap", "frequency")}
            best = [f for f in fixture["factorisations"] if f["target_ratio"] == ratio]
            fact = "; ".join(
                f"{f['method']}{' (calibrated)' if f.get('calibrated') else ''} {f['perplexity_change']:+.3f}"
                for f in best
            )
            lines.append(
                f"| `{fixture['fixture']}` ({fixture['original_perplexity']:.2f}) | {100 * ratio:.0f}% | "
                f"{after}/{before} | {100 * first['model_reduction']:.1f}% | {cells['reap']} | {cells['frequency']} | "
                f"{fact or '-'} |"
            )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
