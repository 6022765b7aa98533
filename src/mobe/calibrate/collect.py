"""Collect per-expert calibration statistics by streaming the ORIGINAL model one decoder layer at a time.

The model is built on the meta device (nothing allocated). The calibration tokens are embedded, then each
decoder layer in turn is materialised from the shards, run over the hidden states of every calibration
sequence (a forward pre-hook on its routed-experts module accumulates the statistics of `LayerStats`), and
freed again. Peak memory: one decoder layer in the source's dtype, the hidden states of the calibration tokens,
and one layer's statistics (factored Grams: min(n_i, d) rows per expert, see `mobe.factorize.gram`); never the
whole checkpoint. The experts are read straight into the stacked tensors the module holds, a few experts at a time
(no per-expert copies beside the stacks), and kept in the source's dtype: the module computes each routed expert in
float32 from its own slice (the values of converting the whole stack first; one matmul per expert instead of
transformers' grouped one, so later layers differ from a converted run by float32 rounding only). What a layer no longer
needs is handed back to the operating system before the next one is read (`release_memory`).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import re
import types
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..architectures import MoeLayout
from ..checkpoint import CheckpointReader
from ..config import file_sha256
from .stats import LayerStats

logger = logging.getLogger(__name__)

EXPERT_TENSOR = re.compile(r"\.experts\.\d+\.")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
STORED_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}
READ_BYTES = 16 * 2**20  # experts read per call into the stacks: about this many bytes (gate, up and down)
# transformers' experts forward for the streamed layers: its per-expert loop. The default on torch >= 2.9,
# grouped_mm, runs on the CPU about 10x slower than the loop on these small per-expert batches (measured on the
# tiny test models: 63 ms a call against a few ms).
EXPERTS_IMPLEMENTATION = "eager"


@functools.cache
def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    return libc if libc is not None and hasattr(libc, "malloc_trim") else None


def release_memory() -> None:
    """Hand freed heap memory back to the operating system (glibc's `malloc_trim`; nothing elsewhere).

    A layer's tensors are read as many allocations of about one expert each; glibc keeps such freed chunks in the
    process (they stay in its resident memory), so without this the next stage's peak would stack on top of them.
    """
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


class CalibrationError(ValueError):
    """A calibration text or checkpoint that cannot be used for calibration."""


def read_calibration_text(path: str | Path) -> str:
    path = Path(path)
    if not path.is_file():
        raise CalibrationError(f"calibration file {path} does not exist")
    text = path.read_text(encoding="utf-8", errors="replace")
    if not text.strip():
        raise CalibrationError(f"calibration file {path} is empty")
    return text


text_hash = file_sha256  # sha256 of the calibration file's bytes (what a resumed run must match)


def require_tokenizer(checkpoint: Path, text: str) -> None:
    """Refuse, with one line, a checkpoint that ships no tokenizer for `text` (what the refusal names)."""
    if not any((Path(checkpoint) / name).is_file() for name in TOKENIZER_FILES):
        raise CalibrationError(f"{checkpoint} has no tokenizer (tokenizer.json): cannot tokenize {text}")


def calibration_ids(checkpoint: Path, text_path: str | Path, max_tokens: int, seq_len: int) -> list[Tensor]:
    """The first `max_tokens` tokens of the calibration text in the checkpoint's tokenizer, cut into sequences."""
    text = read_calibration_text(text_path)
    require_tokenizer(checkpoint, "the calibration text")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    ids = tokenizer(text, return_tensors="pt").input_ids[0][:max_tokens]
    if ids.numel() < 2:
        raise CalibrationError(f"calibration file {text_path} has fewer than 2 tokens")
    if ids.numel() < max_tokens:
        logger.warning("calibration text has %d tokens, fewer than the %d asked for", ids.numel(), max_tokens)
    return list(ids.split(seq_len))


def _rebuild_meta_buffers(module: nn.Module) -> None:
    """Modules whose non-persistent buffers are on the meta device (rotary embeddings) are built anew on the CPU."""
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if any(b.is_meta for b in child.buffers(recurse=False)) and hasattr(child, "config"):
                setattr(parent, name, type(child)(config=child.config))


def check_streamable(layout: MoeLayout) -> None:
    """Calibration stacks each layer's experts from per-expert tensors and runs decoder layers one by one: fused
    layouts and families whose layers cannot run alone are refused with the reason (the family's own first)."""
    if layout.arch.no_calibration:
        raise CalibrationError(f"--calibration cannot stream {layout.arch.model_type}: {layout.arch.no_calibration}")
    if layout.arch.fused is not None:
        raise CalibrationError(
            f"--calibration reads checkpoints that store one tensor per expert; {layout.arch.model_type} "
            "stores its experts fused"
        )


def module_names(model: nn.Module, checkpoint_names: list[str]) -> dict[str, str]:
    """Module name -> checkpoint name of each (non-expert) tensor, by transformers' own renaming rules for the model.

    Tensors that transformers merges or splits on load (other than the experts, which are stacked here) cannot be
    streamed one layer at a time: they are refused by name.
    """
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    meta = model.state_dict()
    out = {}
    for name in checkpoint_names:
        module_name, converted = rename_source_key(name, renamings, converters, model.base_model_prefix, meta)
        if converted is not None:
            raise CalibrationError(
                f"tensor {name}: transformers merges it with others on load ({converted}); --calibration streams "
                "checkpoints whose non-expert tensors load one by one"
            )
        out[module_name] = name
    return out


def _float32_forward(experts: nn.Module) -> bool:
    """Let a fused experts module holding lower-precision stacks compute in float32, one routed expert at a time.

    Only for the layout transformers' default experts forward computes (`gate_up_proj` [gate; up] (E, 2p, d),
    `down_proj` (E, d, p), no biases, `act_fn(gate) * up`): each expert's slice is converted as it is used (the
    values a whole `.float()` would give, computed one expert at a time), without a float32 copy of the layer.
    Returns False (nothing changed) for any other module.
    """
    standard = (
        getattr(experts, "has_gate", False)
        and getattr(experts, "is_concatenated", False)
        and not getattr(experts, "has_bias", True)
        and not getattr(experts, "is_transposed", True)
        and not getattr(experts, "has_post_expert_norm", True)
        and hasattr(experts, "act_fn")
    )
    if not standard:
        return False
    experts.forward = types.MethodType(_experts_forward_float32, experts)
    return True


def _experts_forward_float32(self: nn.Module, hidden: Tensor, top_k_index: Tensor, top_k_weights: Tensor) -> Tensor:
    out = torch.zeros_like(hidden)
    p = self.down_proj.shape[-1]
    for e in top_k_index.unique().tolist():
        if e >= self.gate_up_proj.shape[0]:
            continue
        pos, token = torch.where((top_k_index == e).T)  # ordered as transformers' eager forward orders them
        gate_up = nn.functional.linear(hidden[token], self.gate_up_proj[e].float())
        mid = self.act_fn(gate_up[:, :p]) * gate_up[:, p:]
        y = nn.functional.linear(mid, self.down_proj[e].float()) * top_k_weights[token, pos, None]
        out.index_add_(0, token, y.to(out.dtype))
    return out


class LayerStream:
    """The original model on the meta device, materialised one piece at a time from the checkpoint's shards."""

    def __init__(self, reader: CheckpointReader, layout: MoeLayout):
        from transformers import AutoConfig, AutoModelForCausalLM

        check_streamable(layout)
        self.reader, self.layout = reader, layout
        self.config = AutoConfig.from_pretrained(reader.path)
        self.config._attn_implementation = "sdpa"
        with torch.device("meta"):
            self.model = AutoModelForCausalLM.from_config(
                self.config, attn_implementation="sdpa", experts_implementation=EXPERTS_IMPLEMENTATION
            )
        self.names = module_names(self.model, [n for n in reader.weight_map if not EXPERT_TENSOR.search(n)])
        self.decoder = self.model.get_submodule("model")
        if hasattr(self.decoder, "rotary_emb"):  # non-persistent buffers: built anew on the CPU
            self.decoder.rotary_emb = type(self.decoder.rotary_emb)(config=self.config)

    def _load(
        self, prefix: str, module: nn.Module, layer: int | None = None, stacks: dict[str, Tensor] | None = None
    ) -> None:
        """Materialise `module` from the checkpoint; a MoE layer's experts from `stacks` (by matrix, (E, rows, cols))
        where given, else read in their stored dtype."""
        experts = None
        if layer is not None and layer in self.layout.moe_layers:  # not allocated here: read in the stored dtype below
            experts = self.model.get_submodule(self.layout.arch.experts_module.format(layer=layer))
            for name in ("gate_up_proj", "down_proj"):
                setattr(experts, name, nn.Parameter(torch.empty(0, device="meta"), requires_grad=False))
        module.to_empty(device="cpu")
        names = [m for m in self.names if m.startswith(prefix)]
        tensors = self.reader.get_many([self.names[m] for m in names])
        state = {m[len(prefix) :]: tensors[self.names[m]] for m in names}
        result = module.load_state_dict(state, strict=False, assign=True)
        if result.unexpected_keys:
            raise CalibrationError(f"{self.reader.path}: tensors the model does not have: {result.unexpected_keys[:5]}")
        _rebuild_meta_buffers(module)
        module.float().eval()
        if experts is not None:  # after `.float()`: kept in the stored dtype
            if stacks is not None:
                gate_up, down = torch.cat([stacks["gate"], stacks["up"]], dim=1), stacks["down"]
            else:
                gate_up, down = self._read_stacks(layer)
            experts.gate_up_proj = nn.Parameter(gate_up, requires_grad=False)
            experts.down_proj = nn.Parameter(down, requires_grad=False)
            if gate_up.dtype != torch.float32 and not _float32_forward(experts):
                experts.float()  # a family whose experts module computes otherwise: converted whole
        still_meta = [n for n, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta]
        if still_meta:
            raise CalibrationError(f"{self.reader.path}: no tensor in the checkpoint for {prefix}{still_meta[0]}")

    def _read_stacks(self, layer: int) -> tuple[Tensor, Tensor]:
        """One MoE layer's experts as the module holds them, `gate_up_proj` (E, 2p, d) and `down_proj` (E, d, p),
        filled a few experts at a time (block-FP8 experts dequantised to float32, others in their stored dtype)."""
        layout, reader = self.layout, self.reader
        E, p, d = layout.num_experts, layout.intermediate_size, layout.hidden_size
        names = {matrix: layout.stored_names(layer, matrix) for matrix in ("gate", "up", "down")}
        first = names["gate"][0]
        dtype = torch.float32 if reader.is_block_fp8(first) else STORED_DTYPES[reader.dtype_name(first)]
        gate_up, down = torch.empty(E, 2 * p, d, dtype=dtype), torch.empty(E, d, p, dtype=dtype)
        step = max(1, READ_BYTES // (3 * p * d * dtype.itemsize))
        for start in range(0, E, step):
            part = slice(start, min(E, start + step))
            read = reader.get_many([n for m in ("gate", "up", "down") for n in names[m][part]], dequantize=True)
            for e in range(part.start, part.stop):
                gate_up[e, :p] = read.pop(names["gate"][e])
                gate_up[e, p:] = read.pop(names["up"][e])
                down[e] = read.pop(names["down"][e])
            del read
        return gate_up, down

    def embed(self, sequences: list[Tensor]) -> list[Tensor]:
        embed = self.decoder.embed_tokens
        self._load("model.embed_tokens.", embed)
        with torch.no_grad():
            out = [embed(ids[None]).float() for ids in sequences]
        embed.to("meta")
        return out

    def logits(self, hidden: list[Tensor]) -> Iterator[Tensor]:
        """Yield each sequence's output logits (1, length, vocab) from its last hidden states (final norm, head)."""
        norm, head = self.decoder.norm, self.model.get_output_embeddings()
        self._load("model.norm.", norm)
        if "lm_head.weight" in self.names or not getattr(self.config, "tie_word_embeddings", False):
            self._load("lm_head.", head)
        else:  # tied: the head is the input embedding
            self._load("model.embed_tokens.", self.decoder.embed_tokens)
            head.weight = self.decoder.embed_tokens.weight
        try:
            with torch.no_grad():
                for h in hidden:
                    yield head(norm(h)).float()
        finally:
            norm.to("meta")
            head.to("meta")
            self.decoder.embed_tokens.to("meta")

    def run_layer(
        self, layer: int, hidden: list[Tensor], hook=None, experts: dict[str, Tensor] | None = None
    ) -> list[Tensor]:
        """Materialise decoder layer `layer`, run it over every sequence (in place of `hidden`), free it.

        `experts`: the layer's routed experts as (E, rows, cols) stacks by matrix ("gate", "up", "down") to run in
        place of the checkpoint's (a quantised copy, say)."""
        from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

        module = self.decoder.layers[layer]
        self._load(f"model.layers.{layer}.", module, layer, experts)
        handle = None
        if hook is not None:
            experts = self.model.get_submodule(self.layout.arch.experts_module.format(layer=layer))
            handle = experts.register_forward_pre_hook(lambda mod, args: hook(mod, *args))
        sliding = getattr(self.config, "sliding_window", None)
        mask_fn = create_sliding_window_causal_mask if sliding else create_causal_mask
        try:
            with torch.no_grad():
                for i, h in enumerate(hidden):
                    positions = torch.arange(h.shape[1])[None]
                    mask = mask_fn(
                        config=self.config,
                        inputs_embeds=h,
                        attention_mask=None,
                        cache=None,
                        position_ids=positions,
                    )
                    out = module(
                        h,
                        attention_mask=mask,
                        position_ids=positions,
                        position_embeddings=self.decoder.rotary_emb(h, positions),
                    )
                    hidden[i] = out[0] if isinstance(out, tuple) else out
        finally:
            if handle is not None:
                handle.remove()
            module.to("meta")
            release_memory()
        return hidden


class StatsAccumulator:
    """Forward pre-hook on a fused experts module: accumulates `LayerStats` from (hidden, top_k_index, weights)."""

    def __init__(self, stats: LayerStats, keep_inputs: bool):
        self.stats, self.keep_inputs = stats, keep_inputs
        self.inputs: list[Tensor] = []
        self.index: list[Tensor] = []
        self.weights: list[Tensor] = []

    def __call__(self, module: nn.Module, hidden: Tensor, top_k_index: Tensor, top_k_weights: Tensor) -> None:
        x = hidden.reshape(-1, hidden.shape[-1]).float()
        p = module.down_proj.shape[-1]
        for e in top_k_index.unique().tolist():
            if e >= self.stats.counts.numel():
                continue
            rows = (top_k_index == e).any(dim=-1)
            xe = x[rows]
            gate_up = xe @ module.gate_up_proj[e].float().T
            mid = module.act_fn(gate_up[:, :p]) * gate_up[:, p:]
            self.stats.inputs_factor.add(e, xe)
            self.stats.mid_factor.add(e, mid)
        if self.keep_inputs:
            self.inputs.append(x.clone())
            self.index.append(top_k_index.clone())
            self.weights.append(top_k_weights.float().clone())

    def finish(self) -> LayerStats:
        self.stats.inputs_factor.compact()  # the rows waiting beside R factors
        self.stats.mid_factor.compact()
        if self.keep_inputs:
            self.stats.inputs = torch.cat(self.inputs)
            self.stats.top_k_index = torch.cat(self.index)
            self.stats.top_k_weights = torch.cat(self.weights)
        return self.stats


def collect_statistics(
    reader: CheckpointReader,
    layout: MoeLayout,
    sequences: list[Tensor],
    layers: list[int] | tuple[int, ...],
    *,
    keep_inputs: bool = False,
    skip: set[int] | frozenset[int] = frozenset(),
    progress: bool = False,
) -> Iterator[tuple[int, LayerStats]]:
    """Yield (layer, statistics) for each MoE layer in `layers`, streaming the model layer by layer.

    Layers in `skip` (statistics already saved) are run but not measured; the stream stops after the last layer
    that is wanted.
    """
    wanted = [layer for layer in sorted(set(layers)) if layer not in skip]
    if not wanted:
        return
    stream = LayerStream(reader, layout)
    hidden = stream.embed(sequences)
    E, p, d = layout.num_experts, layout.intermediate_size, layout.hidden_size
    for layer in tqdm(range(wanted[-1] + 1), desc="Calibration", disable=not progress, leave=False):
        if layer in wanted:
            accumulator = StatsAccumulator(LayerStats.empty(E, p, d), keep_inputs)
            hidden = stream.run_layer(layer, hidden, accumulator)
            stats = accumulator.finish()
            del accumulator
            yield layer, stats
            del stats  # the caller has saved them: not held beside the next layer's
            release_memory()
        else:
            hidden = stream.run_layer(layer, hidden)


def collect_sequentially(
    reader: CheckpointReader,
    layout: MoeLayout,
    sequences: list[Tensor],
    replace: Callable[[int, LayerStats], dict[str, Tensor]],
    *,
    progress: bool = False,
) -> None:
    """Stream the model as `collect_statistics` does, but hand each MoE layer's statistics to `replace(layer, stats)`,
    which returns that layer's experts as they are to run from now on ((E, rows, cols) stacks by matrix: a quantised
    copy); the layer is run again with them, so every later layer is measured on the hidden states the replaced
    layers give (GPTQ's sequential calibration, llm-compressor's default). Costs one more pass of each MoE layer and
    a copy of the hidden states."""
    stream = LayerStream(reader, layout)
    hidden = stream.embed(sequences)
    E, p, d = layout.num_experts, layout.intermediate_size, layout.hidden_size
    last = max(layout.moe_layers)
    for layer in tqdm(range(last + 1), desc="Calibration", disable=not progress, leave=False):
        if layer not in layout.moe_layers:
            hidden = stream.run_layer(layer, hidden)
            continue
        inputs = [h.clone() for h in hidden]
        accumulator = StatsAccumulator(LayerStats.empty(E, p, d), keep_inputs=False)
        stream.run_layer(layer, hidden, accumulator)
        experts = replace(layer, accumulator.finish())
        hidden = stream.run_layer(layer, inputs, experts=experts)
