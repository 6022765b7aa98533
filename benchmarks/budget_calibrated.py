"""`mobe compress --target-bytes F --calibration TEXT` between the original's GPTQ-int2 and GPTQ-int3 sizes, against
the field's own recipes at no larger size: llm-compressor's GPTQ (uniform bits) and REAP + int4.

For each trained fixture the calibrated planner (`mobe.plan.mixed`) measures once, on the first
--calibration-tokens tokens of the fixture's training-side text: REAP 0/25/50% and, per MoE layer and matrix, GPTQ
at 2/3/4/8 bits, each as the error it adds to the layers' outputs. At each budget (the original's int2 and int3
sizes at the planner's group size, points between them, and --budgets shares) the chosen plan is written
(`execute_mixed`: REAP, then GPTQ with per-matrix bits), its bytes are checked against the prediction and its
held-out perplexity is measured (`mobe.load_model`, which reads each matrix at its own bits). The chosen plan is the
one `mobe compress` writes: of each REAP share's best allocation, the least calibration loss (`score_choices`);
with --proxy also the least predicted error where that differs. Also the best uniform
plan at each budget with --uniform (one bit width for every expert matrix, what plain transformers loads).

The competitors: llm-compressor's GPTQModifier at 8/4/3/2 bits from benchmarks/results/gptq_baselines.json (same
fixtures, held-out tokens, window and calibration text; it needs its own virtual environment, so it is not rerun
here), and REAP 25% / 50% + int4 measured here, both round-to-nearest (`mobe compress --method reap --quantize
int4`) and GPTQ on the same text. The verdict at each budget: strictly lower perplexity than the best of them that
fits.

    OMP_NUM_THREADS=2 python benchmarks/budget_calibrated.py [--fixtures coarse fine] [--between 3]

Prints a table and verdicts, writes benchmarks/results/budget_calibrated.json and .png.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoTokenizer

from data_free import _calibration_text
from mobe.config import QuantizeConfig
from mobe.evaluate.perplexity import sliding_window_perplexity
from mobe.fixtures import FINE_FIXTURE, TRAINED_FIXTURE, trained_fixture_path
from mobe.plan.mixed import MixedPlan, execute_mixed, plan_mixed, score_choices
from mobe.prune import prune_experts
from mobe.quantize import stored_bytes
from mobe.runtime import load_model
from results_io import add_run_options, pyplot, rewrite_verdicts, save_figure, verdict_lines, write_results

HERE = Path(__file__).resolve().parent
FIXTURES = {"coarse": TRAINED_FIXTURE, "fine": FINE_FIXTURE}


def _perplexity(path: Path, ids: torch.Tensor, args: argparse.Namespace) -> float:
    model = load_model(path, dtype=torch.float32)
    return sliding_window_perplexity(model, ids, context=args.context, stride=args.stride, progress=False).perplexity


def _llm_compressor(name: str) -> list[dict]:
    """llm-compressor's GPTQ rows of benchmarks/gptq_baselines.json for this fixture (empty when not run)."""
    path = HERE / "results" / "gptq_baselines.json"
    if not path.exists():
        return []
    rows = json.loads(path.read_text())["fixtures"].get(name, {}).get("rows", [])
    return [
        {"label": f"llm-compressor GPTQ int{r['bits']}", "stored_bytes": r["bytes"], "perplexity": r["perplexity"]}
        for r in rows
        if r["method"] == "llm-compressor GPTQ"
    ]


