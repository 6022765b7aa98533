"""`mobe` command line: a thin layer over the Python API."""

from __future__ import annotations

import argparse
import logging
import math
import sys
from dataclasses import fields
from pathlib import Path

from .. import __version__
from ..config import METHODS, QUANTIZE_BITS, SCHEDULES, DistillConfig, MobeConfig, QuantizeConfig
from .options import add_config_options, config_from_args

# Commands import their stage inside their handler: `mobe --help`, `mobe --version` and `mobe COMMAND --help`
# import neither torch nor transformers.


def _add_mobe_options(p: argparse.ArgumentParser) -> None:
    method_help = next(f.metadata["help"] for f in fields(MobeConfig) if f.name == "method")
    reap = {
        "choices": [*METHODS, "reap"],
        "help": method_help + "; reap: remove whole experts by their REAP score (needs --calibration)",
    }
    add_config_options(p, MobeConfig, overrides={"method": reap})


def _mobe_config(args: argparse.Namespace) -> MobeConfig:
    return config_from_args(MobeConfig, args)


# --quantize on compress rounds its output to nearest (GPTQ's calibration is `mobe quantize --calibration`)
LOSSY = 0.5  # a budget whose best plan raises the calibration perplexity by more than this share is warned of
COMPRESS_QUANTIZE_EXCLUDED = (
    "bits",
    "calibration",
    "calibration_tokens",
    "calibration_seq_len",
    "damping",
    "act_order",
    "sequential",
)


def _quantize_config(args: argparse.Namespace) -> QuantizeConfig | None:
    """--quantize int8|int4 on compress (with the --quantize-* options), or None."""
    if args.quantize is None:
        return None
    bits = int(args.quantize.removeprefix("int"))
    return config_from_args(QuantizeConfig, args, prefix="quantize-", exclude=COMPRESS_QUANTIZE_EXCLUDED, bits=bits)


def _distill_config(args: argparse.Namespace, prefix: str = "", device: str = "auto") -> DistillConfig:
    return config_from_args(DistillConfig, args, prefix=prefix, exclude=("device",), device=device)


def _budget(args: argparse.Namespace) -> dict[str, float] | None:
    """--target-bytes F or --target-gib G as plan_budget's keyword, or None."""
    if args.target_bytes is not None and args.target_gib is not None:
        raise ValueError("give one of --target-bytes and --target-gib")
    if args.target_bytes is not None:
        return {"target_bytes": args.target_bytes}
    return None if args.target_gib is None else {"target_gib": args.target_gib}


def _cmd_compress(args: argparse.Namespace) -> None:
    if args.method == "reap":
        return _cmd_prune(args)
    budget = _budget(args)
    if budget is not None:
        return _cmd_compress_to_budget(args, budget)
    from ..pipeline import compress

    distill = None
    if args.distill:
        distill = _distill_config(args, "distill-", args.device.split(",")[0])  # the first of a device list
    report = compress(
        args.model,
        args.output,
        _mobe_config(args),
        reconstruct=args.reconstruct,
        work_dir=args.work_dir,
        ray=True if args.ray == "" else (args.ray or False),
        progress=not args.quiet,
        distill=distill,
        distill_text=args.distill,
        quantize=_quantize_config(args),
        force=args.force,
    )
    print(report.table())
    if report.distill is not None:
        print(report.distill.table())
    print(f"wrote {args.output} ({report.format}); report: {args.output}/mobe_report.json")


