"""Expert pruning end to end: REAP scores on calibration text -> experts to drop -> a smaller standard checkpoint.

The output has the source's architecture and model type with fewer routed experts per MoE layer (renumbered from 0,
in their original order), the router's per-expert rows (and DeepSeek-V3's score-correction bias) cut to match, and
the config's expert count updated; top-k is unchanged. It opens with `AutoModelForCausalLM` without mobe. The source
is read one shard at a time and the output assembled in a temporary folder, renamed when complete.
"""

from __future__ import annotations

import re
import shutil
import time
from collections.abc import Mapping
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..architectures import MoeLayout, moe_layout
from ..calibrate import calibration_ids, read_calibration_text
from ..calibrate.collect import check_streamable, require_tokenizer
from ..checkpoint import CheckpointReader
from ..checkpoint.reader import INDEX_FILE
from ..config import FORMAT_VERSION, QuantizeConfig
from ..export.files import atomic_save_file, copy_side_files, write_json_atomic
from ..quantize.checkpoint import check_dense_quantizable, refuse_quantized, stored_bytes
from .report import LayerPruning, PruneReport
from .scores import ExpertScores, collect_reap_scores
from .select import PruneError, experts_to_prune

CRITERIA = ("reap", "frequency")
_LAYER = re.compile(r"^model\.layers\.(\d+)\.")


def prune_experts(
    model: str | Path,
    output: str | Path,
    *,
    target_ratio: float,
    calibration: str | Path,
    budget: str = "layer",
    criterion: str = "reap",
    calibration_tokens: int = 32768,
    calibration_seq_len: int = 512,
    quantize: QuantizeConfig | None = None,
    allocation: Mapping[tuple[int, str], int] | None = None,
    progress: bool = True,
) -> PruneReport:
    """Remove the routed experts with the lowest REAP scores on `calibration` text; write a smaller checkpoint.

    Args:
        model: checkpoint folder or hub id (with its tokenizer).
        output: new folder (must not exist or be empty).
        target_ratio: share of the routed experts to remove, e.g. 0.5.
        calibration: text file whose first `calibration_tokens` tokens (cut into sequences of `calibration_seq_len`)
            are run through the original model, one decoder layer at a time.
        budget: `layer` (the same share in every layer) or `global` (the lowest scores of the whole model; it must
            come out as the same count in every layer).
        criterion: `reap` (the score above), or `frequency` (the calibration tokens routed to each expert: the
            baseline REAP is compared with).
        quantize: then quantise the pruned checkpoint's weights (`mobe.quantize`, compressed-tensors' format), as
            `compress(..., quantize=)` does; its bits, group size and scope are checked before any scoring.
        allocation: with `quantize`, per-(layer, matrix) bits of the kept experts (`quantize_checkpoint`'s).

    Returns:
        The report, also saved as `mobe_report.json` in `output`.

    Example:
        >>> report = prune_experts("Qwen3-30B-A3B", "q3-reap", target_ratio=0.5, calibration="c.txt")  # doctest: +SKIP
        >>> print(report.table())  # doctest: +SKIP
    """
    start = time.perf_counter()
    if criterion not in CRITERIA:
        raise PruneError(f"criterion must be one of {', '.join(CRITERIA)}, got {criterion!r}")
    output = Path(output)
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise PruneError(f"output folder {output} already exists and is not empty; choose another path")
    reader = CheckpointReader(model)
    refuse_quantized(reader, "prune")
    if (reader.config.get("mobe") or {}).get("format") == "native":
        raise PruneError(f"{reader.path} holds MoBE factors, not experts: prune the original or a reconstructed one")
    layout = moe_layout(reader.config)
    check_streamable(layout)  # experts are scored by streaming the original one decoder layer at a time
    if quantize is not None:  # the library, fused experts, the group size: refused now, not after the scoring
        check_dense_quantizable(layout, quantize, reader.path)
    router = f"{layout.arch.router_prefix(layout.moe_layers[0])}.weight"
    if router not in reader.weight_map:
        raise PruneError(f"{reader.path}: no router tensor {router}; expert pruning cannot cut its rows")
    read_calibration_text(calibration)
    require_tokenizer(reader.path, "--calibration text")
    config = reader.config
    groups = int(config.get(layout.arch.router_groups_key) or 1) if layout.arch.router_groups_key else 1
    top_k = int(config.get("num_experts_per_tok") or 1)
    # The same checks as the selection makes after scoring, before the long part.
    experts_to_prune(
        {layer: torch.zeros(layout.num_experts) for layer in layout.moe_layers},
        target_ratio,
        budget="layer",
        top_k=top_k,
        groups=groups,
        topk_group=int(config.get("topk_group") or 1),
    )

    sequences = calibration_ids(reader.path, calibration, calibration_tokens, calibration_seq_len)
    scores: dict[int, ExpertScores] = dict(collect_reap_scores(reader, layout, sequences, progress=progress))
    pruned = experts_to_prune(
        {layer: s.reap if criterion == "reap" else s.counts for layer, s in scores.items()},
        target_ratio,
        budget=budget,
        top_k=top_k,
        groups=groups,
        topk_group=int(config.get("topk_group") or 1),
    )
    kept = {layer: [e for e in range(layout.num_experts) if e not in set(ids)] for layer, ids in pruned.items()}
    num_kept = len(next(iter(kept.values())))

    settings = {"method": "reap", "criterion": criterion, "target_ratio": target_ratio, "budget": budget}
    target = output.with_name(f".{output.name}.mobe-tmp")
    if target.exists():
        shutil.rmtree(target)
    target.mkdir(parents=True)
    params_after = write_pruned(reader, layout, kept, target, progress=progress)
    copy_side_files(reader.path, target)
    new_config = {k: v for k, v in config.items() if k != "mobe"}
    for key in layout.arch.num_experts_keys:
        if key in new_config:
            new_config[key] = num_kept
    new_config["mobe"] = {
        "version": FORMAT_VERSION,
        "format": "pruned",
        **settings,
        "experts_kept": {str(layer): ids for layer, ids in kept.items()},
    }
    write_json_atomic(new_config, target / "config.json")

    p, d = layout.intermediate_size, layout.hidden_size
    report = PruneReport(
        source=str(model),
        output=str(output),
        config=settings,
        layers=[
            LayerPruning(
                layer=layer,
                experts_before=layout.num_experts,
                kept=kept[layer],
                pruned=pruned[layer],
                scores=scores[layer].reap.tolist(),
                tokens_routed=[int(n) for n in scores[layer].counts.tolist()],
            )
            for layer in layout.moe_layers
        ],
        calibration_tokens=sum(s.numel() for s in sequences),
        expert_params_before=len(layout.moe_layers) * 3 * layout.num_experts * p * d,
        expert_params_after=len(layout.moe_layers) * 3 * num_kept * p * d,
        model_params_before=reader.num_parameters(),
        model_params_after=params_after,
    )
    final = target
    if quantize is not None:
        from ..quantize import quantize_checkpoint

        final = output.with_name(f".{output.name}.mobe-quantized")
        if final.exists():
            shutil.rmtree(final)
        quantize_checkpoint(target, final, quantize, progress=progress, allocation=allocation)
        shutil.rmtree(target)
        report.quantize = quantize.to_dict()
    report.bytes_before, report.bytes_after = stored_bytes(reader), stored_bytes(final)
    report.seconds = time.perf_counter() - start
    report.save(final)
    if output.exists():
        output.rmdir()  # checked empty above
    final.rename(output)
    return report


