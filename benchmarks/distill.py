"""Distillation after compression: how much of the held-out perplexity gap each `--train` mode closes.

For each trained fixture (coarse p > d, fine-grained p < d), each expert-parameter cut, and each fit (data-free,
and with `--calibration`), the fixture is compressed by `--method` with the project's default recipe (what
`mobe compress --method mobe --target-ratio R` runs; native factors), then distilled toward the original in each
mode (router; router+coef; all-small) with `mobe distill`'s default settings on excerpts of the fixture's TRAINING
documents (`--distill-bytes` of them). Perplexity is measured on the fixture's held-out documents, which neither
the calibration nor the distillation sees. Gap closed = (ppl_compressed - ppl_distilled) / (ppl_compressed -
ppl_original). Wall time of each step is measured in the run.

    python benchmarks/distill.py [--fixtures coarse fine] [--ratios 0.25 0.5] [--distill-tokens N]
        [--modes router router+coef all-small] [--fits data-free calibrated] [--router-weight W] [--lr LR]

Prints a table, its verdicts, writes benchmarks/results/distill.json and .png. Needs the Debian packages of the
fixtures' corpora (python3.11-doc, perl-doc), as their training does.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from calibration import training_side_text
from compare import _perplexity  # same directory: run as python benchmarks/distill.py
from data_free import FIXTURES
from mobe import MobeConfig, compress
from mobe.distill import DISTILL_MODES, DistillConfig, distill
from results_io import add_run_options, grouped_bars, pyplot, save_figure, write_results

HERE = Path(__file__).resolve().parent
FITS = ("data-free", "calibrated")


def _distill_text(fixture: Path, folder: Path, max_bytes: int) -> Path:
    """Excerpts of the fixture's training documents (as recorded by its training run), written to `folder`."""
    stats = json.loads((fixture / "training_stats.json").read_text())
    config = stats["config"]
    text = training_side_text(
        max_bytes=max_bytes,
        sources=Path(stats["source"]),
        pattern=config.get("pattern", "*.rst.txt"),
        package=stats.get("package", config.get("package", "python3.11-doc")),
    )
    path = folder / f"distill-{fixture.name}.txt"
    path.write_text(text)
    return path


def _distill_config(mode: str, args: argparse.Namespace) -> DistillConfig:
    """`mobe distill`'s defaults, but for the settings named on the command line."""
    named = {k: getattr(args, k) for k in ("epochs", "lr", "router_weight", "schedule") if getattr(args, k) is not None}
    return DistillConfig(train=mode, tokens=args.distill_tokens, seq_len=args.context, device="cpu", **named)


