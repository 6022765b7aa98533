"""The compression pipeline: read -> factorize -> export, one (layer, matrix) job at a time, resumable.

Each finished job's factors are saved atomically in a work folder beside the output
(`OUTPUT.mobe-work/`); a re-run with the same settings skips them. The output folder appears only when
the whole checkpoint is written (it is assembled inside the work folder, then renamed).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from tqdm.auto import tqdm

from .architectures import MoeLayout, moe_layout
from .calibrate import read_calibration_text
from .calibrate.collect import check_streamable, require_tokenizer
from .calibrate.run import calibration_grams, collect_calibration, collect_sampled, refine_layers
from .checkpoint import CheckpointError, CheckpointReader, refuse_native
from .config import FORMAT_VERSION, DistillConfig, MobeConfig, QuantizeConfig, rounds_on_sampled_text
from .devices import resolve_device
from .distribute import JobSpec, JobStore, local_devices, require_ray, run_device_pool, run_ray, run_serial
from .evaluate import CompressionReport, MatrixResult
from .export import (
    copy_side_files,
    dense_config,
    dense_shard_plan,
    native_section,
    read_native_factors,
    run_section,
    write_checkpoint,
    write_json_atomic,
    write_output,
)
from .factorize import budget_for_ratio, get_method, oriented
from .quantize.checkpoint import refuse_quantized, stored_bytes

if TYPE_CHECKING:
    from torch import Tensor

logger = logging.getLogger(__name__)

FLOAT_DTYPES = ("F32", "BF16", "F16")
MOST_USEFUL_RATIO = 0.9  # --target-ratio above this warns: under a tenth of the expert parameters left


class CompressionError(ValueError):
    """Settings that do not fit the checkpoint, or an output that cannot be written."""


def resolve_settings(layout: MoeLayout, config: MobeConfig) -> MobeConfig:
    """Check the settings against the layout; fix the rank (from --target-ratio when given)."""
    E, p, d = layout.num_experts, layout.intermediate_size, layout.hidden_size
    method = get_method(config.method)
    if E % config.groups:
        raise CompressionError(f"--groups {config.groups} does not divide the number of experts ({E})")
    config = dataclasses.replace(config, num_bases=config.bases_for(E))
    if method.name == "mobe" and config.num_bases > E:
        raise CompressionError(f"--bases {config.num_bases} exceeds the number of experts ({E})")
    rank = config.rank
    if config.target_ratio is not None:
        budget = budget_for_ratio(E, p, d, config.target_ratio, len(config.matrices))
        rank = min(method.rank_for_budget(E, p, d, config, budget), method.max_rank(E, p, d, config))
        k = len(config.matrices)  # the largest cut: rank 1
        most = 1 - ((3 - k) * E * p * d + k * method.parameters(E, p, d, config, 1)) / (3 * E * p * d)
        most = math.floor(100 * most) / 100  # as given on the command line: two decimals, never above the limit
        if rank < 1:
            reach = f"the largest reachable is {most:.2f} (rank 1)" if most > 0 else "none is"
            raise CompressionError(
                f"--target-ratio {config.target_ratio} is out of reach for --method {method.name} "
                f"(compressing {','.join(config.matrices)} of E={E}, p={p}, d={d}): {reach}"
            )
        if config.target_ratio > MOST_USEFUL_RATIO:
            logger.warning(
                "--target-ratio %s keeps %.0f%% of the expert parameters (rank %d of %d): little of what the experts "
                "compute survives such a cut (reachable up to %.2f)",
                config.target_ratio, 100 * (1 - config.target_ratio), rank, method.max_rank(E, p, d, config), most,
            )  # fmt: skip
    elif rank is None and method.name != "mobe":
        raise CompressionError(f"--method {method.name} needs --rank or --target-ratio")
    rank = rank or min(p, d)  # the paper's r = p, capped where experts are wider than the hidden size
    limit = method.max_rank(E, p, d, config)
    if rank > limit:
        raise CompressionError(f"--rank {rank} exceeds the {'hidden size' if limit == d else 'matrix rank'} ({limit})")
    return dataclasses.replace(config, rank=rank, activation=config.activation or method.default_activation)


def plan_jobs(reader: CheckpointReader, layout: MoeLayout, config: MobeConfig) -> list[tuple[int, str]]:
    """Check the layers and every expert tensor's shape (headers only); return the jobs to run."""
    layers = layout.moe_layers if config.layers is None else config.layers
    not_moe = [layer for layer in layers if layer not in layout.moe_layers]
    if not_moe:
        raise CompressionError(f"--layers {not_moe} are not MoE layers; MoE layers are {list(layout.moe_layers)}")
    fused = layout.arch.fused is not None
    for layer in layers:
        for matrix in ("gate", "up", "down"):
            expected = layout.fused_shape(matrix) if fused else layout.expected_shape(matrix)
            for name in layout.stored_names(layer, matrix):
                shape = reader.shape(name)
                if fused and reader.dtype_name(name) not in FLOAT_DTYPES:
                    raise CheckpointError(
                        f"tensor {name} is {reader.dtype_name(name)}; mobe reads fused experts in "
                        "float32/bfloat16/float16 only (dequantise the checkpoint first)"
                    )
                if reader.dtype_name(name) not in FLOAT_DTYPES and not reader.is_block_fp8(name):
                    raise CheckpointError(
                        f"tensor {name} is {reader.dtype_name(name)}; mobe reads float32/bfloat16/float16 experts "
                        "and block-FP8 ones with NAME_scale_inv and quantization_config.weight_block_size "
                        "(dequantise other quantised checkpoints first)"
                    )
                if shape != expected:
                    raise CheckpointError(
                        f"tensor {name} has shape {list(shape)}, expected {list(expected)} from config.json"
                    )
    return [(layer, matrix) for layer in layers for matrix in config.matrices]


