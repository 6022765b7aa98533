"""Per-layer error and parameter report: printed as a table, saved as JSON."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..export.files import write_json_atomic

REPORT_FILE = "mobe_report.json"


def weight_error(original: torch.Tensor, approx: torch.Tensor) -> tuple[float, float]:
    """(relative Frobenius error, mean squared error) of `approx` against `original`, in float64.

    Summed a few matrices at a time: a float64 copy of one chunk at once, never of the whole stack (four float64
    stacks were a compression job's peak)."""
    rows = max(1, (1 << 22) // max(1, original[0].numel())) if original.dim() > 1 else original.numel()
    diff2 = torch.zeros((), dtype=torch.float64)
    norm2 = torch.zeros((), dtype=torch.float64)
    for o, a in zip(original.split(rows), approx.split(rows), strict=True):
        o = o.double()
        diff2 += (o - a.double()).pow(2).sum()
        norm2 += o.pow(2).sum()
    return (diff2.sqrt() / norm2.sqrt()).item(), (diff2 / original.numel()).item()


@dataclass
class MatrixResult:
    layer: int
    matrix: str
    relative_error: float
    mse: float
    init_relative_error: float
    best_step: int
    steps: int
    seconds: float
    params_before: int
    params_after: int
    resumed: bool = False
    output_error: float | None = None  # relative output error on the calibration tokens (calibrated runs)
    # relative error of the layer's routed-experts output on the held-out calibration tokens, before and after the
    # layer-local refinement (runs with calibration_refine_steps)
    layer_error_before: float | None = None
    layer_error: float | None = None


@dataclass
class CompressionReport:
    source: str
    output: str
    format: str
    config: dict[str, Any]
    results: list[MatrixResult] = field(default_factory=list)
    expert_params_before: int = 0
    model_params_before: int = 0
    distill: Any = None  # the DistillReport when the result was distilled (saved by the distillation itself)
    bytes_before: int | None = None  # the weights of the source and of the output as stored (all tensors, any dtype)
    bytes_after: int | None = None
    quantize: dict[str, Any] | None = None  # the QuantizeConfig the output was quantised with, if it was

    @property
    def compressed_params_before(self) -> int:
        return sum(r.params_before for r in self.results)

    @property
    def compressed_params_after(self) -> int:
        return sum(r.params_after for r in self.results)

    @property
    def expert_params_after(self) -> int:
        return self.expert_params_before - self.compressed_params_before + self.compressed_params_after

    @property
    def model_params_after(self) -> int:
        return self.model_params_before - self.compressed_params_before + self.compressed_params_after

    @property
    def compressed_layers_params_before(self) -> int:
        """Routed-expert parameters of the layers that were compressed (3 matrix types of E p d each)."""
        return 3 * self.results[0].params_before * len({r.layer for r in self.results}) if self.results else 0

    def summary(self) -> dict[str, Any]:
        layers_before = self.compressed_layers_params_before
        layers_after = layers_before - self.compressed_params_before + self.compressed_params_after
        return {
            "compressed_layers_reduction": 1 - layers_after / layers_before if layers_before else 0.0,
            "expert_params_before": self.expert_params_before,
            "expert_params_after": self.expert_params_after,
            "expert_reduction": 1 - self.expert_params_after / self.expert_params_before,
            "model_params_before": self.model_params_before,
            "model_params_after": self.model_params_after,
            "model_reduction": 1 - self.model_params_after / self.model_params_before,
            "mean_relative_error": sum(r.relative_error for r in self.results) / max(len(self.results), 1),
        }

    def to_dict(self) -> dict[str, Any]:
        out = {
            "source": self.source,
            "output": self.output,
            "format": self.format,
            "config": self.config,
            "summary": self.summary(),
            "results": [asdict(r) for r in self.results],
        }
        if self.distill is not None:
            out["distill"] = self.distill.to_dict()
        if self.bytes_after is not None:
            out["stored_bytes"] = {"before": self.bytes_before, "after": self.bytes_after}
        if self.quantize is not None:
            out["quantize"] = self.quantize
        return out

    def save(self, folder: Path) -> Path:
        path = Path(folder) / REPORT_FILE
        write_json_atomic(self.to_dict(), path)
        return path

    def table(self) -> str:
        c = self.config
        settings = f"m={c.get('num_bases')} " if c.get("method", "mobe") == "mobe" else ""
        lines = [f"method {c.get('method', 'mobe')}: {settings}rank {c.get('rank')}, {self.format} output"]
        calibrated = any(r.output_error is not None for r in self.results)
        refined = any(r.layer_error is not None for r in self.results)
        lines.append(
            f"{'layer':>5} {'matrix':>6} {'rel.err':>9} {'init':>9} {'mse':>10} {'best@':>6} {'sec':>7}"
            + (f" {'out.err':>9}" if calibrated else "")
            + (f" {'layer err: fit -> refined':>25}" if refined else "")
        )
        for r in self.results:
            out = f" {r.output_error:>9.4f}" if r.output_error is not None else ""
            if r.layer_error is not None:
                out += f" {r.layer_error_before:>14.4f} -> {r.layer_error:.4f}"
            lines.append(
                f"{r.layer:>5} {r.matrix:>6} {r.relative_error:>9.4f} {r.init_relative_error:>9.4f} "
                f"{r.mse:>10.3e} {r.best_step:>6} {r.seconds:>7.1f}{out}" + ("  (resumed)" if r.resumed else "")
            )
        s = self.summary()
        lines.append(
            f"experts: {s['expert_params_before']:,} -> {s['expert_params_after']:,} params "
            f"({100 * s['expert_reduction']:.1f}% fewer); model: {s['model_params_before']:,} -> "
            f"{s['model_params_after']:,} ({100 * s['model_reduction']:.1f}% fewer); "
            f"mean relative error {s['mean_relative_error']:.4f}"
        )
        if self.bytes_before and self.bytes_after is not None:
            quant = f", int{self.quantize['bits']} weights" if self.quantize else ""
            lines.append(
                f"stored: {self.bytes_before / 2**20:,.2f} MiB -> {self.bytes_after / 2**20:,.2f} MiB "
                f"({100 * self.bytes_after / self.bytes_before:.1f}% of the source{quant})"
            )
        if abs(s["compressed_layers_reduction"] - s["expert_reduction"]) > 1e-9:  # only some layers compressed
            lines.append(
                f"experts of the {len({r.layer for r in self.results})} compressed layers: "
                f"{100 * s['compressed_layers_reduction']:.1f}% fewer (the rest are unchanged)"
            )
        return "\n".join(lines)
