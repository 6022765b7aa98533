"""Small file helpers: every write goes to a temporary name first, then is renamed into place."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

SKIPPED_SIDE_FILES = {"config.json", "model.safetensors.index.json"}


def atomic_save_file(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    os.replace(tmp, path)


def write_json_atomic(data: Any, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)


def copy_side_files(source: Path, target: Path) -> list[str]:
    """Copy tokenizer, generation config and other non-weight files (not config.json, not shards)."""
    copied = []
    for item in sorted(source.iterdir()):
        if item.is_file() and item.name not in SKIPPED_SIDE_FILES and not item.name.endswith(".safetensors"):
            shutil.copy2(item, target / item.name)
            copied.append(item.name)
    return copied
