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
    config = memory.QuantizeConfig(bits=4, group_size=16)
    rounding = memory.quantize_bytes(reader, config)
    reader.config["mobe"]["method"] = "slbf"  # any other method: its factors rounded one tensor at a time
    plain = memory.quantize_bytes(reader, config)
    E, p, d = 8, 16, 32  # gate and down both fitted as (E, p, d) stacks (down as its transpose), at rank p
    assert rounding - plain == int(1.75 * max(32 * E * p * d, 28 * E * p * p))


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
    assert two == 2 * (estimate.job_host + memory.RUNTIME_BYTES["compress"]) + memory.RUNTIME_BYTES["compress"]
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
