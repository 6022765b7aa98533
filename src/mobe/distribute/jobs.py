"""One (layer, matrix) job: a picklable spec, the fit itself, and the work folder that keeps finished jobs.

A job reads the shards it needs itself and writes its factors atomically into the work folder, so any
process that sees the folder (this one, a local device worker, a Ray worker on another machine) can run it,
and a job finished by anyone is never run again.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from ..architectures import MoeLayout, moe_layout
from ..calibrate.collect import release_memory
from ..calibrate.stats import LayerStats, stats_path
from ..checkpoint import CheckpointReader
from ..config import MobeConfig
from ..evaluate import MatrixResult, weight_error
from ..export import atomic_save_file
from ..factorize import ExpertFactors, get_method, oriented
from ..factorize.weighted import OutputWeighting, output_error

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class JobError(ValueError):
    """A job produced factors that must not be written (not finite)."""


@dataclass(frozen=True)
class JobSpec:
    """Everything a worker needs to run one job, as plain data (sent to other processes and machines)."""

    source: str  # resolved checkpoint folder, visible to the worker (shared filesystem or hub cache)
    work: str  # the work folder the factors go to
    config: dict[str, Any]  # MobeConfig.to_dict(), rank resolved
    layer: int
    matrix: str

    @property
    def name(self) -> str:
        return f"layer {self.layer} {self.matrix}"


class JobStore:
    """Finished jobs' factors and results, one safetensors file per (layer, matrix) in the work folder."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)

    def path(self, layer: int, matrix: str) -> Path:
        return self.folder / f"layer{layer:05d}.{matrix}.safetensors"

    def done(self, layer: int, matrix: str) -> bool:
        return self.path(layer, matrix).exists()

    def save(self, layer: int, matrix: str, factors: ExpertFactors, result: MatrixResult) -> None:
        meta = {"method": factors.method, **factors.meta(), "result": json.dumps(result.__dict__)}
        atomic_save_file(factors.tensors(), self.path(layer, matrix), meta)

    def load(self, layer: int, matrix: str) -> tuple[ExpertFactors, MatrixResult]:
        with safe_open(self.path(layer, matrix), framework="pt") as f:
            meta = f.metadata()
            tensors = {name: f.get_tensor(name) for name in f.keys()}
        factors = get_method(meta["method"]).factors_cls.from_tensors(tensors, meta)
        return factors, MatrixResult(**json.loads(meta["result"]))


def fit_job(
    reader: CheckpointReader,
    layout: MoeLayout,
    config: MobeConfig,
    layer: int,
    matrix: str,
    device: torch.device | str,
    progress: bool = False,
    calibration: LayerStats | None = None,
) -> tuple[ExpertFactors, MatrixResult]:
    """Read one layer's expert stack of one matrix type, fit it, and measure the weight error.

    With the layer's `calibration` statistics the fit minimises the output error on the calibration tokens
    (`OutputWeighting`); the reported relative error stays the weight error, and the relative output error is
    reported beside it.
    """
    names = layout.stored_names(layer, matrix)
    weights = oriented(matrix, layout.read_experts(reader, layer, matrix))
    torch.manual_seed(config.seed)
    fit = get_method(config.method).fit
    side = "left" if matrix == "down" else "right"
    weighting = None
    if calibration is not None:
        weighting = OutputWeighting.from_factor(calibration.factor(matrix), side, damping=config.calibration_damping)
    factors, stats = fit(weights, config, device, f"layer {layer} {matrix}" if progress else None, weighting)
    source_dtype = torch.bfloat16 if reader.is_block_fp8(names[0]) else weights.dtype  # factors stay unquantised
    factors = factors.to(DTYPES.get(config.dtype, source_dtype))
    for field, tensor in factors.tensors().items():
        if not torch.isfinite(tensor).all():
            raise JobError(
                f"layer {layer} {matrix}: factor {field} is not finite after fitting "
                f"(lower --lr or check the source weights)"
            )
    weights, approx = weights.float(), factors.reconstruct()  # each once: the report's stacks are the job's peak
    rel, mse = weight_error(weights, approx)
    # the fit's losses are in its output metric; squares summed in float64 a few experts at a time
    mean_square = _mean_square(weights, weighting)
    E, p, d = weights.shape
    result = MatrixResult(
        layer=layer,
        matrix=matrix,
        relative_error=rel,
        mse=mse,
        init_relative_error=(stats.init_loss / mean_square) ** 0.5,
        best_step=stats.best_step,
        steps=stats.steps,
        seconds=stats.seconds,
        params_before=E * p * d,
        params_after=factors.num_parameters(),
        output_error=None if calibration is None else output_error(calibration.factor(matrix), weights, approx, side),
    )
    return factors, result


def _mean_square(stack: torch.Tensor, weighting: OutputWeighting | None = None) -> float:
    """Mean of the squares of `stack` (in the metric of `weighting` where given: of each W_i L_i or L_i^T W_i) in
    float64, one chunk of matrices at a time (never a whitened copy of the whole stack)."""
    rows = max(1, (1 << 22) // max(1, stack[0].numel()))
    total = 0.0
    for start in range(0, stack.shape[0], rows):
        idx = slice(start, start + rows)
        chunk = stack[idx] if weighting is None else weighting.apply(stack[idx], idx)
        total += chunk.double().pow(2).sum().item()
    return total / stack.numel()


def run_job(spec: JobSpec, device: str, progress: bool = False) -> dict[str, Any]:
    """Run one job in this process and save its factors; returns the result as a dict (cheap to send back).

    CPU results depend on the intra-op thread count (it changes the summation order), so a job runs with
    `config.threads` threads when that is set: the same setting gives the same bits in any process.
    """
    config = MobeConfig.from_dict(spec.config)
    threads = torch.get_num_threads()
    if config.threads:
        torch.set_num_threads(config.threads)
    try:
        reader = CheckpointReader(spec.source)
        layout = moe_layout(reader.config)
        calibration = None
        if config.calibration:
            calibration = LayerStats.load(stats_path(spec.work, spec.layer), matrices=(spec.matrix,))
        factors, result = fit_job(reader, layout, config, spec.layer, spec.matrix, device, progress, calibration)
    finally:
        torch.set_num_threads(threads)
        release_memory()  # the stack's per-expert reads: not kept in this process beside the next job
    JobStore(spec.work).save(spec.layer, spec.matrix, factors, result)
    return result.__dict__
