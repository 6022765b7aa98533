"""Write the markdown tables of the README and docs/ from the benchmarks' JSON (no figure is typed by hand).

Each table sits between `<!-- NAME:start -->` and `<!-- NAME:end -->` markers in the target file; this script
replaces what is between them. Each benchmark's tables are formatted by its own script (`table(result)` and the
like, beside the code that writes the JSON); this driver maps each JSON to its blocks.

    python benchmarks/tables.py            # after python benchmarks/data_free.py
    python benchmarks/tables.py --results benchmarks/results/quick --print   # show, write nothing
"""

from __future__ import annotations

import argparse
import functools
import json
import re
from pathlib import Path

# The benchmark scripts beside this one (run as python benchmarks/tables.py): each formats its own tables.
import budget
import budget_calibrated
import calibrated_rounding
import calibration
import calibration_memory
import compare
import compress_memory
import data_free
import distill
import equal_bytes
import factor_rounding
import gptq_baselines
import inference_memory
import low_bit_factors
import memory_estimates
import paper_parity
import ray_scaling
import reap
import recipe
import run_all
import schedules
import startup

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"


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


def caption(stem: str, result: dict) -> str:
    """Which command wrote the JSON a block comes from (the full settings of run_all.RUNS) and how long it took."""
    run = next((r for r in run_all.RUNS if r.name == stem), None)
    command = f"python benchmarks/{run.script} {run.full}".rstrip() if run else "?"
    if run and "authors-repo" in run.needs:
        command += " --authors-repo PATH"
    seconds = result.get("seconds")
    merged = result.get("args", {}).get("merge") or result.get("merged_from")
    took = f", {seconds:.0f} s" if seconds and seconds >= 1 and not merged else ""
    return (
        f"<sub>From `benchmarks/results/{stem}.json` (`{command}`{took}); written by `benchmarks/tables.py`.</sub>\n\n"
    )


# JSON stem -> the blocks written from it: (file, block name, formatter from the benchmark's own script)
BLOCKS = {
    "data_free": [("README.md", "data_free", data_free.table), ("docs/results.md", "data_free", data_free.table)],
    "data_free_coarse_2000": [("docs/results.md", "data_free_coarse_2000", data_free.table)],
    "compare": [
        ("docs/results.md", "compare", compare.table),
        ("docs/results.md", "compare_synthetic", compare.synthetic_table),
    ],
    "compare_all_matrices": [
        ("docs/results.md", "compare_all_matrices", functools.partial(compare.table, details=False)),
    ],
    "reap": [("docs/prune.md", "reap", reap.table)],
    "distill": [("docs/distill.md", "distill", distill.table)],
    "distill_calibrated": [("docs/distill.md", "distill_calibrated", distill.table)],
    "distill_more_text": [("docs/distill.md", "distill_more_text", distill.table)],
    "distill_fine_all_small": [("docs/distill.md", "distill_fine_all_small", distill.table)],
    "calibration_memory": [("docs/results.md", "calibration_memory", calibration_memory.table)],
    "schedules": [("docs/results.md", "schedules", schedules.table)],
    "data_free_calibrated": [
        ("docs/results.md", "data_free_calibrated", functools.partial(data_free.table, calibrated=True)),
    ],
    "paper_parity": [("docs/results.md", "paper_parity", paper_parity.table)],
    "recipe": [("docs/results.md", "recipe", recipe.table)],
    "factor_rounding": [("docs/quantize.md", "factor_rounding", factor_rounding.table)],
    "low_bit_factors": [
        ("docs/quantize.md", "low_bit_factors", low_bit_factors.table),
        ("README.md", "low_bit_summary", low_bit_factors.summary),
    ],
    "low_bit_factors_calibrated": [("docs/quantize.md", "low_bit_factors_calibrated", low_bit_factors.table)],
    "low_bit_factors_slbf": [("docs/quantize.md", "low_bit_factors_slbf", low_bit_factors.table)],
    "budget": [("docs/quantize.md", "budget", budget.table)],
    "budget_calibrated": [("docs/quantize.md", "budget_calibrated", budget_calibrated.table)],
    "calibrated_rounding": [("docs/quantize.md", "calibrated_rounding", calibrated_rounding.table)],
    "gptq_baselines": [("docs/quantize.md", "gptq_baselines", gptq_baselines.table)],
    "startup": [("docs/cli.md", "startup", startup.table)],
    "memory_estimates": [("docs/results.md", "memory_estimates", memory_estimates.table)],
    "equal_bytes_ridge": [("docs/quantize.md", "equal_bytes_ridge", equal_bytes.mobe_table)],
    "equal_bytes": [
        ("docs/quantize.md", "equal_bytes", equal_bytes.table),
        ("docs/results.md", "equal_bytes_summary", equal_bytes.summary),
    ],
    "calibration_500_steps": [("docs/results.md", "calibration", calibration.table)],
    "inference_memory": [
        ("docs/results.md", "inference_memory", inference_memory.table),
        ("docs/runtime.md", "inference_memory_summary", inference_memory.summary),
    ],
    "compress_memory": [("docs/results.md", "compress_memory", compress_memory.table)],
    "ray_scaling": [
        ("docs/results.md", "ray_scaling", ray_scaling.table),
        ("docs/scale-out.md", "ray_scaling_summary", ray_scaling.summary),
    ],
}
SENTENCES = {"inference_memory_summary", "ray_scaling_summary", "low_bit_summary"}  # one line of prose: no caption


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
    ok &= replace_block(ROOT / "docs" / "results.md", "run_all", run_all.table(results), mode)
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
