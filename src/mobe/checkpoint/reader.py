"""Lazy access to a safetensors checkpoint (single file or sharded with an index).

Only headers are read up front; tensor bytes are read on demand with `safe_open`, so peak memory is
set by what the caller asks for at once (one MoE layer), never by the size of the model.
"""

from __future__ import annotations

import json
import logging
import os
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from . import mxfp4
from .fp8 import FP8_DTYPE_NAMES, SCALE_SUFFIX, block_size, dequantize_blockwise

logger = logging.getLogger(__name__)

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# What a compression needs from a hub repo: config, weights, tokenizer and generation files, custom code.
HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken", "*.py", "*.jinja"]


class CheckpointError(ValueError):
    """A checkpoint is missing a file or tensor, or holds one of the wrong shape."""


def resolve_checkpoint(model: str | os.PathLike) -> Path:
    """Return a local folder for a checkpoint folder or a Hugging Face hub id (downloaded to the cache)."""
    path = Path(model)
    if path.is_dir():
        return path
    if path.exists():
        raise CheckpointError(f"{path} is a file; pass the checkpoint folder that holds config.json")
    if str(model).count("/") != 1 or str(model).startswith((".", "/")):
        raise CheckpointError(f"checkpoint folder {model} does not exist (nor is it a hub id like org/name)")
    from huggingface_hub import snapshot_download

    logger.info("downloading %s from the hub", model)
    try:
        return Path(snapshot_download(str(model), allow_patterns=HUB_PATTERNS))
    except Exception as exc:  # network, auth, missing repo: one line that names the model
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"could not get {model} from the Hugging Face hub: {first_line}") from None


def refuse_native(reader: CheckpointReader, what: str) -> None:
    """One line for a native mobe checkpoint (factors, not dense experts) where dense experts are read."""
    section = reader.config.get("mobe") or {}
    if section.get("format") != "native":
        return
    how = f"{section.get('method', 'mobe')}, {section.get('num_bases')} bases, rank {section.get('rank')}"
    raise CheckpointError(
        f"{reader.path} is a mobe native checkpoint (compressed by mobe: {how}), which holds factors, not the dense "
        f"experts to {what}: {what} its original checkpoint, or run `mobe reconstruct {reader.path} -o DENSE` "
        f"first and {what} DENSE"
    )