def write_pruned(
    reader: CheckpointReader, layout: MoeLayout, kept: dict[int, list[int]], target: Path, *, progress: bool = False
) -> int:
    """Write the source's shards without the removed experts, one shard at a time; returns the parameters written.

    Kept experts are renumbered 0..E'-1 in their original order; every router tensor whose first dimension is the
    expert count keeps the rows of the kept experts in that order.
    """
    E = layout.num_experts
    new_id = {layer: {old: new for new, old in enumerate(ids)} for layer, ids in kept.items()}
    weight_map: dict[str, str] = {}
    total_bytes = total_params = 0
    for shard, names in tqdm(reader.tensors_by_shard().items(), desc="Writing", disable=not progress, leave=False):
        out: dict[str, torch.Tensor] = {}
        for name, tensor in reader.get_many(names).items():
            match = _LAYER.match(name)
            layer = int(match.group(1)) if match else None
            if layer in new_id:
                experts = layout.arch.experts_prefix(layer) + "."
                if name.startswith(experts):
                    index, _, rest = name[len(experts) :].partition(".")
                    if index.isdigit():
                        if int(index) not in new_id[layer]:
                            continue  # a removed expert
                        name = f"{experts}{new_id[layer][int(index)]}.{rest}"
                elif name.startswith(layout.arch.router_prefix(layer) + ".") and tensor.shape[:1] == (E,):
                    tensor = tensor[kept[layer]]
            out[name] = tensor
        if not out:
            continue
        atomic_save_file(out, target / shard, metadata={"format": "pt", "mobe_format": "pruned"})
        weight_map.update(dict.fromkeys(out, shard))
        total_bytes += sum(t.numel() * t.element_size() for t in out.values())
        total_params += sum(t.numel() for t in out.values())
    if (reader.path / INDEX_FILE).is_file():
        index = {"metadata": {"total_size": total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        write_json_atomic(index, target / INDEX_FILE)
    return total_params