def _cmd_compress_to_budget(args: argparse.Namespace, budget: dict[str, float]) -> None:
    """--target-bytes: measure every candidate recipe on a sample layer, write the best that fits."""
    from ..plan import execute_plan, plan_budget

    if args.target_ratio is not None or args.quantize is not None or args.reconstruct:
        raise ValueError("--target-bytes chooses the cut and the bits itself: leave out --target-ratio and --quantize")
    config = _mobe_config(args)
    if config.calibration is not None:  # measured on the text: REAP shares and GPTQ bits of every layer and matrix
        from ..plan.mixed import execute_mixed, plan_mixed, score_choices, scores_table

        quantize = QuantizeConfig(
            calibration_tokens=config.calibration_tokens, calibration_seq_len=config.calibration_seq_len
        )
        mixed = plan_mixed(
            args.model, **budget, calibration=config.calibration, quantize=quantize, progress=not args.quiet
        )
        print(mixed.table())
        scored = score_choices(mixed, args.model, quantize, progress=not args.quiet)  # the proxy ranks shares poorly
        print(scores_table(scored))
        raised = math.exp(scored[0].loss - scored[0].original_loss) if scored else 1.0  # calibration perplexity
        if raised > 1 + LOSSY:
            print(
                f"warning: the best plan within the budget raises the calibration perplexity {raised:.1f}x; "
                "a larger --target-bytes keeps far more",
                file=sys.stderr,
            )
        choice = scored[0].choice if scored else None
        chosen = execute_mixed(mixed, args.model, args.output, quantize, choice=choice, progress=not args.quiet)
        print(f"wrote {args.output}: {chosen.label()}")
        return
    device = args.device.split(",")[0]
    plan = plan_budget(args.model, **budget, device="cpu" if device == "auto" else device)
    print(plan.table())
    recipe = execute_plan(plan, args.model, args.output, config, progress=not args.quiet)
    print(f"wrote {args.output}: {recipe.label()}")


def _cmd_distill(args: argparse.Namespace) -> None:
    from ..distill import distill

    report = distill(
        args.original,
        args.compressed,
        args.output,
        args.text,
        _distill_config(args, device=args.device),
        work_dir=args.work_dir,
        progress=not args.quiet,
    )
    print(report.table())
    print(f"wrote {args.output}; report: {args.output}/mobe_distill.json, plot: {args.output}/mobe_distill.png")


def _add_budget_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--target-bytes",
        type=float,
        metavar="F",
        default=None,
        help="a byte budget, as a share of the original checkpoint's stored bytes: measure every recipe (the original "
        "or MoBE at a cut, at 16/8/4/3/2 bits) on a sample layer and write the best that fits; with --calibration, "
        "choose the REAP share and the GPTQ bits of every layer's gate, up and down by their error on the text",
    )
    p.add_argument("--target-gib", type=float, metavar="G", default=None, help="the byte budget in GiB")


# --- --method reap: expert pruning (a stage of its own: the output is a smaller model, not factors) ---------------
def _add_reap_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--reap-budget",
        choices=("layer", "global"),
        default="layer",
        help="--method reap: remove --target-ratio of the experts of every layer, or the lowest scores of the whole "
        "model (which must come out as the same count per layer)",
    )


def _cmd_prune(args: argparse.Namespace) -> None:
    from ..prune import prune_experts

    if args.target_ratio is None:
        raise ValueError("--method reap needs --target-ratio (the share of routed experts to remove)")
    if args.calibration is None:
        raise ValueError("--method reap needs --calibration FILE: experts are scored on the tokens routed to them")
    if args.layers is not None or args.reconstruct:
        raise ValueError(
            "--method reap prunes every MoE layer alike and writes a plain checkpoint: drop --layers, --reconstruct"
        )
    report = prune_experts(
        args.model,
        args.output,
        target_ratio=args.target_ratio,
        calibration=args.calibration,
        budget=args.reap_budget,
        calibration_tokens=args.calibration_tokens,
        calibration_seq_len=args.calibration_seq_len,
        quantize=_quantize_config(args),
        progress=not args.quiet,
    )
    print(report.table())
    print(
        f"wrote {args.output} (pruned, {report.layers[0].experts_before} -> {len(report.layers[0].kept)} experts "
        f"per layer); report: {args.output}/mobe_report.json"
    )


def _cmd_quantize(args: argparse.Namespace) -> None:
    from ..quantize import quantize_checkpoint

    config = config_from_args(QuantizeConfig, args)
    report = quantize_checkpoint(args.model, args.output, config, progress=not args.quiet)
    print(report.table())
    print(f"wrote {args.output} ({report.kind}); report: {args.output}/mobe_quantize.json")


