"""The byte-budget planner: the bytes it predicts are the bytes the chosen recipe writes, and it chooses the lowest
measured error within the budget."""

import pytest

from mobe import MobeConfig
from mobe.fixtures import build_tiny_moe
from mobe.plan import Recipe, execute_plan, plan_budget
from mobe.plan.budget import Option, Plan
from mobe.quantize import stored_bytes


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny_moe(tmp_path_factory.mktemp("plan") / "qwen3_moe", "qwen3_moe", initializer_range=0.2)


@pytest.fixture(scope="module")
def plan(tiny):
    return plan_budget(tiny, 0.5, steps=10, bits=(16, 8, 4, 3), cuts=(0.25, 0.5))


def test_every_candidate_is_measured_and_ordered_sensibly(plan):
    labels = {o.recipe for o in plan.options}
    assert len(labels) == 4 * 3  # the original and two cuts, each at four precisions
    by = {o.recipe: o for o in plan.options}
    assert by[Recipe("original", 16)].error == 0 and by[Recipe("original", 16)].stored_bytes == plan.original_bytes
    for technique, cut in (("original", 0.0), ("mobe", 0.25), ("mobe", 0.5)):
        sizes = [by[Recipe(technique, b, cut)].stored_bytes for b in (16, 8, 4, 3)]
        assert sizes == sorted(sizes, reverse=True)  # fewer bits, fewer bytes
    assert by[Recipe("original", 3)].error > by[Recipe("original", 4)].error > by[Recipe("original", 8)].error


def test_the_choice_is_the_lowest_error_within_the_budget(plan):
    within = [o for o in plan.options if o.stored_bytes <= plan.budget_bytes]
    assert plan.chosen is min(within, key=lambda o: o.error)
    assert "<- chosen" in plan.table()
    tight = Plan(1, plan.original_bytes, plan.group_size, plan.sample_layers, plan.options)
    assert tight.chosen is None and "nothing fits" in tight.table()
    with pytest.raises(ValueError, match="nothing fits"):
        execute_plan(tight, "unused", "unused")


@pytest.mark.parametrize("recipe", [Recipe("original", 4), Recipe("mobe", 16, 0.25), Recipe("mobe", 3, 0.5)])
def test_predicted_bytes_are_the_bytes_written(tiny, plan, recipe, tmp_path):
    option = next(o for o in plan.options if o.recipe == recipe)
    only = Plan(option.stored_bytes, plan.original_bytes, plan.group_size, plan.sample_layers, [option])
    out = tmp_path / "out"
    assert execute_plan(only, tiny, out, MobeConfig(steps=5, device="cpu"), progress=False) == recipe
    assert stored_bytes(out) == option.stored_bytes


def test_bad_budgets_are_refused(tiny):
    with pytest.raises(ValueError, match="target_bytes"):
        plan_budget(tiny, 1.5)
    with pytest.raises(ValueError, match="one of"):
        plan_budget(tiny)
    assert Option(Recipe("mobe", 4, 0.25), 1, 0.0).recipe.label() == "MoBE 25% cut, int4 factors"


def test_cli_compress_to_a_byte_budget(tiny, tmp_path, capsys):
    from mobe.cli.main import main

    out = tmp_path / "budget"
    assert main(["compress", str(tiny), "-o", str(out), "--target-bytes", "0.45", "--steps", "5", "-q"]) == 0
    printed = capsys.readouterr().out
    assert "<- chosen" in printed and f"wrote {out}" in printed
    assert stored_bytes(out) <= 0.45 * stored_bytes(tiny)
    assert main(["compress", str(tiny), "-o", str(tmp_path / "none"), "--target-bytes", "0.01", "-q"]) == 2
    assert "nothing fits" in capsys.readouterr().err
    both = ["--target-bytes", "0.4", "--target-ratio", "0.3"]
    assert main(["compress", str(tiny), "-o", str(tmp_path / "both"), *both]) == 2
    assert not (tmp_path / "none").exists() and not (tmp_path / "both").exists()


def test_cli_info_prints_the_plan_and_writes_nothing(tiny, tmp_path, capsys):
    from mobe.cli.main import main

    before = sorted(p.name for p in tiny.iterdir())
    assert main(["info", str(tiny), "--target-gib", str(0.5 * stored_bytes(tiny) / 2**30)]) == 0
    printed = capsys.readouterr().out
    assert "<- chosen" in printed and "original int4" in printed
    assert sorted(p.name for p in tiny.iterdir()) == before
