"""Memory estimates: peak bytes of each stage from a checkpoint's headers and the settings, nothing allocated.

What `mobe info` prints and what `mobe compress` checks against the chosen device before it starts
(`check_compress_memory`). Every figure is the big tensors a stage holds above the process's own baseline (the
interpreter and the libraries, about 0.5 GiB, not included); benchmarks/memory_estimates.py compares each with the
peak resident memory of the real command.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from statistics import NormalDist

from ..architectures import MoeLayout, moe_layout
from ..checkpoint import CheckpointReader
from ..config import JOINT_METHODS, MobeConfig, QuantizeConfig
from ..evaluate import mobe_parameters
from ..export import factor_tensor_names
from ..factorize.mobe import fits_transposed, fitted_shape
from ..factorize.primitives import MMAP_THRESHOLD_MAX
from ..quantize.proxy import SAMPLES, expert_chunk

DTYPE_BYTES = {"F32": 4, "BF16": 2, "F16": 2, "F8_E4M3": 1, "F8_E5M2": 1}
GiB = 2**30
# What each command allocates above an idle interpreter whatever the model's size: torch's first kernels and thread
# pools, transformers building a model, the tokenizer, matplotlib for distill's plot (measured on the smallest
# trained fixture, where the model's own tensors are a few MiB: benchmarks/memory_estimates.py; compress's is what
# remains of its peak beside the job with the heap's share, `HEAP_RETAINED`, counted in the job).
RUNTIME_BYTES = {
    "compress": 24 * 2**20,
    "calibration": 16 * 2**20,
    # transformers' loading (config, the loading report, its per-tensor bookkeeping) and generate's own (logits
    # processors, the cache objects): the coarse fixture's native inference with oneDNN's bf16 kernels limited to
    # AVX2 (ONEDNN_MAX_CPU_ISA=AVX2, where they cache next to nothing) peaked at 40 MiB above its baseline, of which
    # the terms of `inference_bytes` are 19 (the checkpoint's 12.4, the stacked dense experts' 4, the workspace's 2.6)
    "inference": 20 * 2**20,
    "quantize": 16 * 2**20,
    # transformers building the student, autograd's engine, the report's plot (matplotlib): the coarse fixture's
    # distill peaked at 139 MiB above its baseline, 66 of it the terms of `distill_memory`'s training (loading
    # 41, one step 23.5, targets 1); 73 remain
    "distill": 75 * 2**20,
}
# A worker process of the local device pool (`mobe.distribute.local`, spawned) is an interpreter of its own that
# imports torch and mobe before its first job: its private (anonymous) memory then, measured as RssAnon after
# `import torch, mobe.distribute.jobs` in a fresh interpreter (torch 2.13, CPU build: 146 MiB; the libraries' code
# pages, RssFile, are shared with the driver and not counted).
WORKER_PROCESS_BYTES = 146 * 2**20
# glibc's malloc serves an allocation below its mmap threshold from its heap, and raises that threshold (up to 32 MiB
# on 64-bit systems, DEFAULT_MMAP_THRESHOLD_MAX) to the size of each mmapped block freed. A fit whose float32 stacks
# are under that size churns them through the heap, and the heap keeps freed chunks resident: measured with glibc's
# threshold fixed (MALLOC_MMAP_THRESHOLD_=131072 in the child's environment) and without, such fits (2-16 MiB
# stacks: the trained fixtures, 32 x 256 x 512 and 64 x 128 x 512) held 0.6-1.1 times their transients again
# (benchmarks/memory_estimates.py).
HEAP_THRESHOLD_MAX = MMAP_THRESHOLD_MAX
HEAP_RETAINED = 0.75


def gib(n: float) -> str:
    """Bytes in the largest unit that keeps the number above 1 (TiB, GiB, MiB, KiB)."""
    for unit, size in (("TiB", 2**40), ("GiB", GiB), ("MiB", 2**20)):
        if n >= size:
            return f"{n / size:,.1f} {unit}"
    return f"{n / 2**10:,.1f} KiB"


def balanced_counts(num_experts: int, tokens: int, top_k: int) -> list[int]:
    """Tokens routed to each expert when the router spreads tokens * top_k routings evenly."""
    total = tokens * top_k
    return [total // num_experts + (e < total % num_experts) for e in range(num_experts)]


def routed_counts(num_experts: int, tokens: int, top_k: int) -> list[int]:
    """Tokens routed to each expert by a router that picks the top-k experts of each token uniformly at random: the
    quantiles (i + 1/2) / E of the binomial count of one expert (tokens * top_k routings, each to it with probability
    1 / E), in its normal approximation, rounded and kept within 0..tokens.

    Their spread matters where the mean is near a factor's dimension: an expert holds its rows below it and a
    d x d float64 factor from then on, so even counts at the dimension (balanced routing) hold the most per row.
    """
    total = tokens * top_k
    mean = total / num_experts
    std = math.sqrt(total * (1 / num_experts) * (1 - 1 / num_experts))
    if std == 0:
        return balanced_counts(num_experts, tokens, top_k)
    normal = NormalDist(mean, std)
    return [min(tokens, max(0, round(normal.inv_cdf((e + 0.5) / num_experts)))) for e in range(num_experts)]


def gram_stats_bytes(num_experts: int, p: int, d: int) -> int:
    """Dense float64 Grams of one layer (what mobe kept before factoring them): E (d^2 + p^2) * 8, plus counts."""
    return 8 * num_experts * (d * d + p * p) + 8 * num_experts


def factor_bytes(counts: list[int], dim: int, collecting: bool = False) -> int:
    """Bytes of a `GramFactor` holding `counts[i]` rows of `dim` numbers for expert i, counts included.

    Stored: float32 rows while n_i < dim, a float64 dim x dim R factor from then on. While `collecting`, an expert
    past dim also buffers up to dim/2 - 1 float32 rows, and one QR of [R; rows] at a time needs its (1.5 dim x dim)
    float64 input and output.
    """
    held = sum(4 * n * dim if n < dim else 8 * dim * dim for n in counts) + 8 * len(counts)
    if collecting and any(n >= dim for n in counts):
        held += sum(4 * dim * (max(1, dim // 2) - 1) for n in counts if n >= dim) + 2 * 8 * (dim + dim // 2) * dim
    return held


def factor_stats_bytes(counts: list[int], p: int, d: int, collecting: bool = False) -> int:
    """One layer's factored statistics: the inputs' factor (dim d) and the intermediate activations' (dim p)."""
    return factor_bytes(counts, d, collecting) + factor_bytes(counts, p, collecting)


