"""benchmarks/schedules.py --merge: rows of one stack fitted by different schedules in separate processes join."""

import importlib
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.fixture
def schedules(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    return importlib.import_module("schedules")


def _side(schedule: str, steps: int, seconds: float, final: float, trace: list) -> dict:
    return {schedule: {"steps": steps, "seconds": seconds, "relative_error": final, "trace": trace}}


def _row(label: str, paper_steps: int | None, fast: bool) -> dict:
    row = {"label": label, "kind": "p<d", "shape": [8, 4, 16], "num_bases": 2, "rank": 4}
    if paper_steps is not None:
        row |= _side("paper", paper_steps, 100.0, 0.30, [(10.0, 0, 0.9), (60.0, 5, 0.4), (100.0, 9, 0.30)])
    if fast:
        row |= _side("fast", 50, 40.0, 0.25, [(1.0, 0, 0.9), (8.0, 10, 0.31), (12.5, 20, 0.29), (40.0, 49, 0.25)])
    return row


def test_partial_rows_join_into_the_speedup_of_a_single_run(schedules):
    rows = schedules.merge_rows([_row("synthetic", 10000, fast=False), _row("synthetic", None, fast=True)])
    assert len(rows) == 1
    fast = rows[0]["fast"]
    # the fast trace first reaches the paper's final 0.30 at 12.5 s (step 20): speedup 100 / 12.5
    assert (fast["reaches_paper_at"], fast["reaches_paper_step"]) == (12.5, 20)
    assert fast["speedup"] == pytest.approx(8.0)
    assert rows[0]["paper"]["reaches_paper_at"] == 100.0


def test_a_longer_paper_reference_supersedes_a_shorter_one(schedules):
    short = schedules.finish_row(_row("synthetic", 600, fast=True))
    long_paper, long_fast = _row("synthetic", 10000, fast=False), _row("synthetic", None, fast=True)
    rows = schedules.merge_rows([short, long_paper, _row("fine 1.gate", 10000, fast=True), long_fast])
    # in the place where each stack first appeared
    assert [(r["label"], r["paper"]["steps"]) for r in rows] == [("synthetic", 10000), ("fine 1.gate", 10000)]


def test_unpaired_or_mismatched_partial_rows_are_refused(schedules):
    with pytest.raises(SystemExit, match="synthetic"):
        schedules.merge_rows([_row("synthetic", 10000, fast=False)])
    other = _row("synthetic", None, fast=True) | {"rank": 3}
    with pytest.raises(SystemExit, match="different stacks"):
        schedules.merge_rows([_row("synthetic", 10000, fast=False), other])
