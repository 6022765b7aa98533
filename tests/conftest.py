"""Shared fixtures: tiny MoE checkpoints of every supported architecture, built offline once per session."""

from __future__ import annotations

from pathlib import Path

import pytest

from mobe.architectures import canonical_model_types
from mobe.fixtures import build_tiny_moe

ARCHITECTURES = canonical_model_types()


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return {arch: build_tiny_moe(root / arch, arch, max_shard_size="20KB") for arch in ARCHITECTURES}


@pytest.fixture
def qwen3_checkpoint(tiny_checkpoints) -> Path:
    return tiny_checkpoints["qwen3_moe"]
