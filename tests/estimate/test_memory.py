"""Memory estimates against closed forms, the refusal of a compression that does not fit, and calibration's
lower-precision streaming (the same statistics as a float32 run)."""

import math

import pytest
import torch

from mobe.architectures import moe_layout
from mobe.calibrate import collect_statistics
from mobe.checkpoint import CheckpointReader
from mobe.cli.main import main
from mobe.config import MobeConfig
from mobe.estimate import memory
from mobe.fixtures import build_tiny_moe

SIZES = dict(hidden_size=32, moe_intermediate_size=16, num_experts=8, num_layers=2)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny_moe(tmp_path_factory.mktemp("mem") / "q3", "qwen3_moe", **SIZES)


@pytest.fixture(scope="module")
def tiny_bf16(tmp_path_factory):
    return build_tiny_moe(tmp_path_factory.mktemp("mem") / "q3bf16", "qwen3_moe", dtype=torch.bfloat16, **SIZES)


def test_decoder_layer_counts_the_layer_as_calibration_holds_it(tiny, tiny_bf16):
    """float32 attention and norms (a bfloat16 checkpoint's also as read, while converted); routed experts in the
    stored dtype (2 bytes in a bfloat16 checkpoint)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(tiny))
    layer = model.model.layers[0]
    experts = sum(p.numel() for n, p in layer.named_parameters() if ".experts." in n)
    rest = sum(p.numel() for n, p in layer.named_parameters() if ".experts." not in n)
    assert experts == 3 * 8 * 16 * 32
    for path, nbytes, rest_bytes in ((tiny, 4, 4), (tiny_bf16, 2, 4 + 2)):
        reader = CheckpointReader(path)
        assert memory.decoder_layer_bytes(reader, moe_layout(reader.config), 0) == rest_bytes * rest + nbytes * experts


def test_quantize_estimate_is_the_largest_shard_read_and_written(tiny):
    reader = CheckpointReader(tiny)
    config = memory.QuantizeConfig(bits=4, group_size=16)
    expected = 0
    for names in reader.tensors_by_shard().values():
        numels = [math.prod(reader.shape(n)) for n in names]
        matrices = [n for n, name in zip(numels, names, strict=True) if len(reader.shape(name)) > 1]
        held = 4 * sum(numels) + sum(1.5 * n + 4 * n / 16 for n in matrices) + 12 * max(matrices, default=0)
        expected = max(expected, int(held))
    assert memory.quantize_bytes(reader, config) == expected + memory.RUNTIME_BYTES["quantize"]


def test_quantize_estimate_adds_the_rounding_of_mobe_factors_in_orthonormal_coordinates(tiny, tmp_path):
    """Native MoBE factors below 8 bits: the largest (layer, matrix) group's 32 bytes per mixed-basis number (E r c)
    or 28 per number of A (E p r), whichever is more, three quarters again for stacks this small (glibc's heap)."""
    from mobe import compress

    native = tmp_path / "native"
    compress(tiny, native, MobeConfig(num_bases=2, steps=1, matrices=("gate", "down")), progress=False)
    reader = CheckpointReader(native)
    config = memory.QuantizeConfig(bits=4, group_size=16, factor_rounding="nearest")
    rounding = memory.quantize_bytes(reader, config)
    weights = memory.quantize_bytes(reader, memory.QuantizeConfig(bits=4, group_size=16))
    reader.config["mobe"]["method"] = "svd"  # a method without a mixed basis: its factors rounded one at a time
    plain = memory.quantize_bytes(reader, config)
    E, p, d = 8, 16, 32  # gate and down both fitted as (E, p, d) stacks (down as its transpose), at rank p
    assert rounding - plain == int(1.75 * max(32 * E * p * d, 28 * E * p * p))
    # data-free GPTQ ("weights"): GPTQ's float64 state (4 copies of A, 4 of the (E, p, p) Hessians) where it is more
    # than rounding to nearest's transients, with the same heap share; and for down the stand-in Hessians' making, at
    # its largest stage here the activations of all 8 experts on 4096 Gaussian inputs (the inputs, gate and up
    # products, five blocks of activations: two projections, their product, einsum's copies), blocks the heap keeps
    # (three quarters again), plus the result (E, p, p) in float32
    gptq = int(1.75 * max(32 * E * p * d, 28 * E * p * p, 32 * E * p * p + 32 * E * p * p))
    activations = 4096 * d * 4 + 2 * E * p * d * 4 + 5 * 4 * E * 4096 * p
    proxy = int(1.75 * activations) + 4 * E * p * p
    assert activations > 3 * 8 * d * d + 4096 * d * 20  # above the Gaussian inputs' stage
    assert weights - plain == gptq + proxy


def test_calibration_pass_is_one_layer_plus_the_hidden_states_and_statistics(tiny):
    reader = CheckpointReader(tiny)
    layout = moe_layout(reader.config)
    base = memory.calibration_pass_bytes(reader, layout, tokens=256, seq_len=64)
    with_stats = memory.calibration_pass_bytes(reader, layout, tokens=256, seq_len=64, stats=10**6)
    assert with_stats - base == 10**6
    layer = memory.decoder_layer_bytes(reader, layout, 0)
    assert base >= layer + 4 * 32 * 256  # the layer and every token's hidden state


def test_calibration_pass_counts_a_shared_experts_activations(tmp_path):
    """Qwen2-MoE's shared expert runs on every token of a sequence: L x (d + 3 p_shared) float32 numbers more."""
    path = build_tiny_moe(tmp_path / "q2", "qwen2_moe", **SIZES)
    reader = CheckpointReader(path)
    layout = moe_layout(reader.config)
    shared = reader.config["shared_expert_intermediate_size"]
    assert shared > 0
    with_shared = memory.calibration_pass_bytes(reader, layout, tokens=256, seq_len=64)
    reader.config["shared_expert_intermediate_size"] = 0
    without = memory.calibration_pass_bytes(reader, layout, tokens=256, seq_len=64)
    assert with_shared - without == 4 * 64 * (32 + 3 * shared)


def test_a_cpu_job_under_the_heap_threshold_counts_what_the_heap_keeps(monkeypatch):
    """glibc serves stacks below its largest mmap threshold from the heap: the CPU job holds its transients and
    three quarters of them again; larger stacks, and jobs on a GPU, do not."""

    def job(E, p, d, device="cpu"):
        return memory.compression_job_bytes(E, p, d, 4, min(p, d), 1, 2, device=device)[0]  # host bytes

    small, large = (32, 256, 512), (64, 256, 1024)  # float32 stacks of 16 and 64 MiB
    kept = {shape: job(*shape) for shape in (small, large)}
    gpu = {shape: job(*shape, device="cuda") for shape in (small, large)}
    monkeypatch.setattr(memory, "HEAP_THRESHOLD_MAX", 0)
    for shape in (small, large):
        E, p, d = shape
        held = 2 * E * p * d  # the bfloat16 stack
        transients = job(*shape) - held
        expected = held + transients + int(0.75 * transients) if shape == small else job(*shape)
        assert kept[shape] == expected
        assert gpu[shape] == job(*shape, device="cuda")


def _refuse_below(monkeypatch, free: int) -> None:
    monkeypatch.setattr(memory, "available_bytes", lambda device: free)


def test_compress_refuses_a_run_that_does_not_fit_and_writes_nothing(tiny, tmp_path, monkeypatch, capsys):
    _refuse_below(monkeypatch, 2**10)  # 1 KiB free
    out = tmp_path / "out"
    code = main(["compress", str(tiny), "-o", str(out), "--steps", "1", "-q", "--device", "cpu"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert "needs about" in err[0] and "1.0 KiB is available" in err[0]
    assert "--batch-experts" in err[0] and "--force" in err[0]
    assert not out.exists() and not list(tmp_path.iterdir())
    assert main(["compress", str(tiny), "-o", str(out), "--steps", "1", "-q", "--device", "cpu", "--force"]) == 0
    assert (out / "config.json").is_file()


def test_refusal_names_the_calibration_setting(tiny, tmp_path, monkeypatch):
    reader = CheckpointReader(tiny)
    _refuse_below(monkeypatch, 2**10)
    config = MobeConfig(num_bases=2, rank=8, calibration="text.txt")
    with pytest.raises(memory.MemoryRefusal, match="--calibration-tokens"):
        memory.check_compress_memory(reader, config, ["cpu"])
    free = memory.compress_memory_estimate(reader, config).compress_host(calibrated=True)
    _refuse_below(monkeypatch, free)  # exactly enough: runs
    memory.check_compress_memory(reader, config, ["cpu"])
    plain = MobeConfig(num_bases=2, rank=8)
    estimate = memory.compress_memory_estimate(reader, plain)
    two = estimate.compress_host(workers=2)  # two local workers: two jobs at once, each in its own process
    runtime, worker = memory.RUNTIME_BYTES["compress"], memory.WORKER_PROCESS_BYTES
    assert two == 2 * (estimate.job_host + runtime + worker) + runtime
    _refuse_below(monkeypatch, two - 1)
    memory.check_compress_memory(reader, plain, ["cpu"])
    with pytest.raises(memory.MemoryRefusal, match="2 jobs at once"):
        memory.check_compress_memory(reader, plain, ["cpu", "cpu"])


def test_refusal_checks_each_gpu_against_its_own_free_memory(tiny, monkeypatch):
    reader = CheckpointReader(tiny)
    monkeypatch.setattr(memory, "available_bytes", lambda device: 2**40 if device == "cpu" else 2**10)
    with pytest.raises(memory.MemoryRefusal, match="on cuda:1 .* 1.0 KiB is free there"):
        memory.check_compress_memory(reader, MobeConfig(num_bases=2, rank=8), ["cuda:1"])


def test_available_memory_of_the_host_is_positive():
    free = memory.available_bytes("cpu")
    assert free is None or free > 0


def test_bfloat16_experts_give_the_statistics_of_a_float32_run(tiny_bf16, monkeypatch):
    """Calibration keeps bfloat16 experts as stored and computes each routed expert in float32: the statistics of
    converting the whole layer first (what it did before)."""
    import mobe.calibrate.collect as collect

    reader = CheckpointReader(tiny_bf16)
    layout = moe_layout(reader.config)
    g = torch.Generator().manual_seed(0)
    sequences = [torch.randint(0, 128, (40,), generator=g), torch.randint(0, 128, (9,), generator=g)]
    streamed = dict(collect_statistics(reader, layout, sequences, layout.moe_layers))
    monkeypatch.setattr(collect, "_float32_forward", lambda experts: False)  # the whole layer made float32
    converted = dict(collect_statistics(reader, layout, sequences, layout.moe_layers))
    first, *later = layout.moe_layers
    for matrix in ("gate", "down"):  # the first layer's inputs are the same: its statistics are the same bits
        torch.testing.assert_close(streamed[first].gram(matrix), converted[first].gram(matrix), rtol=0, atol=0)
        for layer in later:  # after it, float32 rounding (one matmul per expert, not transformers' grouped one)
            torch.testing.assert_close(
                streamed[layer].gram(matrix), converted[layer].gram(matrix), rtol=1e-4, atol=1e-5
            )


@pytest.fixture(scope="module")
def native_bf16(tiny_bf16, tmp_path_factory):
    """The bf16 tiny model compressed natively (gate and down factored, up dense), p < d and p > d alike."""
    from mobe import compress

    root = tmp_path_factory.mktemp("native")
    out = {}
    for name, sizes in (("narrow", SIZES), ("wide", dict(SIZES, moe_intermediate_size=48))):
        src = tiny_bf16 if name == "narrow" else build_tiny_moe(root / name, "qwen3_moe", dtype=torch.bfloat16, **sizes)
        config = MobeConfig(steps=1, matrices=("gate", "down"), num_bases=2)
        compress(src, root / f"{name}-native", config, progress=False)
        out[name] = (src, root / f"{name}-native", config)
    return out


def test_inference_weights_are_the_checkpoint_plus_the_stacked_dense_experts(native_bf16):
    """The native checkpoint's bytes (mapped; its tensors become the parameters) and the per-expert up matrices
    that transformers stacks into a fused parameter: a copy, beside the file. Checked against the model
    `load_model` builds and the bytes the native checkpoint stores."""
    from mobe.pipeline import resolve_settings
    from mobe.runtime import load_model

    for src, native, config in native_bf16.values():
        reader = CheckpointReader(src)
        config = resolve_settings(moe_layout(reader.config), config)
        estimate = memory.memory_estimate(reader, config.num_bases, config.rank, 1, ("gate", "down"), context=8)
        stored = CheckpointReader(native)
        file_bytes = sum(2 * math.prod(stored.shape(n)) for n in stored.weight_map)
        model = load_model(native)
        fused_up = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if n.endswith("up_proj"))
        assert fused_up == 2 * 2 * 8 * 16 * 32 * (3 if "wide" in str(native) else 1)
        assert estimate.inference_weights == file_bytes + fused_up


def test_expert_matmul_shapes_are_those_a_native_forward_runs(native_bf16):
    """`expert_matmuls` against the distinct (in, out, transposed weight) of the matrix products the experts module
    runs for tokens all routed to one expert (the mixing of the bases, one expert's, is left out)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from mobe.runtime import load_model
    from mobe.runtime.experts import MobeExperts

    class Shapes(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func in (torch.ops.aten.mm.default, torch.ops.aten.bmm.default):
                x, w = args[0], args[1]
                if x.shape[-2] == 5:  # the 5 tokens' products, not the mixing of one expert's bases
                    self.seen.add((w.shape[-2], w.shape[-1], w.stride(-2) == 1 and w.shape[-1] > 1))
            return func(*args, **(kwargs or {}))

    for name, (_, native, _) in native_bf16.items():
        experts = next(m for m in load_model(native).modules() if isinstance(m, MobeExperts))
        p = 48 if name == "wide" else 16
        x = torch.randn(5, 32, dtype=torch.bfloat16)
        with Shapes() as shapes, torch.no_grad():
            experts(x, torch.zeros(5, 1, dtype=torch.long), torch.ones(5, 1, dtype=torch.bfloat16))
        rank = experts.matrix("gate").mobe_A.shape[-1]
        assert len(shapes.seen) == memory.expert_matmuls(p, 32, rank, ("gate", "down")), shapes.seen


def test_half_precision_inference_counts_onednn_kernels_per_matmul_shape(tiny_bf16):
    """The kernels term is the shapes times the bytes per shape; float32 has none; more prompt tokens, more shapes
    (up to E distinct token counts per layer)."""
    reader = CheckpointReader(tiny_bf16)
    layout = moe_layout(reader.config)
    args = (layout, reader.num_parameters(), 2, 8, 1, ("gate", "down"), 2, reader.config)
    none = memory.inference_bytes(*args, context=24, prompt=16, shape_bytes=0)[1]
    one = memory.inference_bytes(*args, context=24, prompt=16, shape_bytes=1)[1]
    shapes = memory.matmul_shapes(layout, reader.config, ("gate", "down"), 8, 16, 8, 16)
    assert one - none == shapes
    assert (
        memory.inference_bytes(*args[:6], 4, args[7], context=24, prompt=16, shape_bytes=1)[1]
        == (memory.inference_bytes(*args[:6], 4, args[7], context=24, prompt=16, shape_bytes=0)[1])
    )
    assert memory.matmul_shapes(layout, reader.config, ("gate", "down"), 8, 4, 8, 16) < shapes
    # at most E distinct counts per layer, whatever the prompt
    assert memory.matmul_shapes(layout, reader.config, ("gate", "down"), 8, 10**6, 8, 16) == (
        memory.matmul_shapes(layout, reader.config, ("gate", "down"), 8, 10**3, 8, 16)
    )


def test_distill_counts_loading_a_half_precision_student_in_float32(native_bf16):
    """Loading converts the bf16 checkpoint: the float32 parameters (those of the model `load_model` builds) beside
    the file's bytes, and the per-expert up matrices stacked before conversion."""
    from mobe.estimate.distill import student_loading_bytes
    from mobe.runtime import load_model

    _, native, _ = native_bf16["narrow"]
    reader = CheckpointReader(native)
    model = load_model(native, dtype=torch.float32)
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    file_bytes = sum(2 * math.prod(reader.shape(n)) for n in reader.weight_map)
    per_expert_up = 2 * 2 * 8 * 16 * 32
    assert student_loading_bytes(reader, moe_layout(reader.config)) == params + file_bytes + per_expert_up


@pytest.mark.parametrize("mode", ["router", "router+coef"])
def test_distill_step_counts_the_mixed_bases_a_routed_forward_saves_for_backward(native_bf16, mode):
    """The bytes the experts' forward with grad saves for backward (summed by saved_tensors_hooks, one count per
    storage, parameters' own left out), every expert routed: the mixed bases are `mixed_bases_bytes` exactly, and
    (training the routers) everything saved is within `step_bytes`' count of the experts (2 n x d gathered rows
    and outputs, n x (4 p + r) intermediates, plus the mixed bases)."""
    from mobe.distill.trainable import select_trainable
    from mobe.estimate.distill import FLOAT32, mixed_bases_bytes
    from mobe.runtime import MobeExperts, load_model

    for name, (_, native, _) in native_bf16.items():
        reader = CheckpointReader(native)
        layout = moe_layout(reader.config)
        model = load_model(native, dtype=torch.float32)
        select_trainable(model, layout, mode)
        experts = next(m for m in model.modules() if isinstance(m, MobeExperts))
        own = {p.untyped_storage().data_ptr() for p in model.parameters()}
        E, p, d, top_k = layout.num_experts, layout.intermediate_size, layout.hidden_size, 2
        tokens = 2 * E
        x = torch.randn(tokens, d, requires_grad=True)  # the routed rows need their gradient, as in training
        index = torch.arange(tokens * top_k).reshape(tokens, top_k) % E  # every expert routed
        weights = torch.full((tokens, top_k), 0.5, requires_grad=True)
        saved: dict[int, tuple[int, tuple]] = {}

        def pack(t, own=own, saved=saved):
            storage = t.untyped_storage()
            if storage.data_ptr() not in own:
                saved.setdefault(storage.data_ptr(), (storage.nbytes(), tuple(t.shape[-2:])))
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            experts(x, index, weights)
        shapes = (reader.config["mobe"]["factor_shapes"][m]["bases"][-2:] for m in ("gate", "down"))
        mixed_shapes = {s for r, c in shapes for s in ((r, c), (c, r))}
        mixed = sum(n for n, shape in saved.values() if shape in mixed_shapes)
        assert mixed == mixed_bases_bytes(reader, layout, E, mode), name
        rows, ranks = tokens * top_k, sum(s["bases"][-2] for s in reader.config["mobe"]["factor_shapes"].values())
        bound = FLOAT32 * (2 * rows * d + rows * (4 * p + ranks)) + mixed
        if mode == "router":  # training the coefficients also saves their gathered rows and indices (a few KiB)
            assert mixed < sum(n for n, _ in saved.values()) <= bound, name


def test_a_pool_worker_costs_a_fresh_interpreter_with_torch_and_mobe_imported(tiny):
    """`WORKER_PROCESS_BYTES` against the private memory of a fresh interpreter that imports what a pool worker
    imports before its first job (loose: the figure moves with torch's version), and what the pool estimate adds
    per worker."""
    import subprocess
    import sys

    code = (
        "import torch, mobe.distribute.jobs; from pathlib import Path; "
        "print(next(l.split()[1] for l in Path('/proc/self/status').read_text().splitlines() "
        "if l.startswith('RssAnon')))"
    )
    anon = int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout) * 1024
    assert 0.6 < memory.WORKER_PROCESS_BYTES / anon < 1.5
    estimate = memory.memory_estimate(tiny, 2, 8, matrices=("gate", "down"))
    runtime = memory.RUNTIME_BYTES["compress"]
    job = estimate.job_host + runtime + memory.WORKER_PROCESS_BYTES
    assert estimate.compress_host(workers=3) == max(3 * job, estimate.export) + runtime


def test_sampling_holds_the_whole_model_in_float32_and_one_batchs_cache(tiny_bf16, monkeypatch):
    """Rounding factors on sampled text loads every weight (float32 on the CPU: 4 bytes per parameter, as
    `num_parameters` counts them independently of the shards' dtypes) and a key-value cache of one batch that grows
    to the sequence length; the refusal names the cheaper rounding."""
    from mobe.calibrate.sample import BATCH

    reader = CheckpointReader(tiny_bf16)
    cfg = reader.config
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    per_token = 2 * cfg["num_hidden_layers"] * cfg["num_key_value_heads"] * head_dim  # K and V of every layer
    short, long = (memory.sampling_bytes(reader, BATCH * n, n, "cpu") for n in (64, 128))
    assert long - short == 4 * BATCH * (128 - 64) * per_token  # the float32 cache grows with the sequence
    assert short > 4 * reader.num_parameters()
    assert memory.sampling_bytes(reader, BATCH * 64, 64, "cuda") < short  # bfloat16 weights and cache on a GPU
    config = MobeConfig(num_bases=2, rank=8, calibration_tokens=BATCH * 64, calibration_seq_len=64)
    estimate = memory.compress_memory_estimate(reader, config)
    assert estimate.sampling == short
    assert estimate.compress_host(sampled=True) >= short + memory.RUNTIME_BYTES["compress"]
    _refuse_below(monkeypatch, estimate.compress_host(sampled=True) - 1)
    memory.check_compress_memory(reader, config, ["cpu"])  # without sampling it fits
    with pytest.raises(memory.MemoryRefusal, match="sampled factor rounding .*--quantize-factor-rounding weights"):
        memory.check_compress_memory(reader, config, ["cpu"], sampled=True)
