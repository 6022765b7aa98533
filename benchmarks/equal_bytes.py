"""Quality against stored bytes: factorisation, expert pruning and weight quantisation, alone and stacked.

On both trained fixtures, every variant below is written as a checkpoint, its stored bytes counted (every weight
tensor of the whole model, as stored: packed integers, scales and the 16-bit rest) and its held-out perplexity
measured with the settings of benchmarks/data_free.py (16,384 tokens, context 256, stride 128), the bytes of the
parameters and buffers transformers holds once it has loaded the checkpoint (`resident`), plus the accuracy on
the local lm-eval task tests/data/eval/python_docs_mc.yaml (ten questions: a smoke check, not a ranking):

- the original (bf16), and quantised alone to int8 / int4 (`mobe quantize`, compressed-tensors);
- REAP (`--method reap`, scored on the fixture's training-side text) at 25% / 50% of the experts, then int8 / int4;
- MoBE with the default recipe (data-free; gate/up/down, m = E/4, bases on the wider side, the fast schedule) at
  25% / 50% of the routed-expert parameters: native
  factors in bf16, factors in int8 / int4, and the dense reconstruction quantised to int8 / int4;
- REAP 25% then MoBE 25% (m = E'/4 of the kept experts), native bf16 and int4 factors.

For each fixture the verdict names the variants on the frontier (no other variant is both smaller and better), and
for each variant's size the best variant that fits in it.

    OMP_NUM_THREADS=1 python benchmarks/equal_bytes.py [--fixtures coarse fine] [--steps 300] [--group-size 64]

Prints a table per fixture, writes benchmarks/results/equal_bytes.json and .png.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from compare import _perplexity  # same directory: run as python benchmarks/equal_bytes.py
from data_free import FIXTURES, _calibration_text
from mobe import MobeConfig, compress, reconstruct
from mobe.config import DEFAULT_RIDGE, QuantizeConfig
from mobe.prune import prune_experts
from mobe.quantize import quantize_checkpoint, stored_bytes
from results_io import add_run_options, pyplot, save_figure, write_results

HERE = Path(__file__).resolve().parent
TASK = HERE.parent / "tests" / "data" / "eval" / "python_docs_mc.yaml"
FAMILIES = ("original", "reap", "mobe", "reap+mobe")


def _resident_bytes(path: Path) -> int:
    """Bytes of the parameters and buffers transformers holds after loading the checkpoint in its own dtype (a
    compressed-tensors checkpoint's experts are dequantised while loading; native integer factors stay integers)."""
    from mobe.runtime import load_model

    model = load_model(path)
    tensors = {t.data_ptr(): t for t in (*model.parameters(), *model.buffers())}  # tied embeddings: once
    return sum(t.numel() * t.element_size() for t in tensors.values())


def _accuracy(path: Path) -> float | None:
    """acc on the local lm-eval task (None without lm-eval)."""
    try:
        from mobe.evaluate.harness import evaluate_tasks
    except ImportError:
        return None
    from transformers import AutoTokenizer

    from mobe.runtime import load_model

    model = load_model(path, dtype=torch.float32)
    results = evaluate_tasks(model, AutoTokenizer.from_pretrained(path), [str(TASK)], batch_size=4)
    return float(next(iter(results["results"].values()))["acc,none"])


class Runner:
    """Writes, measures and forgets the checkpoints of one fixture."""

    def __init__(self, fixture: Path, ids: torch.Tensor, args: argparse.Namespace, tmp: Path):
        self.fixture, self.ids, self.args, self.tmp = fixture, ids, args, tmp
        self.rows: list[dict] = []

    def measure(self, family: str, label: str, path: Path, seconds: float, **extra) -> dict:
        start = time.perf_counter()
        ppl = _perplexity(path, self.ids, self.args.context, self.args.stride)
        acc = _accuracy(path) if self.args.lm_eval else None
        row = {
            "family": family,
            "label": label,
            "bytes": stored_bytes(path),
            "resident_bytes": _resident_bytes(path),
            "perplexity": ppl,
            "accuracy": acc,
            "seconds_to_write": seconds,
            "seconds_to_measure": time.perf_counter() - start,
            **extra,
        }
        self.rows.append(row)
        acc_text = "" if acc is None else f" acc {acc:.2f}"
        print(f"  {label:<34} {row['bytes'] / 2**20:>8.2f} MiB  ppl {ppl:>8.3f}{acc_text}", flush=True)
        return row

    def timed(self, name: str, write: Callable[[Path], object]) -> tuple[Path, float]:
        path = self.tmp / name
        start = time.perf_counter()
        write(path)
        return path, time.perf_counter() - start

    def quantised(self, family: str, label: str, source: Path, bits: int, **extra) -> None:
        config = QuantizeConfig(bits=bits, group_size=self.args.group_size)
        path, seconds = self.timed(
            f"{source.name}-int{bits}", lambda p: quantize_checkpoint(source, p, config, progress=False)
        )
        self.measure(family, f"{label} + int{bits}", path, seconds, bits=bits, **extra)
        shutil.rmtree(path)


def _mobe_config(ratio: float, args: argparse.Namespace) -> MobeConfig:
    """The default recipe (gate, up and down; m = E/4; bases on the wider side; `fast`) at `--steps`."""
    return MobeConfig(
        target_ratio=ratio,
        steps=args.steps,
        eval_every=args.eval_every,
        ridge=args.ridge,
        device="cpu",
        threads=args.threads,
    )


def run_fixture(name: str, args: argparse.Namespace, tmp: Path) -> dict:
    from transformers import AutoTokenizer

    from mobe.architectures import moe_layout

    fixture = HERE.parent / "fixtures" / FIXTURES[name]
    layout = moe_layout(json.loads((fixture / "config.json").read_text()))
    ids = AutoTokenizer.from_pretrained(fixture)((fixture / "heldout.txt").read_text(), return_tensors="pt").input_ids
    ids = ids[0][: args.tokens]
    print(f"\n{name} fixture {fixture.name} ({ids.numel()} held-out tokens)", flush=True)
    run = Runner(fixture, ids, args, tmp)
    original = run.measure("original", "original bf16", fixture, 0.0, bits=16)
    for bits in args.bits:
        run.quantised("original", "original", fixture, bits)

    calibration = _calibration_text(fixture, tmp)
    pruned_25 = None
    for ratio in args.ratios:
        label = f"REAP {100 * ratio:.0f}%"

        def prune(path: Path, ratio: float = ratio) -> None:
            prune_experts(
                fixture,
                path,
                target_ratio=ratio,
                calibration=calibration,
                calibration_tokens=args.calibration_tokens,
                calibration_seq_len=args.context,
                progress=False,
            )

        path, seconds = run.timed(f"reap-{ratio}", prune)
        run.measure("reap", label, path, seconds, ratio=ratio, bits=16)
        for bits in args.bits:
            run.quantised("reap", label, path, bits, ratio=ratio)
        if ratio == min(args.ratios) and args.stack:
            pruned_25 = path  # kept for REAP + MoBE
        else:
            shutil.rmtree(path)

    for ratio in args.ratios:
        label = f"MoBE {100 * ratio:.0f}%"
        config = _mobe_config(ratio, args)
        native, seconds = run.timed(f"mobe-{ratio}", lambda p, c=config: compress(fixture, p, c, progress=False))
        run.measure("mobe", f"{label} native", native, seconds, ratio=ratio, bits=16)
        for bits in args.bits:
            run.quantised("mobe", f"{label} native", native, bits, ratio=ratio)
        dense, seconds = run.timed(f"mobe-{ratio}-dense", lambda p, n=native: reconstruct(n, p, progress=False))
        for bits in args.bits:
            run.quantised("mobe", f"{label} dense", dense, bits, ratio=ratio)
        shutil.rmtree(dense)
        shutil.rmtree(native)

    if pruned_25 is not None:
        ratio = min(args.ratios)
        label = f"REAP {100 * ratio:.0f}% + MoBE {100 * ratio:.0f}%"
        config = _mobe_config(ratio, args)
        native, seconds = run.timed("reap-mobe", lambda p: compress(pruned_25, p, config, progress=False))
        run.measure("reap+mobe", f"{label} native", native, seconds, ratio=ratio, bits=16)
        run.quantised("reap+mobe", f"{label} native", native, min(args.bits), ratio=ratio)
        shutil.rmtree(native)
        shutil.rmtree(pruned_25)
    return {
        "fixture": fixture.name,
        "shape": {"E": layout.num_experts, "p": layout.intermediate_size, "d": layout.hidden_size},
        "original_perplexity": original["perplexity"],
        "original_bytes": original["bytes"],
        "tokens": int(ids.numel()),
        "rows": run.rows,
        "frontier": frontier(run.rows),
    }


def frontier(rows: list[dict]) -> list[str]:
    """Labels of the rows no other row beats on both bytes and perplexity, smallest first."""
    out = []
    for row in sorted(rows, key=lambda r: (r["bytes"], r["perplexity"])):
        if not out or row["perplexity"] < min(r["perplexity"] for r in rows if r["label"] in out):
            out.append(row["label"])
    return out


def verdicts(result: dict) -> list[str]:
    lines = []
    for name, fixture in result["fixtures"].items():
        rows = {r["label"]: r for r in fixture["rows"]}
        front = fixture["frontier"]
        orig = fixture["original_bytes"]
        steps = ", ".join(
            f"{rows[f]['bytes'] / orig:.0%} of the bytes: {f} (ppl {rows[f]['perplexity']:.2f})" for f in front
        )
        lines.append(f"{name}: frontier {steps}")
        families = dict.fromkeys(rows[f]["family"] for f in front)
        lines.append(f"{name}: families on the frontier: {', '.join(families)}")
    return lines


def budget_table(fixture: dict) -> list[str]:
    """For each variant's size as a budget, the best variant that fits in it."""
    rows = sorted(fixture["rows"], key=lambda r: r["bytes"])
    lines = []
    for budget in rows:
        fits = [r for r in rows if r["bytes"] <= budget["bytes"]]
        best = min(fits, key=lambda r: r["perplexity"])
        lines.append(f"    <= {budget['bytes'] / 2**20:7.2f} MiB: {best['label']} ({best['perplexity']:.3f})")
    return lines


def _precision(row: dict) -> str:
    return "bf16" if row.get("bits", 16) == 16 else f"int{row['bits']}"


def plot(result: dict, path: Path) -> None:
    """Perplexity against stored bytes per fixture: colour the family, marker the precision, hollow the dense
    reconstructions; the frontier as a step line. `python -c` with equal_bytes.plot redraws it from the JSON."""
    plt = pyplot()

    fixtures = result["fixtures"]
    fig, axes = plt.subplots(1, len(fixtures), figsize=(6.5 * len(fixtures), 4.6), dpi=120, squeeze=False)
    markers = {16: "o", 8: "s", 4: "^"}
    colors = {"original": "tab:gray", "reap": "tab:orange", "mobe": "tab:blue", "reap+mobe": "tab:green"}
    for ax, (name, fixture) in zip(axes[0], fixtures.items(), strict=True):
        rows = fixture["rows"]
        for r in rows:
            dense = " dense" in r["label"]
            ax.plot(
                r["bytes"] / 2**20,
                r["perplexity"],
                markers[r.get("bits", 16)],
                color=colors[r["family"]],
                mfc="none" if dense else colors[r["family"]],
                label=f"{r['family']}{' dense' if dense else ''} {_precision(r)}",
            )
        front = sorted((r for r in rows if r["label"] in fixture["frontier"]), key=lambda r: r["bytes"])
        right = max(r["bytes"] for r in rows) / 2**20  # the best perplexity holds to the largest size
        ax.step(
            [r["bytes"] / 2**20 for r in front] + [right],
            [r["perplexity"] for r in front] + [front[-1]["perplexity"]],
            where="post",
            color="black",
            lw=0.8,
            label="frontier",
        )
        ax.set_xlabel("stored bytes of the whole model (MiB)")
        ax.set_ylabel("held-out perplexity")
        ppl = [r["perplexity"] for r in rows]
        if max(ppl) > 3 * min(ppl):  # a log scale only where some variant is far off
            ax.set_yscale("log")
        ax.set_title(f"{name}: {fixture['fixture']}")
        ax.grid(alpha=0.3)
        handles, labels = ax.get_legend_handles_labels()
        unique = dict(zip(labels, handles, strict=True))
        ax.legend(unique.values(), unique.keys(), fontsize=6, ncol=2)
    save_figure(fig, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_options(parser, "equal_bytes", threads=1, fixtures=FIXTURES)
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.25, 0.5])
    parser.add_argument("--bits", type=int, nargs="+", default=[8, 4], choices=[8, 4])
    parser.add_argument(
        "--group-size", type=int, default=64, help="quantisation group (64: the fine fixture's p = 64 is below 128)"
    )
    parser.add_argument("--steps", type=int, default=300, help="MoBE steps per fit")
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--ridge", type=float, default=DEFAULT_RIDGE, help="of MoBE's exact A solves (--ridge)")
    parser.add_argument("--calibration-tokens", type=int, default=16384, help="REAP scoring tokens")
    parser.add_argument("--tokens", type=int, default=16384, help="held-out tokens scored")
    parser.add_argument("--context", type=int, default=256)
    parser.add_argument("--stride", type=int, default=128)
    parser.add_argument("--no-stack", dest="stack", action="store_false", help="skip REAP + MoBE")
    parser.add_argument("--no-lm-eval", dest="lm_eval", action="store_false", help="skip the local lm-eval task")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        result = {"fixtures": {name: run_fixture(name, args, Path(tmp)) for name in args.fixtures}}
    for name, fixture in result["fixtures"].items():
        print(f"\n{name} ({fixture['fixture']}): original {fixture['original_bytes'] / 2**20:.2f} MiB")
        print(f"{'variant':<36} {'MiB':>8} {'bytes':>7} {'resident':>8} {'ppl':>8} {'d ppl':>8} {'acc':>5}")
        for r in sorted(fixture["rows"], key=lambda r: r["bytes"]):
            acc = "" if r["accuracy"] is None else f"{r['accuracy']:.2f}"
            mark = " *" if r["label"] in fixture["frontier"] else ""
            print(
                f"{r['label'] + mark:<36} {r['bytes'] / 2**20:>8.2f} {r['bytes'] / fixture['original_bytes']:>7.1%} "
                f"{r['resident_bytes'] / 2**20:>8.2f} "
                f"{r['perplexity']:>8.3f} {r['perplexity'] - fixture['original_perplexity']:>+8.3f} {acc:>5}"
            )
        print("  best within each budget:")
        print("\n".join(budget_table(fixture)))
    result["verdicts"] = verdicts(result)
    result["command"] = " ".join(["python", *sys.argv])
    print("\n" + "\n".join(result["verdicts"]))
    write_results(result, args, start, plot, args.out)