def _budgets(plan: MixedPlan, args: argparse.Namespace) -> list[tuple[str, int]]:
    """(name, bytes): the original's int2 and int3 sizes, `--between` points strictly between, and the shares."""
    low, high = plan.uniform(2).stored_bytes, plan.uniform(3).stored_bytes
    out = [("int2 size", low)]
    out += [
        (f"{i}/{args.between + 1} of the way", low + i * (high - low) // (args.between + 1))
        for i in range(1, args.between + 1)
    ]
    out.append(("int3 size", high))
    out += [(f"{100 * s:.0f}%", int(s * plan.original_bytes)) for s in args.budgets]
    return out


def run_fixture(name: str, args: argparse.Namespace, tmp: Path) -> dict:
    fixture = trained_fixture_path(FIXTURES[name])
    ids = AutoTokenizer.from_pretrained(fixture)((fixture / "heldout.txt").read_text(), return_tensors="pt").input_ids
    ids = ids[0][: args.tokens]
    text = _calibration_text(fixture, tmp)
    quantize = QuantizeConfig(calibration_tokens=args.calibration_tokens, calibration_seq_len=args.context)
    original = _perplexity(fixture, ids, args)
    plan = plan_mixed(fixture, 1.0, calibration=text, quantize=quantize, progress=False)
    print(plan.with_budget(plan.uniform(3).stored_bytes).table(), flush=True)

    competitors = _llm_compressor(name)
    for share in (0.25, 0.5):
        for how in ("round to nearest", "GPTQ"):
            out = tmp / f"{name}-reap{share}-{how[:4]}"
            start = time.perf_counter()
            config = QuantizeConfig(
                bits=4,
                group_size=plan.group_size,
                calibration=str(text) if how == "GPTQ" else None,
                calibration_tokens=args.calibration_tokens,
                calibration_seq_len=args.context,
            )
            prune_experts(
                fixture,
                out,
                target_ratio=share,
                calibration=text,
                calibration_tokens=args.calibration_tokens,
                calibration_seq_len=args.context,
                quantize=config,
                progress=False,
            )
            label = f"REAP {100 * share:.0f}% + int4 {how}"
            row = {"label": label, "stored_bytes": stored_bytes(out), "perplexity": _perplexity(out, ids, args)}
            row["seconds"] = time.perf_counter() - start
            competitors.append(row)
            print(f"  {label}: {row['stored_bytes'] / 2**20:.3f} MiB ppl {row['perplexity']:.3f}", flush=True)

    written: dict[tuple, dict] = {}

    def measure(choice) -> dict:
        key = (choice.share, tuple(sorted(choice.allocation.items())))
        if key not in written:
            out = tmp / f"{name}-plan{len(written)}"
            start = time.perf_counter()
            execute_mixed(plan, fixture, out, quantize, choice=choice, progress=False)
            written[key] = {
                "label": choice.label(),
                "predicted_bytes": choice.stored_bytes,
                "stored_bytes": stored_bytes(out),
                "predicted_error": choice.predicted_error,
                "perplexity": _perplexity(out, ids, args),
                "seconds": time.perf_counter() - start,
                "allocation": {f"{layer}.{m}": b for (layer, m), b in choice.allocation.items()},
            }
        return written[key]

    rows = []
    for label, budget in _budgets(plan, args):
        sized = plan.with_budget(budget)
        row = {"budget": label, "budget_bytes": budget, "share": budget / plan.original_bytes}
        scoring = time.perf_counter()
        scored = score_choices(sized, fixture, quantize, progress=False)
        row["scored"] = [{"label": s.choice.label(), "calibration_perplexity": math.exp(s.loss)} for s in scored]
        row["score_seconds"] = time.perf_counter() - scoring
        chosen = scored[0].choice if scored else None
        if args.proxy and sized.chosen is not None and sized.chosen != chosen:
            row["proxy_plan"] = measure(sized.chosen)  # least predicted error, before scoring
        uniform = [plan.uniform(b, branch.share) for branch in plan.branches for b in (2, 3, 4, 8)]
        uniform = [u for u in uniform if u.stored_bytes <= budget]
        if chosen is not None:
            row["plan"] = measure(chosen)
        if uniform and args.uniform:
            row["uniform_plan"] = measure(min(uniform, key=lambda u: u.predicted_error))
        within = [c for c in competitors if c["stored_bytes"] <= budget]
        row["best_competitor"] = min(within, key=lambda c: c["perplexity"]) if within else None
        rows.append(row)
        if chosen is not None:
            print(f"  {label}: {row['plan']['label']} ppl {row['plan']['perplexity']:.3f}", flush=True)
    return {
        "fixture": FIXTURES[name],
        "original_perplexity": original,
        "original_bytes": plan.original_bytes,
        "group_size": plan.group_size,
        "plan_seconds": plan.seconds,
        "calibration_tokens": plan.tokens,
        "competitors": competitors,
        "rows": rows,
    }


def verdicts(result: dict) -> list[str]:
    """Per budget between the int2 and int3 sizes (and the shares): the plan strictly below the best competitor."""
    out = []
    for name, fixture in result["fixtures"].items():
        base = fixture["original_perplexity"]
        for row in fixture["rows"]:
            plan, best = row.get("plan"), row.get("best_competitor")
            where = f"{name} {row['budget']} ({100 * row['share']:.1f}%)"
            if plan is None:
                out.append(f"{where}: nothing fits")
                continue
            exact = "yes" if plan["stored_bytes"] == plan["predicted_bytes"] else "NO"
            line = f"{where}: {plan['label']} {plan['perplexity'] - base:+.3f} (bytes as predicted: {exact})"
            if best is None:
                out.append(f"{line}; no competitor fits")
                continue
            proxy = row.get("proxy_plan")
            if proxy is not None:
                line += f"; least predicted error: {proxy['label']} {proxy['perplexity'] - base:+.3f}"
            lower = plan["perplexity"] < best["perplexity"]
            line += f" against {best['label']} {best['perplexity'] - base:+.3f}: "
            line += "strictly lower: yes" if lower else f"NO, higher by {plan['perplexity'] - best['perplexity']:.3f}"
            out.append(line)
    return out


def table(result: dict) -> str:
    lines = []
    for name, fixture in result["fixtures"].items():
        base = fixture["original_perplexity"]
        lines += [
            f"**{name}** (`{fixture['fixture']}`, {fixture['original_bytes'] / 2**20:.2f} MiB, perplexity {base:.2f}; "
            f"plan measured on {fixture['calibration_tokens']} calibration tokens in {fixture['plan_seconds']:.0f} s, "
            f"groups of {fixture['group_size']})",
            "",
            "| budget | % of orig. | plan (calibrated) | d ppl | best uniform plan | d ppl | best competitor within "
            "| d ppl |",
            "|---|---:|---|---:|---|---:|---|---:|",
        ]
        for r in fixture["rows"]:
            plan, uniform, best = r.get("plan"), r.get("uniform_plan"), r.get("best_competitor")

            def cell(x, base=base):
                return (x["label"], f"{x['perplexity'] - base:+.3f}") if x else ("", "")

            lines.append(
                f"| {r['budget']} | {100 * r['share']:.1f}% | {' | '.join(cell(plan))} | {' | '.join(cell(uniform))} | "
                f"{' | '.join(cell(best))} |"
            )
        lines += [
            "",
            "Competitors: "
            + "; ".join(
                f"{c['label']} {c['stored_bytes'] / 2**20:.2f} MiB {c['perplexity'] - base:+.3f}"
                for c in fixture["competitors"]
            ),
            "",
        ]
    return "\n".join(lines + verdict_lines(result)).rstrip() + "\n"


def plot(result: dict, path: Path) -> None:
    plt = pyplot()
    names = list(result["fixtures"])
    fig, axes = plt.subplots(1, len(names), figsize=(6 * len(names), 4), dpi=120, squeeze=False)
    for ax, name in zip(axes[0], names, strict=True):
        fixture = result["fixtures"][name]
        base = fixture["original_perplexity"]
        mib = 2**20
        for i, c in enumerate(fixture["competitors"]):
            ax.scatter(
                c["stored_bytes"] / mib, c["perplexity"] - base, s=25, marker="s", color=f"C{i % 10}", label=c["label"]
            )
        for key, style, label in (("plan", "-o", "calibrated plan"), ("uniform_plan", "--^", "best uniform plan")):
            points = sorted({(r[key]["stored_bytes"], r[key]["perplexity"]) for r in fixture["rows"] if r.get(key)})
            ax.plot([b / mib for b, _ in points], [p - base for _, p in points], style, color="black", label=label)
        ax.set_xlabel("MiB stored (whole checkpoint)")
        ax.set_ylabel("held-out perplexity change")
        ax.set_yscale("symlog", linthresh=1)
        ax.set_title(name)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    save_figure(fig, path)


def _merge(args: argparse.Namespace) -> None:
    """One result from runs of different fixtures (each process one fixture, so two cores run both at once)."""
    runs = [json.loads(Path(path).read_text()) for path in args.merge]
    result = {"fixtures": {name: f for run in runs for name, f in run["fixtures"].items()}}
    result["verdicts"] = verdicts(result)
    result["merged_from"] = [
        {"path": path, "args": run["args"], "seconds": run["seconds"]}
        for path, run in zip(args.merge, runs, strict=True)
    ]
    print(table(result))
    stem = Path(args.out)
    stem.with_suffix(".json").write_text(
        json.dumps({**result, "args": runs[0]["args"], "seconds": max(run["seconds"] for run in runs)}, indent=1)
    )
    plot(result, stem.with_suffix(".png"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budgets", type=float, nargs="*", default=[0.25, 0.3, 0.35, 0.4])
    parser.add_argument("--between", type=int, default=2, help="budgets strictly between the int2 and int3 sizes")
    parser.add_argument("--calibration-tokens", type=int, default=16384)
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--context", type=int, default=256, help="also the calibration sequences' length")
    parser.add_argument("--stride", type=int, default=128)
    parser.add_argument(
        "--uniform", action="store_true", help="also write and measure the best uniform plan (one width) per budget"
    )
    add_run_options(parser, "budget_calibrated", threads=2, fixtures=list(FIXTURES))
    parser.add_argument(
        "--proxy",
        action="store_true",
        help="also write and measure the allocation with the least predicted error where scoring chose another",
    )
    parser.add_argument("--reverdict", action="store_true", help="recompute the verdicts of the JSON at --out")
    parser.add_argument(
        "--merge", nargs="+", metavar="JSON", help="join runs of separate fixtures (run side by side) into --out"
    )
    args = parser.parse_args()
    if args.reverdict:
        return rewrite_verdicts(args.out, verdicts)
    if args.merge:
        return _merge(args)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        result = {"fixtures": {name: run_fixture(name, args, Path(tmp)) for name in args.fixtures}}
    result["verdicts"] = verdicts(result)
    print("\n" + table(result))
    write_results(result, args, start, plot, args.out)


if __name__ == "__main__":
    main()
