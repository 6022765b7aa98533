import re

import torch
from safetensors.torch import save_file

from mobe.cli.main import main


def test_info_reports_layout_and_closed_form_saving(tiny_checkpoints, capsys):
    assert main(["info", str(tiny_checkpoints["deepseek_v3"]), "--bases", "2", "--rank", "8"]) == 0
    out = capsys.readouterr().out
    assert "deepseek_v3" in out and "3 (2 MoE: 1-2)" in out and "gate/up 16x32" in out
    E, p, d, m, r, layers = 8, 16, 32, 2, 8, 2
    before = layers * 3 * E * p * d
    after = layers * (E * p * d + 2 * (E * p * r + m * r * d + E * m))
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
