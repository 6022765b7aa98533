"""Every compressor side by side on both trained fixtures, at the same expert-parameter cuts.

For each fixture (the coarse one, p > d, and the fine-grained one, p < d, the shape of today's MoEs), each
expert-parameter reduction and each method, the fixture is compressed (gate, up and down), rebuilt dense, and its
held-out perplexity compared with the original's; optionally again with `--calibration` (output-error fits on
excerpts of the fixture's own training documents, never held-out ones). Methods: per-expert SVD, D2-MoE, MoLAE,
MoBE with the paper's settings (Adam, m = E/4, bases on the hidden side, rank from the budget), SLBF (m = E, basis
rank from the budget) and `default`, the recipe `mobe compress MODEL --target-ratio R` runs with no other option.
Wall time of each compression is measured in the same run.

    python benchmarks/data_free.py [--fixtures coarse fine] [--ratios 0.25 0.37 0.5] [--steps 2000]
        [--variants plain calibrated] [--out benchmarks/results/data_free_calibrated]

Prints a table per fixture, writes benchmarks/results/data_free.json and .png.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from calibration import training_side_text  # same directory: run as python benchmarks/data_free.py
from compare import _perplexity
from mobe import CompressionError, MobeConfig, compress
from results_io import add_run_options, pyplot, save_figure, write_results

HERE = Path(__file__).resolve().parent
FIXTURES = {"coarse": "qwen3-moe-trained", "fine": "qwen2-moe-fine-trained"}
METHODS = ("svd", "d2moe", "molae", "mobe", "slbf", "default")  # default: MobeConfig's own recipe


def _calibration_text(fixture: Path, folder: Path) -> Path:
    """Training-side excerpts of the fixture's corpus (as recorded by its training run), written to `folder`."""
    stats = json.loads((fixture / "training_stats.json").read_text())
    config = stats["config"]
    text = training_side_text(
        sources=Path(stats["source"]),
        pattern=config.get("pattern", "*.rst.txt"),
        package=stats.get("package", config.get("package", "python3.11-doc")),
    )
    path = folder / f"calibration-{fixture.name}.txt"
    path.write_text(text)
    return path


