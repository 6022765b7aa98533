"""What a distillation (`mobe.distill`) will hold in memory, from the checkpoints' headers and the settings (no
weights read)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from ..architectures import MoeLayout, moe_layout
from ..checkpoint import CheckpointReader
from ..config import DistillConfig
from ..distill.trainable import FACTOR_FIELDS
from ..export import FACTOR_PREFIX
from .memory import DTYPE_BYTES, RUNTIME_BYTES, calibration_pass_bytes

FLOAT32 = 4


@dataclass(frozen=True)
class DistillMemory:
    """Bytes of each part; `student` and `optimizer` are exact, `activations` an estimate (see `estimate`)."""

    trained_params: int
    student: int  # the compressed model in float32
    optimizer: int  # AdamW: two float32 moments per trained parameter, plus its gradient
    targets: int  # the teacher's top-k per token (and routing per MoE layer), on disk and in memory in training
    activations: int  # one sequence with activation checkpointing
    teacher: int = 0  # computing the targets: the original streamed one decoder layer at a time (0: not given)
    loading: int = 0  # loading the student in float32 (`student_loading_bytes`)

    @property
    def training(self) -> int:
        return self.student + self.optimizer + self.targets + self.activations

    @property
    def total(self) -> int:
        """The largest of the teacher's pass, loading the student and the training, plus what torch, transformers
        and matplotlib (the report's plot) allocate whatever the model's size."""

        return max(self.teacher, self.loading, self.training) + RUNTIME_BYTES["distill"]

    def summary(self, config: DistillConfig) -> str:
        gib = lambda n: f"{n / 2**30:.2f} GiB"  # noqa: E731
        return (
            f"distill --train {config.train} (seq {config.seq_len}, top-k {config.top_k}, {config.tokens:,} tokens): "
            f"{self.trained_params:,} trained parameters; student {gib(self.student)} + optimiser "
            f"{gib(self.optimizer)} + targets {gib(self.targets)} + activations ~{gib(self.activations)} = "
            f"~{gib(self.training)}"
            + (f"; the teacher's pass {gib(self.teacher)}" if self.teacher else "")
            + (f"; loading the student {gib(self.loading)}" if self.loading else "")
            + f"; peak ~{gib(self.total)} with the libraries' own"
        )


def _trained_params(reader: CheckpointReader, layout: MoeLayout, mode: str) -> int:
    """Entries of the routers and of the mode's factor tensors, counted from tensor shapes on disk."""
    factors = tuple(f".{FACTOR_PREFIX}{f}" for f in FACTOR_FIELDS[mode])
    routers = tuple(layout.arch.router_prefix(i) + "." for i in layout.moe_layers)
    experts = tuple(layout.arch.experts_prefix(i) + "." for i in layout.moe_layers)
    return sum(
        math.prod(reader.shape(n))
        for n in reader.weight_map
        if (n.startswith(routers) and n.endswith((".weight", ".bias")))
        or (n.startswith(experts) and n.endswith(factors))
    )


def student_loading_bytes(reader: CheckpointReader, layout: MoeLayout) -> int:
    """Peak of loading the compressed checkpoint as a float32 student (`load_model(dtype=torch.float32)`).

    The float32 parameters, and the checkpoint's pages that loading reads besides them: safetensors maps each
    shard, a tensor stored in another dtype is read from the mapping and converted (its pages stay resident while
    the shard is mapped), and the dense expert matrices a checkpoint stores one tensor per expert are read and stacked
    into transformers' fused (E, p, d) parameter, a copy in the stored dtype before any conversion. A float32 tensor
    loaded as it is stored is a view of the mapping: its pages are the parameter's own. (Measured: the bf16 fine-8L
    native checkpoint, 149 MiB with 64 MiB of per-expert up matrices, peaked at 474 MiB above the baseline while
    loaded in float32 (297 MiB of parameters), and distillation's peak there, 675 MiB, is that load's.)"""
    section = reader.config.get("mobe") or {}
    factored = set(section.get("matrices") or ())
    per_expert = {
        n
        for i in layout.moe_layers
        for m in ("gate", "up", "down")
        if m not in factored and len(names := layout.stored_names(i, m)) > 1
        for n in names
        if n in reader.weight_map
    }
    total = 0
    for name in reader.weight_map:
        numel, dtype = math.prod(reader.shape(name)), reader.dtype_name(name)
        size = DTYPE_BYTES.get(dtype, 4)
        total += FLOAT32 * numel
        total += numel * size if dtype != "F32" else 0  # read from the mapping and converted
        total += numel * size if name in per_expert else 0  # stacked in the stored dtype
    return total


def distill_memory(
    compressed: CheckpointReader, config: DistillConfig, original: CheckpointReader | None = None
) -> DistillMemory:
    """Memory of a distillation of `compressed` with `config`.

    Activations: with checkpointing, each decoder layer's input for one sequence is kept (layers x L x d), one
    layer is recomputed at a time (about 16 L x d for attention and norms plus the routed tokens' expert
    intermediates, L x top_k x p x 3), and the logits, their log-softmax and gradient (3 x L x vocab). With the
    `original`, the teacher's pass that computes the targets (`calibration_pass_bytes`, then the logits of one
    sequence and every token's top-k). Loading the student (`student_loading_bytes`) peaks above its float32
    parameters, and above the training where the checkpoint is half precision.
    """
    layout = moe_layout(compressed.config)
    cfg = compressed.config
    length, d, p = config.seq_len, layout.hidden_size, layout.intermediate_size
    top_k = int(cfg.get("num_experts_per_tok") or 1)
    vocab = int(cfg.get("vocab_size") or 0)
    trained = _trained_params(compressed, layout, config.train)
    activations = FLOAT32 * (layout.num_layers * length * d + 16 * length * d + 3 * length * top_k * p)
    activations += FLOAT32 * 3 * length * vocab
    per_token = 2 * config.top_k * FLOAT32 + FLOAT32 + 8  # log-probs, int32 ids, tail; int64 token id
    if config.routing_top_k:  # per MoE layer: the routing's log-probs, int16 expert ids, tail
        k = min(config.routing_top_k, layout.num_experts)
        per_token += len(layout.moe_layers) * (k * (FLOAT32 + 2) + FLOAT32)
    teacher = 0
    if original is not None:  # the streamed pass, then each sequence's logits and their top-k
        teacher = calibration_pass_bytes(original, moe_layout(original.config), config.tokens, length)
        teacher += 2 * FLOAT32 * length * vocab + per_token * config.tokens
    return DistillMemory(
        teacher=teacher,
        trained_params=trained,
        student=FLOAT32 * compressed.num_parameters(),
        optimizer=3 * FLOAT32 * trained,
        targets=per_token * config.tokens,
        activations=activations,
        loading=student_loading_bytes(compressed, layout),
    )


def distill_memory_estimate(compressed: str | Path, config: DistillConfig | None = None) -> DistillMemory:
    """`distill_memory` from a path (the default distillation of a native checkpoint)."""
    reader = CheckpointReader(compressed)
    section = reader.config.get("mobe") or {}
    config = config or DistillConfig(train="router+coef" if section.get("format") == "native" else "router")
    return distill_memory(reader, config)
