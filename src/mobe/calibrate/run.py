"""Calibration in a compression run: each layer's statistics saved in the work folder, then layer refinement."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import Tensor
from tqdm.auto import tqdm

from ..architectures import MoeLayout
from ..checkpoint import CheckpointReader
from ..config import MobeConfig
from ..devices import resolve_device
from ..distribute import JobStore, local_devices
from ..evaluate import MatrixResult, weight_error
from ..export import atomic_save_file
from ..factorize import oriented
from ..factorize.weighted import output_error
from .collect import CalibrationError, calibration_ids, collect_statistics
from .refine import refine_layer
from .sample import sample_sequences
from .stats import LayerStats, stats_path


def collect_calibration(
    reader: CheckpointReader, layout: MoeLayout, config: MobeConfig, work: Path, layers: list[int], progress: bool
) -> None:
    """Save each layer's calibration statistics in the work folder (layers already there are not measured again)."""
    done = {layer for layer in layers if stats_path(work, layer).exists()}
    if config.calibration is None or done == set(layers):
        return
    sequences = calibration_ids(reader.path, config.calibration, config.calibration_tokens, config.calibration_seq_len)
    stats_path(work, 0).parent.mkdir(exist_ok=True)
    meta = {"tokens": str(sum(s.numel() for s in sequences)), "seq_len": str(config.calibration_seq_len)}
    keep_inputs = config.calibration_refine_steps > 0
    for layer, stats in collect_statistics(
        reader, layout, sequences, layers, keep_inputs=keep_inputs, skip=done, progress=progress
    ):
        stats.save(stats_path(work, layer), meta)
        del stats  # not held while the next layer's are collected


def collect_sampled(
    reader: CheckpointReader,
    layout: MoeLayout,
    config: MobeConfig,
    tokens: int,
    seq_len: int,
    folder: Path,
    layers: list[int],
    progress: bool,
) -> None:
    """Save each layer's statistics of `tokens` tokens the original model samples itself (`sample`) under `folder`,
    for rounding integer factors without a calibration text. The tokens are kept there too, so an interrupted run
    measures the missing layers on the same ones."""
    done = {layer for layer in layers if stats_path(folder, layer).exists()}
    if done == set(layers):
        return
    stats_path(folder, 0).parent.mkdir(parents=True, exist_ok=True)
    saved = folder / "sampled_tokens.safetensors"
    if saved.exists():
        sequences = list(load_file(saved)["ids"])
    else:
        device = local_devices(config.device)[0]
        sequences = sample_sequences(reader.path, tokens, seq_len, seed=config.seed, device=device, progress=progress)
        atomic_save_file({"ids": torch.stack(sequences)}, saved)
    meta = {"tokens": str(sum(s.numel() for s in sequences)), "seq_len": str(seq_len), "source": "sampled"}
    for layer, stats in collect_statistics(reader, layout, sequences, layers, skip=done, progress=progress):
        stats.save(stats_path(folder, layer), meta)
        del stats


def refine_layers(
    reader: CheckpointReader,
    layout: MoeLayout,
    config: MobeConfig,
    work: Path,
    jobs: list[tuple[int, str]],
    results: dict[tuple[int, str], MatrixResult],
    progress: bool,
) -> JobStore:
    """Layer-local distillation of every compressed layer (in this process, one layer at a time).

    The refined factors go to `WORK/refined/` (the fitted ones stay), a layer counting as done when all its matrix
    types are there, so an interrupted run redoes at most one layer, from the same start. Returns that store and
    updates `results` in place.
    """
    from transformers.activations import ACT2FN  # here: importing mobe does not import transformers

    fitted, refined = JobStore(work), JobStore(work / "refined")
    refined.folder.mkdir(exist_ok=True)
    act = ACT2FN[reader.config.get("hidden_act", "silu")]
    device = resolve_device(local_devices(config.device)[0])
    threads = torch.get_num_threads()
    if config.threads:
        torch.set_num_threads(config.threads)
    try:
        for layer in tqdm(sorted({layer for layer, _ in jobs}), desc="Refining", disable=not progress, leave=False):
            matrices = [m for lay, m in jobs if lay == layer]
            if all(refined.done(layer, m) for m in matrices):
                for m in matrices:
                    results[layer, m] = dataclasses.replace(refined.load(layer, m)[1], resumed=True)
                continue
            originals = {m: layout.read_experts(reader, layer, m) for m in ("gate", "up", "down")}
            stats = LayerStats.load(stats_path(work, layer), with_inputs=True)
            factors = {m: fitted.load(layer, m)[0] for m in matrices}
            torch.manual_seed(config.seed)
            new, info = refine_layer(
                factors,
                originals,
                stats,
                act,
                config.calibration_refine_steps,
                config.calibration_refine_lr,
                seed=config.seed,
                device=device,
            )
            for m in matrices:
                if not all(torch.isfinite(t).all() for t in new[m].tensors().values()):
                    raise CalibrationError(f"layer {layer} {m}: factors not finite after refinement (lower the lr)")
                weights = oriented(m, originals[m]).float()
                rel, mse = weight_error(weights, new[m].reconstruct())
                side = "left" if m == "down" else "right"
                result = dataclasses.replace(
                    results[layer, m],
                    relative_error=rel,
                    mse=mse,
                    output_error=output_error(stats.factor(m), weights, new[m].reconstruct(), side),
                    layer_error_before=info.before,
                    layer_error=info.after,
                    seconds=results[layer, m].seconds + info.seconds / len(matrices),
                    resumed=False,
                )
                refined.save(layer, m, new[m], result)
                results[layer, m] = result
    finally:
        torch.set_num_threads(threads)
    return refined


def calibration_grams(work: Path) -> Callable[[int, str], Tensor]:
    """(layer, matrix) -> the second moments (E, k, k) float32 of each expert's inputs to `matrix` (of the routed
    hidden states for gate and up, of the intermediate activations for down), from the statistics a calibrated run
    saved in its work folder; one layer's statistics held at a time."""

    @functools.lru_cache(maxsize=1)
    def layer_stats(layer: int) -> LayerStats:
        return LayerStats.load(stats_path(work, layer))

    return lambda layer, matrix: layer_stats(layer).gram(matrix).float()
