"""Distillation toward the original: the loss, the streamed teacher, what trains, and what is written."""

import json
import shutil

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from mobe import MobeConfig, compress
from mobe.architectures import moe_layout
from mobe.checkpoint import CheckpointReader
from mobe.cli.main import main
from mobe.distill import DistillConfig, DistillError, compute_targets, distill, select_trainable, teacher_topk, topk_kl
from mobe.distill.train import _forward
from mobe.fixtures import FINE_FIXTURE, build_tiny_moe, heldout_text, trained_fixture_path

VOCAB = 4096  # the trained fixtures' tokenizer, so that tiny models can read text


def _kl_full(teacher_logits, student_logits):
    t, s = torch.log_softmax(teacher_logits.double(), -1), torch.log_softmax(student_logits.double(), -1)
    return (t.exp() * (t - s)).sum(-1)


def test_topk_kl_is_the_full_kl_when_k_covers_the_vocabulary():
    g = torch.Generator().manual_seed(0)
    teacher, student = torch.randn(5, 7, 50, generator=g), torch.randn(5, 7, 50, generator=g)
    kl = topk_kl(student, *teacher_topk(teacher, 50))
    torch.testing.assert_close(kl.double(), _kl_full(teacher, student), rtol=1e-5, atol=1e-6)
    assert topk_kl(teacher, *teacher_topk(teacher, 50)).abs().max() < 1e-6


def test_topk_kl_is_the_kl_of_the_coarsened_distributions():
    g = torch.Generator().manual_seed(1)
    teacher, student = 3 * torch.randn(40, 100, generator=g), 3 * torch.randn(40, 100, generator=g)
    k = 8
    kl = topk_kl(student, *teacher_topk(teacher, k))
    t, s = torch.softmax(teacher.double(), -1), torch.softmax(student.double(), -1)
    top = teacher.topk(k, -1).indices
    coarse_t = torch.cat([t.gather(-1, top), 1 - t.gather(-1, top).sum(-1, keepdim=True)], -1)
    coarse_s = torch.cat([s.gather(-1, top), 1 - s.gather(-1, top).sum(-1, keepdim=True)], -1)
    expected = (coarse_t * (coarse_t.log() - coarse_s.log())).sum(-1)
    torch.testing.assert_close(kl.double(), expected, rtol=1e-4, atol=1e-6)
    assert (kl.double() <= _kl_full(teacher, student) + 1e-6).all()  # coarsening never raises a KL


@pytest.fixture(scope="module")
def text_models(tmp_path_factory):
    """Tiny models with the trained fixtures' tokenizer (so they read text), per architecture, and a text."""
    root = tmp_path_factory.mktemp("distill")
    fixture = trained_fixture_path()
    out = {}
    for arch in ("qwen3_moe", "mixtral", "deepseek_v3"):
        path = build_tiny_moe(root / arch, arch, vocab_size=VOCAB, max_shard_size="200KB", initializer_range=0.3)
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(fixture / name, path / name)
        out[arch] = path
    text = root / "text.txt"  # one passage over and over: the held-out tail is like the training part
    text.write_text(heldout_text()[:400] * 12)
    return out, text


def _full_logits(path, ids):
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(ids[None]).logits[0]


@pytest.mark.parametrize("arch", ["deepseek_v3", "mixtral"])
def test_streamed_teacher_equals_the_full_forward(arch, text_models):
    path = text_models[0][arch]
    sequences = [torch.randint(2, VOCAB, (n,), generator=torch.Generator().manual_seed(n)) for n in (16, 9)]
    targets = compute_targets(path, sequences, top_k=10, meta={})
    for i, ids in enumerate(sequences):
        values, indices, tail = teacher_topk(_full_logits(path, ids), 10)
        torch.testing.assert_close(targets.logprobs[i], values, rtol=1e-4, atol=1e-4)
        assert torch.equal(targets.indices[i], indices)
        torch.testing.assert_close(targets.tail[i], tail, rtol=1e-4, atol=1e-4)