def _cmd_reconstruct(args: argparse.Namespace) -> None:
    from ..pipeline import reconstruct

    reconstruct(args.native, args.output, progress=not args.quiet)
    print(f"wrote dense checkpoint {args.output}")


def _cmd_info(args: argparse.Namespace) -> None:
    from ..devices import resolve_device
    from ..estimate import memory_estimate
    from ..info import families_table, model_info

    if args.list:
        print(families_table())
        return
    if args.model is None:
        raise ValueError("mobe info needs a checkpoint folder or hub id (or --list)")
    device = resolve_device(args.device)  # checked before anything is read
    budget = _budget(args)
    if budget is not None and args.calibration is not None:  # measured on the text, nothing written
        from ..config import QuantizeConfig
        from ..plan.mixed import plan_mixed

        quantize = QuantizeConfig(calibration_tokens=args.calibration_tokens)
        print(plan_mixed(args.model, **budget, calibration=args.calibration, quantize=quantize).table())
        return
    if budget is not None:  # the plan and its measured candidates, nothing written
        from ..plan import plan_budget

        print(plan_budget(args.model, **budget, device=str(device)).table())
        return
    matrices = tuple(m for m in args.matrices.split(",") if m)
    info = model_info(args.model, args.num_bases, args.rank, args.groups, matrices, args.target_ratio, args.schedule)
    print(info.summary())
    if info.stored is None and info.quantization is None:  # an original: what compressing and running it would take
        estimate = memory_estimate(
            args.model,
            info.num_bases
            or MobeConfig(num_bases=args.num_bases or 0, groups=args.groups).bases_for(info.layout.num_experts),
            info.rank or args.rank,
            args.groups,
            matrices,
            args.calibration_tokens,
            "cpu" if device.type == "cpu" else "cuda",
            args.context,
            args.cache_mib,
            schedule=args.schedule,
        )
        print(estimate.summary())
    if info.num_bases is not None and info.stored is None and info.quantization is None:
        from ..estimate import estimate_compress_time

        timing = estimate_compress_time(
            info.layout,
            info.num_bases,
            info.rank,
            args.schedule,
            args.steps,
            matrices,
            device=device,
            basis_side=info.basis_side,
        )
        print(timing.summary())


def _load(args: argparse.Namespace):
    from pathlib import Path

    from transformers import AutoTokenizer

    from ..checkpoint import resolve_checkpoint
    from ..devices import resolve_device
    from ..runtime import load_model

    device = resolve_device(args.device)  # before anything is read
    path = resolve_checkpoint(args.model)
    dtype = None if args.dtype == "auto" else args.dtype
    model = load_model(
        path, workspace_experts=args.workspace_experts, cache_mib=args.cache_mib, device=device, dtype=dtype
    )
    tokenizer = AutoTokenizer.from_pretrained(path) if (Path(path) / "tokenizer_config.json").exists() else None
    return model, tokenizer


def _cmd_generate(args: argparse.Namespace) -> None:
    import torch

    model, tokenizer = _load(args)
    if tokenizer is not None:
        ids = tokenizer(args.prompt, return_tensors="pt").input_ids
    else:  # no tokenizer shipped: the prompt is token ids
        ids = torch.tensor([[int(t) for t in args.prompt.split()]])
    ids = ids.to(model.device)
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=args.max_new_tokens, do_sample=False)
    new = out[0, ids.shape[1] :]
    print(
        args.prompt + tokenizer.decode(new, skip_special_tokens=True) if tokenizer else " ".join(map(str, new.tolist()))
    )


def _cmd_perplexity(args: argparse.Namespace) -> None:
    import json
    from pathlib import Path

    from ..evaluate.perplexity import sliding_window_perplexity

    model, tokenizer = _load(args)
    if tokenizer is None:
        raise ValueError(f"{args.model} has no tokenizer (tokenizer_config.json): cannot tokenize {args.text}")
    ids = tokenizer(Path(args.text).read_text(), return_tensors="pt").input_ids[0].to(model.device)
    if args.max_tokens:
        ids = ids[: args.max_tokens]
    result = sliding_window_perplexity(model, ids, context=args.context, stride=args.stride, progress=not args.quiet)
    data = {"model": str(args.model), "text": str(args.text), **result.to_dict()}
    data["dtype"] = str(next(model.parameters()).dtype).removeprefix("torch.")
    print(
        f"perplexity {result.perplexity:.4f} over {result.tokens} tokens "
        f"(context {args.context}, stride {args.stride}, {data['dtype']})"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(data, indent=2) + "\n")


