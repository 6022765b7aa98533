"""Calibrated planning under a byte budget: how many experts to prune (REAP) and the bits of every layer's gate, up
and down, chosen together to lose least on the calibration text.

Measurement (one stream of the original model over the calibration tokens, one decoder layer at a time): for
each MoE layer l, with the original model's hidden states X_l as input and the original layer's output Y_l as
reference, the squared error ||Y'_l - Y_l||^2 summed over the tokens of

- the layer with a share of its experts pruned by REAP (`mobe.prune`; the router keeps only the kept experts), and
- that layer (pruned or not) with one matrix of its experts rounded by GPTQ at each candidate bit width, on the
  Grams of the tokens that layer routes to each kept expert (`quantize.checkpoint.gptq_stack`, the rounding
  `mobe quantize --calibration` writes), less the pruning's own error.

Since attention is the same in every variant, the difference of the decoder layer's outputs is the MoE block's
error in the residual stream, one unit for every layer, matrix, pruning and rounding. The plan's predicted error
is the sum of the parts (errors of different layers and matrices taken as uncorrelated), and for each pruning
share the bits of the (layer, matrix) units are allocated by an exact knapsack over the bytes (discretised
upwards, so the allocation always fits). `chosen` is the share whose best allocation predicts the least error;
`score_choices` ranks the shares' best allocations by calibration loss instead (`mobe.plan.score`), which is what
`mobe compress` writes: the sum of squared errors ranks allocations within a share well, pruning against rounding
less so.
Uniform precision is one of the allocations, so the plan is never predicted worse than uniform GPTQ at the same
bytes; `benchmarks/budget_calibrated.py` checks the choices against held-out perplexity.

Cost: per MoE layer and pruning share, one GPTQ of each matrix at each bit width and five runs of the layer (one
for the Grams, one per width). Peak memory: one layer, its statistics, the calibration tokens' hidden
states (three copies). Disk: each REAP share's pruned copy of the model, at the source's precision, in a temporary
folder while the plan is measured.
"""

from __future__ import annotations

import math
import shutil
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..architectures import moe_layout
from ..calibrate import LayerStats, LayerStream, StatsAccumulator, calibration_ids
from ..checkpoint import CheckpointReader
from ..config import QuantizeConfig
from ..prune import prune_experts
from ..quantize.checkpoint import gptq_stack, quantize_checkpoint, stored_bytes
from .score import calibration_loss, model_loss
from .sizes import MATRICES, budget_bytes, check_budget, expert_bytes, group_size_for

UNIT_BITS = (2, 3, 4, 8)
PRUNE_SHARES = (0.0, 0.25, 0.5)
RESOLUTION = 20_000  # knapsack cells across the experts' share of the budget