def _check_output(output: Path) -> None:
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise CompressionError(f"output folder {output} already exists and is not empty; choose another path")


def _open_work_folder(work: Path, fingerprint: dict) -> None:
    state = work / "work.json"
    if state.exists():
        previous = json.loads(state.read_text())
        if previous != fingerprint:
            raise CompressionError(
                f"work folder {work} holds a run with other settings or source; "
                "remove it or pass the same settings to resume"
            )
        logger.info("resuming from %s", work)
    else:
        work.mkdir(parents=True, exist_ok=True)
        write_json_atomic(fingerprint, state)
    stale = work / "assemble"
    if stale.exists():
        shutil.rmtree(stale)


def check_calibration(reader: CheckpointReader, config: MobeConfig) -> None:
    """Refuse a missing or empty calibration file, a checkpoint without tokenizer, or a method without weighting."""
    if config.calibration is None:
        return
    read_calibration_text(config.calibration)
    check_streamable(moe_layout(reader.config))
    require_tokenizer(reader.path, "--calibration text")
    if not get_method(config.method).weighted:
        raise CompressionError(f"--method {config.method} does not support --calibration")


def _run_jobs(
    specs: list[JobSpec], config: MobeConfig, ray: bool | str, on_done: Callable[[JobSpec, dict], None], progress: bool
) -> None:
    """Run the unfinished jobs on a Ray cluster, on several local devices, or here, one after another."""
    if ray is not False:
        kind = config.device.split(",")[0].strip()
        device = "auto" if kind == "auto" else ("cuda" if kind.startswith("cuda") else "cpu")
        run_ray(specs, None if ray is True else ray, device, config.threads or 1, on_done)
        return
    devices = local_devices(config.device)
    if len(devices) > 1 and len(specs) > 1:
        run_device_pool(specs, devices, on_done)
    else:
        run_serial(specs, str(resolve_device(devices[0])), on_done, progress)


