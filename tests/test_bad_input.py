"""Bad input: a one-line error naming the culprit, a non-zero exit code, and nothing half-written."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from mobe.cli.main import main

FAST = ["--bases", "2", "--rank", "8", "--steps", "3", "--quiet"]


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _run(capsys, model: Path, out: Path, *extra: str) -> str:
    code = main(["compress", str(model), "-o", str(out), *FAST, *extra])
    err = capsys.readouterr().err.strip()
    assert code != 0
    assert err.startswith("mobe: error:") and len(err.splitlines()) == 1, err
    assert not out.exists() or not any(out.iterdir())
    assert not out.with_name(out.name + ".mobe-work").exists() or not list(
        out.with_name(out.name + ".mobe-work").glob("layer*")
    )
    return err


def _shard_of(model: Path, tensor: str) -> Path:
    index = json.loads((model / "model.safetensors.index.json").read_text())
    return model / index["weight_map"][tensor]


def test_missing_shard(qwen3_checkpoint, tmp_path, capsys):
    model = _copy(qwen3_checkpoint, tmp_path / "m")
    shard = _shard_of(model, "model.layers.1.mlp.experts.3.up_proj.weight")
    shard.unlink()
    assert shard.name in _run(capsys, model, tmp_path / "out")


def test_tensor_missing_from_shard(qwen3_checkpoint, tmp_path, capsys):
    model = _copy(qwen3_checkpoint, tmp_path / "m")
    name = "model.layers.1.mlp.experts.3.up_proj.weight"
    shard = _shard_of(model, name)
    tensors = load_file(shard)
    del tensors[name]
    save_file(tensors, shard, metadata={"format": "pt"})
    err = _run(capsys, model, tmp_path / "out")
    assert name in err and shard.name in err


def test_wrong_shape(qwen3_checkpoint, tmp_path, capsys):
    model = _copy(qwen3_checkpoint, tmp_path / "m")
    name = "model.layers.0.mlp.experts.5.gate_proj.weight"
    shard = _shard_of(model, name)
    tensors = load_file(shard)
    tensors[name] = torch.zeros(15, 32)
    save_file(tensors, shard, metadata={"format": "pt"})
    err = _run(capsys, model, tmp_path / "out")
    assert name in err and "[15, 32]" in err and "[16, 32]" in err


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--bases", "16"], "--bases 16 exceeds the number of experts (8)"),
        (["--bases", "6", "--groups", "3"], "--groups 3 does not divide the number of experts (8)"),
        (["--bases", "4", "--groups", "3"], "groups (3) must divide num_bases (4)"),
        (["--layers", "7"], "--layers [7] are not MoE layers"),
        (["--activation", "none", "--rank", "64"], "--rank 64 exceeds the hidden size (32)"),
    ],
)
def test_inconsistent_settings(qwen3_checkpoint, tmp_path, capsys, extra, needle):
    assert needle in _run(capsys, qwen3_checkpoint, tmp_path / "out", *extra)


def test_output_folder_with_other_content(qwen3_checkpoint, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    code = main(["compress", str(qwen3_checkpoint), "-o", str(out), *FAST])
    err = capsys.readouterr().err
    assert code != 0 and str(out) in err and "not empty" in err
    assert [p.name for p in out.iterdir()] == ["precious.txt"]


def test_unknown_architecture(qwen3_checkpoint, tmp_path, capsys):
    model = _copy(qwen3_checkpoint, tmp_path / "m")
    config = json.loads((model / "config.json").read_text())
    config["model_type"] = "llama"
    (model / "config.json").write_text(json.dumps(config))
    err = _run(capsys, model, tmp_path / "out")
    assert "'llama'" in err and "qwen3_moe" in err and "mixtral" in err


def test_missing_folder(tmp_path, capsys):
    assert "does not exist" in _run(capsys, tmp_path / "nope", tmp_path / "out")


def test_fp8_experts_without_block_scales_are_refused(qwen3_checkpoint, tmp_path, capsys):
    model = _copy(qwen3_checkpoint, tmp_path / "m")
    name = "model.layers.0.mlp.experts.2.up_proj.weight"
    shard = _shard_of(model, name)
    tensors = load_file(shard)
    tensors[name] = tensors[name].to(torch.float8_e4m3fn)
    save_file(tensors, shard, metadata={"format": "pt"})
    err = _run(capsys, model, tmp_path / "out")
    assert name in err and "F8_E4M3" in err and "dequantise" in err


def test_compressing_a_native_checkpoint_says_what_it_is(qwen3_checkpoint, tmp_path, capsys):
    assert main(["compress", str(qwen3_checkpoint), "-o", str(tmp_path / "native"), *FAST]) == 0
    capsys.readouterr()
    err = _run(capsys, tmp_path / "native", tmp_path / "again")
    assert "is a mobe native checkpoint (compressed by mobe: mobe, 2 bases, rank 8)" in err
    assert "compress its original checkpoint" in err and f"mobe reconstruct {tmp_path / 'native'}" in err
    assert "not in the checkpoint index" not in err


# (method, --target-ratio): beyond what rank 1 reaches on the tiny Qwen3-MoE (E=8, p=16, d=32)
OUT_OF_REACH_CASES = [("mobe", "0.99"), ("svd", "0.95"), ("d2moe", "0.99")]


@pytest.mark.parametrize(("method", "ratio"), OUT_OF_REACH_CASES)
def test_target_ratio_out_of_reach_names_the_largest_reachable(method, ratio, qwen3_checkpoint, tmp_path, capsys):
    """Refused up front, naming the option, its value and the largest reachable cut; that cut then compresses (at
    rank 1) and a hundredth more does not."""
    import re

    fit = ["--method", method, "--steps", "3", "--quiet"]
    assert main(["compress", str(qwen3_checkpoint), "-o", str(tmp_path / "a"), *fit, "--target-ratio", ratio]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"mobe: error: --target-ratio {ratio} is out of reach for --method {method}"), err
    assert len(err.splitlines()) == 1 and not (tmp_path / "a").exists()
    most = re.search(r"the largest reachable is (0\.\d\d) \(rank 1\)$", err).group(1)
    over = f"{float(most) + 0.01:.2f}"
    assert main(["compress", str(qwen3_checkpoint), "-o", str(tmp_path / "b"), *fit, "--target-ratio", over]) == 2
    assert main(["compress", str(qwen3_checkpoint), "-o", str(tmp_path / "c"), *fit, "--target-ratio", most]) == 0
    assert json.loads((tmp_path / "c" / "config.json").read_text())["mobe"]["rank"] == 1


def test_target_ratio_that_leaves_almost_nothing_warns(qwen3_checkpoint, caplog):
    from mobe import MobeConfig
    from mobe.architectures import moe_layout
    from mobe.checkpoint import CheckpointReader
    from mobe.pipeline import resolve_settings

    layout = moe_layout(CheckpointReader(qwen3_checkpoint).config)
    with caplog.at_level("WARNING", logger="mobe.pipeline"):
        assert resolve_settings(layout, MobeConfig(method="svd", target_ratio=0.5)).rank == 5
        assert not caplog.records
        assert resolve_settings(layout, MobeConfig(method="svd", target_ratio=0.9)).rank == 1  # a tenth: no warning
        assert not caplog.records
        assert resolve_settings(layout, MobeConfig(method="svd", target_ratio=0.905)).rank == 1
    (record,) = caplog.records
    assert record.getMessage() == (
        "--target-ratio 0.905 keeps 9% of the expert parameters (rank 1 of 16): little of what the experts compute "
        "survives such a cut (reachable up to 0.90)"
    )