# --- tables for README.md and docs/ (written by benchmarks/tables.py from this script's JSON) ---
def table(result: dict) -> str:
    """Every variant of equal_bytes.py by stored bytes, one block per fixture; the frontier marked."""
    lines = []
    for name, fixture in result["fixtures"].items():
        orig_ppl, orig_bytes = fixture["original_perplexity"], fixture["original_bytes"]
        lines.append(
            f"**{name}** (`{fixture['fixture']}`, {orig_bytes / 2**20:.2f} MiB of weights, perplexity {orig_ppl:.2f})"
        )
        lines.append("")
        lines.append("| variant | MiB stored | of the original | MiB resident | perplexity | d ppl | acc (10 q.) |")
        lines.append("|---|---:|---:|---:|---:|---:|---:|")
        for r in sorted(fixture["rows"], key=lambda r: (r["bytes"], r["perplexity"])):
            label = f"**{r['label']}** *" if r["label"] in fixture["frontier"] else r["label"]
            acc = "" if r.get("accuracy") is None else f"{r['accuracy']:.1f}"
            lines.append(
                f"| {label} | {r['bytes'] / 2**20:.2f} | {100 * r['bytes'] / orig_bytes:.1f}% | "
                f"{r['resident_bytes'] / 2**20:.2f} | "
                f"{r['perplexity']:.3f} | {r['perplexity'] - orig_ppl:+.3f} | {acc} |"
            )
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def summary_sentence(name: str, fixture: dict) -> str:
    """Where quantising the original alone stands against the factorised and pruned variants, in one sentence."""
    rows = {r["label"]: r for r in fixture["rows"]}
    quantised = [rows[f] for f in fixture["frontier"] if rows[f]["family"] == "original" and rows[f]["bits"] < 16]
    if not quantised:
        return f"On {name}, quantising the original alone is not on the frontier."
    q = min(quantised, key=lambda r: r["bytes"])
    others = [r for r in fixture["rows"] if r["family"] != "original" and r["bytes"] >= q["bytes"]]
    beaten = sum(r["perplexity"] > q["perplexity"] for r in others)
    below = [f for f in fixture["frontier"] if rows[f]["bytes"] < q["bytes"]]
    pct = 100 * q["bytes"] / fixture["original_bytes"]
    text = (
        f"On {name}, the original in int{q['bits']} alone ({pct:.0f}% of the bytes, "
        f"{q['perplexity'] - fixture['original_perplexity']:+.2f} perplexity) beats {beaten} of the {len(others)} "
        "factorised or pruned variants as large or larger"
    )
    if below:
        return text + f"; below its size the frontier is {', '.join(below)}."
    return text + "; nothing smaller was measured."


