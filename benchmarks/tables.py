"""Write the markdown tables of the README and docs/ from the benchmarks' JSON (no figure is typed by hand).

Each table sits between `<!-- NAME:start -->` and `<!-- NAME:end -->` markers in the target file; this script
replaces what is between them.

    python benchmarks/tables.py            # after python benchmarks/data_free.py
    python benchmarks/tables.py --results benchmarks/results/quick --print   # show, write nothing
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"


METHOD_LABELS = {"mobe": "mobe, paper settings", "default": "**mobe default** (`--target-ratio` alone)"}


def data_free_table(result: dict, calibrated: bool = False) -> str:
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


def factor_rounding_table(result: dict) -> str:
    """factor_rounding.py: relative weight error of each fit (rows) with its factors rounded each way (columns)."""
    from factor_rounding import ROUNDINGS

    head = "| fixture | fit | r | " + " | ".join(ROUNDINGS) + " | s |"
    lines = [head, "|---|---|---:|" + "---:|" * (len(ROUNDINGS) + 1)]
    for r in result["rows"]:
        cells = " | ".join(f"{r['errors'][k]:.4f}" for k in ROUNDINGS)
        lines.append(f"| {r['fixture']} | {r['variant']} | {r['rank']} | {cells} | {r['seconds']:.0f} |")
    return "\n".join(lines + _verdict_lines(result)) + "\n"


def recipe_table(result: dict) -> str:
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
        f"Relative weight error after {steps} steps of each iterative fit; verdict: {result['summary']['verdict']}."
    )
    return "\n".join(lines) + "\n"


def compare_table(result: dict, details: bool = True) -> str:
    """compare.py on the trained model: one row per method and cut; the best error and perplexity of each cut bold."""
    rows = result["rows"]
    best = {
        ratio: (
            min(r["mean_relative_error"] for r in rows if r["target_ratio"] == ratio),
            min(r["perplexity_change"] for r in rows if r["target_ratio"] == ratio),
        )
        for ratio in {r["target_ratio"] for r in rows}
    }
    original = f"Original held-out perplexity {result['original_perplexity']:.2f} ({result['tokens']} tokens).\n\n"
    head = "| method | target | rank | expert params cut |" + (" model params |" if details else "")
    head += " mean rel. error | perplexity | change |" + (" seconds |" if details else "")
    lines = [head, "|---|" + "---:|" * (8 if details else 6)]
    for r in rows:
        err_min, ppl_min = best[r["target_ratio"]]
        err_best, ppl_best = r["mean_relative_error"] == err_min, r["perplexity_change"] == ppl_min
        cells = [r["method"], f"{r['target_ratio']:.2f}", str(r["rank"]), f"{100 * r['expert_reduction']:.1f}%"]
        cells += [f"{r['model_params']:,}"] if details else []
        cells += [
            _bold(f"{r['mean_relative_error']:.4f}", err_best),
            _bold(f"{r['perplexity']:.2f}", ppl_best),
            _bold(f"{r['perplexity_change']:+.2f}", ppl_best),
        ]
        cells += [f"{r['seconds']:.1f}"] if details else []
        lines.append("| " + " | ".join(cells) + " |")
    return original + "\n".join(lines) + "\n"


def compare_synthetic_table(result: dict) -> str:
    """compare.py on its synthetic layer: weight error per method and cut, the best of each cut bold."""
    rows = result["synthetic"]
    best = {
        ratio: min(r["relative_error"] for r in rows if r["target_ratio"] == ratio)
        for ratio in {r["target_ratio"] for r in rows}
    }
    lines = ["| method | target | rank | parameters | relative error |", "|---|---:|---:|---:|---:|"]
    for r in rows:
        error = _bold(f"{r['relative_error']:.4f}", r["relative_error"] == best[r["target_ratio"]])
        lines.append(f"| {r['method']} | {r['target_ratio']:.2f} | {r['rank']} | {r['params']:,} | {error} |")
    return "\n".join(lines) + "\n"


def _bold(text: str, on: bool) -> str:
    return f"**{text}**" if on else text


def distill_table(result: dict) -> str:
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


def calibration_memory_table(result: dict) -> str:
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


def reap_table(result: dict) -> str:
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


def paper_parity_table(result: dict) -> str:
    """Final relative error of the authors' train.py and of `--schedule paper` on the same layer, side by side."""
    threads = result.get("args", {}).get("threads")
    lines = [
        f"E={result['E']}, p={result['p']}, d={result['d']}, m={result['m']}, r={result['r']}, {result['steps']} steps"
        + (f", {threads} CPU threads each" if threads else "")
        + ":",
        "",
        "| activation | matrix | authors' relative error | ours | relative difference | gap between reconstructions |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        diff = abs(r["ours_relative_error"] / r["authors_relative_error"] - 1)
        lines.append(
            f"| {r['activation']} | {r['matrix']} | {r['authors_relative_error']:.8f} | {r['ours_relative_error']:.8f} "
            f"| {diff:.1e} | {r['reconstructions_relative_gap']:.1e} |"
        )
    return "\n".join(lines) + "\n"


def schedules_table(result: dict) -> str:
    """Per stack: each schedule's steps, seconds and final error, and when `fast` reached the paper's final error."""
    lines = [
        "| stack | E x p x d | r | m | paper steps | paper s | paper error | fast steps | fast s | fast error "
        "| fast reaches paper's error at | (step) | speedup |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in result["rows"]:
        paper, fast = row["paper"], row["fast"]
        best = min(paper["relative_error"], fast["relative_error"])
        errors = [
            f"**{e:.5f}**" if e == best else f"{e:.5f}" for e in (paper["relative_error"], fast["relative_error"])
        ]
        reach = "never" if fast["reaches_paper_at"] is None else f"{fast['reaches_paper_at']:.1f} s"
        step = "" if fast["reaches_paper_step"] is None else str(fast["reaches_paper_step"])
        speedup = "" if fast["speedup"] is None else f"{fast['speedup']:.1f}x"
        lines.append(
            f"| {row['label']} ({row['kind']}) | {' x '.join(map(str, row['shape']))} | {row['rank']} | "
            f"{row['num_bases']} | {paper['steps']} | {paper['seconds']:.1f} | {errors[0]} | {fast['steps']} | "
            f"{fast['seconds']:.1f} | {errors[1]} | {reach} | {step} | {speedup} |"
        )
    summary = result["summary"]
    lines += ["", f"Verdict: {summary['verdict']} (the default schedule is `{summary['default_schedule']}`)."]
    for name, entry in result.get("perplexity", {}).items():
        cells = ", ".join(
            f"{s} {entry[s]['perplexity']:.3f} ({entry[s]['perplexity'] - entry['original']:+.3f}"
            + (
                f", mean relative error {entry[s]['mean_relative_error']:.4f}"
                if "mean_relative_error" in entry[s]
                else ""
            )
            + f", compress {entry[s]['compress_seconds']:.0f} s)"
            for s in ("paper", "fast")
        )
        tokens = f"{entry['tokens']} tokens" if "tokens" in entry else f"at most {entry['tokens_at_most']} tokens"
        source = f"; read from the printed lines of `{entry['from_log']}`" if "from_log" in entry else ""
        lines.append(
            f"Held-out perplexity of `{name}` with MoE layer(s) {', '.join(map(str, entry['layers']))} compressed "
            f"(gate and up, {tokens}{source}): original {entry['original']:.3f}; {cells}."
        )
    return "\n".join(lines) + "\n"


def equal_bytes_table(result: dict) -> str:
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


def equal_bytes_sentence(name: str, fixture: dict) -> str:
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


def equal_bytes_summary(result: dict) -> str:
    """The README's view: one sentence per fixture, then the frontier (the best variant at each size)."""
    lines = [" ".join(equal_bytes_sentence(n, f) for n, f in result["fixtures"].items()), ""]
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


def equal_bytes_mobe_table(result: dict) -> str:
    """The MoBE rows of an equal_bytes.py run (e.g. with --ridge): size and perplexity increase per variant."""
    lines = ["| fixture | variant | of the original bytes | d ppl |", "|---|---|---:|---:|"]
    for name, fixture in result["fixtures"].items():
        lines += [_bytes_row(name, fixture, r) for r in fixture["rows"] if r["family"] in ("mobe", "reap+mobe")]
    return "\n".join(lines) + "\n"


def calibration_table(result: dict) -> str:
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
        cut = "" if r["variant"] == "plain" else _bold(f"{100 * r['increase_cut']:.0f}%", on)
        ppl, change = _bold(f"{r['perplexity']:.3f}", on), _bold(f"{r['perplexity_change']:+.3f}", on)
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
    lines += [str(v) for v in _verdict_lines(result)]
    return "\n".join(lines) + "\n"


def inference_memory_table(result: dict) -> str:
    """inference_memory.py: per variant, checkpoint size, peak RSS per phase and speed; then its verdicts."""
    a = result["args"]
    experts = a["layers"] * 3 * a["experts"] * a["intermediate"] * a["hidden"] * 4 / 2**20
    names = {
        "original": "original (transformers)",
        "dense": "dense reconstruction of the same factors",
        "native": "native MoBE",
        "native+cache": f"native MoBE, {a['cache_mib']:g} MiB cache",
        "materialising": "all-experts-materialising (authors' scheme)",
    }
    lines = [
        f"qwen3_moe, {a['layers']} layers x {a['experts']} experts of {a['intermediate']}, hidden {a['hidden']} "
        f"({experts:.0f} MiB of float32 experts); MoBE m={a['bases']}, r={a['rank']}; prefill {a['prefill']} tokens, "
        f"then {a['decode']} greedy decoding steps; each variant in a fresh process, peak RSS (MiB) per phase.",
        "",
        f"| variant | checkpoint MiB | baseline RSS | peak RSS load | peak RSS prefill {a['prefill']} | "
        "peak RSS decode | prefill tok/s | decode tok/s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {names.get(r['variant'], r['variant'])} | {r['checkpoint_mib']:.0f} | {r['baseline_rss_mib']:.0f} | "
            f"{r['peak_rss_after_load_mib']:.0f} | {r['peak_rss_prefill_mib']:.0f} | {r['peak_rss_decode_mib']:.0f} | "
            f"{r['prefill_tokens_per_s']:.0f} | {r['decode_tokens_per_s']:.1f} |"
        )
    lines += [
        "",
        f"Native peak RSS above its baseline: {result['checks']['native_peak_over_checkpoint']:.2f}x its "
        "checkpoint (no target: activations and the workspace come on top).",
    ]
    lines += _verdict_lines(result)
    return "\n".join(lines) + "\n"


def inference_memory_summary(result: dict) -> str:
    """One sentence for docs/runtime.md: decoding speed against the original, never rounded across its target."""
    from results_io import ratio_text

    checks, cache = result["checks"], result["args"]["cache_mib"]
    peak = {
        r["variant"]: max(r[k] for k in ("peak_rss_after_load_mib", "peak_rss_prefill_mib", "peak_rss_decode_mib"))
        for r in result["rows"]
    }
    return (
        f"Measured by `benchmarks/inference_memory.py` (`benchmarks/results/inference_memory.json`): native MoBE "
        f"peaks at {peak['native']:.0f} MiB of RSS against the original's {peak['original']:.0f} MiB; without a "
        f"cache it decodes at {ratio_text(checks['decode_speed_native_vs_original'], 0.5)}x the original's speed, "
        f"with a {cache:g} MiB cache at {ratio_text(checks['decode_speed_native_cache_vs_original'], 0.5)}x "
        f"([results.md](results.md#inference-keeps-the-memory-it-saved)).\n"
    )


def compress_memory_table(result: dict) -> str:
    """compress_memory.py: peak RSS above each process's baseline against the number of layers; its verdicts."""
    a = result["args"]
    lines = [
        f"qwen3_moe, hidden {a['hidden']}, {a['experts']} experts of {a['intermediate']} (float32), "
        f"MoBE m={a['bases']}, r={a['rank']}, {a['steps']} steps, {a['threads']} threads; "
        "each compression in a fresh process.",
        "",
        "| MoE layers | output | checkpoint MiB | one layer's experts MiB | baseline RSS MiB | peak RSS MiB "
        "| peak above baseline MiB | in layers | s |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['layers']} | {r['format']} | {r['checkpoint_mib']:.0f} | {r['layer_experts_mib']:.0f} | "
            f"{r['baseline_rss_mib']:.0f} | {r['peak_rss_mib']:.0f} | {r['above_baseline_mib']:.0f} | "
            f"{r['above_baseline_mib'] / r['layer_experts_mib']:.2f} | {r['seconds']:.0f} |"
        )
    lines += _verdict_lines(result)
    return "\n".join(lines) + "\n"


def memory_estimates_table(result: dict) -> str:
    """memory_estimates.py: its own `table` (estimate against measured peak per model and command), its verdicts."""
    from memory_estimates import table

    return "\n".join([table(result), *_verdict_lines(result)]) + "\n"


def ray_scaling_table(result: dict) -> str:
    """ray_scaling.py: wall time per runner, the bit-identity verdict (if the JSON has it), and the projections."""
    a = result["args"]
    runs = result["runs"]
    lines = [
        f"{runs[0]['jobs']} jobs (gate and up of {a['layers']} MoE layers), E={a['experts']}, p={a['intermediate']}, "
        f"d={a['hidden']}, m={a['bases']}, r={a['rank']}, {a['steps']} Adam steps, one thread per job.",
        "",
        "| runner | cluster start | wall time | vs single process | summed job time | Ray overhead per job |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in runs:
        start = "-" if r["workers"] == 1 and r["runner"] == "single process" else f"{r['cluster_start_s']:.1f} s"
        lines.append(
            f"| {r['runner']} | {start} | {r['compress_s']:.1f} s | {r['speedup_vs_single_process']:.2f}x | "
            f"{sum(r['job_seconds']):.1f} s | {r['overhead_per_job_s']:.2f} s |"
        )
    one, two = runs[1], runs[2]
    lines += [
        "",
        f"2 workers against 1: {one['compress_s'] / two['compress_s']:.2f}x faster "
        f"({two['compress_s'] / one['compress_s']:.2f}x the time); "
        f"the summed fitting time of the jobs goes from {sum(one['job_seconds']):.1f} s to "
        f"{sum(two['job_seconds']):.1f} s (two jobs share the memory bandwidth).",
    ]
    if "tensors_sha256" not in runs[0]:
        lines.append(
            "This JSON predates the bit-identity check: it holds no digest of the written tensors (rerun "
            "`python benchmarks/ray_scaling.py` to check it)."
        )
    lines += _verdict_lines(result)
    proj = result["projections"]
    gpus = sorted({p["gpus"] for p in proj})
    lines += [
        "",
        f"On paper, at an **assumed** sustained {proj[0]['gpu_tflops_assumed']:g} TFLOP/s fp32 per GPU (this CPU "
        f"sustained {result['cpu_gflop_s_per_job']:.1f} GFLOP/s per one-thread job): wall time = ceil(jobs / GPUs) x "
        "one job's FLOP count / that rate.",
        "",
        "| model | jobs | hours per job | " + " | ".join(f"{g} GPUs" for g in gpus) + " |",
        "|---|---:|---:|" + "---:|" * len(gpus),
    ]
    models = result.get("models", {})
    for model in dict.fromkeys(p["model"] for p in proj):
        rows = {p["gpus"]: p for p in proj if p["model"] == model}
        first = rows[gpus[0]]
        m = models.get(model)
        name = (
            f"{model} ({m['moe_layers']} MoE layers, E={m['E']}, m={m['m']}"
            + (f" in {m['groups']} groups" if m["groups"] > 1 else "")
            + f", {m['steps']:,} steps)"
            if m
            else model
        )
        lines.append(
            f"| {name} | {first['jobs']} | {first['job_hours']:.1f} | "
            + " | ".join(f"{rows[g]['wall_hours']:.1f} h" for g in gpus)
            + " |"
        )
    return "\n".join(lines) + "\n"


def ray_scaling_summary(result: dict) -> str:
    """One sentence for docs/scale-out.md."""
    one, two = result["runs"][1], result["runs"][2]
    bits = (
        result["verdicts"]["same_bits"]
        if isinstance(result.get("verdicts"), dict)
        else "the bit-identity check is not in this JSON (it predates the check)"
    )
    return (
        f"Measured by `benchmarks/ray_scaling.py` (`benchmarks/results/ray_scaling.json`): 2 one-CPU Ray workers "
        f"finish in {two['compress_s'] / one['compress_s']:.2f}x the time of 1; {bits}.\n"
    )


def run_all_table(results: Path) -> str:
    """Every run of run_all.py: its command and the seconds its JSON recorded, and their sum."""
    from run_all import RUNS

    lines = ["| benchmark | command (`python benchmarks/...`) | seconds recorded |", "|---|---|---:|"]
    total, missing = 0.0, []
    for run in RUNS:
        path = results / f"{run.name}.json"
        result = json.loads(path.read_text()) if path.exists() else {}
        seconds, merged = result.get("seconds"), result.get("args", {}).get("merge")
        if seconds is None or merged:
            missing.append(run.name)
            cell = "no JSON: not run" if not result else "merged from separate runs" if merged else "not recorded"
        else:
            total += seconds
            cell = f"{seconds:.0f}"
        lines.append(f"| {run.name} | `{f'{run.script} {run.full}'.strip()}` | {cell} |")
    lines += [
        "",
        f"Recorded total: {total:.0f} s ({total / 3600:.1f} h)"
        + (f", plus {', '.join(missing)}, which record no single run time" if missing else "")
        + ". The runs happened at different times on a shared 2-core machine: the sum is a guide, not a measurement.",
    ]
    full = results / "run_all.json"
    if full.exists():
        f = json.loads(full.read_text())
        lines.append("")
        lines.append(
            f"Last full `python benchmarks/run_all.py`: {f['seconds']:.0f} s wall ({f['seconds'] / 3600:.1f} h), load "
            f"average (1 min) {f['load_before'][0]:.1f} before and {f['load_after'][0]:.1f} after ({f['finished']})."
        )
    quick = results / "run_all_quick.json"
    if quick.exists():
        q = json.loads(quick.read_text())
        lines.append("")
        lines.append(
            f"`python benchmarks/run_all.py --quick`: {q['seconds']:.0f} s wall ({q['seconds'] / 60:.1f} min) and "
            f"{q['cpu_seconds']:.0f} s of CPU time on {q['cpus']} cores, load average (1 min) "
            f"{q['load_before'][0]:.1f} before and {q['load_after'][0]:.1f} after "
            f"(OMP_NUM_THREADS={q['omp_num_threads']}; {q['finished']})."
        )
    return "\n".join(lines) + "\n"


def fixtures_table(stats: dict[str, dict]) -> str:
    """The trained fixtures' training_stats.json (written by scripts/train_fixture.py): what each was trained on,
    for how long, and what it learned."""
    lines = [
        "| fixture | parameters | shards (MB) | documents train / held out | steps x batch x tokens | epochs "
        "| training time | held-out perplexity (tokens) | experts' distance from init | experts almost never chosen "
        "| busiest expert / fair share |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, (folder, st) in stats.items():
        c, held = st["config"], st["heldout"]
        shards = sorted(folder.glob("*.safetensors"))
        size = sum(p.stat().st_size for p in shards) / 1e6
        distance = [v for layer in st["expert_distance_from_init"].values() for v in layer.values()]
        usage = st["expert_usage_heldout"]
        unused = sum(sum(1 for share in layer if share == 0) for layer in usage.values())
        routed = sum(len(layer) for layer in usage.values())
        busiest = max(max(layer) * len(layer) for layer in usage.values())
        lines.append(
            f"| `{name}` | {st['parameters'] / 1e6:.1f} M | {len(shards)} ({size:.0f}) | "
            f"{st['documents']['train']} / {st['documents']['heldout']} | {st['steps']} x {c['batch_size']} x "
            f"{c['seq_len']} | {st['epochs']:.1f} | {st['train_wall_seconds'] / 60:.0f} min | "
            f"{held['perplexity']:.1f} ({held['tokens']:,}) | {min(distance):.1f}-{max(distance):.1f}x | "
            f"{unused} of {routed} | {busiest:.1f}x |"
        )
    lines += [
        "",
        f"Perplexity: context {held['context']}, stride {held['stride']}; uniform guessing gives "
        f"{st['uniform_perplexity']}. Distance: ||W - W0||_F / ||W0||_F of each layer's gate, up and down (all "
        "experts together), min-max. Expert usage on the first 8 sequences of the held-out text; almost never chosen: "
        "a share of the routings that rounds to 0 at four decimals.",
    ]
    return "\n".join(lines) + "\n"


def _verdict_lines(result: dict) -> list[str]:
    verdicts = result.get("verdicts")
    if not verdicts:
        return []
    if isinstance(verdicts, dict):  # "name: line", or "name: yes/NO" where the value is a bare flag
        items = [f"{k}: {v if isinstance(v, str) else 'yes' if v else 'NO'}" for k, v in verdicts.items()]
    else:
        items = [str(v) for v in verdicts]
    return ["", "Verdicts:", "", *[f"- {v}" for v in items]]


def caption(stem: str, result: dict) -> str:
    """Which command wrote the JSON a block comes from (the full settings of run_all.RUNS) and how long it took."""
    from run_all import RUNS

    run = next((r for r in RUNS if r.name == stem), None)
    command = f"python benchmarks/{run.script} {run.full}".rstrip() if run else "?"
    if run and "authors-repo" in run.needs:
        command += " --authors-repo PATH"
    seconds = result.get("seconds")
    merged = result.get("args", {}).get("merge") or result.get("merged_from")
    took = f", {seconds:.0f} s" if seconds and seconds >= 1 and not merged else ""
    return (
        f"<sub>From `benchmarks/results/{stem}.json` (`{command}`{took}); written by `benchmarks/tables.py`.</sub>\n\n"
    )


# JSON stem -> the blocks written from it: (file, block name, generator)
BLOCKS = {
    "data_free": [("README.md", "data_free", data_free_table), ("docs/results.md", "data_free", data_free_table)],
    "data_free_coarse_2000": [("docs/results.md", "data_free_coarse_2000", data_free_table)],
    "compare": [
        ("docs/results.md", "compare", compare_table),
        ("docs/results.md", "compare_synthetic", compare_synthetic_table),
    ],
    "compare_all_matrices": [
        ("docs/results.md", "compare_all_matrices", lambda r: compare_table(r, details=False)),
    ],
    "reap": [("docs/prune.md", "reap", reap_table)],
    "distill": [("README.md", "distill", distill_table), ("docs/distill.md", "distill", distill_table)],
    "distill_calibrated": [("docs/distill.md", "distill_calibrated", distill_table)],
    "distill_more_text": [("docs/distill.md", "distill_more_text", distill_table)],
    "distill_fine_all_small": [("docs/distill.md", "distill_fine_all_small", distill_table)],
    "calibration_memory": [("docs/results.md", "calibration_memory", calibration_memory_table)],
    "schedules": [("docs/results.md", "schedules", schedules_table)],
    "data_free_calibrated": [
        ("docs/results.md", "data_free_calibrated", lambda r: data_free_table(r, calibrated=True)),
    ],
    "paper_parity": [("docs/results.md", "paper_parity", paper_parity_table)],
    "recipe": [("docs/results.md", "recipe", recipe_table)],
    "factor_rounding": [("docs/quantize.md", "factor_rounding", factor_rounding_table)],
    "equal_bytes_ridge": [("docs/quantize.md", "equal_bytes_ridge", equal_bytes_mobe_table)],
    "equal_bytes": [
        ("docs/quantize.md", "equal_bytes", equal_bytes_table),
        ("README.md", "equal_bytes", equal_bytes_summary),
    ],
    "calibration_500_steps": [("docs/results.md", "calibration", calibration_table)],
    "inference_memory": [
        ("docs/results.md", "inference_memory", inference_memory_table),
        ("docs/runtime.md", "inference_memory_summary", inference_memory_summary),
    ],
    "compress_memory": [("docs/results.md", "compress_memory", compress_memory_table)],
    "memory_estimates": [("docs/results.md", "memory_estimates", memory_estimates_table)],
    "ray_scaling": [
        ("docs/results.md", "ray_scaling", ray_scaling_table),
        ("docs/scale-out.md", "ray_scaling_summary", ray_scaling_summary),
    ],
}
SENTENCES = {"inference_memory_summary", "ray_scaling_summary"}  # one line of prose: no caption


def replace_block(path: Path, name: str, body: str, mode: str = "write") -> bool:
    """Put `body` between the NAME markers of `path` ("write"), print it ("print"), or report whether the file
    already holds it ("check"). Returns False only when checking finds the block out of date."""
    if mode == "print":
        print(f"--- {name} (for {path.relative_to(ROOT)})\n{body}")
        return True
    text = path.read_text()
    pattern = re.compile(rf"(<!-- {name}:start -->\n).*?(<!-- {name}:end -->)", re.S)
    if not pattern.search(text):
        raise SystemExit(f"{path}: no <!-- {name}:start --> ... <!-- {name}:end --> block")
    new = pattern.sub(lambda m: m.group(1) + body + m.group(2), text)
    if mode == "check":
        if new != text:
            print(f"{path.relative_to(ROOT)}: block {name} differs from what tables.py writes")
        return new == text
    if new != text:
        path.write_text(new)
        print(f"updated {name} in {path.relative_to(ROOT)}")
    return True


def write_all(results: Path, mode: str = "write") -> bool:
    """Every block whose JSON exists in `results`; True when all are (or now are) up to date."""
    ok = True
    for stem, blocks in BLOCKS.items():
        path = results / f"{stem}.json"
        if not path.exists():
            continue
        result = json.loads(path.read_text())
        for file, name, generate in blocks:
            body = generate(result) if name in SENTENCES else caption(stem, result) + generate(result)
            ok &= replace_block(ROOT / file, name, body, mode)
    ok &= replace_block(ROOT / "docs" / "results.md", "run_all", run_all_table(results), mode)
    stats = {
        folder.name: (folder, json.loads((folder / "training_stats.json").read_text()))
        for folder in sorted((ROOT / "fixtures").glob("*"), reverse=True)
        if (folder / "training_stats.json").exists()
    }
    if stats:
        body = "<sub>From each fixture's `training_stats.json` (`scripts/train_fixture.py`); written by "
        body += "`benchmarks/tables.py`.</sub>\n\n" + fixtures_table(stats)
        ok &= replace_block(ROOT / "docs" / "fixtures.md", "fixtures", body, mode)
    return ok


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", type=Path, default=RESULTS, help="folder of the benchmarks' JSON")
    parser.add_argument("--print", dest="show", action="store_true", help="print the tables, write no file")
    parser.add_argument("--check", action="store_true", help="exit 1 if a block differs from its JSON; write nothing")
    args = parser.parse_args()
    mode = "print" if args.show else "check" if args.check else "write"
    if not write_all(args.results, mode):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