def run_fixture(name: str, args: argparse.Namespace, tmp: Path) -> dict:
    from transformers import AutoTokenizer

    fixture = HERE.parent / "fixtures" / FIXTURES[name]
    tokenizer = AutoTokenizer.from_pretrained(fixture)
    ids = tokenizer((fixture / "heldout.txt").read_text(), return_tensors="pt").input_ids[0][: args.tokens]
    original = _perplexity(fixture, ids, args.context, args.stride)
    text = _distill_text(fixture, tmp, args.distill_bytes)
    print(f"\n{name} ({fixture.name}): original held-out perplexity {original:.3f}", flush=True)
    targets_work = tmp / f"{name}-teacher"  # the teacher's targets, shared by every run on this fixture
    rows = []
    for ratio in args.ratios:
        method = args.method
        for fit in args.fits:
            compressed = tmp / f"{name}-{ratio}-{fit}"
            start = time.perf_counter()
            report = compress(
                fixture,
                compressed,
                MobeConfig(
                    method=method,
                    target_ratio=ratio,
                    device="cpu",
                    threads=args.threads,
                    calibration=str(text) if fit == "calibrated" else None,
                    **({} if args.steps is None else {"steps": args.steps}),
                ),
                progress=False,
            )
            compress_seconds = time.perf_counter() - start
            before = _perplexity(compressed, ids, args.context, args.stride)
            row = {
                "target_ratio": ratio,
                "method": method,
                "fit": fit,
                "expert_reduction": report.summary()["expert_reduction"],
                "compress_seconds": compress_seconds,
                "perplexity_before": before,
                "modes": {},
            }
            print(
                f"  {method} @ {ratio:.2f} {fit}: cut {100 * row['expert_reduction']:.1f}%, ppl {before:.3f} "
                f"({before - original:+.3f}), {compress_seconds:.0f} s",
                flush=True,
            )
            for mode in args.modes:
                out = tmp / f"{compressed.name}-{mode}"
                start = time.perf_counter()
                result = distill(
                    fixture,
                    compressed,
                    out,
                    text,
                    _distill_config(mode, args),
                    work_dir=targets_work,
                    progress=False,
                )
                seconds = time.perf_counter() - start
                after = _perplexity(out, ids, args.context, args.stride)
                gap = before - original
                row["modes"][mode] = {
                    "perplexity": after,
                    "gap_closed": (before - after) / gap if gap > 0 else None,
                    "heldout_kl_before": result.before["kl"],
                    "heldout_kl_after": result.after["kl"],
                    "kept_input": result.kept_input,
                    "trained_params": result.trained_params,
                    "seconds": seconds,
                    "history": result.history,
                }
                closed = row["modes"][mode]["gap_closed"]
                print(
                    f"    {mode:>11}: ppl {after:.3f} ({after - original:+.3f}), gap closed "
                    f"{'n/a' if closed is None else f'{100 * closed:.0f}%'}, KL {result.before['kl']:.4f} -> "
                    f"{result.after['kl']:.4f}, {seconds:.0f} s",
                    flush=True,
                )
            rows.append(row)
    return {"fixture": fixture.name, "original_perplexity": original, "tokens": int(ids.numel()), "rows": rows}


def verdicts(result: dict) -> list[str]:
    out = []
    worse = [
        f"{name} {r['target_ratio']} {r['fit']} {mode}"
        for name, f in result["fixtures"].items()
        for r in f["rows"]
        for mode, m in r["modes"].items()
        if m["perplexity"] > r["perplexity_before"]
    ]
    out.append(
        "distillation never made held-out perplexity worse: " + ("yes" if not worse else f"NO ({', '.join(worse)})")
    )
    for name, f in result["fixtures"].items():
        for r in f["rows"]:
            if r["target_ratio"] != max(result["args"]["ratios"]) or "router" not in r["modes"]:
                continue
            closed = r["modes"]["router"]["gap_closed"]
            ok = closed is not None and closed >= 0.5
            out.append(
                f"{name} at {100 * r['target_ratio']:.0f}% ({r['fit']}): router distillation closes "
                f"{'n/a' if closed is None else f'{100 * closed:.0f}%'} of the perplexity gap "
                f"(target >= 50%): {'yes' if ok else 'no'}"
            )
    return out


