"""How long the command line takes to answer: `mobe --help`, `--version`, `info --list` and `import mobe`, against
the imports of torch and transformers themselves.

Every command runs in a fresh interpreter, `--repeats` times, the commands taking turns (one of each per round, so
that the machine's load falls on all alike); the median wall time of each is compared. A further run of each with
`python -X importtime` records whether it imported torch or transformers. Verdicts: `mobe --help` takes at most half
of `import torch`, and `import mobe` at most `import torch, transformers` plus 0.5 s. Prints a table and the
verdicts, writes JSON and PNG.

    python benchmarks/startup.py [--repeats 7]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from importlib.metadata import version
from pathlib import Path

from results_io import write_results

HERE = Path(__file__).resolve().parent
SRC = HERE.parent / "src"  # this checkout's mobe, whatever is installed
HELP_SHARE = 0.5  # `mobe --help` at most this share of `import torch`
IMPORT_MARGIN = 0.5  # `import mobe` at most `import torch, transformers` plus this many seconds

CASES = {  # label -> interpreter arguments
    "python -c pass": ["-c", "pass"],
    "import torch": ["-c", "import torch"],
    "import torch, transformers": ["-c", "import torch, transformers"],
    "mobe --help": ["-m", "mobe", "--help"],
    "mobe --version": ["-m", "mobe", "--version"],
    "mobe info --list": ["-m", "mobe", "info", "--list"],
    "import mobe": ["-c", "import mobe"],
}


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(SRC), os.environ.get("PYTHONPATH")) if p)}


def _wall(argv: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, *argv], check=True, stdout=subprocess.DEVNULL, env=_env())
    return time.perf_counter() - start


def _imported(argv: list[str]) -> list[str]:
    """Which of torch and transformers the command imports (from `python -X importtime`)."""
    run = subprocess.run(
        [sys.executable, "-X", "importtime", *argv], check=True, capture_output=True, text=True, env=_env()
    )
    names = {line.rsplit("|", 1)[-1].strip() for line in run.stderr.splitlines() if line.startswith("import time:")}
    return [m for m in ("torch", "transformers") if m in names]


def table(result: dict) -> str:
    """The markdown table of docs/cli.md: median wall time of each command, against `import torch`; verdicts."""
    torch = next(r["median_s"] for r in result["rows"] if r["case"] == "import torch")
    lines = [
        f"| command (fresh process, median of {result['repeats']}) | seconds | / `import torch` | imports |",
        "|---|---:|---:|---|",
    ]
    for r in result["rows"]:
        imports = ", ".join(r["imports"]) or "neither torch nor transformers"
        lines.append(f"| `{r['command']}` | {r['median_s']:.2f} | {r['median_s'] / torch:.2f} | {imports} |")
    lines += ["", f"Load average before and after: {result['load_before']:.2f}, {result['load_after']:.2f}."]
    lines += ["", "Verdicts:", "", *[f"- {k}: {v}" for k, v in result["verdicts"].items()]]
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"][::-1]
    fig, ax = plt.subplots(figsize=(7, 3.8))
    colours = ["tab:orange" if "torch" in r["imports"] else "tab:blue" for r in rows]
    ax.barh(range(len(rows)), [r["median_s"] for r in rows], color=colours)
    for i, r in enumerate(rows):
        ax.plot(r["seconds"], [i] * len(r["seconds"]), "k.", ms=3)
    ax.set_yticks(range(len(rows)), [r["case"] for r in rows])
    ax.set_xlabel(f"seconds, fresh process (bar: median of {result['repeats']}; dots: every run)")
    ax.set_title("startup time (orange: imports torch)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7, help="runs of each command (one per round)")
    parser.add_argument("--out", default=str(HERE / "results" / "startup"), help="stem of the JSON and PNG")
    args = parser.parse_args()
    start = time.perf_counter()
    load_before = os.getloadavg()[0]
    for argv in CASES.values():  # warm the file cache: the first run of each would otherwise read from disk
        _wall(argv)
    seconds: dict[str, list[float]] = {case: [] for case in CASES}
    for n in range(args.repeats):
        for case, argv in CASES.items():
            seconds[case].append(_wall(argv))
        print(f"round {n + 1}/{args.repeats}: " + ", ".join(f"{s[-1]:.2f}" for s in seconds.values()), flush=True)
    rows = [
        {
            "case": case,
            "command": f'python -c "{argv[1]}"' if argv[0] == "-c" else f"python {' '.join(argv)}",
            "seconds": seconds[case],
            "median_s": statistics.median(seconds[case]),
            "imports": _imported(argv),
        }
        for case, argv in CASES.items()
    ]
    load_after = os.getloadavg()[0]
    median = {r["case"]: r["median_s"] for r in rows}
    imports = {r["case"]: r["imports"] for r in rows}

    print(f"\n{'command':<28} {'median s':>9} {'min s':>7} {'/ torch':>8}  imports")
    for r in rows:
        print(
            f"{r['case']:<28} {r['median_s']:>9.2f} {min(r['seconds']):>7.2f} "
            f"{r['median_s'] / median['import torch']:>8.2f}  {', '.join(r['imports']) or '-'}"
        )
    help_ok = median["mobe --help"] <= HELP_SHARE * median["import torch"]
    limit = median["import torch, transformers"] + IMPORT_MARGIN
    verdicts = {
        "help_at_most_half_of_torch": (
            f"mobe --help {median['mobe --help']:.2f} s against import torch {median['import torch']:.2f} s "
            f"({median['mobe --help'] / median['import torch']:.2f}x, target <= {HELP_SHARE}x): "
            f"{'yes' if help_ok else 'NO'}"
        ),
        "import_mobe_within_torch_and_transformers": (
            f"import mobe {median['import mobe']:.2f} s against import torch, transformers "
            f"{median['import torch, transformers']:.2f} s + {IMPORT_MARGIN} s = {limit:.2f} s: "
            f"{'yes' if median['import mobe'] <= limit else 'NO'}"
        ),
        "help_version_import_without_torch": (
            "mobe --help, mobe --version and import mobe import neither torch nor transformers: "
            + ("yes" if not any(imports[c] for c in ("mobe --help", "mobe --version", "import mobe")) else "NO")
        ),
    }
    print()
    for name, line in verdicts.items():
        print(f"{name}: {line}")
    result = {
        "rows": rows,
        "repeats": args.repeats,
        "load_before": load_before,
        "load_after": load_after,
        "cpus": os.cpu_count(),
        "versions": {p: version(p) for p in ("torch", "transformers")} | {"python": sys.version.split()[0]},
        "verdicts": verdicts,
    }
    write_results(result, args, start, plot, args.out)


if __name__ == "__main__":
    main()
