"""Rerun every benchmark with the settings recorded below, then regenerate the README/docs tables from the JSON.

One command reproduces every published figure:

    python benchmarks/run_all.py                  # full settings (hours), results in benchmarks/results/
    python benchmarks/run_all.py --quick          # toy settings, benchmarks/results/quick/ (its time: docs/results.md)
    python benchmarks/run_all.py --only compare schedules --authors-repo /path/to/MoBE

The full run writes the JSON/PNG files the docs are built from and then runs benchmarks/tables.py, which rewrites
the tables in README.md and docs/; the quick run writes to its own folder (never over the full results) and only
prints the tables. A benchmark whose requirement is missing (Ray, the authors' checkout, the Debian documentation
package the fixtures' text comes from) is skipped with the reason. Ends with one line per benchmark: its wall time
and the verdicts it wrote into its JSON; the wall time of the whole run, the machine's load average before and after
and the thread setting go to benchmarks/results/run_all.json (run_all_quick.json for --quick). OMP_NUM_THREADS is
set to 2 (the cores the published figures were measured on) unless it is set already.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Run:
    """One benchmark run: its script, the output option it takes, the full and the quick arguments."""

    name: str  # also the stem of the JSON it writes
    script: str
    full: str  # arguments, split on spaces
    quick: str
    out_option: str = "--out"  # "--out STEM" or "--json FILE"
    needs: tuple[str, ...] = field(default=())


# Training-side text of the trained fixtures (calibration, distillation): where each Debian package puts it.
FIXTURE_TEXT = {"python3.11-doc": "/usr/share/doc/python3.11/html/_sources", "perl-doc": "/usr/share/perl"}
COARSE_TEXT, BOTH_TEXTS = ("python3.11-doc",), ("python3.11-doc", "perl-doc")

# The settings of every published result. The full arguments are those recorded in the "args" of the JSON files
# under benchmarks/results/; the quick ones keep each script's code path at toy sizes.
RUNS = (
    Run("compare", "compare.py", "", "--ratios 0.25 --methods mobe svd --steps 20 --tokens 2048 --synthetic 8 64 128"),
    Run(
        "compare_all_matrices",
        "compare.py",
        "--matrices gate up down",
        "--matrices gate up down --ratios 0.4 --methods mobe svd --steps 20 --tokens 2048 --synthetic 8 64 128",
    ),
    Run(
        "schedules",
        "schedules.py",
        "",
        "--quick",
    ),
    Run(
        "data_free",
        "data_free.py",
        "--steps 1000",
        "--fixtures coarse --ratios 0.25 --methods svd d2moe molae mobe default --steps 20 --tokens 2048",  # no slbf
    ),
    Run(
        "data_free_coarse_2000",
        "data_free.py",
        "--fixtures coarse --steps 2000",
        "--fixtures coarse --ratios 0.25 --methods svd default --steps 20 --tokens 2048",
    ),
    Run("factor_rounding", "factor_rounding.py", "", "--fixtures coarse --steps 20"),
    Run(
        "calibrated_rounding",
        "calibrated_rounding.py",
        "",
        "--fixtures fine --steps 10 --calibration-tokens 1024",
        needs=BOTH_TEXTS,
    ),
    Run(
        "budget",
        "budget.py",
        "",
        "--fixtures coarse --budgets 0.3 --plan-steps 5 --steps 5 --tokens 1024",
    ),
    Run(
        "budget_calibrated",
        "budget_calibrated.py",
        "",
        "--fixtures coarse --between 1 --budgets --calibration-tokens 1024 --tokens 1024",
        needs=BOTH_TEXTS,
    ),
    Run(
        "low_bit_factors_calibrated",
        "low_bit_factors.py",
        "--fixtures fine --ratios 0.25 0.5 --bits 4 3 --steps 300 --calibrated --threads 2",
        "--fixtures fine --ratios 0.5 --bits 4 --steps 5 --tokens 1024 --calibrated --calibration-tokens 2048",
        needs=BOTH_TEXTS,
    ),
    Run(
        "low_bit_factors",
        "low_bit_factors.py",
        "--steps 300",
        "--fixtures coarse --ratios 0.5 --bits 4 --steps 10 --tokens 1024",
    ),
    Run(
        "low_bit_factors_slbf",
        "low_bit_factors.py",
        "--method slbf --steps 1000 --ratios 0.25 --bits 4 3 --written-bits 3",
        "--method slbf --fixtures coarse --ratios 0.25 --bits 4 --steps 5 --tokens 1024 --schemes orthonormal",
    ),
    Run(
        "equal_bytes_ridge",
        "equal_bytes.py",
        "--steps 300 --threads 1 --ridge 0.001",
        "--fixtures coarse --ratios 0.5 --steps 5 --tokens 1024 --calibration-tokens 1024 --no-lm-eval --ridge 0.001",
        needs=BOTH_TEXTS,
    ),
    Run(
        "data_free_calibrated",
        "data_free.py",
        "--steps 1000 --variants calibrated",
        "--fixtures coarse --ratios 0.25 --methods svd mobe default --steps 20 --variants calibrated --tokens 2048",
        needs=BOTH_TEXTS,
    ),
    Run(
        "reap",
        "reap.py",
        "",
        "--fixtures coarse --ratios 0.5 --calibration-tokens 2048 --tokens 2048",
        needs=BOTH_TEXTS,
    ),
    Run(
        "calibration_memory",
        "calibration_memory.py",
        "",
        "--shapes Qwen3-30B-A3B --tokens 4096 --gram-experts 1 --factor-experts 2",
    ),
    Run(
        "calibration_500_steps",
        "calibration.py",
        "--steps 500 --threads 1",
        "--ratios 0.25 --matrix-sets gate,up --steps 20 --refine-steps 10 --calibration-tokens 2048 --tokens 2048",
        needs=COARSE_TEXT,
    ),
    Run(
        "distill",
        "distill.py",
        "--ratios 0.5 --fits data-free --modes router --threads 1",
        "--fixtures coarse --ratios 0.5 --fits data-free --modes router --steps 20 --epochs 1 --distill-tokens 4096 "
        "--tokens 2048",
        needs=BOTH_TEXTS,
    ),
    Run(
        "distill_calibrated",
        "distill.py",
        "--fixtures coarse --ratios 0.5 --fits calibrated --modes router --threads 1",
        "--fixtures coarse --ratios 0.5 --fits calibrated --modes router --steps 20 --epochs 1 --distill-tokens 4096 "
        "--tokens 2048",
        needs=BOTH_TEXTS,
    ),
    Run(
        "distill_more_text",
        "distill.py",
        "--fixtures coarse --ratios 0.5 --fits data-free --modes router --distill-tokens 262144 --threads 1",
        "--fixtures coarse --ratios 0.5 --fits data-free --modes router --steps 20 --epochs 1 --distill-tokens 8192 "
        "--tokens 2048",
        needs=COARSE_TEXT,
    ),
    Run(
        "distill_fine_all_small",
        "distill.py",
        "--fixtures fine --ratios 0.5 --fits data-free --modes all-small --lr 0.0003 --threads 1",
        "--fixtures fine --ratios 0.5 --fits data-free --modes all-small --lr 0.0003 --steps 20 --epochs 1 "
        "--distill-tokens 4096 --tokens 2048",
        needs=("perl-doc",),
    ),
    Run(
        "equal_bytes",
        "equal_bytes.py",
        "--steps 300 --threads 1",
        "--fixtures coarse --ratios 0.5 --steps 5 --tokens 1024 --calibration-tokens 1024 --no-lm-eval",
        needs=BOTH_TEXTS,
    ),
    Run(
        "gptq_baselines",
        "gptq_baselines.py",
        "",
        "--fixtures coarse --bits 3 --tokens 1024 --calibration-tokens 1024",
        needs=BOTH_TEXTS,
    ),
    Run(
        "recipe",
        "recipe.py",
        "--steps 1000 --threads 1",
        "--fixtures coarse --matrices gate --ratios 0.5 --steps 10",
    ),
    Run("compress_memory", "compress_memory.py", "", "--hidden 256 --experts 8 --intermediate 256 --layers 2 4"),
    Run("startup", "startup.py", "", "--repeats 2"),
    Run(
        "memory_estimates", "memory_estimates.py", "", "--models coarse-fixture --commands compress quantize --steps 1"
    ),
    Run(
        "inference_memory",
        "inference_memory.py",
        "",
        "--hidden 256 --experts 8 --intermediate 128 --layers 2 --rank 64 --prefill 64 --decode 8 --cache-mib 4",
        out_option="--json",
    ),
    Run(
        "ray_scaling",
        "ray_scaling.py",
        "",
        "--experts 4 --hidden 64 --intermediate 32 --rank 16 --steps 50",
        needs=("ray",),
    ),
    Run("paper_parity", "paper_parity.py", "", "--steps 200", out_option="--json", needs=("authors-repo",)),
    Run(
        "gpu_jobs",
        "gpu_jobs.py",
        "--device cuda --paper-steps 1000",
        "--device cpu --scale 0.02 --models qwen3-30b-a3b --paper-steps 20 --steps 20",
        needs=("cuda",),  # the full run only; the quick one checks the code path on the CPU
    ),
)


def missing(run: Run, args: argparse.Namespace) -> str | None:
    """Why `run` cannot run here, or None."""
    for need in run.needs:
        if need == "cuda" and not args.quick and not _cuda():
            return "needs a CUDA GPU (its figures are not measured yet)"
        if need == "ray" and importlib.util.find_spec("ray") is None:
            return "Ray is not installed (pip install 'mobe[ray]')"
        if need == "authors-repo" and not (args.authors_repo and (Path(args.authors_repo) / "train.py").is_file()):
            return "needs --authors-repo, a checkout of inclusionAI/MoBE holding train.py"
        if need in FIXTURE_TEXT and not Path(FIXTURE_TEXT[need]).is_dir():
            return f"the fixtures' training-side text needs the Debian package {need} ({FIXTURE_TEXT[need]})"
    return None


def _children_cpu() -> float:
    """User + system CPU seconds of every finished child so far: unlike wall time, barely moved by other jobs."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def command(run: Run, args: argparse.Namespace, results: Path) -> list[str]:
    stem = results / run.name
    out = [run.out_option, str(stem.with_suffix(".json") if run.out_option == "--json" else stem)]
    extra = ["--authors-repo", args.authors_repo] if "authors-repo" in run.needs else []
    return [sys.executable, str(HERE / run.script), *(run.quick if args.quick else run.full).split(), *extra, *out]


