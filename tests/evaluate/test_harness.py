"""`mobe eval`: lm-eval's accuracy and log-likelihoods equal those computed directly from the model's logits."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from mobe import MobeConfig, compress, load_model
from mobe.cli.main import main
from mobe.evaluate.harness import EvalError, evaluate_tasks, task_spec
from mobe.fixtures import build_tiny_moe, trained_fixture_path

pytest.importorskip("lm_eval")

TASK = Path(__file__).parents[1] / "data" / "eval" / "python_docs_mc.yaml"
DOCS = [json.loads(line) for line in TASK.with_suffix(".jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def native_tiny(tmp_path_factory):
    """A tiny random Qwen3-MoE with the trained fixture's tokenizer, compressed to native MoBE factors."""
    root = tmp_path_factory.mktemp("eval")
    tiny = build_tiny_moe(root / "tiny", "qwen3_moe", vocab_size=4096)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(trained_fixture_path() / name, tiny / name)
    compress(tiny, root / "native", MobeConfig(num_bases=2, steps=5), progress=False)
    return root / "native"


@torch.no_grad()
def reference(model, tokenizer, docs):
    """Per document, each choice's log-likelihood after the context, from one plain forward pass."""
    out = []
    for doc in docs:
        context = tokenizer(doc["context"]).input_ids
        scores = []
        for choice in doc["choices"]:
            whole = tokenizer(doc["context"] + " " + choice).input_ids
            logp = torch.log_softmax(model(torch.tensor([whole])).logits[0].double(), dim=-1)
            scores.append(sum(logp[i - 1, whole[i]].item() for i in range(len(context), len(whole))))
        out.append(scores)
    return out


def accuracies(docs, scores):
    acc = [max(range(len(s)), key=s.__getitem__) == d["answer"] for d, s in zip(docs, scores, strict=True)]
    norm = [
        max(range(len(s)), key=lambda i: s[i] / len(d["choices"][i])) == d["answer"]  # noqa: B023
        for d, s in zip(docs, scores, strict=True)
    ]
    return sum(acc) / len(acc), sum(norm) / len(norm)


@pytest.mark.parametrize("which", ["native_tiny", "trained"])
def test_loglikelihoods_and_accuracy_match_the_logits(which, request):
    path = request.getfixturevalue("native_tiny") if which == "native_tiny" else trained_fixture_path()
    model, tokenizer = load_model(path, dtype="float32"), AutoTokenizer.from_pretrained(path)
    if which == "native_tiny":
        assert type(model.model.layers[0].mlp.experts).__name__ == "MobeExperts"  # the factors themselves run
    limit = len(DOCS) if which == "native_tiny" else 4
    results = evaluate_tasks(model, tokenizer, [str(TASK)], limit=limit, batch_size=3, log_samples=True)
    samples = sorted(results["samples"]["mobe_python_docs_mc"], key=lambda s: s["doc_id"])
    assert len(samples) == limit
    expected = reference(model, tokenizer, DOCS[:limit])
    for sample, scores in zip(samples, expected, strict=True):
        got = [ll for ll, _ in sample["filtered_resps"]]
        assert got == pytest.approx(scores, abs=1e-3)
    acc, acc_norm = accuracies(DOCS[:limit], expected)
    metrics = results["results"]["mobe_python_docs_mc"]
    assert metrics["acc,none"] == pytest.approx(acc)
    assert metrics["acc_norm,none"] == pytest.approx(acc_norm)


def test_cli_eval_writes_the_table_and_json(tmp_path, capsys):
    out = tmp_path / "eval.json"
    args = ["eval", str(trained_fixture_path()), "--tasks", str(TASK), "--limit", "5", "--json", str(out), "-q"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "mobe_python_docs_mc" in printed and "acc_norm" in printed
    data = json.loads(out.read_text())
    assert (
        data["limit"] == 5 and data["dtype"] == "float32" and data["n-samples"]["mobe_python_docs_mc"]["effective"] == 5
    )
    model = load_model(trained_fixture_path(), dtype="float32")
    acc, _ = accuracies(DOCS[:5], reference(model, AutoTokenizer.from_pretrained(trained_fixture_path()), DOCS[:5]))
    assert data["results"]["mobe_python_docs_mc"]["acc,none"] == pytest.approx(acc)


def test_task_file_data_is_read_beside_the_yaml(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the data file is not in the working directory
    spec = task_spec(str(TASK))
    assert spec["dataset_kwargs"]["data_files"]["test"] == str(TASK.with_suffix(".jsonl").resolve())
    with pytest.raises(EvalError, match="missing.yaml does not exist"):
        task_spec(str(tmp_path / "missing.yaml"))


def test_bad_eval_input_is_one_line_and_exit_2(tmp_path, capsys):
    fixture = str(trained_fixture_path())
    assert main(["eval", fixture, "--tasks", str(tmp_path / "nope.yaml"), "-q"]) == 2
    assert "nope.yaml does not exist" in capsys.readouterr().err
    assert main(["eval", fixture, "--tasks", str(TASK), "--limit", "0", "-q"]) == 2
    assert "--limit" in capsys.readouterr().err
    assert main(["eval", fixture, "--tasks", "no_such_task_xyz", "-q"]) == 2
    assert "no_such_task_xyz" in capsys.readouterr().err