def plot(result: dict, path: Path) -> None:
    plt = pyplot()

    fixtures = result["fixtures"]
    fig, axes = plt.subplots(1, len(fixtures), figsize=(6.5 * len(fixtures), 4.2), dpi=120, squeeze=False)
    for ax, (name, f) in zip(axes[0], fixtures.items(), strict=True):
        labels = [f"{100 * r['target_ratio']:.0f}% {r['fit']}" for r in f["rows"]]
        modes = ["compressed", *dict.fromkeys(m for r in f["rows"] for m in r["modes"])]
        series = {
            mode: [
                (r["perplexity_before"] if mode == "compressed" else r["modes"][mode]["perplexity"])
                - f["original_perplexity"]
                for r in f["rows"]
            ]
            for mode in modes
        }
        grouped_bars(ax, labels, series, fontsize=8)
        ax.set_ylabel("held-out perplexity above the original")
        ax.set_title(f"{name} ({f['fixture']})")
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=7)
    save_figure(fig, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_options(parser, "distill", threads=2, fixtures=FIXTURES)
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.25, 0.5])
    parser.add_argument("--fits", nargs="+", default=list(FITS), choices=FITS)
    parser.add_argument("--method", default="mobe", choices=("mobe", "slbf"), help="methods with basis coefficients")
    parser.add_argument("--modes", nargs="+", default=list(DISTILL_MODES), choices=DISTILL_MODES)
    parser.add_argument("--steps", type=int, help="steps of each compression fit (default: the recipe's)")
    parser.add_argument("--epochs", type=int, help="distillation epochs (default: DistillConfig's)")
    parser.add_argument("--lr", type=float, help="distillation learning rate (default: DistillConfig's)")
    parser.add_argument("--router-weight", type=float, help="routing loss weight (default: DistillConfig's)")
    parser.add_argument("--schedule", choices=("cosine", "halve"), help="default: DistillConfig's")
    parser.add_argument("--distill-tokens", type=int, default=DistillConfig.tokens, help="distillation tokens")
    parser.add_argument("--distill-bytes", type=int, default=1_500_000, help="training-side text excerpted")
    parser.add_argument("--tokens", type=int, default=16384, help="held-out tokens scored")
    parser.add_argument("--context", type=int, default=256)
    parser.add_argument("--stride", type=int, default=128)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        result = {"fixtures": {name: run_fixture(name, args, Path(tmp)) for name in args.fixtures}}
    result["args"] = vars(args)
    print(
        f"\n{'fixture':>7} {'cut':>4} {'fit':>10} {'method':>6} {'ppl':>8} " + " ".join(f"{m:>18}" for m in args.modes)
    )
    for name, f in result["fixtures"].items():
        for r in f["rows"]:
            cells = []
            for mode in args.modes:
                m = r["modes"][mode]
                closed = "n/a" if m["gap_closed"] is None else f"{100 * m['gap_closed']:.0f}%"
                cells.append(f"{m['perplexity']:>9.3f} ({closed:>5})")
            print(
                f"{name:>7} {100 * r['target_ratio']:>3.0f}% {r['fit']:>10} {r['method']:>6} "
                f"{r['perplexity_before']:>8.3f} " + " ".join(f"{c:>18}" for c in cells)
            )
        print(f"{'':>7} original {f['original_perplexity']:.3f}")
    result["verdicts"] = verdicts(result)
    print("\n" + "\n".join(result["verdicts"]))
    write_results(result, args, start, plot, args.out)


# --- tables for README.md and docs/ (written by benchmarks/tables.py from this script's JSON) ---
def table(result: dict) -> str:
    """Held-out perplexity above the original before and after each distillation mode, and the gap it closes."""
    modes = list(dict.fromkeys(m for f in result["fixtures"].values() for r in f["rows"] for m in r["modes"]))
    lines = [
        "| fixture | cut | fit | compressed: d ppl | "
        + " | ".join(f"{m}: d ppl (gap closed) | s" for m in modes)
        + " |",
        "|---|---:|---|---:|" + "---:|---:|" * len(modes),
    ]
    for name, f in result["fixtures"].items():
        for r in f["rows"]:
            cells = []
            for mode in modes:
                m = r["modes"][mode]
                closed = "" if m["gap_closed"] is None else f" ({100 * m['gap_closed']:.0f}%)"
                cells += [f"{m['perplexity'] - f['original_perplexity']:+.3f}{closed}", f"{m['seconds']:.0f}"]
            lines.append(
                f"| {name} (original {f['original_perplexity']:.2f}) | {100 * r['target_ratio']:.0f}% | "
                f"{r['method']} {r['fit']} | {r['perplexity_before'] - f['original_perplexity']:+.3f} | "
                + " | ".join(cells)
                + " |"
            )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