class CheckpointReader:
    """Index of a checkpoint's tensors with lazy, per-tensor reads.

    `weight_map` names the model's tensors: an MXFP4 checkpoint's blocks / scales pairs appear as the tensors they
    dequantise to (bfloat16), read and dequantised one at a time.

    Example:
        >>> reader = CheckpointReader("Qwen3-30B-A3B")  # doctest: +SKIP
        >>> reader.shape("model.layers.0.mlp.experts.0.up_proj.weight")  # doctest: +SKIP
        (768, 2048)
    """

    def __init__(self, path: str | os.PathLike):
        self.path = resolve_checkpoint(path)
        config_file = self.path / "config.json"
        if not config_file.is_file():
            raise CheckpointError(f"{config_file} is missing: not a Hugging Face checkpoint folder")
        self.config: dict[str, Any] = json.loads(config_file.read_text())
        self._headers: dict[str, dict[str, tuple[tuple[int, ...], str]]] = {}
        self._stored = self._read_weight_map()  # every tensor in the files
        # MXFP4 checkpoints: each blocks / scales pair is shown as the one tensor it dequantises to (`mxfp4.py`).
        self.mxfp4 = mxfp4.packed_pairs(self._stored) if mxfp4.is_mxfp4(self.config) else {}
        packed = {name for pair in self.mxfp4.values() for name in pair}
        self.weight_map = {n: shard for n, shard in self._stored.items() if n not in packed}
        self.weight_map.update({name: self._stored[blocks] for name, (blocks, _) in self.mxfp4.items()})

    def _read_weight_map(self) -> dict[str, str]:
        index = self.path / INDEX_FILE
        if index.is_file():
            weight_map = json.loads(index.read_text()).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise CheckpointError(f"{index} has no weight_map")
        elif (self.path / SINGLE_FILE).is_file():
            weight_map = dict.fromkeys(self._header(SINGLE_FILE), SINGLE_FILE)
        else:
            raise CheckpointError(f"{self.path} has neither {SINGLE_FILE} nor {INDEX_FILE}")
        for shard in sorted(set(weight_map.values())):
            if not (self.path / shard).is_file():
                raise CheckpointError(f"shard {self.path / shard} listed in {INDEX_FILE} is missing")
        return weight_map

    @property
    def shards(self) -> list[str]:
        return sorted(set(self._stored.values()))

    def tensors_by_shard(self) -> dict[str, list[str]]:
        by_shard: dict[str, list[str]] = defaultdict(list)
        for name, shard in self.weight_map.items():
            by_shard[shard].append(name)
        return {shard: sorted(names) for shard, names in sorted(by_shard.items())}

    def _header(self, shard: str) -> dict[str, tuple[tuple[int, ...], str]]:
        if shard not in self._headers:
            try:
                with safe_open(self.path / shard, framework="pt") as f:
                    slices = {name: f.get_slice(name) for name in f.keys()}
                    self._headers[shard] = {n: (tuple(s.get_shape()), s.get_dtype()) for n, s in slices.items()}
            except SafetensorError as exc:
                raise CheckpointError(f"shard {self.path / shard} is not a readable safetensors file: {exc}") from None
        return self._headers[shard]

    def _locate(self, name: str) -> str:
        shard = self._stored.get(name)
        if shard is None:
            raise CheckpointError(f"tensor {name} is not in the checkpoint index of {self.path}")
        if name not in self._header(shard):
            raise CheckpointError(f"tensor {name} is listed in the index but missing from shard {shard}")
        return shard

    def shape(self, name: str) -> tuple[int, ...]:
        if name in self.mxfp4:
            return mxfp4.dequantized_shape(self.shape(self.mxfp4[name][0]))
        return self._header(self._locate(name))[name][0]

    def dtype_name(self, name: str) -> str:
        if name in self.mxfp4:
            return mxfp4.DEQUANTIZED_DTYPE_NAME
        return self._header(self._locate(name))[name][1]

    def get(self, name: str) -> torch.Tensor:
        if name in self.mxfp4:
            return self.get_many([name])[name]
        with safe_open(self.path / self._locate(name), framework="pt") as f:
            return f.get_tensor(name)

    def get_part(self, name: str, dim: int, start: int, stop: int) -> torch.Tensor:
        """Rows `start:stop` of dimension `dim` of a tensor, reading only those bytes (one matrix type of a fused
        experts tensor); MXFP4 tensors are dequantised whole, then cut."""
        if name in self.mxfp4:
            return self.get(name).narrow(dim, start, stop - start).contiguous()
        with safe_open(self.path / self._locate(name), framework="pt") as f:
            index = (slice(None),) * dim + (slice(start, stop),)
            return f.get_slice(name)[index]

    def get_many(self, names: list[str], dequantize: bool = False) -> dict[str, torch.Tensor]:
        """Read several tensors, opening each shard once; `dequantize` turns block-FP8 weights into float32 (MXFP4
        ones are always dequantised, to bfloat16)."""
        if dequantize:
            scales = {name: name + SCALE_SUFFIX for name in names if self.is_block_fp8(name)}
            raw = self.get_many([*names, *scales.values()])
            for name, scale in scales.items():
                raw[name] = dequantize_blockwise(raw[name], raw[scale], block_size(self.config))  # type: ignore[arg-type]
            return {name: raw[name] for name in names}
        packed = [name for name in names if name in self.mxfp4]
        if packed:  # each MXFP4 tensor read as its blocks and scales, then dequantised
            pairs = [part for name in packed for part in self.mxfp4[name]]
            raw = self.get_many([*(n for n in names if n not in self.mxfp4), *pairs])
            for name in packed:
                blocks, scales = self.mxfp4[name]
                raw[name] = mxfp4.dequantize(raw.pop(blocks), raw.pop(scales))
            return {name: raw[name] for name in names}
        by_shard: dict[str, list[str]] = defaultdict(list)
        for name in names:
            by_shard[self._locate(name)].append(name)
        out: dict[str, torch.Tensor] = {}
        for shard, shard_names in by_shard.items():
            with safe_open(self.path / shard, framework="pt") as f:
                for name in shard_names:
                    out[name] = f.get_tensor(name)
        return {name: out[name] for name in names}

    def is_block_fp8(self, name: str) -> bool:
        """An FP8 weight with its block scales (`NAME_scale_inv`) in a checkpoint whose config declares blocks."""
        return (
            self.dtype_name(name) in FP8_DTYPE_NAMES
            and block_size(self.config) is not None
            and name + SCALE_SUFFIX in self._stored
        )

    def num_parameters(self) -> int:
        """Total parameter count, from the shard headers only."""
        total = 0
        for name in self.weight_map:
            numel = 1
            for size in self.shape(name):
                numel *= size
            total += numel
        return total