def read_verdicts(path: Path) -> list[str]:
    """The verdicts a benchmark stored in its JSON, as lines ("name: value" for a dict)."""
    if not path.exists():
        return ["(no JSON written)"]
    verdicts = json.loads(path.read_text()).get("verdicts")
    if verdicts is None:
        return ["(no verdicts in the JSON)"]
    if isinstance(verdicts, dict):
        return [f"{k}: {v}" for k, v in verdicts.items()]
    return [str(v) for v in verdicts]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small settings, results in benchmarks/results/quick/")
    parser.add_argument("--only", nargs="+", choices=[r.name for r in RUNS], help="run these benchmarks only")
    parser.add_argument(
        "--skip", nargs="+", default=[], choices=[r.name for r in RUNS], help="run every benchmark but these"
    )
    parser.add_argument("--authors-repo", default=None, help="checkout of inclusionAI/MoBE for paper_parity.py")
    args = parser.parse_args()
    results = HERE / "results" / ("quick" if args.quick else "")
    results.mkdir(parents=True, exist_ok=True)

    listed = {run.script for run in RUNS} | {"run_all.py", "tables.py", "results_io.py"}
    for script in sorted(p.name for p in HERE.glob("*.py") if p.name not in listed):
        print(f"{script}: not in run_all.RUNS yet, so not run (add its settings there)")

    os.environ.setdefault("OMP_NUM_THREADS", "2")  # the children inherit it
    load_before = os.getloadavg()
    start = time.perf_counter()
    summary, cpu_seconds = [], {}
    for run in RUNS:
        if args.only and run.name not in args.only:
            continue
        if run.name in args.skip:
            print(f"\n=== {run.name}: skipped (--skip)", flush=True)
            summary.append((run.name, None, "skipped", ["--skip"]))
            continue
        reason = missing(run, args)
        if reason:
            print(f"\n=== {run.name}: skipped, {reason}", flush=True)
            summary.append((run.name, None, "skipped", [reason]))
            continue
        if "ray" in run.needs and shutil.which("ray"):
            subprocess.run(["ray", "stop", "--force"], check=False, capture_output=True)
        cmd = command(run, args, results)
        print(f"\n=== {run.name}: {' '.join(cmd[1:])}", flush=True)
        t0, cpu0 = time.perf_counter(), _children_cpu()
        code = subprocess.run(cmd, check=False).returncode
        seconds = time.perf_counter() - t0
        cpu_seconds[run.name] = _children_cpu() - cpu0
        json_path = results / f"{run.name}.json"
        if code:
            summary.append((run.name, seconds, f"failed (exit {code})", []))
        else:
            summary.append((run.name, seconds, "ok", read_verdicts(json_path)))

    tables = [sys.executable, str(HERE / "tables.py"), "--results", str(results)]
    if args.quick:
        tables.append("--print")  # toy figures never go into the README
    print(f"\n=== tables: {' '.join(tables[1:])}", flush=True)
    table_code = subprocess.run(tables, check=False).returncode

    total = time.perf_counter() - start
    print(f"\n{'benchmark':<22} {'seconds':>8} {'CPU s':>7}  {'status':<16} verdicts")
    for name, seconds, status, verdicts in summary:
        secs = f"{seconds:8.0f}" if seconds is not None else f"{'-':>8}"
        cpu = f"{cpu_seconds[name]:7.0f}" if name in cpu_seconds else f"{'-':>7}"
        lines = verdicts or [""]
        print(f"{name:<22} {secs} {cpu}  {status:<16} {lines[0]}")
        for line in lines[1:]:
            print(f"{'':<22} {'':>8} {'':>7}  {'':<16} {line}")
    print(f"tables.py: {'ok' if table_code == 0 else f'failed (exit {table_code})'}")
    load_after = os.getloadavg()
    print(
        f"total {total:.0f} s ({total / 60:.1f} min; {_children_cpu():.0f} CPU s), results in {results}; "
        "OMP_NUM_THREADS="
        f"{os.environ['OMP_NUM_THREADS']}, {os.cpu_count()} cores, load average (1 min) {load_before[0]:.1f} before, "
        f"{load_after[0]:.1f} after"
    )
    not_ok = [f"{name} {status}" for name, _, status, _ in summary if status != "ok"]
    record = {
        "quick": args.quick,
        "only": args.only,
        "seconds": total,
        "cpu_seconds": _children_cpu(),
        "cpus": os.cpu_count(),
        "omp_num_threads": os.environ["OMP_NUM_THREADS"],
        "load_before": load_before,
        "load_after": load_after,
        "finished": "every benchmark ran" if not not_ok else "not run or failed: " + ", ".join(not_ok),
        "runs": [
            {"name": n, "seconds": sec, "cpu_seconds": cpu_seconds.get(n), "status": st, "verdicts": v}
            for n, sec, st, v in summary
        ],
        "tables_exit_code": table_code,
    }
    timing = HERE / "results" / ("run_all_quick.json" if args.quick else "run_all.json")
    if not args.only:  # a partial run says nothing about the whole one's time
        timing.write_text(json.dumps(record, indent=2) + "\n")
        print(f"wrote {timing}")
    if table_code or any(s.startswith("failed") for _, _, s, _ in summary):
        sys.exit(1)


# --- tables for README.md and docs/ (written by benchmarks/tables.py from this script's JSON) ---
def table(results: Path) -> str:
    """Every run of run_all.py: its command and the seconds its JSON recorded, and their sum."""
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


if __name__ == "__main__":
    main()