def test_streamed_teacher_of_a_tied_head_model():
    """The fine-grained fixture ties its output head to the input embedding (no lm_head tensor on disk)."""
    path = trained_fixture_path(FINE_FIXTURE)
    assert "lm_head.weight" not in CheckpointReader(path).weight_map
    ids = torch.randint(2, VOCAB, (12,), generator=torch.Generator().manual_seed(3))
    targets = compute_targets(path, [ids], top_k=5, meta={})
    values, indices, _ = teacher_topk(_full_logits(path, ids), 5)
    torch.testing.assert_close(targets.logprobs[0], values, rtol=1e-4, atol=1e-4)
    assert torch.equal(targets.indices[0], indices)


@pytest.fixture(scope="module")
def compressed(text_models, tmp_path_factory):
    """arch -> (native MoBE,) compressions of the tiny text models at about half the experts; qwen3_moe also has
    (native SVD, dense) ones."""
    root = tmp_path_factory.mktemp("compressed")
    out = {}
    for arch, path in text_models[0].items():
        compress(path, root / f"{arch}-mobe", MobeConfig(target_ratio=0.5, steps=20), progress=False)
        out[arch] = (root / f"{arch}-mobe",)
    path = text_models[0]["qwen3_moe"]
    svd = MobeConfig(method="svd", target_ratio=0.5)
    compress(path, root / "svd", svd, progress=False)
    compress(path, root / "dense", svd, reconstruct=True, progress=False)
    out["qwen3_moe"] += (root / "svd", root / "dense")
    return out


