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
    activations: int  # one sequence's training step with activation checkpointing (`step_bytes`)
    teacher: int = 0  # computing the targets: the original streamed one decoder layer at a time (0: not given)
    loading: int = 0  # loading the student in float32 (`student_loading_bytes`)

    @property
    def training(self) -> int:
        """What loading left resident (`loading`: the float32 parameters, the checkpoint's pages read from mappings
        that stay open while parameters are views of them, and what glibc's heap keeps of the load's conversions and
        stacked copies), plus the optimiser, the targets and one step. Measured at the backward's peak (RssAnon and
        RssFile above the baseline, benchmarks/memory_estimates.py's child): float32 fine-2L (64 x 128 x 2048) held
        380 MiB of file pages, its 241 MiB of parameters mapped as views plus the 128 MiB of per-expert up matrices
        the load read and stacked (whose 128 MiB stacked copy is anonymous beside them); bf16 e128-2L held 1390 MiB
        anonymous, its 578 MiB of float32 parameters and the step's 297 MiB of live tensors leaving 515 MiB, more
        than the 417 MiB of the load's reads and stacked copies that `loading` adds to the parameters."""
        return max(self.student, self.loading) + self.optimizer + self.targets + self.activations

    @property
    def total(self) -> int:
        """The larger of the teacher's pass and the training (which holds what loading the student left), plus what
        torch, transformers and matplotlib (the report's plot) allocate whatever the model's size."""

        return max(self.teacher, self.training) + RUNTIME_BYTES["distill"]

    def summary(self, config: DistillConfig) -> str:
        gib = lambda n: f"{n / 2**30:.2f} GiB"  # noqa: E731
        return (
            f"distill --train {config.train} (seq {config.seq_len}, top-k {config.top_k}, {config.tokens:,} tokens): "
            f"{self.trained_params:,} trained parameters; student {gib(self.student)}"
            + (f" ({gib(self.loading)} resident once loaded)" if self.loading > self.student else "")
            + f" + optimiser {gib(self.optimizer)} + targets {gib(self.targets)} + one step ~{gib(self.activations)} "
            f"= ~{gib(self.training)}"
            + (f"; the teacher's pass {gib(self.teacher)}" if self.teacher else "")
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


# Activations whose backward keeps their input (SiLU, GELU): with the coefficients trained, each mixed basis is saved
# twice, before and after the activation; tanh and sigmoid keep their output, the tensor the matmul saves anyway.
OUTPUT_SAVING_ACTIVATIONS = ("tanh", "sigmoid", "identity", "none", "linear")


def mixed_bases_bytes(reader: CheckpointReader, layout: MoeLayout, experts: int, mode: str) -> int:
    """Bytes of the mixed bases M_e = act(sum_j coef_ej B_j) that one MoE layer's forward with grad saves for
    `experts` experts: `MobeExperts` builds (A_e, M_e) per routed expert and applies x -> (x M_e^T) A_e^T; the
    routed rows need their gradient (transformers' checkpointing makes the embeddings' output require it), so each
    matmul saves M_e, one (r, cols) float32 tensor per expert and factored matrix (A_e is a view of its parameter,
    free), whatever trains. A matrix factored otherwise (not MoBE) is rebuilt per expert as its dense (p, d)
    matrix, saved the same way."""
    section = reader.config.get("mobe") or {}
    shapes, meta = section.get("factor_shapes") or {}, section.get("factor_meta") or {}
    total = 0
    for matrix in section.get("matrices") or ():
        bases = (shapes.get(matrix) or {}).get("bases")
        if not bases:
            total += FLOAT32 * experts * layout.intermediate_size * layout.hidden_size
            continue
        act = str((meta.get(matrix) or {}).get("activation", section.get("activation", "identity")))
        both = "coef" in FACTOR_FIELDS[mode] and act not in OUTPUT_SAVING_ACTIVATIONS
        total += FLOAT32 * experts * bases[-2] * bases[-1] * (2 if both else 1)
    return total


def step_bytes(reader: CheckpointReader, layout: MoeLayout, config: DistillConfig, workspace_experts: int = 16) -> int:
    """Peak of one training step on one sequence of `config.seq_len` tokens, with activation checkpointing.

    The forward keeps each decoder layer's input (layers x L x d: the checkpoints) and the logits; the backward
    recomputes one decoder layer at a time with grad, and everything that recomputation saves for its backward is
    held at once. Per MoE layer that is (all float32): 16 L x d for attention, the norms and the router (measured
    11 L x d on qwen3_moe); the routed rows gathered per (token, slot) and the experts' weighted outputs (2 n x d,
    n = L x top_k); the experts' intermediates (n x (4 p + r per factored matrix): gate, its activation, up, their
    product, and x M_e^T); and the mixed bases of every routed expert (`mixed_bases_bytes`), at most min(E, n)
    experts, and beside them one workspace batch's mixing product before its activation (`workspace_experts`
    experts of the widest factored matrix, `load_model`'s default batch: the activation's output is allocated while
    its input lives). The logits, their log-softmax and gradient add 3 L x vocab. (torch.profiler's live bytes
    over one step against this count: 110.6 MiB on float32 wide-2L, every expert routed, 129; 124.9 on float32
    fine-2L, whose layer 0 routed 40 of its 64 experts, 201.5 counting 64; 297 on bf16 e128-2L, 101 of 128 routed,
    358; 16.7 on the coarse fixture, 23.5.)"""
    cfg = reader.config
    length, d, p = config.seq_len, layout.hidden_size, layout.intermediate_size
    top_k = int(cfg.get("num_experts_per_tok") or 1)
    vocab = int(cfg.get("vocab_size") or 0)
    rows = length * top_k
    shapes = (cfg.get("mobe") or {}).get("factor_shapes") or {}
    ranks = sum(s["bases"][-2] for s in shapes.values() if s.get("bases"))
    layer = FLOAT32 * (16 * length * d + 2 * rows * d + rows * (4 * p + ranks))
    if layout.moe_layers:
        layer += mixed_bases_bytes(reader, layout, min(layout.num_experts, rows), config.train)
        widest = max((s["bases"][-2] * s["bases"][-1] for s in shapes.values() if s.get("bases")), default=0)
        layer += FLOAT32 * min(workspace_experts, layout.num_experts, rows) * widest
    return layer + FLOAT32 * (layout.num_layers * length * d + 3 * length * vocab)


def distill_memory(
    compressed: CheckpointReader, config: DistillConfig, original: CheckpointReader | None = None
) -> DistillMemory:
    """Memory of a distillation of `compressed` with `config`.

    Activations: one training step with checkpointing (`step_bytes`), above what loading the student left
    resident (`student_loading_bytes`, see `DistillMemory.training`). With the `original`, the teacher's pass that
    computes the targets (`calibration_pass_bytes`, then the logits of one sequence and every token's top-k).
    """
    layout = moe_layout(compressed.config)
    cfg = compressed.config
    length = config.seq_len
    vocab = int(cfg.get("vocab_size") or 0)
    trained = _trained_params(compressed, layout, config.train)
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
        activations=step_bytes(compressed, layout, config),
        loading=student_loading_bytes(compressed, layout),
    )


def distill_memory_estimate(compressed: str | Path, config: DistillConfig | None = None) -> DistillMemory:
    """`distill_memory` from a path (the default distillation of a native checkpoint)."""
    reader = CheckpointReader(compressed)
    section = reader.config.get("mobe") or {}
    config = config or DistillConfig(train="router+coef" if section.get("format") == "native" else "router")
    return distill_memory(reader, config)
