"""Per-layer calibration statistics: what the routed experts of one MoE layer saw on the calibration text.

For expert i of a layer, with X_i the (n_i, d) inputs of the tokens routed to it and H_i = act(X_i G_i^T) *
(X_i U_i^T) its (n_i, p) intermediate activations under the ORIGINAL weights:

- `gram_in[i]  = X_i^T X_i` (d x d): weights the output error of gate and up, ||X_i (W_i - What_i)^T||^2;
- `gram_mid[i] = H_i^T H_i` (p x p): weights the output error of down, ||H_i (D_i - Dhat_i)^T||^2;
- `counts[i]   = n_i`;

all accumulated in float64. Optionally the layer's expert inputs themselves (`inputs` (T, d), `top_k_index`,
`top_k_weights`), for the layer-local distillation of `mobe.calibrate.refine`.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path

import torch
from safetensors import safe_open
from torch import Tensor

from ..export import atomic_save_file


@dataclass
class LayerStats:
    gram_in: Tensor  # (E, d, d) float64
    gram_mid: Tensor  # (E, p, p) float64
    counts: Tensor  # (E,) int64
    inputs: Tensor | None = None  # (T, d) the experts module's input tokens
    top_k_index: Tensor | None = None  # (T, k)
    top_k_weights: Tensor | None = None  # (T, k)

    @classmethod
    def zeros(cls, num_experts: int, p: int, d: int) -> LayerStats:
        return cls(
            torch.zeros(num_experts, d, d, dtype=torch.float64),
            torch.zeros(num_experts, p, p, dtype=torch.float64),
            torch.zeros(num_experts, dtype=torch.int64),
        )

    def gram(self, matrix: str) -> Tensor:
        """The Gram that weights `matrix`'s output error: of the inputs (gate, up) or the activations (down)."""
        return self.gram_mid if matrix == "down" else self.gram_in

    def save(self, path: Path, metadata: dict[str, str]) -> None:
        tensors = {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}
        atomic_save_file({k: v.contiguous() for k, v in tensors.items()}, path, metadata)

    @classmethod
    def load(cls, path: Path, with_inputs: bool = False) -> LayerStats:
        with safe_open(path, framework="pt") as f:
            keys = set(f.keys())
            wanted = [x.name for x in fields(cls) if x.name in keys]
            if not with_inputs:
                wanted = [k for k in wanted if k in ("gram_in", "gram_mid", "counts")]
            return cls(**{k: f.get_tensor(k) for k in wanted})


def metadata_of(path: Path) -> dict[str, str]:
    with safe_open(path, framework="pt") as f:
        return f.metadata() or {}


STATS_FOLDER = "calibration"


def stats_path(work: str | Path, layer: int) -> Path:
    """Where a run keeps a layer's calibration statistics: inside its work folder, so a resumed run reuses them."""
    return Path(work) / STATS_FOLDER / f"layer{layer:05d}.safetensors"
