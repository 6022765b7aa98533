"""The best recipe for a byte budget: quantise the original, or factorise with MoBE and store the factors in fewer
bits, whichever a measurement says loses least within the bytes.

Each candidate recipe's stored bytes are computed exactly, without writing anything: the packed integers and
scales that `mobe quantize` writes (a dense weight's by compressed-tensors' own compressor on one expert's shape, a
factor's by the same packing `mobe.quantize` uses) plus every other tensor as the source stores it. Its loss is
predicted by the relative weight error it leaves on sample layers: the original's experts rounded to nearest at the
bits, or a short default-recipe MoBE fit at the cut whose factors are then rounded as `mobe quantize` rounds them.
The weight error is a proxy, measured on the sample layers only: `benchmarks/budget.py` checks the choice against
held-out perplexity.

Pure planning: nothing here writes a checkpoint (`execute_plan` hands the chosen recipe to `compress` or
`quantize_checkpoint`).
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..architectures import MoeLayout, moe_layout
from ..checkpoint import CheckpointReader
from ..config import MobeConfig, QuantizeConfig
from ..factorize import MobeFactors, fit_mobe, oriented
from ..pipeline import compress, resolve_settings
from ..quantize import groupwise
from ..quantize.checkpoint import quantize_checkpoint, stored_bytes
from ..quantize.factors import SHARED_BITS, quantize_mobe
from .sizes import DTYPE_SIZE, MATRICES, budget_bytes, check_budget, expert_bytes, group_size_for

BITS = (16, 8, 4, 3, 2)
CUTS = (0.25, 0.37, 0.5)


@dataclass(frozen=True)
class Recipe:
    """One way to store the routed experts: the original's matrices or MoBE factors at a cut, at `bits` (16: as the
    source stores them)."""

    technique: str  # "original" or "mobe"
    bits: int
    cut: float = 0.0
    group_size: int | None = None  # of the integers' scales; None: the plan's (the largest that tiles)

    def label(self) -> str:
        precision = "16-bit" if self.bits == 16 else f"int{self.bits}"
        if self.group_size is not None and self.bits < 16:
            precision += f" g{self.group_size}"
        if self.technique == "original":
            return f"original {precision}"
        return f"MoBE {100 * self.cut:.0f}% cut, {precision} factors"


@dataclass
class Option:
    """A recipe, the bytes of the whole checkpoint it writes and the relative weight error it leaves on the sample."""

    recipe: Recipe
    stored_bytes: int
    error: float


@dataclass
class Plan:
    """Every option measured, the budget and the choice: the lowest error within the budget."""

    budget_bytes: int
    original_bytes: int
    group_size: int
    sample_layers: list[int]
    options: list[Option] = field(default_factory=list)
    seconds: float = 0.0

    def with_budget(self, budget_bytes: int) -> Plan:
        """The same measurements under another budget (nothing is measured again)."""
        return dataclasses.replace(self, budget_bytes=budget_bytes)

    @property
    def chosen(self) -> Option | None:
        within = [o for o in self.options if o.stored_bytes <= self.budget_bytes]
        return min(within, key=lambda o: o.error) if within else None

    def table(self) -> str:
        """The options by size, the chosen one marked, and why."""
        unit, scale = ("GiB", 2**30) if self.original_bytes >= 2**30 else ("MiB", 2**20)
        lines = [
            f"budget {self.budget_bytes / scale:.3f} {unit} = {100 * self.budget_bytes / self.original_bytes:.1f}% "
            f"of the original's {self.original_bytes / scale:.3f} {unit}; weight error measured on MoE layer(s) "
            f"{self.sample_layers} ({self.seconds:.0f} s)",
            f"{'recipe':<34} {unit:>9} {'of orig.':>9} {'rel. error':>11}",
        ]
        chosen = self.chosen
        for o in sorted(self.options, key=lambda o: o.stored_bytes):
            mark = "  <- chosen" if o is chosen else "" if o.stored_bytes <= self.budget_bytes else "  (too large)"
            lines.append(
                f"{o.recipe.label():<34} {o.stored_bytes / scale:>9.3f} "
                f"{100 * o.stored_bytes / self.original_bytes:>8.1f}% {o.error:>11.4f}{mark}"
            )
        if chosen is None:
            smallest = min(self.options, key=lambda o: o.stored_bytes)
            lines.append(
                f"nothing fits: the smallest option, {smallest.recipe.label()}, needs "
                f"{smallest.stored_bytes / scale:.3f} {unit}"
            )
        else:
            lines.append(f"chosen: {chosen.recipe.label()}, the lowest weight error of the options within the budget")
        return "\n".join(lines)


def _expert_names(layout: MoeLayout, layer: int, matrix: str) -> list[str]:
    return [layout.arch.tensor_name(layer, e, matrix) for e in range(layout.num_experts)]


def _dense_bytes(layout: MoeLayout, reader: CheckpointReader, bits: int, group: int) -> int:
    """Bytes of every routed expert matrix stored at `bits` as `mobe quantize` writes a dense checkpoint."""
    per_layer = sum(expert_bytes(reader, layout, matrix, bits, group) for matrix in MATRICES)
    return per_layer * layout.num_experts * len(layout.moe_layers)


def _factor_bytes(factors: MobeFactors, bits: int, group: int, element: int) -> int:
    """Bytes of one (layer, matrix)'s MoBE factors as `mobe compress` / `mobe quantize` write them."""

    def packed(shape: list[int], b: int) -> int:
        return math.prod(groupwise.packed_shape(shape, b)) + element * math.prod(groupwise.scales_shape(shape, group))

    A, bases, coef = (list(t.shape) for t in (factors.A, factors.bases, factors.coef))
    coef_bytes = math.prod(coef) * element
    if bits == 16:
        return (math.prod(A) + math.prod(bases)) * element + coef_bytes
    if bits == 8:  # as fitted: both factors int8, groups along their rows
        return packed(A, 8) + packed(bases, 8) + coef_bytes
    return packed(groupwise.stored_shape(A, True), bits) + packed(bases, SHARED_BITS) + coef_bytes


