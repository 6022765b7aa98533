import json

import pytest

from mobe import MobeConfig, compress
from mobe.cli.main import main
from mobe.fixtures import trained_fixture_path


@pytest.fixture(scope="module")
def native_fixture(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "native"
    compress(trained_fixture_path(), out, MobeConfig(num_bases=4, target_ratio=0.25, steps=5), progress=False)
    return out


def test_perplexity_of_original_and_native(native_fixture, tmp_path, capsys):
    text = trained_fixture_path() / "heldout.txt"
    results = {}
    for name, model in (("original", trained_fixture_path()), ("native", native_fixture)):
        out = tmp_path / f"{name}.json"
        args = [
            "perplexity",
            str(model),
            "--text",
            str(text),
            "--max-tokens",
            "400",
            "--context",
            "128",
            "--stride",
            "64",
            "--json",
            str(out),
            "-q",
        ]
        assert main(args) == 0
        results[name] = json.loads(out.read_text())
        assert results[name]["tokens"] == 399
    assert "perplexity" in capsys.readouterr().out
    # Five steps of fitting at 25% fewer expert parameters: worse than the original, but still a language model.
    assert results["original"]["perplexity"] < results["native"]["perplexity"] < 4 * results["original"]["perplexity"]


def test_generate_with_tokenizer_and_with_token_ids(native_fixture, tiny_checkpoints, capsys):
    assert main(["generate", str(native_fixture), "The list type", "--max-new-tokens", "5"]) == 0
    assert capsys.readouterr().out.startswith("The list type")
    assert main(["generate", str(tiny_checkpoints["olmoe"]), "3 4 5", "--max-new-tokens", "4"]) == 0
    assert len(capsys.readouterr().out.split()) == 4


def test_perplexity_without_tokenizer_is_refused(tiny_checkpoints, tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text("hello")
    assert main(["perplexity", str(tiny_checkpoints["olmoe"]), "--text", str(text)]) == 2
    assert "has no tokenizer" in capsys.readouterr().err


def test_perplexity_runs_in_float32_and_equals_one_forward(tmp_path, capsys):
    """One window covering the text: perplexity is exp of transformers' own mean token loss, in float32."""
    import math

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    fixture = trained_fixture_path()
    text = tmp_path / "t.txt"
    text.write_text((fixture / "heldout.txt").read_text()[:1200])
    out = tmp_path / "p.json"
    assert main(["perplexity", str(fixture), "--text", str(text), "--context", "1024", "--json", str(out), "-q"]) == 0
    result = json.loads(out.read_text())
    assert result["dtype"] == "float32" and "float32" in capsys.readouterr().out
    ids = AutoTokenizer.from_pretrained(fixture)(text.read_text(), return_tensors="pt").input_ids
    assert ids.shape[1] <= 1024
    model = AutoModelForCausalLM.from_pretrained(fixture, dtype=torch.float32).eval()
    with torch.no_grad():  # the token loss alone (the model's own loss adds the router's balancing term)
        logits = model(ids).logits[0, :-1]
    expected = math.exp(torch.nn.functional.cross_entropy(logits, ids[0, 1:]).item())
    assert result["perplexity"] == pytest.approx(expected, rel=1e-5)


# (words of held-out text, whether the perplexity warns that the text is too short)
SHORT_TEXT_CASES = [(2, True), (20, True), (200, False)]


@pytest.mark.parametrize(("words", "warns"), SHORT_TEXT_CASES)
def test_perplexity_of_a_short_text_warns_and_still_answers(words, warns, tmp_path, capsys, caplog):
    from mobe.evaluate.perplexity import MIN_MEANINGFUL_TOKENS

    text = tmp_path / "t.txt"
    text.write_text(" ".join((trained_fixture_path() / "heldout.txt").read_text().split()[:words]))
    out = tmp_path / "p.json"
    with caplog.at_level("WARNING", logger="mobe.evaluate.perplexity"):
        assert main(["perplexity", str(trained_fixture_path()), "--text", str(text), "--json", str(out), "-q"]) == 0
    tokens = json.loads(out.read_text())["tokens"]
    assert "perplexity" in capsys.readouterr().out and (tokens < MIN_MEANINGFUL_TOKENS) == warns
    messages = [r.getMessage() for r in caplog.records]
    expected = f"perplexity over only {tokens} tokens (fewer than 64) is not meaningful: use a longer text"
    assert [m.startswith(expected) for m in messages] == ([True] if warns else [])