def _add_runtime_options(p: argparse.ArgumentParser, dtype: str = "auto") -> None:
    p.add_argument("model", help="original, native MoBE or reconstructed checkpoint (folder or hub id)")
    p.add_argument("--workspace-experts", type=int, default=16, help="experts materialised at once in a forward")
    p.add_argument("--cache-mib", type=float, default=0.0, help="LRU cache of mixed bases per layer, for decoding")
    p.add_argument("--device", default="auto", help="auto (CUDA when present, else CPU), cpu, cuda, cuda:N or mps")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars or loading reports")
    p.add_argument(
        "--dtype",
        default=dtype,
        choices=("auto", "float32", "bfloat16", "float16"),
        help="parameter dtype to run in (auto: the checkpoint's)",
    )


def _cmd_sweep(args: argparse.Namespace) -> None:
    import json
    from dataclasses import asdict

    from ..devices import resolve_device
    from ..evaluate.sweep import plot_sweep, sweep, sweep_table

    points = sweep(
        args.model,
        layer=args.layer,
        matrices=tuple(m for m in args.matrices.split(",") if m),
        methods=tuple(m for m in args.methods.split(",") if m),
        ratios=args.ratios,
        steps=args.steps,
        device=str(resolve_device(args.device)),
        progress=not args.quiet,
    )
    print(sweep_table(points))
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(pt) for pt in points], indent=2) + "\n")
    if args.plot:
        plot_sweep(points, args.plot, title=f"layer {args.layer if args.layer is not None else 'first MoE'}")
        print(f"wrote {args.plot}")


# --- mobe eval: lm-eval benchmarks on any checkpoint mobe opens ---------------------------------------------------
def _cmd_eval(args: argparse.Namespace) -> None:
    from ..evaluate.harness import evaluate_tasks, results_json, results_table

    if args.limit is not None and args.limit <= 0:
        raise ValueError(f"--limit must be positive, got {args.limit}")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {args.batch_size}")
    model, tokenizer = _load(args)
    if tokenizer is None:
        raise ValueError(f"{args.model} has no tokenizer (tokenizer_config.json): lm-eval needs one")
    tasks = [t for t in args.tasks.split(",") if t]
    limit = int(args.limit) if args.limit is not None and args.limit >= 1 else args.limit
    results = evaluate_tasks(
        model, tokenizer, tasks, limit=limit, batch_size=args.batch_size, num_fewshot=args.num_fewshot
    )
    print(results_table(results))
    if args.json:
        dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
        extra = {"model": str(args.model), "tasks": tasks, "limit": limit, "dtype": dtype}
        Path(args.json).write_text(results_json(results, **extra))
        print(f"wrote {args.json}")


def _add_eval_command(sub) -> None:
    p = _command(sub, "eval", "lm-eval benchmarks (accuracy) of any checkpoint, native MoBE included")
    _add_runtime_options(p, dtype="float32")  # evaluation in float32 unless asked otherwise
    p.add_argument(
        "--tasks",
        required=True,
        help="comma-separated lm-eval task names and/or task YAML files, e.g. hellaswag,arc_easy",
    )
    p.add_argument("--limit", type=float, default=None, help="examples per task (a fraction of each task when < 1)")
    p.add_argument("--batch-size", type=int, default=1, help="requests per forward pass")
    p.add_argument("--num-fewshot", type=int, default=None, help="few-shot examples (default: each task's own)")
    p.add_argument("--json", default=None, help="write the metrics and task settings here as JSON")
    p.set_defaults(func=_cmd_eval)


def _cmd_demo(args: argparse.Namespace) -> None:
    from ..demo import run_demo

    run_demo(args.workdir, steps=args.steps, target_ratio=args.target_ratio)


