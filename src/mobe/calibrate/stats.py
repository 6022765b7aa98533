"""Per-layer calibration statistics: what the routed experts of one MoE layer saw on the calibration text.

For expert i of a layer, with X_i the (n_i, d) inputs of the tokens routed to it and H_i = act(X_i G_i^T) *
(X_i U_i^T) its (n_i, p) intermediate activations under the ORIGINAL weights:

- `inputs_factor`: F_i with F_i^T F_i = X_i^T X_i, which weights the output error of gate and up,
  ||X_i (W_i - What_i)^T||^2 = ||(W_i - What_i) F_i^T||^2;
- `mid_factor`: the same for H_i, which weights the output error of down, ||H_i (D_i - Dhat_i)^T||^2;
- `counts[i] = n_i` (each routed token counts once; the router's weights do not enter the Grams).

The factors (`mobe.factorize.gram.GramFactor`) hold min(n_i, d) rows of d numbers per expert instead of a d x d
Gram: the rows themselves (float32, as the layer computed them) until an expert has seen d tokens, then a float64
R factor of a streamed QR. The Grams stay exact; a layer's statistics shrink from E (d^2 + p^2) float64 numbers
(105 GB for DeepSeek-V3) to at most the calibration tokens' own rows. Optionally the layer's expert inputs
themselves (`inputs` (T, d), `top_k_index`, `top_k_weights`), for the layer-local distillation of
`mobe.calibrate.refine`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from safetensors import safe_open
from torch import Tensor

from ..export import atomic_save_file
from ..factorize.gram import GramFactor

FACTORS = ("inputs_factor", "mid_factor")
ROUTING = ("inputs", "top_k_index", "top_k_weights")


@dataclass
class LayerStats:
    inputs_factor: GramFactor  # of the expert inputs X_i (dim d)
    mid_factor: GramFactor  # of the intermediate activations H_i (dim p)
    inputs: Tensor | None = None  # (T, d) the experts module's input tokens
    top_k_index: Tensor | None = None  # (T, k)
    top_k_weights: Tensor | None = None  # (T, k)

    @classmethod
    def empty(cls, num_experts: int, p: int, d: int) -> LayerStats:
        return cls(GramFactor(num_experts, d), GramFactor(num_experts, p))

    @property
    def counts(self) -> Tensor:
        return self.inputs_factor.counts

    def factor(self, matrix: str) -> GramFactor:
        """The factored Grams that weight `matrix`'s output error: of the inputs (gate, up) or activations (down)."""
        return self.mid_factor if matrix == "down" else self.inputs_factor

    def gram(self, matrix: str) -> Tensor:
        """The dense Grams (E, k, k) float64 of `factor(matrix)`: for checks and small layers only."""
        return self.factor(matrix).gram()

    @property
    def nbytes(self) -> int:
        """Bytes of the Gram statistics (factors and counts; the kept routing inputs not included)."""
        return self.inputs_factor.nbytes + self.mid_factor.nbytes

    def save(self, path: Path, metadata: dict[str, str]) -> None:
        tensors = {}
        for name in FACTORS:
            tensors |= {f"{name}.{k}": v for k, v in getattr(self, name).tensors().items()}
        tensors |= {name: getattr(self, name) for name in ROUTING if getattr(self, name) is not None}
        atomic_save_file({k: v.contiguous() for k, v in tensors.items()}, path, metadata)

    @classmethod
    def load(
        cls, path: Path, with_inputs: bool = False, matrices: tuple[str, ...] = ("gate", "up", "down")
    ) -> LayerStats:
        """Read a layer's statistics; only the factors that `matrices` need (the other one stays empty).

        A file of an older mobe, with dense Grams (`gram_in`, `gram_mid`), is read into factors.
        """
        wanted = {"mid_factor" if m == "down" else "inputs_factor" for m in matrices}
        with safe_open(path, framework="pt") as f:
            keys = set(f.keys())
            factors = {}
            for name, legacy in zip(FACTORS, ("gram_in", "gram_mid"), strict=True):
                if legacy in keys and name in wanted:
                    factors[name] = GramFactor.from_gram(f.get_tensor(legacy), f.get_tensor("counts"))
                elif legacy in keys:
                    shape = f.get_slice(legacy).get_shape()
                    factors[name] = GramFactor(shape[0], shape[-1])
                elif name in wanted:
                    prefix = f"{name}."
                    factors[name] = GramFactor.from_tensors(
                        {k[len(prefix) :]: f.get_tensor(k) for k in keys if k.startswith(prefix)}
                    )
                else:
                    counts, first = f.get_slice(f"{name}.counts"), f.get_slice(f"{name}.0.0")
                    factors[name] = GramFactor(counts.get_shape()[0], first.get_shape()[1])
            routing = {k: f.get_tensor(k) for k in ROUTING if with_inputs and k in keys}
        return cls(**factors, **routing)


def metadata_of(path: Path) -> dict[str, str]:
    with safe_open(path, framework="pt") as f:
        return f.metadata() or {}


STATS_FOLDER = "calibration"


def stats_path(work: str | Path, layer: int) -> Path:
    """Where a run keeps a layer's calibration statistics: inside its work folder, so a resumed run reuses them."""
    return Path(work) / STATS_FOLDER / f"layer{layer:05d}.safetensors"
