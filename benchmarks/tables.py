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
        methods = list(dict.fromkeys(r["method"] for r in rows))
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
    return "\n".join(lines) + "\n"


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
        for label in fixture["frontier"]:
            r = rows[label]
            lines.append(
                f"| {name} | {label} | {100 * r['bytes'] / fixture['original_bytes']:.1f}% | "
                f"{r['perplexity'] - fixture['original_perplexity']:+.3f} |"
            )
    return "\n".join(lines) + "\n"


def replace_block(path: Path, name: str, body: str, show: bool = False) -> None:
    """Put `body` between the NAME markers of `path`; with `show`, print it instead and leave the file alone."""
    if show:
        print(f"--- {name} (for {path.relative_to(ROOT)})\n{body}")
        return
    text = path.read_text()
    pattern = re.compile(rf"(<!-- {name}:start -->\n).*?(<!-- {name}:end -->)", re.S)
    if not pattern.search(text):
        raise SystemExit(f"{path}: no <!-- {name}:start --> ... <!-- {name}:end --> block")
    path.write_text(pattern.sub(lambda m: m.group(1) + body + m.group(2), text))
    print(f"updated {name} in {path.relative_to(ROOT)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", type=Path, default=RESULTS, help="folder of the benchmarks' JSON")
    parser.add_argument("--print", dest="show", action="store_true", help="print the tables, write no file")
    args = parser.parse_args()
    results, show = args.results, args.show
    data_free = results / "data_free.json"
    if data_free.exists():
        result = json.loads(data_free.read_text())
        table = data_free_table(result)
        replace_block(ROOT / "README.md", "data_free", table, show)
        replace_block(ROOT / "docs" / "results.md", "data_free", table, show)
    compare = results / "compare.json"
    if compare.exists():
        result = json.loads(compare.read_text())
        replace_block(ROOT / "docs" / "results.md", "compare", compare_table(result), show)
        replace_block(ROOT / "docs" / "results.md", "compare_synthetic", compare_synthetic_table(result), show)
    compare_all = results / "compare_all_matrices.json"
    if compare_all.exists():
        table = compare_table(json.loads(compare_all.read_text()), details=False)
        replace_block(ROOT / "docs" / "results.md", "compare_all_matrices", table, show)
    reap = results / "reap.json"
    if reap.exists():
        replace_block(ROOT / "docs" / "prune.md", "reap", reap_table(json.loads(reap.read_text())), show)
    distill = results / "distill.json"
    if distill.exists():
        table = distill_table(json.loads(distill.read_text()))
        replace_block(ROOT / "README.md", "distill", table, show)
        replace_block(ROOT / "docs" / "distill.md", "distill", table, show)
    distill_calibrated = results / "distill_calibrated.json"
    if distill_calibrated.exists():
        table = distill_table(json.loads(distill_calibrated.read_text()))
        replace_block(ROOT / "docs" / "distill.md", "distill_calibrated", table, show)
    memory = results / "calibration_memory.json"
    if memory.exists():
        result = json.loads(memory.read_text())
        replace_block(ROOT / "docs" / "results.md", "calibration_memory", calibration_memory_table(result), show)
    schedules = results / "schedules.json"
    if schedules.exists():
        table = schedules_table(json.loads(schedules.read_text()))
        replace_block(ROOT / "docs" / "results.md", "schedules", table, show)
    calibrated = results / "data_free_calibrated.json"
    if calibrated.exists():
        result = json.loads(calibrated.read_text())
        replace_block(ROOT / "docs" / "results.md", "data_free_calibrated", data_free_table(result, True), show)
    recipe = results / "recipe.json"
    if recipe.exists():
        replace_block(ROOT / "docs" / "results.md", "recipe", recipe_table(json.loads(recipe.read_text())), show)
    equal_bytes = results / "equal_bytes.json"
    if equal_bytes.exists():
        result = json.loads(equal_bytes.read_text())
        replace_block(ROOT / "docs" / "quantize.md", "equal_bytes", equal_bytes_table(result), show)
        replace_block(ROOT / "README.md", "equal_bytes", equal_bytes_summary(result), show)
    parity = results / "paper_parity.json"
    if parity.exists():
        table = paper_parity_table(json.loads(parity.read_text()))
        replace_block(ROOT / "docs" / "results.md", "paper_parity", table, show)


if __name__ == "__main__":
    main()
