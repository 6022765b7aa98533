"""What a pruning run removed: experts kept per layer, their REAP scores, parameters before and after."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..evaluate.report import REPORT_FILE
from ..export.files import write_json_atomic


@dataclass
class LayerPruning:
    layer: int
    experts_before: int
    kept: list[int]  # original ids, in their new order
    pruned: list[int]
    scores: list[float]  # REAP score of every original expert
    tokens_routed: list[int]  # calibration tokens routed to every original expert


@dataclass
class PruneReport:
    source: str
    output: str
    config: dict[str, Any]
    layers: list[LayerPruning] = field(default_factory=list)
    calibration_tokens: int = 0
    expert_params_before: int = 0
    expert_params_after: int = 0
    model_params_before: int = 0
    model_params_after: int = 0
    seconds: float = 0.0
    bytes_before: int | None = None  # the weights of the source and of the output as stored (all tensors, any dtype)
    bytes_after: int | None = None
    quantize: dict[str, Any] | None = None  # the QuantizeConfig the output was quantised with, if it was

    def summary(self) -> dict[str, Any]:
        return {
            "experts_per_layer_before": self.layers[0].experts_before if self.layers else 0,
            "experts_per_layer_after": len(self.layers[0].kept) if self.layers else 0,
            "expert_params_before": self.expert_params_before,
            "expert_params_after": self.expert_params_after,
            "expert_reduction": 1 - self.expert_params_after / max(self.expert_params_before, 1),
            "model_params_before": self.model_params_before,
            "model_params_after": self.model_params_after,
            "model_reduction": 1 - self.model_params_after / max(self.model_params_before, 1),
        }

    def to_dict(self) -> dict[str, Any]:
        out = {
            "source": self.source,
            "output": self.output,
            "format": "pruned",
            "config": self.config,
            "calibration_tokens": self.calibration_tokens,
            "seconds": self.seconds,
            "summary": self.summary(),
            "layers": [asdict(layer) for layer in self.layers],
        }
        if self.bytes_before is not None:
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
        lines = [
            f"expert pruning by {c.get('criterion', 'reap')} score: {100 * c['target_ratio']:.0f}% of the routed "
            f"experts removed ({c['budget']} budget), scored on {self.calibration_tokens} calibration tokens"
        ]
        header = f"{'layer':>5} {'kept':>7} {'unrouted':>8} {'max score removed':>17} {'min score kept':>14}  removed"
        lines.append(header)
        for lay in self.layers:
            removed = max((lay.scores[e] for e in lay.pruned), default=float("nan"))
            kept = min(lay.scores[e] for e in lay.kept)
            unrouted = sum(1 for n in lay.tokens_routed if n == 0)
            ids = ",".join(map(str, lay.pruned)) or "-"
            lines.append(
                f"{lay.layer:>5} {len(lay.kept):>3}/{lay.experts_before:<3} {unrouted:>8} {removed:>17.4g} "
                f"{kept:>14.4g}  {ids}"
            )
        s = self.summary()
        lines.append(
            f"experts: {s['expert_params_before']:,} -> {s['expert_params_after']:,} params "
            f"({100 * s['expert_reduction']:.1f}% fewer); model: {s['model_params_before']:,} -> "
            f"{s['model_params_after']:,} ({100 * s['model_reduction']:.1f}% fewer)"
        )
        if self.bytes_before and self.bytes_after is not None:
            quant = f", int{self.quantize['bits']} weights" if self.quantize else ""
            lines.append(
                f"stored: {self.bytes_before / 2**20:,.2f} MiB -> {self.bytes_after / 2**20:,.2f} MiB "
                f"({100 * self.bytes_after / self.bytes_before:.1f}% of the source{quant})"
            )
        return "\n".join(lines)
