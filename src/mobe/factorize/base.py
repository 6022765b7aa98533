"""What every factorisation of an expert stack provides, so the pipeline and writers treat methods alike."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import ClassVar, TypeVar

import torch
from torch import Tensor

F = TypeVar("F", bound="ExpertFactors")


class ExpertFactors:
    """Base of the factor dataclasses: tensor fields are stored; `meta` fields are strings in the header.

    Subclasses are dataclasses whose Tensor fields are listed in `tensor_fields`; `reconstruct` returns the
    dense (n, p, d) float32 matrices of the given experts.
    """

    method: ClassVar[str]
    tensor_fields: ClassVar[tuple[str, ...]]
    meta_fields: ClassVar[tuple[str, ...]] = ()
    index_fields: ClassVar[tuple[str, ...]] = ()  # integer tensors among tensor_fields
    meta_defaults: ClassVar[dict[str, str]] = {}  # meta fields that checkpoints written before them lack

    def reconstruct(self, experts: Tensor | None = None) -> Tensor:
        raise NotImplementedError

    def tensors(self) -> dict[str, Tensor]:
        return {name: getattr(self, name) for name in self.tensor_fields}

    def meta(self) -> dict[str, str]:
        return {name: str(getattr(self, name)) for name in self.meta_fields}

    @classmethod
    def from_tensors(cls: type[F], tensors: dict[str, Tensor], meta: dict[str, str]) -> F:
        return cls(**{name: tensors[name] for name in cls.tensor_fields}, **cls.read_meta(meta))

    @classmethod
    def read_meta(cls, meta: Mapping[str, object]) -> dict[str, str]:
        """This method's meta fields from a header or config section, defaults filled in for older checkpoints."""
        missing = [k for k in cls.meta_fields if k not in meta and k not in cls.meta_defaults]
        if missing:
            raise KeyError(f"{cls.method} factors need meta fields {missing}")
        return {k: str(meta[k]) if k in meta else cls.meta_defaults[k] for k in cls.meta_fields}

    @property
    def dtype(self) -> torch.dtype:
        return getattr(self, self.tensor_fields[0]).dtype

    def num_parameters(self) -> int:
        return sum(t.numel() for t in self.tensors().values())

    def to(self: F, dtype: torch.dtype) -> F:
        """Floating tensors to `dtype`; integer ones (indices) stay as they are."""
        return dataclasses.replace(self, **{k: v.to(dtype) for k, v in self.tensors().items() if v.is_floating_point()})

    def _experts(self, experts: Tensor | None) -> Tensor:
        first = getattr(self, self.tensor_fields[0])
        return torch.arange(first.shape[0]) if experts is None else experts


def oriented(matrix: str, stack: Tensor) -> Tensor:
    """Down matrices (d x p) are factorised as their transpose, so every stack fitted is (E, p, d); self-inverse."""
    return stack.transpose(-1, -2) if matrix == "down" else stack


@dataclasses.dataclass
class FitStats:
    """What a fit reports: MSE of the start and of the kept state (original scale), and its cost.

    `trace` holds (seconds since the start, step, MSE at that step in the original scale) for iterative fits,
    so that schedules can be compared by error against wall time.
    """

    init_loss: float
    best_loss: float
    best_step: int
    steps: int
    seconds: float
    scale: float = 1.0
    trace: list[tuple[float, int, float]] = dataclasses.field(default_factory=list)