def _load(path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def test_each_mode_trains_exactly_its_tensors(text_models, compressed):
    native, svd, dense = compressed["qwen3_moe"]
    layout = moe_layout(CheckpointReader(native).config)
    routers = {f"model.layers.{i}.mlp.gate.weight" for i in layout.moe_layers}
    factors = {
        f"model.layers.{i}.mlp.experts.{m}_proj.mobe_{field}"
        for i in layout.moe_layers
        for m in CheckpointReader(native).config["mobe"]["matrices"]
        for field in ("coef", "A")
    }
    assert set(select_trainable(_load(native), layout, "router")) == routers
    coef = {n for n in factors if n.endswith("coef")}
    assert set(select_trainable(_load(native), layout, "router+coef")) == routers | coef
    model = _load(native)
    assert set(select_trainable(model, layout, "all-small")) == routers | factors
    assert {n for n, p in model.named_parameters() if p.requires_grad} == routers | factors
    with pytest.raises(DistillError, match="basis coefficients"):
        select_trainable(_load(svd), layout, "router+coef")
    with pytest.raises(DistillError, match="dense"):
        select_trainable(_load(dense), layout, "all-small")


def _shard_tensors(folder):
    out = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(path, "pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})  # noqa: SIM118
    return out


QUICK = dict(tokens=1024, seq_len=64, top_k=32, batch=2, eval_every=2, epochs=2, device="cpu")


def _changed(before_folder, after_folder):
    before, after = _shard_tensors(before_folder), _shard_tensors(after_folder)
    assert before.keys() == after.keys()
    assert all(after[n].dtype == before[n].dtype for n in before)
    return {n for n in before if not torch.equal(before[n], after[n])}


@pytest.fixture(scope="module")
def targets_work(tmp_path_factory):
    """Work folders keeping each tiny model's teacher targets, shared by the tests (the targets are computed once)."""
    root = tmp_path_factory.mktemp("targets")
    return lambda arch: root / arch


def _expected_changes(native, mode):
    """Checkpoint names of the routers and of the factor tensors that `mode` trains."""
    layout = moe_layout(CheckpointReader(native).config)
    names = set()
    for layer in layout.moe_layers:
        experts = layout.arch.experts_prefix(layer)
        names.add(experts.rsplit(".", 1)[0] + ".gate.weight")  # checkpoint names (Mixtral's block_sparse_moe)
        for field in {"router": (), "router+coef": ("coef",), "all-small": ("coef", "A")}[mode]:
            compressed = CheckpointReader(native).config["mobe"]["matrices"]
            names |= {f"{experts}.{layout.arch.matrices[m]}.mobe_{field}" for m in compressed}
    return names


# The router alone moves a tiny random DeepSeek-V3 or Mixtral little (its dense first layer and shared experts carry
# most of the output), so those write their routers and small factors.
@pytest.mark.parametrize(
    ("arch", "mode"), [("qwen3_moe", "router"), ("mixtral", "all-small"), ("deepseek_v3", "all-small")]
)
def test_distillation_lowers_heldout_kl_and_writes_only_what_trains(
    arch, mode, text_models, compressed, targets_work, tmp_path
):
    original, text = text_models[0][arch], text_models[1]
    native = compressed[arch][0]
    work = targets_work(arch)
    config = DistillConfig(train=mode, lr=1e-2, schedule="halve", **QUICK)  # what is written, whatever the schedule
    report = distill(original, native, tmp_path / "out", text, config, work_dir=work)
    assert not report.kept_input and report.after["kl"] < report.before["kl"]
    assert report.hint == ""  # only a kept input gets advice
    assert _changed(native, tmp_path / "out") == _expected_changes(native, mode)

    # The report's held-out KL is what the written checkpoint gives, recomputed from the files.
    from mobe.distill.run import TARGETS_FILE, TeacherTargets
    from mobe.distill.train import split

    targets = TeacherTargets.load(work / TARGETS_FILE)
    _, held = split(len(targets), DistillConfig().heldout_fraction)
    model = _load(tmp_path / "out")
    with torch.no_grad():
        kls = [_forward(model, targets, i)[0] for i in held]
    assert torch.cat(kls).mean().item() == pytest.approx(report.after["kl"], rel=1e-4)
    data = json.loads((tmp_path / "out" / "mobe_report.json").read_text())
    assert data["distill"]["after"]["kl"] == report.after["kl"]
    assert (tmp_path / "out" / "mobe_distill.png").stat().st_size > 0


def test_router_and_coefficients(text_models, compressed, targets_work, tmp_path):
    original, text = text_models[0]["qwen3_moe"], text_models[1]
    native = compressed["qwen3_moe"][0]
    config = DistillConfig(train="router+coef", lr=1e-2, **QUICK)
    report = distill(original, native, tmp_path / "o", text, config, work_dir=targets_work("qwen3_moe"))
    assert report.after["kl"] < report.before["kl"]
    assert _changed(native, tmp_path / "o") == _expected_changes(native, "router+coef")


def test_routing_loss_teaches_the_routers_the_originals_routing(text_models, compressed, tmp_path):
    """With the routing loss, the written routers route the held-out text closer to the original's routing."""
    from mobe.distill.run import TARGETS_FILE, TeacherTargets
    from mobe.distill.train import routing_kl, split
    from mobe.distill.trainable import RouterHooks, router_modules

    original, text = text_models[0]["qwen3_moe"], text_models[1]
    native = compressed["qwen3_moe"][0]
    config = DistillConfig(router_weight=10.0, lr=1e-2, **QUICK)
    distill(original, native, tmp_path / "out", text, config, work_dir=tmp_path / "work")
    targets = TeacherTargets.load(tmp_path / "work" / TARGETS_FILE)
    assert targets.has_routing
    _, held = split(len(targets), config.heldout_fraction)
    layout = moe_layout(CheckpointReader(native).config)

    def held_out_routing_kl(path):
        model = _load(path)
        routers = list(router_modules(model, layout).values())
        routed = [None] * len(routers)
        with RouterHooks(routers, routed.__setitem__), torch.no_grad():
            kls = [(model(targets.input_ids[i][None]), routing_kl(routed, targets, i))[1] for i in held]
        return torch.cat(kls).mean().item()

    assert held_out_routing_kl(tmp_path / "out") < held_out_routing_kl(native)


def test_a_distillation_that_only_hurts_keeps_the_input(text_models, compressed, targets_work, tmp_path):
    original, text = text_models[0]["qwen3_moe"], text_models[1]
    native = compressed["qwen3_moe"][0]
    config = DistillConfig(**{**QUICK, "epochs": 1}, lr=100.0)
    report = distill(original, native, tmp_path / "out", text, config, work_dir=targets_work("qwen3_moe"))
    assert report.kept_input and report.after == report.before
    assert report.history[1]["heldout_kl"] > report.history[0]["heldout_kl"]
    assert report.table().endswith("try --lr 10")  # the rate that threw it off, a tenth of it suggested
    before, after = _shard_tensors(native), _shard_tensors(tmp_path / "out")
    assert all(torch.equal(before[n], after[n]) for n in before)


def test_distill_in_place_replaces_the_input(text_models, compressed, targets_work, tmp_path):
    original, text = text_models[0]["qwen3_moe"], text_models[1]
    target = tmp_path / "model"
    shutil.copytree(compressed["qwen3_moe"][2], target)  # a dense compression: routers still train
    before = _shard_tensors(target)
    report = distill(
        original, target, target, text, DistillConfig(lr=1e-2, **QUICK), work_dir=targets_work("qwen3_moe")
    )
    assert not report.kept_input
    after = _shard_tensors(target)
    assert any(not torch.equal(before[n], after[n]) for n in before)
    assert not list(tmp_path.glob(".model*"))  # no temporary folder left behind


def test_cli_distill_and_its_errors(text_models, compressed, tmp_path, capsys):
    original, text = text_models[0]["qwen3_moe"], text_models[1]
    native = str(compressed["qwen3_moe"][0])
    common = ["--tokens", "1024", "--seq-len", "64", "--epochs", "1", "--device", "cpu", "-q"]
    assert main(["distill", str(original), native, "-o", str(tmp_path / "o"), "--text", str(text), *common]) == 0
    assert "held-out KL" in capsys.readouterr().out
    assert main(["distill", str(original), native, "-o", str(tmp_path / "x"), "--text", "nope.txt", *common]) == 2
    assert "nope.txt" in capsys.readouterr().err
    other = str(text_models[0]["mixtral"])
    assert main(["distill", other, native, "-o", str(tmp_path / "y"), "--text", str(text), *common]) == 2
    assert "its own original" in capsys.readouterr().err
    bad = ["distill", str(original), native, "-o", str(tmp_path / "z"), "--text", str(text), "--train", "router+A"]
    with pytest.raises(SystemExit):
        main(bad)
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_memory_estimate_counts_what_a_distillation_holds(text_models, compressed, targets_work, tmp_path):
    from mobe.distill.run import _targets
    from mobe.estimate import distill_memory as estimate

    native = compressed["qwen3_moe"][0]
    reader = CheckpointReader(native)
    layout = moe_layout(reader.config)
    for mode in ("router", "router+coef", "all-small"):
        config = DistillConfig(train=mode, **QUICK)
        memory = estimate(reader, config)
        model = _load(native)
        trained = sum(p.numel() for p in select_trainable(model, layout, mode).values())
        assert memory.trained_params == trained
        assert memory.student == 4 * sum(p.numel() for p in model.parameters())
    original, text = text_models[0]["qwen3_moe"], text_models[1]
    targets = _targets(original, text, config, targets_work("qwen3_moe"), progress=False)
    held = sum(t.numel() * t.element_size() for t in [*targets.logprobs, *targets.tail, *targets.input_ids])
    held += sum(4 * t.numel() for t in targets.indices)  # int32 on disk
    assert memory.targets == held


def test_compress_with_distill_in_one_run(text_models, tmp_path, capsys):
    original, text = text_models[0]["qwen3_moe"], text_models[1]
    out = tmp_path / "out"
    args = ["compress", str(original), "-o", str(out), "--target-ratio", "0.5", "--steps", "10", "-q"]
    distill_args = [
        "--distill",
        str(text),
        "--distill-tokens",
        "1024",
        "--distill-seq-len",
        "64",
        "--distill-epochs",
        "1",
    ]
    assert main([*args, *distill_args, "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "held-out KL" in printed and "experts:" in printed
    report = json.loads((out / "mobe_report.json").read_text())
    assert report["distill"]["config"]["epochs"] == 1 and report["results"]
    assert (out / "mobe_distill.json").is_file() and not (tmp_path / "out.mobe-work").exists()
    assert main([*args[:3], str(tmp_path / "o2"), *args[4:], "--distill", "missing.txt"]) == 2  # refused up front
    assert "missing.txt" in capsys.readouterr().err and not (tmp_path / "o2").exists()
