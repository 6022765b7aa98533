"""The teacher's targets: top-k log-probabilities of the ORIGINAL model on the distillation text, on disk.

The original is streamed one decoder layer at a time (as for calibration statistics), so computing the targets
needs one decoder layer plus the hidden states of the text, never the whole model; the student trains afterwards
without the teacher in memory. Each MoE layer's routing is recorded on the way (the router's top-k log-probabilities
over the experts, coarsened like the vocabulary's): the student's routers can then be taught the original's routing
directly, not only through the output.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
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
from .trainable import RouterHooks, router_modules


@dataclass
class TeacherTargets:
    """Per sequence: its token ids and the teacher's top-k log-probabilities, token ids and tail log-probability.

    `router_*` (empty when not recorded): per sequence, the same over the experts of each MoE layer, shaped
    (moe layers, length, k) for log-probabilities and expert ids and (moe layers, length) for the tail.
    """

    input_ids: list[Tensor]
    logprobs: list[Tensor]
    indices: list[Tensor]
    tail: list[Tensor]
    meta: dict[str, str]
    router_logprobs: list[Tensor] = field(default_factory=list)
    router_indices: list[Tensor] = field(default_factory=list)
    router_tail: list[Tensor] = field(default_factory=list)

    @property
    def has_routing(self) -> bool:
        return bool(self.router_logprobs)

    def __len__(self) -> int:
        return len(self.input_ids)

    def save(self, path: Path) -> None:
        tensors: dict[str, Tensor] = {}
        for i in range(len(self)):
            tensors[f"{i}.input_ids"] = self.input_ids[i].to(torch.int64).contiguous()
            tensors[f"{i}.logprobs"] = self.logprobs[i].float().contiguous()
            tensors[f"{i}.indices"] = self.indices[i].to(torch.int32).contiguous()
            tensors[f"{i}.tail"] = self.tail[i].float().contiguous()
            if self.has_routing:
                tensors[f"{i}.router_logprobs"] = self.router_logprobs[i].float().contiguous()
                tensors[f"{i}.router_indices"] = self.router_indices[i].to(torch.int16).contiguous()
                tensors[f"{i}.router_tail"] = self.router_tail[i].float().contiguous()
        tmp = path.with_name(path.name + ".tmp")
        save_file(tensors, tmp, metadata={"meta": json.dumps(self.meta, sort_keys=True), "sequences": str(len(self))})
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path) -> TeacherTargets:
        with safe_open(path, framework="pt") as f:
            header = f.metadata()
            n = int(header["sequences"])
            get = f.get_tensor
            routing = "0.router_logprobs" in f.keys()  # noqa: SIM118 (safe_open has no __contains__)
            return cls(
                input_ids=[get(f"{i}.input_ids") for i in range(n)],
                logprobs=[get(f"{i}.logprobs") for i in range(n)],
                indices=[get(f"{i}.indices").long() for i in range(n)],
                tail=[get(f"{i}.tail") for i in range(n)],
                meta=json.loads(header["meta"]),
                router_logprobs=[get(f"{i}.router_logprobs") for i in range(n)] if routing else [],
                router_indices=[get(f"{i}.router_indices") for i in range(n)] if routing else [],
                router_tail=[get(f"{i}.router_tail") for i in range(n)] if routing else [],
            )


def compute_targets(
    original: str | Path,
    sequences: list[Tensor],
    top_k: int,
    meta: dict[str, str],
    progress: bool = False,
    router_top_k: int = 0,
) -> TeacherTargets:
    """Run the original over `sequences` (1-D token ids), streamed layer by layer, and keep its top-k.

    With `router_top_k` > 0, each MoE layer's router logits are caught as the layer runs and their top
    `router_top_k` log-probabilities over the experts kept too.
    """
    reader = CheckpointReader(original)
    layout = moe_layout(reader.config)
    stream = LayerStream(reader, layout)
    routers = list(router_modules(stream.model, layout).values()) if router_top_k > 0 else []
    caught: list[list[tuple[Tensor, Tensor, Tensor]]] = [[] for _ in routers]
    with RouterHooks(routers, lambda k, logits: caught[k].append(teacher_topk(logits.float(), router_top_k))):
        hidden = stream.embed(sequences)
        for layer in tqdm(range(layout.num_layers), desc="Teacher", disable=not progress, leave=False):
            hidden = stream.run_layer(layer, hidden)
    logprobs, indices, tail = [], [], []
    for logits in stream.logits(hidden):
        values, idx, rest = teacher_topk(logits[0], top_k)
        logprobs.append(values)
        indices.append(idx)
        tail.append(rest)
    per_seq = [[layer[i] for layer in caught] for i in range(len(sequences))] if routers else []
    return TeacherTargets(
        [s.clone() for s in sequences],
        logprobs,
        indices,
        tail,
        meta,
        router_logprobs=[torch.stack([v for v, _, _ in seq]) for seq in per_seq],
        router_indices=[torch.stack([i for _, i, _ in seq]).to(torch.int16) for seq in per_seq],
        router_tail=[torch.stack([t for _, _, t in seq]) for seq in per_seq],
    )