def factor_stats_bound(num_experts: int, p: int, d: int, tokens: int, top_k: int, collecting: bool = False) -> int:
    """At most, whatever the routing: a factor holds no more than min(T k, E dim) rows of at most 8 * dim bytes."""
    total = 0
    for dim in (d, p):
        rows = min(tokens * top_k, num_experts * dim)
        total += 8 * dim * rows + 8 * num_experts
        if collecting:  # folding buffers of the experts that can reach dim rows
            total += factor_bytes([dim] * min(num_experts, rows // dim), dim, True) - 8 * dim * dim * (rows // dim)
    return total


def compression_job_bytes(
    num_experts: int,
    p: int,
    d: int,
    num_bases: int,
    rank: int,
    groups: int,
    source_bytes: int,
    stats_bytes: int = 0,
    weighting_rows: int = 0,
    device: str = "cpu",
    schedule: str = "fast",
    weighting_widest: int = 0,
) -> tuple[int, int]:
    """(host, device) peak bytes of one MoBE (layer, matrix) job.

    Held throughout: the expert stack in the source dtype, the layer's Gram factor (`stats_bytes`) and the
    weighting built from it (`weighting_rows` directions of d float32 numbers, at most `weighting_widest` for one
    expert). On top, the largest of: reading (the per-expert tensors before they are stacked), fitting (the float32
    target, the parameters with their gradients, two Adam moments and the best state, and the larger of one chunk's
    activations (`auto_chunk`) and one SVD group's initialisation), and the error report (a float32 copy and the
    reconstruction). The fast schedule also holds the row-space targets C (a float32 stack) with their bases U
    (E k^2, k = min(p, d)) and the factorisation's transient (a stack). With calibration a chunk takes fewer
    experts (`weighted_chunk`: the metric's transients, `metric_loss_bytes`, join each), and the initialisation holds
    the whitened stack and the mean metric of each SVD group (`weighting_rows / m` directions each, at most d), in
    the fast schedule beside the plain row space its start is mapped from (freed before the steps). On a GPU the fit
    and a copy of the weighting are there, the rest in host RAM. On the CPU, stacks under glibc's largest mmap
    threshold are served from its heap, which keeps about three quarters of the transients again (`HEAP_RETAINED`).
    """
    from ..factorize.mobe import weighted_chunk
    from ..factorize.primitives import auto_chunk, chunk_bytes
    from ..factorize.weighted import metric_loss_bytes

    stack = num_experts * p * d
    params = mobe_parameters(num_experts, p, d, num_bases, rank, groups)
    weighting = 4 * weighting_rows * d
    held = source_bytes * stack + stats_bytes + weighting
    chunk = min(num_experts, auto_chunk(rank, p, d))
    k = min(p, d)
    group = -(-num_experts // num_bases) * p * d  # the experts of one SVD group, stacked
    init = 4 * (2 * group + min(group, rank * d))
    if weighting_rows:  # the metric in the loss (a right one: gate, up); the whitened stack for the init
        rows = rank if schedule == "fast" else p
        loss = metric_loss_bytes(weighting_widest or d, d, rows, d)
        chunk = weighted_chunk(chunk, rows, rank, p, d, loss)
        activations = chunk * (chunk_bytes(rank, p, d) + loss)
        init += 4 * stack + 4 * num_bases * min(-(-weighting_rows // num_bases), d) * d
        if schedule == "fast":  # the plain row space and its bases, beside the weighted ones
            init += 4 * stack + 4 * num_experts * k * k
    else:
        activations = chunk * chunk_bytes(rank, p, d)
    fit = 4 * stack + 5 * 4 * params + max(activations, init)
    if schedule == "fast":
        fit += 4 * stack + 4 * num_experts * k * k + 4 * stack
        if weighting_rows:  # what the start leaves resident through the steps (measured: the calibrated peaks sit
            fit += 4 * 4 * stack + 4 * num_experts * k * k  # that much above the data-free ones on every shape)
    report = 8 * stack + 4 * params
    if device == "cpu":
        transients = max(source_bytes * stack, fit, report)
        if 4 * stack < HEAP_THRESHOLD_MAX:  # the stacks churn through glibc's heap, which keeps them resident
            transients += int(HEAP_RETAINED * transients)
        return held + transients, 0
    return held + max(source_bytes * stack, report), fit + weighting


# oneDNN, which torch's CPU matmuls in bfloat16/float16 run on, compiles (JIT) and caches kernels per matmul shape:
# its primitive cache keeps up to 1024 primitives (ONEDNN_PRIMITIVE_CACHE_CAPACITY's default), each with its machine
# code. Bytes per cached shape, by the best instruction set oneDNN finds (measured: resident memory after bf16 matmuls
# of 200 distinct shapes, (n, 512) x (512, 128) x (128, 2048), on a Sapphire Rapids core with ONEDNN_MAX_CPU_ISA
# set to each level: 0.65 MiB with AMX, 0.63 with AVX512-BF16, 0.19 with AVX-512 core, 0.01 with AVX2).
ONEDNN_CACHE_CAPACITY = 1024
ONEDNN_SHAPE_BYTES = {"amx_bf16": 0.65 * 2**20, "avx512_bf16": 0.63 * 2**20, "avx512bw": 0.19 * 2**20}


def onednn_shape_bytes() -> int:
    """Bytes oneDNN keeps per distinct half-precision matmul shape on this host's CPU (`ONEDNN_SHAPE_BYTES` by the
    best of its flags in /proc/cpuinfo; 0 where none is listed or it cannot be read)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return 0
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return int(next((size for flag, size in ONEDNN_SHAPE_BYTES.items() if flag in flags), 0))


def expert_matmuls(p: int, d: int, rank: int, matrices: tuple[str, ...], basis_side: str = "wider") -> int:
    """Distinct matmuls (in, out, whether the weight is read transposed) of one expert's forward on a given number of
    tokens (`mobe.runtime.experts.MobeExperts._project_weight`): a dense matrix is x W^T; a factored gate/up is
    (x M^T) A^T, or (x A) M where the stack is fitted transposed; a factored down the other way round. The same
    (in, out, orientation) is one kernel (the dense up and a factored gate share theirs where the rank is p)."""
    transposed = fits_transposed(p, d, basis_side)
    shapes = set()
    for matrix in ("gate", "up", "down"):
        n_in, n_out = (p, d) if matrix == "down" else (d, p)
        if matrix not in matrices:
            shapes.add((n_in, n_out, True))
        else:  # A M is W^T in transformers' orientation for down xor a transposed fit: x A then M, no transpose
            plain = (matrix == "down") != transposed
            shapes |= {(n_in, rank, not plain), (rank, n_out, not plain)}
    return len(shapes)


def matmul_shapes(
    layout: MoeLayout,
    config: dict,
    matrices: tuple[str, ...],
    rank: int,
    prompt: int,
    generated: int,
    workspace_experts: int,
    basis_side: str = "wider",
) -> int:
    """Distinct matmul shapes of a native generate call at batch 1: `prompt` tokens in one forward, then
    `generated` forwards of one token; at most oneDNN's cache capacity.

    An expert's projections (`expert_matmuls`) change shape with the tokens routed to it; the prompt's k tokens per
    position over E experts give at most c distinct counts in a layer (c (c + 1) / 2 <= prompt * k) and at most
    `prompt` over all layers (the bound: trained and random routers alike send most tokens to a few experts, so the
    counts spread far wider than uniform routing's). Mixing the bases is one matmul per factored matrix and distinct
    number of experts in a workspace batch (full batches and each layer's last one). Decoding adds one token's: the
    k experts' batched products and their mixing. Then the attention projections (q, k and v alike, o), the router
    and a shared expert's (gate and up alike, down, its gate) at the prompt's length and at one token, and the last
    position's logits.
    """
    top_k = int(config.get("num_experts_per_tok") or 1)
    moe_layers = len(layout.moe_layers)
    per_count = expert_matmuls(layout.intermediate_size, layout.hidden_size, rank, matrices, basis_side)
    c = (math.isqrt(8 * prompt * top_k + 1) - 1) // 2
    counts = min(prompt, moe_layers * min(c, layout.num_experts))
    mixing = len(matrices) * min(workspace_experts, moe_layers + 1)
    decoding = per_count + len(matrices) if generated else 0
    shared = 3 if config.get("shared_expert_intermediate_size") else 0
    fixed = (3 + 1 + shared) * (2 if generated else 1) + 1
    return min(ONEDNN_CACHE_CAPACITY, counts * per_count + mixing + decoding + fixed)


def inference_bytes(
    layout: MoeLayout,
    model_params: int,
    num_bases: int,
    rank: int,
    groups: int,
    matrices: tuple[str, ...],
    dtype_bytes: int,
    config: dict,
    workspace_experts: int = 16,
    cache_mib: float = 0.0,
    context: int = 4096,
    prompt: int | None = None,
    stacked_per_expert: bool = True,
    shape_bytes: int | None = None,
    basis_side: str = "wider",
) -> tuple[int, int]:
    """(weights, workspace) bytes of `mobe generate` on the native checkpoint on the CPU at batch 1: a `prompt`
    (default: the whole `context`) then new tokens up to `context`.

    Weights: the native checkpoint's tensors (the routed experts' compressed matrices as MoBE factors), in its
    dtype: safetensors maps the file and the parameters are views of it, resident once read; and where the
    checkpoint stores the dense (uncompressed) expert matrices one tensor per expert (`stacked_per_expert`),
    transformers stacks them into its fused (E, p, d) parameters: a copy, beside the file's pages it read them from.

    Workspace: the mixed bases act(sum_j alpha_ij B_j) (r x d; r x p for a stack fitted transposed) of
    `workspace_experts` experts per compressed matrix type (one layer at a time) and the mixing's product before the
    activation, with what glibc's heap keeps of them where they are below its largest mmap threshold
    (`HEAP_RETAINED`); the LRU cache of each MoE layer; the KV cache (full keys and values per head, as transformers
    keeps them, MLA models included); and in half precision, oneDNN's kernels for each distinct matmul shape
    (`matmul_shapes` x `shape_bytes`, default this host's, `onednn_shape_bytes`: the bf16 fine-8L model's generate
    cached 90 shapes, and peaked 65 MiB higher with AMX than with oneDNN held to AVX2; with a 1024-token prompt it
    cached 779 shapes and peaked at 798 MiB above the baseline, 149 MiB of them the checkpoint, against 1024 shapes
    and 917 MiB estimated).
    """
    E, p, d = layout.num_experts, layout.intermediate_size, layout.hidden_size
    fitted = mobe_parameters(E, p, d, num_bases, rank, groups, basis_side)
    saved = len(layout.moe_layers) * len(matrices) * (E * p * d - fitted)
    dense = len(layout.moe_layers) * (3 - len(matrices)) * E * p * d
    weights = (model_params - saved + (dense if stacked_per_expert else 0)) * dtype_bytes
    block = workspace_experts * rank * fitted_shape(p, d, basis_side)[1] * dtype_bytes  # r x d, r x p transposed
    mixed = (len(matrices) + 1) * block if matrices else 0
    if block < HEAP_THRESHOLD_MAX:
        mixed += int(HEAP_RETAINED * mixed)
    heads = config.get("num_attention_heads", 1)
    if "kv_lora_rank" in config:  # DeepSeek MLA: keys of qk_nope + qk_rope, values of v_head_dim, per head
        per_token = heads * (config["qk_nope_head_dim"] + config["qk_rope_head_dim"] + config["v_head_dim"])
    else:
        head_dim = config.get("head_dim") or d // heads
        per_token = 2 * config.get("num_key_value_heads", heads) * head_dim
    kv = layout.num_layers * per_token * context * dtype_bytes
    kernels = 0
    if dtype_bytes == 2:
        prompt = context if prompt is None else min(prompt, context)
        generated = context - prompt
        shapes = matmul_shapes(layout, config, matrices, rank, prompt, generated, workspace_experts, basis_side)
        kernels = shapes * (onednn_shape_bytes() if shape_bytes is None else shape_bytes)
    return weights, mixed + int(cache_mib * 2**20) * len(layout.moe_layers) + kv + kernels


def export_bytes(reader: CheckpointReader, layout: MoeLayout, jobs: list[tuple[int, str]], native: bool = True) -> int:
    """Peak bytes of writing the output (`mobe.export.write_checkpoint`), one shard at a time: the largest source
    shard's tensors that are written again (native: all but the replaced experts; dense: every one, the rebuilt
    ones in place of the source's) as read, the file's pages mapped while they are read, and their serialised copy."""
    from ..export import replaced_tensor_names

    replaced = set(replaced_tensor_names(layout, jobs)) if native else set()
    largest = 0
    for names in reader.tensors_by_shard().values():
        kept = sum(
            math.prod(reader.shape(n)) * DTYPE_BYTES.get(reader.dtype_name(n), 4) for n in names if n not in replaced
        )
        largest = max(largest, kept)
    return 3 * largest


def source_bytes(reader: CheckpointReader, layout: MoeLayout) -> int:
    """Bytes per expert weight as a job reads it: the stored dtype's, 4 for block-FP8 (read dequantised)."""
    first = layout.stored_names(layout.moe_layers[0], "gate")[0]  # per expert: expert 0; fused: the one tensor
    return 4 if reader.is_block_fp8(first) else DTYPE_BYTES.get(reader.dtype_name(first), 4)


def decoder_layer_bytes(reader: CheckpointReader, layout: MoeLayout, layer: int) -> int:
    """One decoder layer as calibration holds it: its routed experts in the source's dtype (block-FP8: float32),
    everything else (attention, norms, router, shared expert) in float32, and while it is converted, that rest as
    read too (`module.float()` beside the tensors loaded in the stored dtype)."""
    E, p, d = layout.num_experts, layout.intermediate_size, layout.hidden_size
    prefix = f"model.layers.{layer}."
    experts = layout.arch.experts_prefix(layer) + "."
    rest = [
        n
        for n in reader.weight_map
        if n.startswith(prefix) and not n.startswith(experts) and not n.endswith("_scale_inv")
    ]
    float32 = sum(4 * math.prod(reader.shape(n)) for n in rest)
    stored = sum(math.prod(reader.shape(n)) * DTYPE_BYTES.get(reader.dtype_name(n), 4) for n in rest)
    routed = 3 * E * p * d * source_bytes(reader, layout) if layer in layout.moe_layers else 0
    return float32 + (stored if stored < float32 else 0) + routed


def calibration_pass_bytes(
    reader: CheckpointReader,
    layout: MoeLayout,
    tokens: int,
    seq_len: int,
    keep_inputs: bool = False,
    stats: int = 0,
) -> int:
    """Peak bytes of the calibration pass (`mobe.calibrate.collect`): the larger of the embedding step and one
    decoder layer's step.

    Embedding: the table in float32 beside the source's copy, and the hidden states. A layer: its weights
    (`decoder_layer_bytes`, largest layer), the hidden states of every calibration token (float32, T x d) plus one
    sequence's replacement, one sequence's transients (attention scores, heads x L^2, and the MoE forward's routed
    copies, top-k x L x (d + 3p) float32, and a shared expert's, L x (d + 3 p_shared)), the experts read at a time
    (`READ_BYTES`), the layer's statistics while collected (`stats`), and with `keep_inputs` the experts' inputs of
    every token and their routing.
    """
    from ..calibrate.collect import READ_BYTES

    cfg = reader.config
    d, p = layout.hidden_size, layout.intermediate_size
    top_k = int(cfg.get("num_experts_per_tok") or 1)
    heads = int(cfg.get("num_attention_heads") or 1)
    length = min(seq_len, tokens)
    hidden = 4 * d * (tokens + length)
    vocab = int(cfg.get("vocab_size") or 0)
    embed = (4 + DTYPE_BYTES.get(_dtype_of(reader, "model.embed_tokens.weight"), 4)) * vocab * d + hidden
    shared = int(cfg.get("shared_expert_intermediate_size") or 0)  # a shared expert's activations (Qwen2-MoE)
    sequence = 4 * heads * length * length + 4 * top_k * length * (d + 3 * p)
    sequence += 4 * length * (d + 3 * shared) if shared else 0
    layer = max(decoder_layer_bytes(reader, layout, i) for i in layout.moe_layers)
    inputs = (4 * d + 12 * top_k) * tokens if keep_inputs else 0
    return max(embed, layer + hidden + sequence + READ_BYTES + stats + inputs)


def sampling_bytes(reader: CheckpointReader, tokens: int, seq_len: int, device: str = "cpu") -> int:
    """Peak bytes of sampling calibration text from the whole model (`mobe.calibrate.sample`): every weight (float32
    on the CPU, the stored dtype on an accelerator) beside the largest shard as read while loading, the key-value
    cache of one batch of sequences (float32 or the stored dtype), the batch's last-token logits with their
    processed copies and probabilities, and what loading and generate allocate for themselves
    (`RUNTIME_BYTES["inference"]`). Peaks measured on the CPU (RSS above a warm interpreter; the trained fixtures,
    1024 and 16384 tokens, two runs each) were 0.83-1.05 of this."""
    from ..calibrate.sample import BATCH

    cfg = reader.config.get("text_config", reader.config)
    names = list(reader.weight_map)
    stored = sum(math.prod(reader.shape(n)) * DTYPE_BYTES.get(reader.dtype_name(n), 4) for n in names)
    element = 4 if device == "cpu" else max(1, stored // max(1, reader.num_parameters()))
    shards = reader.tensors_by_shard().values()
    largest = max(
        sum(math.prod(reader.shape(n)) * DTYPE_BYTES.get(reader.dtype_name(n), 4) for n in shard) for shard in shards
    )
    batch = min(BATCH, math.ceil(tokens / seq_len))
    heads = int(cfg.get("num_attention_heads") or 1)
    kv_heads = int(cfg.get("num_key_value_heads") or heads)
    head_dim = int(cfg.get("head_dim") or int(cfg.get("hidden_size", 0)) // heads)
    layers = int(cfg.get("num_hidden_layers") or 1)
    cache = element * batch * seq_len * layers * 2 * kv_heads * head_dim
    logits = 4 * 4 * batch * int(cfg.get("vocab_size") or 0)
    return element * reader.num_parameters() + largest + cache + logits + RUNTIME_BYTES["inference"]


def _dtype_of(reader: CheckpointReader, name: str) -> str:
    return reader.dtype_name(name) if name in reader.weight_map else "F32"


def quantize_bytes(reader: CheckpointReader, config: QuantizeConfig | None = None) -> int:
    """Peak bytes of `mobe quantize` on a native checkpoint (its factors; a dense one: every float weight): one shard
    at a time, its tensors as read beside their quantised form (int8 before packing, packed, and the scales), plus
    the float32 transients of the largest tensor (the grouped copy, its quotient by the scales, the rounded values),
    and the libraries' own allocations.

    MoBE factors below 8 bits are rounded a (layer, matrix) group at a time in orthonormal coordinates
    (`mobe.quantize.factors.quantize_mobe`): the larger of forming them, the mixed bases of every expert (E r c
    numbers) in float64 beside their float32 orthonormalisation (its input, QR copy, Q, signed Q) and Q in float64,
    32 bytes a number, and re-solving and rounding A (E p r numbers: float64 copy and product, float32 transients),
    28 bytes a number; where those stacks are below glibc's largest mmap threshold, what its heap keeps of them
    (`HEAP_RETAINED`, as for a compression job)."""
    config = config or QuantizeConfig()
    section = reader.config.get("mobe") or {}
    native = section.get("format") == "native"
    peak = 0
    for names in reader.tensors_by_shard().values():
        read = quantised = largest = 0
        for name in names:
            numel, dtype = math.prod(reader.shape(name)), reader.dtype_name(name)
            read += numel * DTYPE_BYTES.get(dtype, 4)
            floating = dtype in ("F32", "BF16", "F16") and len(reader.shape(name)) > 1
            planned = floating and (not native or ".mobe_" in name)
            if planned:
                quantised += numel * (1 + config.bits / 8) + 4 * numel / config.group_size
                largest = max(largest, numel)
        peak = max(peak, int(read + quantised + 3 * 4 * largest))
    if native and section.get("method", "mobe") in JOINT_METHODS and config.bits < 8:
        peak += _mobe_rounding_bytes(reader, weights=config.factor_rounding == "weights")
    return peak + RUNTIME_BYTES["quantize"]


def _mobe_rounding_bytes(reader: CheckpointReader, weights: bool = False) -> int:
    """The largest (layer, matrix) group's transients of rounding MoBE factors in orthonormal coordinates, with what
    glibc's heap keeps of stacks below its largest mmap threshold (`quantize_bytes`). With `weights` (data-free
    GPTQ, `mobe.quantize.proxy`) GPTQ's float64 state (the weights, their scales and error, the Hessians and their
    inverse Cholesky factor, Q S Q^T where the inputs meet A's columns) where it is more than rounding to nearest's
    transients and, for down, the stand-in Hessians' making (`_proxy_bytes`)."""
    section = reader.config["mobe"]
    layout = moe_layout(reader.config)
    down = {factor_tensor_names(layout, layer, "down")["A"] for layer in section.get("layers", ())}
    most = 0
    for name in reader.weight_map:
        if not name.endswith(".mobe_A"):
            continue
        stem, formed = name[: -len("A")], 0
        if stem + "bases" in reader.weight_map:
            cols = reader.shape(stem + "bases")[-1]
        elif stem + "V" in reader.weight_map:  # SLBF: its m low-rank bases are formed, (m, r, c) float32
            cols = reader.shape(stem + "V")[-1]
            formed = 4 * reader.shape(stem + "V")[0] * reader.shape(name)[-1] * cols
        else:
            continue
        E, rows, rank = reader.shape(name)
        transients = max(32 * E * rank * cols, 28 * E * rows * rank) + formed
        if weights:  # GPTQ in place of rounding to nearest: its float64 state instead of the float32 transients
            side = max(rows, rank)
            transients = max(transients, 8 * 4 * E * rows * rank + 8 * 4 * E * side * side)
        if 4 * E * max(rank * cols, rows * rank) < HEAP_THRESHOLD_MAX:
            transients += int(HEAP_RETAINED * transients)
        if weights and name in down:
            transients += _proxy_bytes(E, layout.intermediate_size, layout.hidden_size)
        most = max(most, transients)
    return most


def _proxy_bytes(experts: int, p: int, d: int) -> int:
    """Making down's stand-in Hessians (`proxy.down_hessians`), the largest of its stages plus the result (E, p, p)
    in float32: the input Gram (16 experts' gate or up products in float32 and two float64 copies, the d x d Gram
    and its partial sum); the Gaussian inputs (the Gram scaled, its eigenvectors and their scaled copy: three d x d
    float64 matrices; the float64 draws, their product and its float32 copy); the activations
    (the inputs, a chunk of experts' gate and up products, two projections, their product, and the copies einsum
    makes of them to multiply them as batches)."""
    gram_chunk = min(experts, 16)
    gram = gram_chunk * p * d * (4 + 8 + 8) + 2 * 8 * d * d
    inputs = 3 * 8 * d * d + SAMPLES * d * (8 + 8 + 4)
    step = min(experts, expert_chunk(SAMPLES, p))
    block = 4 * step * SAMPLES * p
    activations = SAMPLES * d * 4 + 2 * step * p * d * 4 + 5 * block  # einsum's permuted copies
    if block < HEAP_THRESHOLD_MAX:  # blocks the heap serves, and keeps
        activations += int(HEAP_RETAINED * activations)
    return max(gram, inputs, activations) + 4 * experts * p * p


@dataclass
class MemoryEstimate:
    """Peak bytes of the big tensors of each stage (the interpreter and libraries, about 0.5 GB, not included)."""

    job_host: int  # one (layer, matrix) compression job, data-free: host RAM
    job_device: int  # ... on the accelerator (0 when it runs on the CPU)
    calibrated_job_host: int  # ... with --calibration
    calibrated_job_device: int
    calibration_pass: int  # the calibration pass: one decoder layer streamed at a time, with its statistics
    export: int  # writing the output, one shard at a time
    stats_gram: int  # one layer's calibration statistics as dense float64 Grams (before)
    stats_factor: int  # ... factored, uniformly random routing, while collecting (peak)
    stats_factor_bound: int  # ... factored, any routing
    inference_weights: int  # native MoBE checkpoint's parameters in its dtype
    inference_workspace: int  # materialised mixed bases of one forward + the LRU caches + KV cache
    calibration_tokens: int
    top_k: int
    device: str = "cpu"
    sampling: int = 0  # sampling calibration text from the whole model (factor rounding "sampled"), where it runs

    def compress_host(self, calibrated: bool = False, workers: int = 1, sampled: bool = False) -> int:
        """`mobe compress`'s host peak: the largest of `workers` jobs at once (each worker process its own
        interpreter and libraries, `WORKER_PROCESS_BYTES`, and runtime), with calibration the pass before them, and
        writing the output; with `sampled` (integer factors rounded on sampled text), the sampling (on the CPU)
        and the calibration pass over its tokens; plus the runtime's own allocations."""
        job = self.calibrated_job_host if calibrated else self.job_host
        runtime = RUNTIME_BYTES["compress"]
        pool = workers * (job + runtime + WORKER_PROCESS_BYTES)
        stages = [pool if workers > 1 else job, self.export]
        if calibrated or sampled:
            stages.append(self.calibration_pass)
        if sampled and self.device == "cpu":
            stages.append(self.sampling)
        return max(stages) + runtime

    @property
    def inference_total(self) -> int:
        """`mobe generate`'s peak: the weights, the workspace and caches, and the libraries' own."""
        return self.inference_weights + self.inference_workspace + RUNTIME_BYTES["inference"]

    def compress_device(self, calibrated: bool = False, sampled: bool = False) -> int:
        """Peak bytes on one accelerator (each device of a pool runs one job at a time; the first also samples)."""
        job = self.calibrated_job_device if calibrated else self.job_device
        return max(job, self.sampling) if sampled and self.device != "cpu" else job

    def summary(self) -> str:
        def job(host: int, device: int) -> str:
            return f"{gib(host)} RAM" + (f" + {gib(device)} GPU" if device else "")

        return "\n".join(
            [
                "memory (estimates from the config's shapes):",
                f"  compression job (one layer, one matrix type): {job(self.job_host, self.job_device)}, "
                f"with --calibration {job(self.calibrated_job_host, self.calibrated_job_device)}",
                f"  compress: {gib(self.compress_host())} RAM (the largest of a job and writing the output, "
                f"{gib(self.export)}), with --calibration {gib(self.compress_host(True))} (the calibration pass, "
                f"one decoder layer at a time: {gib(self.calibration_pass)}); each includes "
                f"{gib(RUNTIME_BYTES['compress'])} for torch and transformers themselves",
                f"  calibration statistics of one layer ({self.calibration_tokens} tokens x top-{self.top_k}): "
                f"factored {gib(self.stats_factor)} (uniformly random routing; at most "
                f"{gib(self.stats_factor_bound)}), "
                f"dense Grams {gib(self.stats_gram)}",
                f"  integer factors rounded on sampled text (--quantize-factor-rounding sampled): the whole model "
                f"samples {self.calibration_tokens} tokens, {gib(self.sampling)}"
                + (" RAM" if self.device == "cpu" else f" on {self.device}"),
                f"  native inference: {gib(self.inference_total)} "
                f"(weights {gib(self.inference_weights)}, workspace and caches {gib(self.inference_workspace)})",
            ]
        )


def memory_estimate(
    model: str | Path | CheckpointReader,
    num_bases: int,
    rank: int | None = None,
    groups: int = 1,
    matrices: tuple[str, ...] = ("gate", "up"),
    calibration_tokens: int = 32768,
    device: str = "cpu",
    context: int = 4096,
    cache_mib: float = 0.0,
    calibration_seq_len: int = 512,
    keep_inputs: bool = False,
    schedule: str = "fast",
    prompt: int | None = None,
    basis_side: str = "wider",
) -> MemoryEstimate:
    """Peak memory of compressing `model` (one job, the calibration pass and statistics) and of running the result
    natively. `device`: "cpu" or "cuda" (where a job's fit runs); `context`, `prompt`: the tokens of the native
    inference, of which `prompt` in its first forward (default: all)."""
    reader = model if isinstance(model, CheckpointReader) else CheckpointReader(model)
    layout = moe_layout(reader.config)
    E, p, d = layout.num_experts, layout.intermediate_size, layout.hidden_size
    rank = rank or min(p, d)
    top_k = int(reader.config.get("num_experts_per_tok") or 1)
    first = layout.stored_names(layout.moe_layers[0], "gate")[0]
    nbytes = source_bytes(reader, layout)
    counts = routed_counts(E, calibration_tokens, top_k)
    stats = factor_stats_bytes(counts, p, d, collecting=True)
    job_stats = factor_bytes(counts, d)  # a gate/up job reads the inputs' factor (the larger one)
    host, gpu = compression_job_bytes(E, p, d, num_bases, rank, groups, nbytes, device=device, schedule=schedule)
    rows, widest = sum(min(n, d) for n in counts), max(min(n, d) for n in counts)
    calibrated = compression_job_bytes(
        E, p, d, num_bases, rank, groups, nbytes, job_stats, rows, device, schedule, weighting_widest=widest
    )
    weights, workspace = inference_bytes(
        layout,
        reader.num_parameters(),
        num_bases,
        rank,
        groups,
        matrices,
        2 if reader.is_block_fp8(first) else nbytes,
        reader.config,
        cache_mib=cache_mib,
        context=context,
        prompt=prompt,
        stacked_per_expert=len(layout.stored_names(layout.moe_layers[0], "up")) > 1,
        basis_side=basis_side,
    )
    return MemoryEstimate(
        job_host=host,
        job_device=gpu,
        calibrated_job_host=calibrated[0],
        calibrated_job_device=calibrated[1],
        calibration_pass=calibration_pass_bytes(
            reader, layout, calibration_tokens, calibration_seq_len, keep_inputs, stats
        ),
        export=export_bytes(reader, layout, [(layer, m) for layer in layout.moe_layers for m in matrices]),
        stats_gram=gram_stats_bytes(E, p, d),
        stats_factor=stats,
        stats_factor_bound=factor_stats_bound(E, p, d, calibration_tokens, top_k, collecting=True),
        inference_weights=weights,
        inference_workspace=workspace,
        calibration_tokens=calibration_tokens,
        top_k=top_k,
        device=device,
        sampling=sampling_bytes(reader, calibration_tokens, calibration_seq_len, device),
    )


def compress_memory_estimate(reader: CheckpointReader, config: MobeConfig, device: str = "cpu") -> MemoryEstimate:
    """`memory_estimate` for the settings of a `mobe compress` run (`config` resolved: bases and rank set)."""
    return memory_estimate(
        reader,
        config.num_bases,
        config.rank,
        config.groups,
        tuple(config.matrices),
        config.calibration_tokens,
        device,
        calibration_seq_len=config.calibration_seq_len,
        keep_inputs=config.calibration_refine_steps > 0,
        schedule=config.schedule,
        basis_side=config.basis_side or "wider",
    )


def available_bytes(device: str) -> int | None:
    """Memory free for a new allocation on `device` now: CUDA's free memory (`torch.cuda.mem_get_info`), the host's
    MemAvailable (psutil when installed, else /proc/meminfo); None where it cannot be told (mps, other systems)."""
    if device.startswith("cuda"):
        import torch

        return int(torch.cuda.mem_get_info(torch.device(device))[0])
    if device != "cpu":
        return None
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        pass
    meminfo = Path("/proc/meminfo")
    if not meminfo.is_file():
        return None
    for line in meminfo.read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return None


class MemoryRefusal(ValueError):
    """A run whose estimated peak exceeds what the device has free (`--force` runs it anyway)."""


def check_compress_memory(
    reader: CheckpointReader, config: MobeConfig, devices: list[str], sampled: bool = False
) -> MemoryEstimate:
    """Refuse, before anything is written, a compression whose estimated peak exceeds the memory the chosen devices
    have free: the host RAM (every local job at once, or the calibration pass) and each accelerator's. `sampled`:
    the integer factors are rounded on text the whole model samples (`config.rounds_on_sampled_text`). One line
    names the estimate, what is free, and what to change."""
    kinds = ["cuda" if dev.startswith("cuda") or dev == "auto" and _cuda() else "cpu" for dev in devices]
    gpu = "cuda" in kinds
    estimate = compress_memory_estimate(reader, config, "cuda" if gpu else "cpu")
    calibrated = config.calibration is not None
    what = "with --calibration " if calibrated else ""
    what += "with sampled factor rounding " if sampled else ""
    fixes = "lower --batch-experts" + (", lower --calibration-tokens" if calibrated else "")
    fixes += ", --quantize-factor-rounding weights (sampling holds the whole model)" if sampled else ""
    need = estimate.compress_host(calibrated, workers=len(devices) if not gpu else 1, sampled=sampled)
    free = available_bytes("cpu")
    if free is not None and need > free:
        workers = f" ({len(devices)} jobs at once)" if len(devices) > 1 and not gpu else ""
        raise MemoryRefusal(
            f"compress {what}needs about {gib(need)} of RAM{workers} by mobe's estimate, {gib(free)} is available: "
            f"{fixes}, use fewer devices or {'a GPU' if not gpu else 'a machine with more RAM'}, or pass --force"
        )
    for dev, kind in zip(devices, kinds, strict=True):
        if kind != "cuda":
            continue
        dev = "cuda" if dev == "auto" else dev
        need, free = estimate.compress_device(calibrated, sampled), available_bytes(dev)
        if free is not None and need > free:
            raise MemoryRefusal(
                f"compress {what}needs about {gib(need)} on {dev} by mobe's estimate, {gib(free)} is free there: "
                f"{fixes}, use a device with more memory or --device cpu, or pass --force"
            )
    return estimate


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()
