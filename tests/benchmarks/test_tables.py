"""benchmarks/tables.py: the README/docs tables match the benchmarks' JSON, and ratios never round across a target."""

import importlib
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BENCHMARKS = ROOT / "benchmarks"


@pytest.fixture
def tables(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))  # tables.py imports its neighbours run_all and results_io
    return importlib.import_module("tables")


def test_every_generated_block_matches_its_json(tables):
    """A figure edited by hand inside a marker block, or a JSON rerun without `tables.py`, fails here."""
    assert tables.write_all(tables.RESULTS, mode="check")


def test_every_marker_block_has_a_generator(tables):
    written = {(file, name) for blocks in tables.BLOCKS.values() for file, name, _ in blocks}
    written |= {("docs/results.md", "run_all"), ("docs/fixtures.md", "fixtures")}
    found = set()
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for name in re.findall(r"<!-- (\w+):start -->", path.read_text()):
            found.add((str(path.relative_to(ROOT)), name))
    assert found == written


@pytest.mark.parametrize(
    ("value", "target", "text"),
    [
        (0.4994, 0.5, "0.499"),  # 0.50 would read as meeting an at-least-0.5 target
        (0.5, 0.5, "0.50"),
        (1.2049, 1.2, "1.205"),  # 1.20 would read as meeting an at-most-1.2 target
        (0.7999, 0.8, "0.7999"),
        (1.14, 0.5, "1.14"),
    ],
)
def test_ratio_text_never_rounds_onto_or_across_its_target(monkeypatch, value, target, text):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    results_io = importlib.import_module("results_io")
    assert results_io.ratio_text(value, target) == text
    shown = float(text)
    assert (shown > target) == (value > target) and (shown < target) == (value < target)


# (a benchmark's check as its JSON holds it, its name, the statement the docs show)
STATEMENT_CASES = [
    ("2 workers vs 1: 1.64x faster (target >= 1.5x): yes", "", "2 workers vs 1: 1.64x faster (target >= 1.5x, met)."),
    ("a / b: 0.37x (target >= 0.5x): NO", "", "A / b: 0.37x (target >= 0.5x, not met)."),
    ("distillation never made perplexity worse: yes", "", "Distillation never made perplexity worse."),
    ("closes 29% of the gap (target >= 50%): no", "", "Closes 29% of the gap (target >= 50%, not met)."),
    ("same error (difference <= 1e-5): yes, largest 1e-8", "", "Same error (difference <= 1e-5), largest 1e-8."),
    ("bits identical: no", "", "Not the case: bits identical."),
    (True, "factored_at_least_10x_smaller", "Factored at least 10x smaller."),
    ("coarse @ 0.25: best slbf (+0.291)", "", "Coarse @ 0.25: best slbf (+0.291)."),
]


@pytest.mark.parametrize(("check", "name", "statement"), STATEMENT_CASES)
def test_checks_read_as_plain_statements(monkeypatch, check, name, statement):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    results_io = importlib.import_module("results_io")
    assert results_io.plain_statement(check, name) == statement
