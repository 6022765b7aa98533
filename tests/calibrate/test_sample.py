"""Calibration tokens the model samples itself, and compression's integer factors rounded on them."""

import dataclasses
import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from mobe import MobeConfig, QuantizeConfig, compress
from mobe.architectures import moe_layout
from mobe.calibrate import collect_statistics
from mobe.calibrate import run as calibrate_run
from mobe.calibrate.run import collect_sampled
from mobe.calibrate.sample import sample_sequences
from mobe.checkpoint import CheckpointReader
from mobe.factorize import oriented
from mobe.fixtures import trained_fixture_path
from mobe.pipeline import read_native_factors
from mobe.quantize.factors import quantize_mobe


def test_sampled_sequences_are_seeded_follow_the_model_and_start_from_ordinary_tokens():
    source = trained_fixture_path()
    a = sample_sequences(source, 100, 24, seed=1, device="cpu")
    b = sample_sequences(source, 100, 24, seed=1, device="cpu")
    c = sample_sequences(source, 100, 24, seed=2, device="cpu")
    assert len(a) == math.ceil(100 / 24) and all(s.shape == (24,) and s.dtype == torch.int64 for s in a)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(torch.equal(x, y) for x, y in zip(a, c, strict=True))
    tokenizer = AutoTokenizer.from_pretrained(source)
    assert not {int(s[0]) for s in a} & set(tokenizer.all_special_ids)
    # the continuations are the model's own text: far likelier under it than uniformly drawn tokens (log V nats)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    ids = torch.stack(a)
    with torch.no_grad():
        logits = model(ids).logits[:, :-1]
    nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    assert nll.item() < 0.6 * math.log(len(tokenizer))


def test_compress_rounds_integer_factors_on_sampled_text(tmp_path, monkeypatch):
    """`compress --quantize-factor-rounding sampled` writes what `quantize_mobe` gives on the Grams of the routed
    inputs of the tokens the original samples (A re-solved against the original experts, least-error scales), and
    its output error against the original on those inputs is below round-to-nearest's at the same bytes."""
    source = trained_fixture_path()
    settings = MobeConfig(
        num_bases=2, rank=16, steps=4, eval_every=2, layers=(0, 3), matrices=("gate", "down"), device="cpu"
    )
    settings = dataclasses.replace(settings, calibration_tokens=256, calibration_seq_len=64)
    quantize = QuantizeConfig(bits=3, group_size=16, factor_rounding="sampled")
    native, sampled, nearest = tmp_path / "native", tmp_path / "sampled", tmp_path / "nearest"
    compress(source, native, settings, progress=False)
    compress(source, sampled, settings, progress=False, quantize=quantize)
    compress(
        source, nearest, settings, progress=False, quantize=dataclasses.replace(quantize, factor_rounding="nearest")
    )
    reader = CheckpointReader(source)
    layout = moe_layout(reader.config)
    tokens = sample_sequences(source, 256, 64, seed=settings.seed, device="cpu")
    stats = dict(collect_statistics(reader, layout, tokens, [0, 3]))
    errors = {"sampled": 0.0, "nearest": 0.0}
    for layer in (0, 3):
        for matrix in ("gate", "down"):
            fitted = read_native_factors(CheckpointReader(native), layout, layer, matrix)
            W = oriented(matrix, layout.read_experts(reader, layer, matrix)).float()
            inputs_on_rows = (matrix == "down") != (fitted.transposed == "1")
            gram = stats[layer].gram(matrix).float()
            targets = W.transpose(1, 2) if fitted.transposed == "1" else W
            want, _ = quantize_mobe(
                fitted, 3, 16, grams=gram, inputs_on_rows=inputs_on_rows, observer="mse", targets=targets
            )
            got = read_native_factors(CheckpointReader(sampled), layout, layer, matrix)
            torch.testing.assert_close(got.A, want.A, rtol=0, atol=1e-5)
            pattern = "epd,epq,eqd->" if matrix == "down" else "epd,edk,epk->"
            for name, path in (("sampled", sampled), ("nearest", nearest)):
                dW = read_native_factors(CheckpointReader(path), layout, layer, matrix).reconstruct().double() - W
                errors[name] += torch.einsum(pattern, dW, gram.double(), dW).item()
    assert errors["sampled"] < errors["nearest"]

    # an interrupted run's sampled tokens and finished layers are reused, not sampled again
    folder = tmp_path / "work-sampled"
    collect_sampled(reader, layout, settings, 256, 64, folder, [0], False)

    def refuse(*args, **kwargs):
        raise AssertionError("sampled again")

    monkeypatch.setattr(calibrate_run, "sample_sequences", refuse)
    collect_sampled(reader, layout, settings, 256, 64, folder, [0, 3], False)
    assert all(calibrate_run.stats_path(folder, layer).exists() for layer in (0, 3))


def test_sampled_rounding_needs_a_compression(tmp_path):
    from mobe.fixtures import build_tiny_moe
    from mobe.quantize import quantize_checkpoint
    from mobe.quantize.checkpoint import QuantizeError

    model = build_tiny_moe(tmp_path / "tiny", "qwen3_moe")
    native = tmp_path / "native"
    compress(model, native, MobeConfig(num_bases=2, steps=2, device="cpu"), progress=False)
    with pytest.raises(QuantizeError, match="sampled"):
        quantize_checkpoint(native, tmp_path / "q", QuantizeConfig(bits=3, factor_rounding="sampled"), progress=False)
    assert not (tmp_path / "q").exists()