@dataclass
class Branch:
    """One pruning share measured: per MoE layer the pruning's error and each (matrix, bits) rounding's added error,
    and the bytes of everything but the routed experts and of one layer's matrix at each width."""

    share: float
    experts: int  # kept per layer
    rest_bytes: int  # every stored tensor but the routed experts (the router shrinks when experts go)
    unit_bytes: dict[tuple[str, int], int]  # (matrix, bits) -> bytes of one layer's kept experts' matrix
    prune_error: dict[int, float] = field(default_factory=dict)
    rounding_error: dict[tuple[int, str, int], float] = field(default_factory=dict)  # (layer, matrix, bits)

    @property
    def layers(self) -> list[int]:
        return sorted(self.prune_error)

    def allocate(self, budget_bytes: int) -> MixedChoice | None:
        """The bits of every (layer, matrix) with the least predicted error within `budget_bytes` (None: the
        smallest allocation does not fit)."""
        units = [(layer, m) for layer in self.layers for m in MATRICES]
        choices = UNIT_BITS
        room = budget_bytes - self.rest_bytes
        if room < sum(self.unit_bytes[m, min(UNIT_BITS)] for _, m in units):
            return None
        cell = max(1, -(-room // RESOLUTION))
        cells = room // cell
        best = np.full(cells + 1, np.inf)
        best[0] = 0.0
        picks = np.zeros((len(units), cells + 1), dtype=np.int8)
        for u, (layer, m) in enumerate(units):
            new = np.full(cells + 1, np.inf)
            for c, bits in enumerate(choices):
                cost = -(-self.unit_bytes[m, bits] // cell)  # rounded up: the allocation always fits
                if cost > cells:
                    continue
                error = self.rounding_error[layer, m, bits]
                candidate = best[: cells + 1 - cost] + error
                better = candidate < new[cost:]
                new[cost:][better] = candidate[better]
                picks[u, cost:][better] = c
            best = new
        end = int(np.argmin(best))
        if not np.isfinite(best[end]):
            return None
        allocation: dict[tuple[int, str], int] = {}
        for u in range(len(units) - 1, -1, -1):
            bits = choices[picks[u, end]]
            allocation[units[u]] = bits
            end -= -(-self.unit_bytes[units[u][1], bits] // cell)
        experts_bytes = sum(self.unit_bytes[m, b] for (_, m), b in allocation.items())
        predicted = sum(self.prune_error.values()) + sum(
            self.rounding_error[layer, m, b] for (layer, m), b in allocation.items()
        )
        return MixedChoice(self.share, dict(sorted(allocation.items())), self.rest_bytes + experts_bytes, predicted)


@dataclass
class MixedChoice:
    """A pruning share and the bits of every (layer, matrix) unit, with their exact stored bytes and the predicted
    output error (summed squared error of the MoE layers' outputs on the calibration tokens)."""

    share: float
    allocation: dict[tuple[int, str], int]
    stored_bytes: int
    predicted_error: float

    def label(self) -> str:
        counts: dict[int, int] = {}
        for bits in self.allocation.values():
            counts[bits] = counts.get(bits, 0) + 1
        precision = " ".join(f"int{b} x{n}" for b, n in sorted(counts.items(), reverse=True))
        prefix = f"REAP {100 * self.share:.0f}% + " if self.share else ""
        if len(counts) == 1:
            return f"{prefix}GPTQ {precision.split(' x')[0]}"
        return f"{prefix}GPTQ mixed ({precision} of {len(self.allocation)} matrices)"


@dataclass
class MixedPlan:
    """Every pruning share measured on the calibration text; `chosen` solves the allocation for the budget."""

    budget_bytes: int
    original_bytes: int
    group_size: int
    calibration: str
    tokens: int
    branches: list[Branch]
    seconds: float = 0.0

    def with_budget(self, budget_bytes: int) -> MixedPlan:
        """The same measurements under another budget (nothing is measured again)."""
        return replace(self, budget_bytes=budget_bytes)

    def choices(self) -> list[MixedChoice]:
        """Each pruning share's best allocation within the budget (shares that fit nothing left out)."""
        return [c for c in (b.allocate(self.budget_bytes) for b in self.branches) if c is not None]

    @property
    def chosen(self) -> MixedChoice | None:
        choices = self.choices()
        return min(choices, key=lambda c: c.predicted_error) if choices else None

    def uniform(self, bits: int, share: float = 0.0) -> MixedChoice:
        """Every unit at `bits` under pruning `share`: what a uniform recipe predicts, for comparison."""
        branch = next(b for b in self.branches if b.share == share)
        allocation = {(layer, m): bits for layer in branch.layers for m in MATRICES}
        size = branch.rest_bytes + sum(branch.unit_bytes[m, bits] for _, m in allocation)
        error = sum(branch.prune_error.values()) + sum(branch.rounding_error[layer, m, bits] for layer, m in allocation)
        return MixedChoice(share, allocation, size, error)

    def table(self) -> str:
        unit, scale = ("GiB", 2**30) if self.original_bytes >= 2**30 else ("MiB", 2**20)
        lines = [
            f"budget {self.budget_bytes / scale:.3f} {unit} = {100 * self.budget_bytes / self.original_bytes:.1f}% "
            f"of the original's {self.original_bytes / scale:.3f} {unit}; errors of the MoE layers' outputs measured "
            f"on {self.tokens} tokens of {self.calibration} ({self.seconds:.0f} s)",
            f"{'recipe':<58} {unit:>9} {'of orig.':>9} {'pred. error':>12}",
        ]
        chosen = self.chosen
        rows = [self.uniform(b, branch.share) for branch in self.branches for b in UNIT_BITS]
        rows = [r for r in rows if r.stored_bytes <= self.budget_bytes]
        rows += [c for c in self.choices() if c not in rows]
        for row in sorted(rows, key=lambda r: r.stored_bytes):
            mark = "  <- least predicted error" if row == chosen else ""
            lines.append(
                f"{row.label():<58} {row.stored_bytes / scale:>9.3f} "
                f"{100 * row.stored_bytes / self.original_bytes:>8.1f}% {row.predicted_error:>12.4g}{mark}"
            )
        if chosen is None:
            smallest = min((self.uniform(min(UNIT_BITS), b.share) for b in self.branches), key=lambda r: r.stored_bytes)
            lines.append(
                f"nothing fits: the smallest, {smallest.label()}, needs {smallest.stored_bytes / scale:.3f} {unit}"
            )
        else:
            lines.append(f"least predicted error within the budget: {chosen.label()}")
            lines.append(
                "bits by layer (gate/up/down): "
                + ", ".join(
                    f"{layer}: " + "/".join(str(chosen.allocation[layer, m]) for m in MATRICES)
                    for layer in sorted({layer for layer, _ in chosen.allocation})
                )
            )
        return "\n".join(lines)


def _squared_error(outputs: list[torch.Tensor], reference: list[torch.Tensor]) -> float:
    return float(sum((o.double() - r.double()).pow(2).sum() for o, r in zip(outputs, reference, strict=True)))


class _RoundingErrors:
    """Forward pre-hook on a fused experts module: for each variant (one matrix's experts swapped for a rounded
    copy) the squared error of the module's output against its own, on the tokens and routing of this call."""

    def __init__(self, variants: dict[str, torch.Tensor]):
        self.variants = variants  # matrix -> its rounded (E, rows, cols) stack
        self.errors = dict.fromkeys(variants, 0.0)
        self.swapped: dict[str, tuple[torch.nn.Parameter, torch.nn.Parameter]] = {}

    def _swap(self, module: torch.nn.Module, matrix: str) -> tuple[torch.nn.Parameter, torch.nn.Parameter]:
        """The module's (gate_up_proj, down_proj) with `matrix` rounded, built once per layer."""
        if matrix not in self.swapped:
            gate_up, down = module.gate_up_proj, module.down_proj
            rounded, p = self.variants[matrix], down.shape[-1]
            if matrix == "down":
                down = torch.nn.Parameter(rounded, requires_grad=False)
            else:
                copy = gate_up.data.clone()
                (copy[:, :p] if matrix == "gate" else copy[:, p:]).copy_(rounded)
                gate_up = torch.nn.Parameter(copy, requires_grad=False)
            self.swapped[matrix] = (gate_up, down)
        return self.swapped[matrix]

    def __call__(self, module: torch.nn.Module, hidden: torch.Tensor, index: torch.Tensor, weights: torch.Tensor):
        own = module.gate_up_proj, module.down_proj
        with torch.no_grad():
            reference = module.forward(hidden, index, weights).double()  # .forward: no hooks, no recursion
            try:
                for matrix in self.variants:
                    module.gate_up_proj, module.down_proj = self._swap(module, matrix)
                    out = module.forward(hidden, index, weights).double()
                    self.errors[matrix] += float((out - reference).pow(2).sum())
            finally:
                module.gate_up_proj, module.down_proj = own


def _measure_layer(
    stream: LayerStream,
    layer: int,
    hidden: list[torch.Tensor],
    reference: list[torch.Tensor] | None,
    branch: Branch,
    quantize: QuantizeConfig,
) -> list[torch.Tensor]:
    """Fill `branch`'s errors for `layer` (on the inputs `hidden`); return this branch's own layer output (the
    reference when `reference` is None: the unpruned branch).

    One run of the layer collects the Grams (and gives the pruning's error against `reference`); then, per bit
    width, GPTQ rounds each matrix and one more run measures each rounded matrix's error in the experts' output on
    this branch's own routing (what is added to the pruning's error)."""
    layout, reader = stream.layout, stream.reader
    accumulator = StatsAccumulator(
        LayerStats.empty(layout.num_experts, layout.intermediate_size, layout.hidden_size), keep_inputs=False
    )
    own = stream.run_layer(layer, list(hidden), accumulator)
    stats = accumulator.finish()
    branch.prune_error[layer] = 0.0 if reference is None else _squared_error(own, reference)
    stacks = {m: layout.read_experts(reader, layer, m) for m in MATRICES}  # read once, rounded at every width
    for bits in UNIT_BITS:
        variants = {m: gptq_stack(stacks[m], stats.factor(m), stats.counts, quantize, bits)[2] for m in MATRICES}
        hook = _RoundingErrors(variants)
        stream.run_layer(layer, list(hidden), hook)
        for m in MATRICES:
            branch.rounding_error[layer, m, bits] = hook.errors[m]
        del variants, hook
    return own


def _branch(reader: CheckpointReader, share: float, group: int) -> Branch:
    layout = moe_layout(reader.config)
    unit = {
        (m, bits): expert_bytes(reader, layout, m, bits, group) * layout.num_experts
        for m in MATRICES
        for bits in (*UNIT_BITS, 16)
    }
    experts_bytes = sum(unit[m, 16] for m in MATRICES) * len(layout.moe_layers)
    return Branch(share, layout.num_experts, stored_bytes(reader) - experts_bytes, unit)


def _branch_streams(
    reader: CheckpointReader, shares: tuple[float, ...] | list[float], quantize: QuantizeConfig, work: Path
) -> dict[float, LayerStream]:
    """A layer stream of the original (share 0) and of a REAP-pruned copy (written under `work`) per other share,
    pruned on `quantize`'s calibration text and tokens as `execute_mixed` prunes."""
    streams = {}
    for share in shares:
        if share == 0:
            streams[share] = LayerStream(reader, moe_layout(reader.config))
            continue
        pruned = work / f"reap-{share}"
        prune_experts(
            reader.path,
            pruned,
            target_ratio=share,
            calibration=quantize.calibration,
            calibration_tokens=quantize.calibration_tokens,
            calibration_seq_len=quantize.calibration_seq_len,
            progress=False,
        )
        pruned_reader = CheckpointReader(pruned)
        streams[share] = LayerStream(pruned_reader, moe_layout(pruned_reader.config))
    return streams


def plan_mixed(
    model: str | Path,
    target_bytes: float | None = None,
    *,
    target_gib: float | None = None,
    calibration: str | Path,
    shares: tuple[float, ...] = PRUNE_SHARES,
    quantize: QuantizeConfig | None = None,
    progress: bool = True,
) -> MixedPlan:
    """Measure every pruning share and (layer, matrix, bits) rounding on the calibration text (see the module's
    docstring); the plan's `chosen` is the least predicted error within the budget.

    Args:
        model: checkpoint folder or hub id (with its tokenizer).
        target_bytes: the budget as a share of the original checkpoint's stored bytes; or `target_gib`.
        calibration: text file (its first `quantize.calibration_tokens` tokens).
        shares: REAP pruning shares to consider (0: keep every expert).
        quantize: GPTQ settings (group size: the largest power of two up to 128 that tiles the experts' inputs).
    """
    check_budget(target_bytes, target_gib)
    if 0.0 not in shares or any(not 0 <= s < 1 for s in shares):
        raise ValueError(f"shares are REAP shares in [0, 1) and must include 0 (no pruning), got {shares}")
    start = time.perf_counter()
    reader = CheckpointReader(model)
    layout = moe_layout(reader.config)
    original = stored_bytes(reader)
    budget = budget_bytes(target_bytes, target_gib, original)
    group = group_size_for(layout)
    quantize = replace(quantize or QuantizeConfig(), group_size=group, calibration=str(calibration))
    sequences = calibration_ids(reader.path, calibration, quantize.calibration_tokens, quantize.calibration_seq_len)
    work = Path(tempfile.mkdtemp(prefix="mobe-plan-"))
    try:
        streams = _branch_streams(reader, shares, quantize, work)
        branches = {share: _branch(stream.reader, share, group) for share, stream in streams.items()}
        main = streams[0.0]
        hidden = main.embed(sequences)
        for layer in tqdm(range(max(layout.moe_layers) + 1), desc="Measuring", disable=not progress):
            if layer not in layout.moe_layers:
                hidden = main.run_layer(layer, hidden)
                continue
            reference = _measure_layer(main, layer, hidden, None, branches[0.0], quantize)
            for share, stream in streams.items():
                if share > 0:
                    _measure_layer(stream, layer, hidden, reference, branches[share], quantize)
            hidden = reference
    finally:
        shutil.rmtree(work, ignore_errors=True)
    tokens = int(sum(s.numel() for s in sequences))
    plan = MixedPlan(budget, original, group, str(calibration), tokens, list(branches.values()))
    plan.seconds = time.perf_counter() - start
    return plan


@dataclass
class ScoredChoice:
    """A share's best allocation with the next-token cross-entropy (nats) it gives on the calibration tokens, and the
    original's on the same tokens."""

    choice: MixedChoice
    loss: float
    original_loss: float


def score_choices(
    plan: MixedPlan,
    model: str | Path,
    quantize: QuantizeConfig | None = None,
    *,
    tokens: int | None = None,
    progress: bool = True,
) -> list[ScoredChoice]:
    """Each pruning share's best allocation within the plan's budget, scored by its calibration loss
    (`mobe.plan.score`: streamed, layer by layer, nothing written but each share's pruned copy), least loss first.

    Args:
        tokens: calibration tokens to score on (default: the plan's, `quantize.calibration_tokens`).
    """
    choices = plan.choices()
    if not choices:
        return []
    quantize = replace(quantize or QuantizeConfig(), group_size=plan.group_size, calibration=plan.calibration)
    reader = CheckpointReader(model)
    sequences = calibration_ids(
        reader.path, plan.calibration, tokens or quantize.calibration_tokens, quantize.calibration_seq_len
    )
    work = Path(tempfile.mkdtemp(prefix="mobe-score-"))
    try:
        streams = _branch_streams(reader, sorted({0.0, *(c.share for c in choices)}), quantize, work)
        losses, original = [], None
        for choice in tqdm(choices, desc="Scoring plans", disable=not progress):
            loss, unrounded = calibration_loss(streams[choice.share], sequences, choice.allocation, quantize)
            losses.append(loss)
            original = unrounded if choice.share == 0 else original
        if original is None:  # only pruned shares fit
            original = model_loss(streams[0.0], sequences)
        scored = [ScoredChoice(c, loss, original) for c, loss in zip(choices, losses, strict=True)]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return sorted(scored, key=lambda s: s.loss)


def scores_table(scored: list[ScoredChoice]) -> str:
    """The scored choices, least loss first, as perplexities on the calibration tokens."""
    if not scored:
        return "nothing fits the budget: nothing scored"
    original = scored[0].original_loss
    lines = [f"{'measured: each share at its best allocation':<58} {'cal. ppl':>9} {'vs orig.':>9}"]
    for s in scored:
        mark = "  <- chosen" if s is scored[0] else ""
        change = 100 * (math.exp(s.loss - original) - 1)
        lines.append(f"{s.choice.label():<58} {math.exp(s.loss):>9.3f} {change:>+8.2f}%{mark}")
    lines.append(f"{'original':<58} {math.exp(original):>9.3f}")
    return "\n".join(lines)


def execute_mixed(
    plan: MixedPlan,
    model: str | Path,
    output: str | Path,
    quantize: QuantizeConfig | None = None,
    *,
    choice: MixedChoice | None = None,
    progress: bool = True,
) -> MixedChoice:
    """Write `choice` (default: the plan's chosen one): REAP at its share (when any), then GPTQ with its allocation,
    on the plan's calibration text and group size. `quantize`: the calibration tokens and GPTQ settings."""
    choice = choice or plan.chosen
    if choice is None:
        raise ValueError(plan.table().splitlines()[-1])
    quantize = replace(
        quantize or QuantizeConfig(),
        group_size=plan.group_size,
        calibration=plan.calibration,
        bits=min(choice.allocation.values()),
    )
    if choice.share:
        prune_experts(
            model,
            output,
            target_ratio=choice.share,
            calibration=plan.calibration,
            calibration_tokens=quantize.calibration_tokens,
            calibration_seq_len=quantize.calibration_seq_len,
            quantize=quantize,
            allocation=choice.allocation,
            progress=progress,
        )
    else:
        quantize_checkpoint(model, output, quantize, progress=progress, allocation=choice.allocation)
    return choice