def summary(result: dict) -> str:
    """The README's view: one sentence per fixture, then the frontier (the best variant at each size)."""
    lines = [" ".join(summary_sentence(n, f) for n, f in result["fixtures"].items()), ""]
    lines += ["| fixture | frontier variant | of the original bytes | d ppl |", "|---|---|---:|---:|"]
    for name, fixture in result["fixtures"].items():
        rows = {r["label"]: r for r in fixture["rows"]}
        lines += [_bytes_row(name, fixture, rows[label]) for label in fixture["frontier"]]
    return "\n".join(lines) + "\n"


def _bytes_row(name: str, fixture: dict, row: dict) -> str:
    """| fixture | variant | share of the original's bytes | perplexity increase |"""
    return (
        f"| {name} | {row['label']} | {100 * row['bytes'] / fixture['original_bytes']:.1f}% | "
        f"{row['perplexity'] - fixture['original_perplexity']:+.3f} |"
    )


def mobe_table(result: dict) -> str:
    """The MoBE rows of an equal_bytes.py run (e.g. with --ridge): size and perplexity increase per variant."""
    lines = ["| fixture | variant | of the original bytes | d ppl |", "|---|---|---:|---:|"]
    for name, fixture in result["fixtures"].items():
        lines += [_bytes_row(name, fixture, r) for r in fixture["rows"] if r["family"] in ("mobe", "reap+mobe")]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
