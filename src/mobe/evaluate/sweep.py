"""`mobe sweep`: what a cut costs on one layer, for every method, before a multi-hour run.

Fits one MoE layer's expert stacks at several sizes with each method (few steps for the iterative ones) and reports
the relative weight error against the share of the matrix's parameters kept: the error-vs-size frontier.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from pathlib import Path

from tqdm.auto import tqdm

from ..architectures import moe_layout
from ..checkpoint import CheckpointReader
from ..config import MobeConfig
from ..factorize import budget_for_ratio, get_method, oriented
from .report import weight_error

DEFAULT_METHODS = ("svd", "d2moe", "molae", "mobe", "slbf")


@dataclasses.dataclass
class SweepPoint:
    method: str
    matrix: str
    target_ratio: float
    rank: int | None  # None: the method cannot reach this cut
    parameters: int | None
    dense_parameters: int
    relative_error: float | None
    seconds: float

    @property
    def kept(self) -> float | None:
        return None if self.parameters is None else self.parameters / self.dense_parameters


def sweep(
    model: str | Path,
    layer: int | None = None,
    matrices: Sequence[str] = ("gate", "up", "down"),
    methods: Sequence[str] = DEFAULT_METHODS,
    ratios: Sequence[float] = (0.25, 0.37, 0.5),
    steps: int = 300,
    device: str = "cpu",
    progress: bool = True,
) -> list[SweepPoint]:
    """Fit `layer` (default: the first MoE layer) of `model` with each method at each cut of each matrix type."""
    reader = CheckpointReader(model)
    layout = moe_layout(reader.config)
    layer = layout.moe_layers[0] if layer is None else layer
    if layer not in layout.moe_layers:
        raise ValueError(f"--layer {layer} is not an MoE layer; MoE layers are {list(layout.moe_layers)}")
    E, p, d = layout.num_experts, layout.intermediate_size, layout.hidden_size
    points = []
    bar = tqdm(total=len(matrices) * len(methods) * len(ratios), desc="Sweep", disable=not progress)
    for matrix in matrices:
        weights = oriented(matrix, layout.read_experts(reader, layer, matrix)).float()
        for method_name in methods:
            method = get_method(method_name)
            for ratio in ratios:
                config = MobeConfig(
                    method=method_name, num_bases=max(1, E // 4), steps=steps, eval_every=max(1, steps // 10)
                )
                budget = budget_for_ratio(E, p, d, ratio, compressed=3)  # this matrix's own cut
                rank = min(method.rank_for_budget(E, p, d, config, budget), method.max_rank(E, p, d, config))
                start = time.perf_counter()
                if rank < 1:
                    points.append(SweepPoint(method_name, matrix, ratio, None, None, E * p * d, None, 0.0))
                else:
                    config = dataclasses.replace(config, rank=rank)
                    factors, _ = method.fit(weights, config, device, None)
                    points.append(
                        SweepPoint(
                            method_name,
                            matrix,
                            ratio,
                            rank,
                            factors.num_parameters(),
                            E * p * d,
                            weight_error(weights, factors.reconstruct())[0],
                            time.perf_counter() - start,
                        )
                    )
                bar.update()
    bar.close()
    return points


def sweep_table(points: list[SweepPoint]) -> str:
    lines = [f"{'matrix':>6} {'method':>6} {'cut':>5} {'rank':>5} {'kept':>7} {'rel.err':>8} {'sec':>6}"]
    for pt in points:
        if pt.rank is None:
            lines.append(f"{pt.matrix:>6} {pt.method:>6} {pt.target_ratio:>5.2f}   out of reach")
            continue
        lines.append(
            f"{pt.matrix:>6} {pt.method:>6} {pt.target_ratio:>5.2f} {pt.rank:>5} {100 * pt.kept:>6.1f}% "
            f"{pt.relative_error:>8.4f} {pt.seconds:>6.1f}"
        )
    return "\n".join(lines)


def plot_sweep(points: list[SweepPoint], path: str | Path, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    matrices = list(dict.fromkeys(pt.matrix for pt in points))
    fig, axes = plt.subplots(1, len(matrices), figsize=(5 * len(matrices), 3.8), dpi=120, squeeze=False)
    for ax, matrix in zip(axes[0], matrices, strict=True):
        for method in dict.fromkeys(pt.method for pt in points):
            pts = sorted(
                (pt for pt in points if pt.matrix == matrix and pt.method == method and pt.rank is not None),
                key=lambda pt: pt.kept,
            )
            if pts:
                ax.plot([100 * pt.kept for pt in pts], [pt.relative_error for pt in pts], "o-", label=method)
        ax.set_title(f"{title} {matrix}".strip())
        ax.set_xlabel("parameters kept (% of the dense matrix)")
        ax.set_ylabel("relative weight error")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
