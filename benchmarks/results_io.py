"""Writing a benchmark's results: the JSON next to its PNG, shared by the benchmark scripts."""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path


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
