import json
import re

import pytest
import torch
from safetensors.torch import save_file

from mobe.cli.main import main


def test_info_reports_layout_and_closed_form_saving(tiny_checkpoints, capsys):
    assert main(["info", str(tiny_checkpoints["deepseek_v3"]), "--bases", "2", "--rank", "8"]) == 0
    out = capsys.readouterr().out
    assert "deepseek_v3" in out and "3 (2 MoE: 1-2)" in out and "gate/up 16x32" in out
    E, p, d, m, r, layers = 8, 16, 32, 2, 8, 2  # gate, up and down (the default --matrices) factored
    before = layers * 3 * E * p * d
    after = layers * 3 * (E * p * r + m * r * d + E * m)
    match = re.search(r"experts ([\d,]+) -> ([\d,]+)", out)
    assert match and int(match[1].replace(",", "")) == before and int(match[2].replace(",", "")) == after


def test_info_unsupported_model_type(tmp_path, capsys):
    (tmp_path / "config.json").write_text('{"model_type": "bert"}')
    save_file({"embeddings.weight": torch.zeros(2, 2)}, tmp_path / "model.safetensors")
    assert main(["info", str(tmp_path)]) == 2
    assert "unsupported model_type 'bert'" in capsys.readouterr().err


def test_corrupt_shard_is_named(tmp_path, capsys):
    (tmp_path / "config.json").write_text('{"model_type": "qwen3_moe"}')
    (tmp_path / "model.safetensors").write_bytes(b"not a safetensors file")
    assert main(["info", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "model.safetensors" in err and "not a readable safetensors file" in err


def _experts_line(out: str) -> tuple[int, int]:
    match = re.search(r"experts ([\d,]+) -> ([\d,]+)", out)
    assert match, out
    return int(match[1].replace(",", "")), int(match[2].replace(",", ""))


def test_info_of_a_compressed_checkpoint_counts_what_it_holds(tiny_checkpoints, tmp_path, capsys):
    from mobe import MobeConfig, compress

    compress(
        tiny_checkpoints["qwen3_moe"],
        tmp_path / "n",
        MobeConfig(num_bases=4, rank=8, steps=2, matrices=("gate", "up")),
        progress=False,
    )
    capsys.readouterr()
    assert main(["info", str(tmp_path / "n")]) == 0
    out = capsys.readouterr().out
    E, p, d, m, r, layers = 8, 16, 32, 4, 8, 2
    assert _experts_line(out) == (layers * 3 * E * p * d, layers * (E * p * d + 2 * (E * p * r + m * r * d + E * m)))
    assert "native mobe m=4 r=8 gate+up" in out and "% fewer" in out


@pytest.mark.parametrize("matrices", ["gate,up,down", "gate,up"])
def test_info_at_a_target_ratio_predicts_what_compress_writes(tiny_checkpoints, tmp_path, capsys, matrices):
    """The saving `mobe info --target-ratio` predicts (rank from the same rule as compress, m = E/4) equals the
    parameter count of the checkpoint that compress then writes."""
    from mobe import MobeConfig, compress

    model = tiny_checkpoints["qwen3_moe"]
    assert main(["info", str(model), "--target-ratio", "0.3", "--matrices", matrices, "--steps", "2"]) == 0
    out = capsys.readouterr().out
    predicted = _experts_line(out)
    chosen = re.search(r"MoBE m=(\d+) r=(\d+) \(([a-z+]+)\)", out)
    assert chosen and chosen[3] == matrices.replace(",", "+") and int(chosen[1]) == 8 // 4
    config = MobeConfig(target_ratio=0.3, steps=2, matrices=tuple(matrices.split(",")))
    compress(model, tmp_path / "n", config, progress=False)
    capsys.readouterr()
    assert main(["info", str(tmp_path / "n")]) == 0
    written = capsys.readouterr().out
    assert _experts_line(written) == predicted and f"m={chosen[1]} r={chosen[2]}" in written
    assert predicted[1] <= 0.7 * predicted[0]


def test_info_warns_when_settings_grow_the_model(tiny_checkpoints, capsys):
    assert main(["info", str(tiny_checkpoints["qwen3_moe"]), "--bases", "8", "--rank", "32"]) == 0
    before, after = _experts_line(out := capsys.readouterr().out)
    assert after > before and "make the model bigger" in out


def test_unknown_device_is_one_line_and_exit_2(tiny_checkpoints, tmp_path, capsys):
    assert main(["generate", str(tiny_checkpoints["qwen3_moe"]), "1 2 3", "--device", "tpu9"]) == 2
    assert main(["compress", str(tiny_checkpoints["qwen3_moe"]), "-o", str(tmp_path / "o"), "--device", "tpu9"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all("'tpu9'" in line for line in err)
    assert not (tmp_path / "o").exists()


def test_default_rank_works_where_experts_are_wider_than_the_hidden_size(tmp_path, capsys):
    """p > d (the first trained fixture's shape): the default rank is min(p, d), not p."""
    from mobe.fixtures import build_tiny_moe

    src = build_tiny_moe(tmp_path / "wide", "qwen3_moe", moe_intermediate_size=48)  # p=48 > d=32
    assert main(["compress", str(src), "-o", str(tmp_path / "o"), "--bases", "2", "--steps", "2", "-q"]) == 0
    config = __import__("json").loads((tmp_path / "o" / "config.json").read_text())
    assert config["mobe"]["rank"] == 32


def test_target_ratio_is_met_on_the_layers_compressed(tiny_checkpoints, tmp_path, capsys):
    """--layers 0 of two MoE layers at --target-ratio 0.3: that layer's experts shrink ~30%, the model's half as much,
    and the table says both."""
    src = str(tiny_checkpoints["qwen3_moe"])
    args = ["compress", src, "-o", str(tmp_path / "o"), "--method", "svd", "--target-ratio", "0.3", "--layers", "0"]
    assert main([*args, "-q"]) == 0
    report = json.loads((tmp_path / "o" / "mobe_report.json").read_text())["summary"]
    assert 0.3 <= report["compressed_layers_reduction"] < 0.36  # the largest rank that fits: at least the target
    assert report["expert_reduction"] == pytest.approx(report["compressed_layers_reduction"] / 2)
    assert "experts of the 1 compressed layers: " in capsys.readouterr().out


def test_statistics_estimates_are_the_bytes_of_the_collected_statistics(tiny_checkpoints, capsys):
    from mobe.architectures import moe_layout
    from mobe.calibrate import collect_statistics
    from mobe.checkpoint import CheckpointReader
    from mobe.estimate.memory import factor_stats_bound, factor_stats_bytes, gram_stats_bytes

    reader = CheckpointReader(tiny_checkpoints["qwen3_moe"])
    layout = moe_layout(reader.config)
    E, p, d = layout.num_experts, layout.intermediate_size, layout.hidden_size
    g = torch.Generator().manual_seed(0)
    sequences = [torch.randint(0, 128, (48,), generator=g), torch.randint(0, 128, (13,), generator=g)]
    for _, stats in collect_statistics(reader, layout, sequences, layout.moe_layers):
        counts = stats.counts.tolist()
        assert min(counts) < p <= max(counts)  # rows and R factors both present
        assert factor_stats_bytes(counts, p, d) == stats.nbytes
        assert stats.nbytes <= factor_stats_bound(E, p, d, 61, 2)
        dense = [stats.gram("gate"), stats.gram("down"), stats.counts]
        assert gram_stats_bytes(E, p, d) == sum(t.numel() * t.element_size() for t in dense)
    assert main(["info", str(tiny_checkpoints["qwen3_moe"]), "--bases", "2", "--calibration-tokens", "61"]) == 0
    out = capsys.readouterr().out
    assert f"dense Grams {gram_stats_bytes(E, p, d) / 2**10:.1f} KiB" in out and "compression job" in out


def test_list_says_tested_from_the_data_table_as_the_fixtures_builder_does():
    """`mobe info --list` reads the tiny-config table, not the test helpers; both agree on every family."""
    from mobe.fixtures import tiny_config
    from mobe.info import supported_families

    for row in supported_families():
        try:
            tiny_config(row.model_type)
            builds = True
        except ValueError:
            builds = False
        assert row.tested == builds, row.model_type
