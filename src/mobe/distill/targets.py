"""The teacher's targets: top-k log-probabilities of the ORIGINAL model on the distillation text, on disk.

The original is streamed one decoder layer at a time (as for calibration statistics), so computing the targets
needs one decoder layer plus the hidden states of the text, never the whole model; the student trains afterwards
without the teacher in memory.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor
from tqdm.auto import tqdm

from ..architectures import moe_layout
from ..calibrate import LayerStream
from ..checkpoint import CheckpointReader
from .loss import teacher_topk


@dataclass
class TeacherTargets:
    """Per sequence: its token ids and the teacher's top-k log-probabilities, token ids and tail log-probability."""

    input_ids: list[Tensor]
    logprobs: list[Tensor]
    indices: list[Tensor]
    tail: list[Tensor]
    meta: dict[str, str]

    def __len__(self) -> int:
        return len(self.input_ids)

    def save(self, path: Path) -> None:
        tensors: dict[str, Tensor] = {}
        for i in range(len(self)):
            tensors[f"{i}.input_ids"] = self.input_ids[i].to(torch.int64).contiguous()
            tensors[f"{i}.logprobs"] = self.logprobs[i].float().contiguous()
            tensors[f"{i}.indices"] = self.indices[i].to(torch.int32).contiguous()
            tensors[f"{i}.tail"] = self.tail[i].float().contiguous()
        tmp = path.with_name(path.name + ".tmp")
        save_file(tensors, tmp, metadata={"meta": json.dumps(self.meta, sort_keys=True), "sequences": str(len(self))})
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path) -> TeacherTargets:
        with safe_open(path, framework="pt") as f:
            header = f.metadata()
            n = int(header["sequences"])
            get = f.get_tensor
            return cls(
                input_ids=[get(f"{i}.input_ids") for i in range(n)],
                logprobs=[get(f"{i}.logprobs") for i in range(n)],
                indices=[get(f"{i}.indices").long() for i in range(n)],
                tail=[get(f"{i}.tail") for i in range(n)],
                meta=json.loads(header["meta"]),
            )


def compute_targets(
    original: str | Path, sequences: list[Tensor], top_k: int, meta: dict[str, str], progress: bool = False
) -> TeacherTargets:
    """Run the original over `sequences` (1-D token ids), streamed layer by layer, and keep its top-k."""
    reader = CheckpointReader(original)
    layout = moe_layout(reader.config)
    stream = LayerStream(reader, layout)
    hidden = stream.embed(sequences)
    for layer in tqdm(range(layout.num_layers), desc="Teacher", disable=not progress, leave=False):
        hidden = stream.run_layer(layer, hidden)
    logprobs, indices, tail = [], [], []
    for logits in stream.logits(hidden):
        values, idx, rest = teacher_topk(logits[0], top_k)
        logprobs.append(values)
        indices.append(idx)
        tail.append(rest)
    return TeacherTargets([s.clone() for s in sequences], logprobs, indices, tail, meta)
