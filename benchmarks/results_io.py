"""Writing a benchmark's results: the JSON next to its PNG, shared by the benchmark scripts."""

from __future__ import annotations

import argparse
import json
import re
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def add_run_options(
    parser: argparse.ArgumentParser, name: str, threads: int | None = None, fixtures: Sequence[str] | None = None
) -> None:
    """The options benchmarks share: `--fixtures` (which of `fixtures` to run; all by default), `--threads` (torch's
    CPU threads, default `threads`) where given, and `--out` (the stem of the JSON and PNG, results/`name`)."""
    if fixtures is not None:
        parser.add_argument("--fixtures", nargs="+", default=list(fixtures), choices=list(fixtures))
    if threads is not None:
        parser.add_argument("--threads", type=int, default=threads, help="torch CPU threads")
    parser.add_argument("--out", default=str(RESULTS / name), help="stem of the JSON and PNG")


def pyplot():
    """matplotlib's pyplot on the Agg backend (files only, no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path, dpi: float | None = None) -> None:
    """The ending of every plot: lay out, write `path`, free the figure."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, **({"dpi": dpi} if dpi else {}))
    plt.close(fig)


def write_results(
    result: dict, args: argparse.Namespace, start: float, plot: Callable[[dict, Path], None], stem: str
) -> None:
    """Record the arguments and run time in `result`, then write `stem`.json and its plot `stem`.png."""
    result["args"] = vars(args)
    result["seconds"] = time.perf_counter() - start
    out = Path(stem)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    plot(result, out.with_suffix(".png"))
    print(f"\nwrote {out.with_suffix('.json')} and {out.with_suffix('.png')} in {result['seconds']:.0f} s")


def rewrite_verdicts(stem: str, verdicts: Callable[[dict], list[str]], update: Callable[[dict], None] | None = None):
    """Recompute the verdicts of the JSON `stem`.json from its rows (after `update`, which refreshes what they are
    compared with), write it back and print them: a re-derivation, nothing measured again."""
    path = Path(stem).with_suffix(".json")
    result = json.loads(path.read_text())
    if update is not None:
        update(result)
    result["verdicts"] = verdicts(result)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print("\n".join(result["verdicts"]))


def grouped_bars(
    ax, categories: Sequence[str], series: Mapping[str, Sequence[float]], fontsize: float | None = None
) -> None:
    """One group of bars per category on `ax`, one bar per series (its label in the legend), ticks under each group."""
    width = 0.8 / len(series)
    for k, (label, values) in enumerate(series.items()):
        ax.bar([i + k * width for i in range(len(categories))], values, width, label=label)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(categories))], categories, fontsize=fontsize)


def ratio_text(value: float, target: float, digits: int = 2) -> str:
    """`value` with `digits` decimals, or more where fewer would round it onto or across `target` (against a target
    of 0.5, 0.4994 prints 0.499, never 0.50; against 1.2, 1.2049 prints 1.205)."""

    def side(x: float) -> int:
        return (x > target) - (x < target)

    while digits < 8 and side(round(value, digits)) != side(value):
        digits += 1
    return f"{value:.{digits}f}"


def bold(text: str, on: bool) -> str:
    return f"**{text}**" if on else text


_CHECK = re.compile(r"^(?P<claim>.*?)(?: \((?P<target>[^()]*target[^()]*)\))?: (?P<flag>yes|no|NO)(?P<rest>, .*)?$")


def plain_statement(check: str | bool, name: str = "") -> str:
    """A benchmark's check as a plain statement of what was measured, for the docs: "2 workers vs 1 worker: 1.64x
    faster (target >= 1.5x): yes" -> "2 workers vs 1 worker: 1.64x faster (target >= 1.5x, met)."; a check without
    a target states its claim, or that it did not hold; a bare flag states its `name`."""
    if isinstance(check, bool):
        check = f"{name.replace('_', ' ')}: {'yes' if check else 'no'}"
    m = _CHECK.match(check)
    if m is None:
        text = check
    elif m["target"]:
        met = "met" if m["flag"] == "yes" else "not met"
        text = f"{m['claim']} ({m['target']}, {met}){m['rest'] or ''}"
    else:
        text = f"{m['claim']}{m['rest'] or ''}" if m["flag"] == "yes" else f"not the case: {m['claim']}"
    text = text[:1].upper() + text[1:]
    return text if text.endswith(".") else text + "."


def verdict_lines(result: dict) -> list[str]:
    """The JSON's checks (a list, or name -> line or flag) as a list of plain statements."""
    checks = result.get("verdicts")
    if not checks:
        return []
    items = checks.items() if isinstance(checks, dict) else (("", c) for c in checks)
    return ["", "What was measured:", "", *[f"- {plain_statement(v, k)}" for k, v in items]]