def _command(sub, name: str, help: str) -> argparse.ArgumentParser:
    """A subcommand whose --help shows every option's default."""
    return sub.add_parser(name, formatter_class=argparse.ArgumentDefaultsHelpFormatter, help=help)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mobe", description=__doc__)
    parser.add_argument("--version", action="version", version=f"mobe {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = parser.add_subparsers(dest="command", required=True)

    p = _command(sub, "compress", "compress an MoE checkpoint with MoBE")
    p.add_argument("model", help="checkpoint folder or Hugging Face hub id")
    p.add_argument("-o", "--output", required=True, help="new output folder")
    p.add_argument("--reconstruct", action="store_true", help="write dense experts rebuilt from the factors")
    p.add_argument("--work-dir", default=None, help="folder for finished jobs (default OUTPUT.mobe-work)")
    p.add_argument(
        "--ray",
        nargs="?",
        const="",
        default=None,
        metavar="ADDRESS",
        help="run each (layer, matrix) job as a Ray task on the cluster at ADDRESS (without one: RAY_ADDRESS, a "
        "cluster running on this machine, or a new local one); needs pip install 'mobe[ray]' and storage every "
        "node sees",
    )
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    p.add_argument(
        "--force", action="store_true", help="run even where the memory estimate exceeds what the device has free"
    )
    _add_mobe_options(p)
    _add_budget_options(p)
    p.add_argument(
        "--distill",
        metavar="FILE",
        default=None,
        help="then distil the result toward the original on this text (the --distill-* options; see mobe distill)",
    )
    add_config_options(
        p.add_argument_group("distillation (--distill)"), DistillConfig, prefix="distill-", exclude=("device",)
    )
    _add_reap_options(p)
    p.add_argument(
        "--quantize",
        choices=[f"int{b}" for b in QUANTIZE_BITS],
        default=None,
        help="then quantise the output's weights (weight-only, symmetric, group-wise; see mobe quantize)",
    )
    add_config_options(
        p.add_argument_group("quantisation (--quantize)"),
        QuantizeConfig,
        prefix="quantize-",
        exclude=COMPRESS_QUANTIZE_EXCLUDED,
    )
    p.set_defaults(func=_cmd_compress)

    p = _command(
        sub,
        "quantize",
        "weight-only int8/4/3/2 quantisation of any checkpoint (original, pruned, dense, native); GPTQ with "
        "--calibration",
    )
    p.add_argument("model", help="checkpoint folder or Hugging Face hub id")
    p.add_argument("-o", "--output", required=True, help="new output folder")
    add_config_options(p, QuantizeConfig)
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_quantize)

    p = _command(sub, "distill", "train a compressed model's routers (and small factors) toward the original")
    p.add_argument("original", help="the uncompressed checkpoint (folder or hub id): the teacher")
    p.add_argument("compressed", help="its compression by mobe, native or dense: the student")
    p.add_argument("-o", "--output", required=True, help="new output folder (or the compressed folder itself)")
    p.add_argument("--text", required=True, help="UTF-8 text to distil on; its last tenth chooses the best state")
    add_config_options(p, DistillConfig, exclude=("device",))
    p.add_argument("--device", default="auto", help="auto (CUDA when present, else CPU), cpu, cuda, cuda:N or mps")
    p.add_argument("--work-dir", default=None, help="keep the teacher's targets here for further runs")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_distill)

    p = _command(sub, "reconstruct", "rebuild dense experts from a native MoBE checkpoint")
    p.add_argument("native", help="native MoBE checkpoint folder")
    p.add_argument("-o", "--output", required=True, help="new output folder")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_reconstruct)

    p = _command(sub, "info", "architecture, parameters and the saving of given settings (no weights read)")
    p.add_argument("model", nargs="?", default=None, help="checkpoint folder or Hugging Face hub id")
    p.add_argument("--list", action="store_true", help="list the supported MoE families and their on-disk layouts")
    p.add_argument(
        "--bases", "-m", dest="num_bases", type=int, default=None, help="m: bases per layer to cost (0 = E/4)"
    )
    p.add_argument("--rank", "-r", type=int, default=None, help="r: rank to cost (default min(p, d))")
    p.add_argument(
        "--target-ratio",
        type=float,
        default=None,
        help="cost the default recipe at this expert-parameter reduction (sets r, and m = E/4 unless --bases)",
    )
    p.add_argument("--groups", type=int, default=1, help="expert groups with their own bases")
    p.add_argument("--matrices", default=",".join(MobeConfig().matrices), help="matrix types to cost (memory)")
    p.add_argument(
        "--calibration-tokens", type=int, default=MobeConfig().calibration_tokens, help="calibration tokens to cost"
    )
    p.add_argument("--context", type=int, default=4096, help="tokens of KV cache to cost for native inference")
    p.add_argument("--cache-mib", type=float, default=0.0, help="per-layer LRU cache of native inference, MiB")
    p.add_argument(
        "--schedule", choices=SCHEDULES, default=MobeConfig().schedule, help="schedule whose compress time to estimate"
    )
    p.add_argument("--steps", type=int, default=None, help="steps per job (default: the schedule's own)")
    p.add_argument(
        "--device",
        default="auto",
        help="device of the estimates: where a job's memory is costed, and whose step time is measured",
    )
    _add_budget_options(p)
    p.add_argument(
        "--calibration",
        metavar="FILE",
        default=None,
        help="with --target-bytes: measure the plan on this text (REAP share and GPTQ bits per layer and matrix)",
    )
    p.set_defaults(func=_cmd_info)

    p = _command(sub, "generate", "greedy generation from any checkpoint, native MoBE included")
    _add_runtime_options(p)
    p.add_argument("prompt", help="text, or space-separated token ids when the checkpoint has no tokenizer")
    p.add_argument("--max-new-tokens", type=int, default=32, help="tokens to generate (greedy)")
    p.set_defaults(func=_cmd_generate)

    p = _command(sub, "perplexity", "sliding-window perplexity of any checkpoint on a text file")
    _add_runtime_options(p, dtype="float32")  # evaluation in float32 unless asked otherwise
    p.add_argument("--text", required=True, help="UTF-8 text file")
    p.add_argument("--context", type=int, default=512, help="tokens each window sees")
    p.add_argument("--stride", type=int, default=256, help="tokens scored per window (after the first)")
    p.add_argument("--max-tokens", type=int, default=0, help="score only the first N tokens (0 = all)")
    p.add_argument("--json", default=None, help="write the result here as JSON")
    p.set_defaults(func=_cmd_perplexity)

    _add_eval_command(sub)

    p = _command(
        sub, "sweep", "fit one layer with every method at several cuts: the error-vs-size frontier, in minutes"
    )
    p.add_argument("model", help="checkpoint folder or Hugging Face hub id")
    p.add_argument("--layer", type=int, default=None, help="MoE layer to fit (default: the first)")
    p.add_argument("--matrices", default="gate,up,down", help="matrix types to fit")
    p.add_argument("--methods", default="svd,d2moe,molae,mobe,slbf", help="methods to compare")
    p.add_argument("--ratios", type=float, nargs="+", default=[0.25, 0.37, 0.5], help="cuts of each matrix")
    p.add_argument("--steps", type=int, default=300, help="steps of the iterative methods (few: a preview)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    p.add_argument("--json", default=None, help="write the points here as JSON")
    p.add_argument("--plot", default=None, help="write the frontier here as a PNG")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_sweep)

    p = _command(sub, "demo", "build a small MoE, compress, reconstruct, load and generate")
    p.add_argument("--workdir", default="demo_output", help="folder for the demo's checkpoints")
    p.add_argument("--steps", type=int, default=300, help="optimisation steps per fit")
    p.add_argument("--target-ratio", type=float, default=0.3, help="expert-parameter reduction")
    p.set_defaults(func=_cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(name)s: %(message)s")
    if getattr(args, "quiet", False):
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    try:
        args.func(args)
    except (ValueError, OSError, ImportError) as exc:  # our errors are ValueErrors with one clear line
        print(f"mobe: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mobe: interrupted; finished layers are kept, run the same command again to resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