def compress(
    model: str | Path,
    output: str | Path,
    config: MobeConfig | None = None,
    *,
    reconstruct: bool = False,
    work_dir: str | Path | None = None,
    ray: bool | str = False,
    calibration: str | Path | None = None,
    progress: bool = True,
    distill: DistillConfig | None = None,
    distill_text: str | Path | None = None,
    quantize: QuantizeConfig | None = None,
    force: bool = False,
) -> CompressionReport:
    """Compress the MoE checkpoint `model` (folder or hub id) into `output`.

    Args:
        model: checkpoint folder with config.json and safetensors weights, or a hub id.
        output: new folder for the result; must not exist or be empty.
        config: MoBE settings (`MobeConfig()` if None).
        reconstruct: write dense experts rebuilt from the factors (same layout as the source,
            loadable by any engine) instead of the native factors.
        work_dir: where finished jobs are kept for resuming (default `OUTPUT.mobe-work`).
        ray: run each (layer, matrix) job as a Ray task: True for Ray's default (RAY_ADDRESS, a cluster running
            on this machine, or a new local one), or a cluster address. The checkpoint and the work folder must
            be visible to every node.
        calibration: a text file (overrides `config.calibration`): tokenised with the checkpoint's tokenizer and
            run through the original model, layer by layer, to collect each expert's input Gram (as a factor); the
            fits then minimise the output error on the tokens routed to each expert instead of the weight error.
        progress: show progress bars.
        distill_text, distill: then distil the result toward `model` on this text (`mobe.distill`), before it
            is moved into `output`; the teacher's targets are kept in the work folder until the end.
        quantize: then quantise the result's weights (`mobe.quantize`): a dense output in compressed-tensors'
            format, a native one factor by factor.
        force: run even where the memory estimate (`mobe.estimate.check_compress_memory`) exceeds the memory the
            chosen devices have free; without it such a run is refused before anything is written.

    Returns:
        The report, also saved as `mobe_report.json` inside `output` (with a `distill` section when distilled).

    Example:
        >>> report = compress("tiny-qwen3-moe", "tiny-mobe", MobeConfig(num_bases=4, steps=500))  # doctest: +SKIP
        >>> print(report.table())  # doctest: +SKIP
    """
    config = config or MobeConfig()
    if calibration is not None:
        config = dataclasses.replace(config, calibration=str(calibration))
    output = Path(output)
    if ray is False:
        for device in local_devices(config.device):
            resolve_device(device)
    else:
        require_ray()
    _check_output(output)
    reader = CheckpointReader(model)
    refuse_quantized(reader, "compress")
    refuse_native(reader, "compress")
    layout = moe_layout(reader.config)
    config = resolve_settings(layout, config)
    check_calibration(reader, config)
    if distill_text is not None:  # refused now, not after hours of compression
        read_calibration_text(distill_text)
        require_tokenizer(reader.path, "--distill text")
    jobs = plan_jobs(reader, layout, config)
    sampled = rounds_on_sampled_text(config, quantize, reconstruct)  # integer factors rounded on sampled text
    if not force and ray is False:  # a Ray cluster's nodes are not this machine
        from .estimate import check_compress_memory

        check_compress_memory(reader, config, local_devices(config.device), sampled=sampled)
    fmt = "dense" if reconstruct else "native"
    if quantize is not None and reconstruct:  # refused now (library missing, group size), not after the fits
        from .quantize.checkpoint import check_dense_quantizable

        check_dense_quantizable(layout, quantize, reader.path)
    if sampled:
        check_streamable(layout)  # the sampled tokens' statistics are collected layer by layer

    work = Path(work_dir) if work_dir else output.with_name(output.name + ".mobe-work")
    _open_work_folder(work, {"source": str(reader.path.resolve()), "config": config.fingerprint()})
    store = JobStore(work)
    collect_calibration(
        reader,
        layout,
        config,
        work,
        sorted({layer for layer, matrix in jobs if not store.done(layer, matrix)}),
        progress,
    )
    report = CompressionReport(
        source=str(model),
        output=str(output),
        format=fmt,
        config=config.to_dict(),
        expert_params_before=len(layout.moe_layers) * layout.expert_params_per_layer,
        model_params_before=reader.num_parameters(),
    )
    # Workers open the checkpoint themselves: a local folder by its absolute path, a hub id by its id.
    source = str(reader.path.resolve()) if Path(model).exists() else str(model)
    results: dict[tuple[int, str], MatrixResult] = {}
    todo = []
    for layer, matrix in jobs:
        if store.done(layer, matrix):
            results[layer, matrix] = dataclasses.replace(store.load(layer, matrix)[1], resumed=True)
        else:
            todo.append(JobSpec(source, str(work), config.to_dict(), layer, matrix))
    bar = tqdm(total=len(jobs), initial=len(results), desc="Compressing", disable=not progress)

    def on_done(spec: JobSpec, result: dict) -> None:
        results[spec.layer, spec.matrix] = MatrixResult(**result)
        bar.set_postfix_str(spec.name)
        bar.update()

    try:
        _run_jobs(todo, config, ray, on_done, progress)
    finally:
        bar.close()
    if config.calibration_refine_steps:
        store = refine_layers(reader, layout, config, work, jobs, results, progress)
    report.results = [results[job] for job in jobs]

    assemble = work / "assemble"
    assemble.mkdir()
    factors_of = functools.lru_cache(maxsize=len(config.matrices))(lambda layer, m: store.load(layer, m)[0])
    write_output(reader, layout, jobs, factors_of, assemble, run_section(config, jobs, fmt), progress)
    report.save(assemble)
    if distill_text is not None:
        from .distill import distill as run_distill

        report.distill = run_distill(
            reader.path, assemble, assemble, distill_text, distill, work_dir=work / "distill", progress=progress
        )
    final = assemble
    if quantize is not None:
        from .quantize import quantize_checkpoint

        final = work / "quantized"
        grams = targets = None
        if config.calibration is not None and not reconstruct:  # integer factors rounded on the routed inputs
            grams = calibration_grams(work)
        elif sampled:  # ... of text the original samples itself
            layers = sorted({layer for layer, _ in jobs})
            tokens, seq_len = config.calibration_tokens, config.calibration_seq_len
            collect_sampled(reader, layout, config, tokens, seq_len, work / "sampled", layers, progress)
            grams = calibration_grams(work / "sampled")
        # A re-solved against the original experts in the inputs' metric, then rounded; not where distillation or
        # layer refinement moved the factors toward the model's outputs, which a per-matrix re-solve would undo
        if grams is not None and distill_text is None and not config.calibration_refine_steps:

            def targets(layer: int, matrix: str) -> Tensor:
                return oriented(matrix, layout.read_experts(reader, layer, matrix))

        quantize_checkpoint(assemble, final, quantize, progress=progress, grams=grams, targets=targets)
        report.quantize = quantize.to_dict()
    report.bytes_before, report.bytes_after = stored_bytes(reader), stored_bytes(final)
    report.save(final)
    _move_into_place(final, output)
    shutil.rmtree(work)
    return report