def _rounded(factors: MobeFactors, bits: int, group: int) -> MobeFactors:
    if bits == 16:
        return factors
    if bits == 8:
        return dataclasses.replace(
            factors,
            A=groupwise.fake_quantize(factors.A, 8, group),
            bases=groupwise.fake_quantize(factors.bases, 8, group),
        )
    return quantize_mobe(factors, bits, group)[0]


def plan_budget(
    model: str | Path,
    target_bytes: float | None = None,
    *,
    target_gib: float | None = None,
    sample_layers: list[int] | None = None,
    steps: int = 200,
    bits: tuple[int, ...] = BITS,
    cuts: tuple[float, ...] = CUTS,
    device: str = "cpu",
) -> Plan:
    """Measure every candidate recipe on sample layers and choose the one with the lowest weight error that fits.

    Args:
        model: checkpoint folder or hub id.
        target_bytes: the budget as a share of the original checkpoint's stored bytes (0 < F <= 1).
        target_gib: or in GiB.
        sample_layers: MoE layers to measure on (default: the middle one).
        steps: steps of each sample MoBE fit (the default recipe's schedule, shortened).
        bits, cuts: the candidate bit widths (16: unquantised) and MoBE cuts.
        device: where the sample fits run.

    Returns:
        The plan; `plan.chosen` is None when nothing fits.
    """
    check_budget(target_bytes, target_gib)
    start = time.perf_counter()
    reader = CheckpointReader(model)
    layout = moe_layout(reader.config)
    original = stored_bytes(reader)
    budget = budget_bytes(target_bytes, target_gib, original)
    group = group_size_for(layout)
    experts_bytes = _dense_bytes(layout, reader, 16, group)
    rest = original - experts_bytes
    element = DTYPE_SIZE[reader.dtype_name(_expert_names(layout, layout.moe_layers[0], "gate")[0])]
    layers = sample_layers or [layout.moe_layers[len(layout.moe_layers) // 2]]
    plan = Plan(budget, original, group, layers)
    stacks = {
        (layer, m): oriented(m, layout.read_experts(reader, layer, m).float()) for layer in layers for m in MATRICES
    }
    norm = math.sqrt(sum(w.pow(2).sum().item() for w in stacks.values()))

    def error(rebuilt: dict) -> float:
        return math.sqrt(sum((rebuilt[k] - w).pow(2).sum().item() for k, w in stacks.items())) / norm

    # The original: every bit width at the plan's group size, and below 8 bits at half and a quarter of it too (more
    # scales, less error). Groups run along each matrix's own input dimension, as the checkpoint stores them.
    dense = [(b, None) for b in bits] + [(b, group // k) for b in bits if 1 < b < 8 for k in (2, 4) if group // k >= 16]
    for b, g in dense:
        size = g or group
        rebuilt = {
            (layer, m): w if b == 16 else oriented(m, groupwise.fake_quantize(oriented(m, w), b, size))
            for (layer, m), w in stacks.items()
        }
        bytes_ = rest + _dense_bytes(layout, reader, b, size)
        plan.options.append(Option(Recipe("original", b, group_size=g), bytes_, error(rebuilt)))
    for cut in cuts:
        config = resolve_settings(layout, MobeConfig(target_ratio=cut, steps=steps, device=device))
        fits = {}
        for (layer, matrix), w in stacks.items():
            torch.manual_seed(0)
            fits[layer, matrix] = fit_mobe(w, config, device=device)[0]
        per_layer = {b: sum(_factor_bytes(fits[layers[0], m], b, group, element) for m in MATRICES) for b in bits}
        for b in bits:
            rebuilt = {}
            for key, factors in fits.items():
                rebuilt[key] = _rounded(factors, b, group).reconstruct()  # in the stack's orientation
            option = Option(Recipe("mobe", b, cut), rest + per_layer[b] * len(layout.moe_layers), error(rebuilt))
            plan.options.append(option)
    plan.seconds = time.perf_counter() - start
    return plan


def execute_plan(
    plan: Plan,
    model: str | Path,
    output: str | Path,
    config: MobeConfig | None = None,
    *,
    progress: bool = True,
) -> Recipe:
    """Write the chosen recipe: `quantize_checkpoint` of the original, or `compress` at the cut with integer factors.

    `config`: further settings of a MoBE compression (steps, device, calibration, ...); its target ratio is the plan's.
    Raises ValueError when nothing fits the budget.
    """
    chosen = plan.chosen
    if chosen is None:
        raise ValueError(plan.table().splitlines()[-1])
    recipe = chosen.recipe
    group = recipe.group_size or plan.group_size
    quantize = None if recipe.bits == 16 else QuantizeConfig(bits=recipe.bits, group_size=group)
    if recipe.technique == "original":
        if quantize is None:
            raise ValueError("the budget holds the original as it is: nothing to write")
        quantize_checkpoint(model, output, quantize, progress=progress)
    else:
        settings = dataclasses.replace(config or MobeConfig(), target_ratio=recipe.cut)
        compress(model, output, settings, progress=progress, quantize=quantize)
    return recipe