def _config(method: str, ratio: float, num_experts: int, calibration: Path | None, args) -> MobeConfig:
    """`default` is what `mobe compress MODEL --target-ratio R` runs; `mobe` is MoBE with the paper's settings."""
    if method == "default":
        recipe = {}
    elif method == "mobe":
        recipe = {"method": "mobe", "schedule": "adam", "basis_side": "hidden", "activation": "tanh"}
    else:
        recipe = {"method": method}
    return MobeConfig(
        **recipe,
        target_ratio=ratio,
        num_bases=0 if method == "default" else max(1, num_experts // 4),  # the paper's m = E/4 (32 of 128, 4 of 16)
        steps=args.steps,
        eval_every=args.eval_every,
        matrices=tuple(args.matrices),
        device="cpu",
        threads=args.threads,
        calibration=None if calibration is None else str(calibration),
        calibration_tokens=args.calibration_tokens,
        calibration_seq_len=args.context,
    )


def run_fixture(name: str, args: argparse.Namespace, tmp: Path) -> dict:
    from transformers import AutoTokenizer

    from mobe.architectures import moe_layout

    fixture = HERE.parent / "fixtures" / FIXTURES[name]
    config_json = json.loads((fixture / "config.json").read_text())
    layout = moe_layout(config_json)
    tokenizer = AutoTokenizer.from_pretrained(fixture)
    ids = tokenizer((fixture / "heldout.txt").read_text(), return_tensors="pt").input_ids[0][: args.tokens]
    original = _perplexity(fixture, ids, args.context, args.stride)
    print(
        f"\n{name} fixture {fixture.name}: E={layout.num_experts} p={layout.intermediate_size} "
        f"d={layout.hidden_size}; original perplexity {original:.3f} ({ids.numel()} tokens)",
        flush=True,
    )
    variants = [None if v == "plain" else _calibration_text(fixture, tmp) for v in args.variants]
    rows = []
    for ratio in args.ratios:
        for calibration in variants:
            for method in args.methods:
                out = tmp / f"{name}-{method}-{ratio}-{calibration is not None}"
                row = {"method": method, "target_ratio": ratio, "calibrated": calibration is not None}
                start = time.perf_counter()
                try:
                    report = compress(
                        fixture,
                        out,
                        _config(method, ratio, layout.num_experts, calibration, args),
                        reconstruct=True,
                        progress=False,
                    )
                except CompressionError as err:  # a cut the method cannot reach: recorded, not hidden
                    rows.append({**row, "unreachable": str(err)})
                    print(f"  {method:>6} @ {ratio:.2f}: out of reach ({err})", flush=True)
                    continue
                seconds = time.perf_counter() - start
                ppl = _perplexity(out, ids, args.context, args.stride)
                summary = report.summary()
                rows.append(
                    {
                        **row,
                        "rank": report.config["rank"],
                        "num_bases": report.config["num_bases"],
                        "expert_reduction": summary["expert_reduction"],
                        "mean_relative_error": summary["mean_relative_error"],
                        "perplexity": ppl,
                        "perplexity_change": ppl - original,
                        "seconds": seconds,
                    }
                )
                print(
                    f"  {method:>6} @ {ratio:.2f}{' cal' if calibration else '    '}: "
                    f"cut {100 * summary['expert_reduction']:.1f}% err {summary['mean_relative_error']:.4f} "
                    f"ppl {ppl:.3f} ({ppl - original:+.3f}) {seconds:.0f} s",
                    flush=True,
                )
                for path in out.iterdir():
                    path.unlink()
                out.rmdir()
    return {
        "fixture": fixture.name,
        "shape": {"E": layout.num_experts, "p": layout.intermediate_size, "d": layout.hidden_size},
        "original_perplexity": original,
        "tokens": int(ids.numel()),
        "rows": rows,
    }


def merge(earlier: dict, new: dict, args: argparse.Namespace) -> dict:
    """`earlier` with `new`'s rows added; refused where the held-out scoring differs (the rows would not compare)."""
    for key in ("tokens", "context", "stride", "matrices", "steps", "calibration_tokens"):
        if key in earlier["args"] and earlier["args"][key] != getattr(args, key):
            raise SystemExit(
                f"--merge-into: the earlier run used {key}={earlier['args'][key]}, this one {getattr(args, key)}"
            )
    out = {"fixtures": dict(earlier["fixtures"]), "merged_from": earlier.get("merged_from", []) + [earlier["args"]]}
    for name, fixture in new["fixtures"].items():
        if name not in out["fixtures"]:
            out["fixtures"][name] = fixture
            continue
        old = out["fixtures"][name]
        if abs(old["original_perplexity"] - fixture["original_perplexity"]) > 1e-6:
            raise SystemExit(f"--merge-into: {name}'s original perplexity differs ({old['original_perplexity']})")
        keys = {(r["method"], r["target_ratio"], r["calibrated"]) for r in fixture["rows"]}
        kept = [r for r in old["rows"] if (r["method"], r["target_ratio"], r["calibrated"]) not in keys]
        out["fixtures"][name] = {**old, "rows": kept + fixture["rows"]}
    return out


def verdicts(result: dict) -> list[str]:
    """Per fixture, cut and calibration: which method has the smallest perplexity increase."""
    out = []
    for name, fixture in result["fixtures"].items():
        keys = {(r["target_ratio"], r["calibrated"]) for r in fixture["rows"]}
        for ratio, calibrated in sorted(keys):
            rows = [
                r
                for r in fixture["rows"]
                if (r["target_ratio"], r["calibrated"]) == (ratio, calibrated) and "perplexity" in r
            ]
            if rows:
                best = min(rows, key=lambda r: r["perplexity_change"])
                out.append(
                    f"{name} @ {ratio:.2f}{' calibrated' if calibrated else ''}: best {best['method']} "
                    f"({best['perplexity_change']:+.3f})"
                )
    return out


def plot(result: dict, path: Path) -> None:
    plt = pyplot()

    fixtures = result["fixtures"]
    fig, axes = plt.subplots(1, len(fixtures), figsize=(6 * len(fixtures), 4.2), dpi=120, squeeze=False)
    for ax, (name, fixture) in zip(axes[0], fixtures.items(), strict=True):
        for method in dict.fromkeys(r["method"] for r in fixture["rows"]):
            for calibrated in (False, True):
                rows = sorted(
                    (
                        r
                        for r in fixture["rows"]
                        if r["method"] == method and r["calibrated"] == calibrated and "perplexity" in r
                    ),
                    key=lambda r: r["expert_reduction"],
                )
                if rows:
                    ax.plot(
                        [100 * r["expert_reduction"] for r in rows],
                        [r["perplexity_change"] for r in rows],
                        "o-" if not calibrated else "s--",
                        label=method + (" (cal.)" if calibrated else ""),
                    )
        s = fixture["shape"]
        ax.set_title(f"{name}: E={s['E']} p={s['p']} d={s['d']}")
        ax.set_xlabel("routed-expert parameters removed (%)")
        ax.set_ylabel("held-out perplexity increase")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    save_figure(fig, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_options(parser, "data_free", threads=2, fixtures=FIXTURES)
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.25, 0.37, 0.5])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--matrices", nargs="+", default=["gate", "up", "down"], choices=["gate", "up", "down"])
    parser.add_argument("--steps", type=int, default=2000, help="steps of the iterative methods (mobe, slbf)")
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument(
        "--variants",
        nargs="+",
        default=["plain"],
        choices=["plain", "calibrated"],
        help="data-free fits, and/or fits with --calibration on the fixture's training-side text",
    )
    parser.add_argument("--calibration-tokens", type=int, default=16384)
    parser.add_argument("--tokens", type=int, default=16384, help="held-out tokens scored")
    parser.add_argument("--context", type=int, default=256)
    parser.add_argument("--stride", type=int, default=128)
    parser.add_argument(
        "--merge-into",
        metavar="JSON",
        default=None,
        help="add this run's rows to an earlier result of the same fixtures and settings (replacing rows of the same "
        "method, cut and variant); the earlier run's arguments are kept under 'merged_from'",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        result = {"fixtures": {name: run_fixture(name, args, Path(tmp)) for name in args.fixtures}}
    if args.merge_into:
        result = merge(json.loads(Path(args.merge_into).read_text()), result, args)
    for name, fixture in result["fixtures"].items():
        print(f"\n{name} ({fixture['fixture']}), original perplexity {fixture['original_perplexity']:.3f}")
        print(
            f"{'method':>6} {'cut':>5} {'cal':>3} {'rank':>5} {'real cut':>8} {'rel.err':>8} {'ppl':>8} "
            f"{'d ppl':>8} {'sec':>6}"
        )
        for r in fixture["rows"]:
            head = f"{r['method']:>6} {r['target_ratio']:>5.2f} {'yes' if r['calibrated'] else 'no':>3}"
            if "perplexity" not in r:
                print(f"{head} out of reach")
                continue
            print(
                f"{head} {r['rank']:>5} {100 * r['expert_reduction']:>7.1f}% {r['mean_relative_error']:>8.4f} "
                f"{r['perplexity']:>8.3f} {r['perplexity_change']:>+8.3f} {r['seconds']:>6.0f}"
            )
    result["verdicts"] = verdicts(result)
    print("\n" + "\n".join(result["verdicts"]))
    write_results(result, args, start, plot, args.out)


# --- tables for README.md and docs/ (written by benchmarks/tables.py from this script's JSON) ---
METHOD_LABELS = {"mobe": "mobe, paper settings", "default": "**mobe default** (`--target-ratio` alone)"}


def table(result: dict, calibrated: bool = False) -> str:
    """Perplexity increase per method (rows) and cut (columns), one block per fixture; best of each column bold."""
    lines = []
    for name, fixture in result["fixtures"].items():
        s = fixture["shape"]
        rows = [r for r in fixture["rows"] if r["calibrated"] == calibrated]
        ratios = sorted({r["target_ratio"] for r in rows})
        order = ("svd", "d2moe", "molae", "mobe", "slbf", "default")  # merged runs list rows in run order
        methods = sorted(dict.fromkeys(r["method"] for r in rows), key=lambda m: order.index(m) if m in order else 99)
        lines.append(
            f"**{name}** (`{fixture['fixture']}`, E={s['E']} p={s['p']} d={s['d']}; original perplexity "
            f"{fixture['original_perplexity']:.2f})"
        )
        lines.append("")
        lines.append("| method | " + " | ".join(f"{100 * r:.0f}% cut: d ppl (rel. err) | s" for r in ratios) + " |")
        lines.append("|---|" + "---:|---:|" * len(ratios))
        best = {
            ratio: min(
                (r["perplexity_change"] for r in rows if r["target_ratio"] == ratio and "perplexity" in r),
                default=None,
            )
            for ratio in ratios
        }
        for method in methods:
            cells = []
            for ratio in ratios:
                row = next(r for r in rows if r["method"] == method and r["target_ratio"] == ratio)
                if "perplexity" not in row:
                    cells += ["out of reach", ""]
                    continue
                change = f"{row['perplexity_change']:+.3f}"
                if row["perplexity_change"] == best[ratio]:
                    change = f"**{change}**"
                cells += [f"{change} ({row['mean_relative_error']:.3f})", f"{row['seconds']:.0f}"]
            lines.append(f"| {METHOD_LABELS.get(method, method)} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


if __name__ == "__main__":
    main()