def _move_into_place(folder: Path, output: Path) -> None:
    if output.exists():
        output.rmdir()  # checked empty before any work was done
    folder.rename(output)


def reconstruct(native: str | Path, output: str | Path, *, progress: bool = True) -> Path:
    """Rebuild dense experts from a native checkpoint, in the original architecture and tensor names.

    The result loads unchanged with `transformers.AutoModelForCausalLM` (and so vLLM, SGLang, lm-eval).
    """
    output = Path(output)
    _check_output(output)
    reader = CheckpointReader(native)
    section = native_section(reader)
    layout = moe_layout(reader.config)
    jobs = [(layer, matrix) for layer in section["layers"] for matrix in section["matrices"]]
    factors_of = functools.lru_cache(maxsize=len(section["matrices"]))(
        lambda layer, m: read_native_factors(reader, layout, layer, m)
    )
    target = output.with_name(f".{output.name}.mobe-tmp")
    if target.exists():
        shutil.rmtree(target)
    target.mkdir(parents=True)
    plan = dense_shard_plan(reader, layout, jobs, get_method(section.get("method", "mobe")).factors_cls.tensor_fields)
    metadata = {"format": "pt", "mobe_version": str(FORMAT_VERSION), "mobe_format": "dense"}
    write_checkpoint(reader, layout, jobs, factors_of, target, "dense", metadata, progress, shard_plan=plan)
    copy_side_files(reader.path, target)
    write_json_atomic(dense_config(reader.config), target / "config.json")
    _move_into_place(target, output)
    return output
