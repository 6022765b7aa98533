"""`mobe` command line: a thin layer over the Python API."""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import fields
from pathlib import Path

from ..config import ACTIVATIONS, SCHEDULES, MobeConfig
from ..devices import resolve_device
from ..factorize import method_names


def _int_list(text: str) -> tuple[int, ...]:
    """'1,3-5' -> (1, 3, 4, 5)."""
    out: list[int] = []
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        out.extend(range(int(lo), int(hi or lo) + 1))
    return tuple(out)


def _add_mobe_options(p: argparse.ArgumentParser) -> None:
    helps = {f.name: f.metadata.get("help", "") for f in fields(MobeConfig)}
    default = MobeConfig()
    p.add_argument("--method", choices=method_names(), default=default.method, help=helps["method"])
    p.add_argument("--bases", "-m", dest="num_bases", type=int, default=default.num_bases, help=helps["num_bases"])
    p.add_argument("--target-ratio", type=float, default=None, help=helps["target_ratio"])
    p.add_argument("--rank", "-r", type=int, default=None, help=helps["rank"])
    p.add_argument("--activation", choices=ACTIVATIONS, default=default.activation, help=helps["activation"])
    p.add_argument("--groups", type=int, default=default.groups, help=helps["groups"])
    p.add_argument("--schedule", choices=SCHEDULES, default=default.schedule, help=helps["schedule"])
    p.add_argument("--steps", type=int, default=None, help=helps["steps"])
    p.add_argument("--lr", type=float, default=default.lr, help=helps["lr"])
    p.add_argument("--eval-every", type=int, default=default.eval_every, help=helps["eval_every"])
    p.add_argument("--stop-tol", type=float, default=default.stop_tol, help=helps["stop_tol"])
    p.add_argument("--batch-experts", type=int, default=default.batch_experts, help=helps["batch_experts"])
    p.add_argument("--init-logit", type=float, default=default.init_logit, help=helps["init_logit"])
    p.add_argument("--matrices", default="gate,up", help="comma-separated subset of gate,up,down")
    p.add_argument("--layers", type=_int_list, default=None, help="MoE layers to compress, e.g. 1,3-5 (default all)")
    p.add_argument("--device", default=default.device, help=helps["device"])
    p.add_argument("--threads", type=int, default=default.threads, help=helps["threads"])
    p.add_argument("--dtype", default=default.dtype, help=helps["dtype"])
    p.add_argument("--seed", type=int, default=default.seed, help=helps["seed"])
    p.add_argument("--calibration", metavar="FILE", default=None, help=helps["calibration"])
    p.add_argument(
        "--calibration-tokens", type=int, default=default.calibration_tokens, help=helps["calibration_tokens"]
    )
    p.add_argument(
        "--calibration-seq-len", type=int, default=default.calibration_seq_len, help=helps["calibration_seq_len"]
    )
    p.add_argument(
        "--calibration-damping", type=float, default=default.calibration_damping, help=helps["calibration_damping"]
    )
    p.add_argument(
        "--calibration-refine-steps",
        type=int,
        default=default.calibration_refine_steps,
        help=helps["calibration_refine_steps"],
    )
    p.add_argument(
        "--calibration-refine-lr",
        type=float,
        default=default.calibration_refine_lr,
        help=helps["calibration_refine_lr"],
    )


def _config_from_args(args: argparse.Namespace) -> MobeConfig:
    return MobeConfig(
        method=args.method,
        target_ratio=args.target_ratio,
        num_bases=args.num_bases,
        rank=args.rank,
        activation=args.activation,
        groups=args.groups,
        schedule=args.schedule,
        steps=args.steps,
        lr=args.lr,
        eval_every=args.eval_every,
        stop_tol=args.stop_tol,
        batch_experts=args.batch_experts,
        init_logit=args.init_logit,
        matrices=tuple(m for m in args.matrices.split(",") if m),
        layers=args.layers,
        device=args.device,
        threads=args.threads,
        dtype=args.dtype,
        seed=args.seed,
        calibration=args.calibration,
        calibration_tokens=args.calibration_tokens,
        calibration_seq_len=args.calibration_seq_len,
        calibration_damping=args.calibration_damping,
        calibration_refine_steps=args.calibration_refine_steps,
        calibration_refine_lr=args.calibration_refine_lr,
    )


def _cmd_compress(args: argparse.Namespace) -> None:
    from ..pipeline import compress

    report = compress(
        args.model,
        args.output,
        _config_from_args(args),
        reconstruct=args.reconstruct,
        work_dir=args.work_dir,
        ray=True if args.ray == "" else (args.ray or False),
        progress=not args.quiet,
    )
    print(report.table())
    print(f"wrote {args.output} ({report.format}); report: {args.output}/mobe_report.json")


def _cmd_reconstruct(args: argparse.Namespace) -> None:
    from ..pipeline import reconstruct

    reconstruct(args.native, args.output, progress=not args.quiet)
    print(f"wrote dense checkpoint {args.output}")


def _cmd_info(args: argparse.Namespace) -> None:
    from ..info import model_info

    info = model_info(args.model, args.num_bases, args.rank, args.groups)
    print(info.summary())
    if args.num_bases is not None and info.stored is None:
        from ..estimate import estimate_compress_time

        device = resolve_device(args.device)
        estimate = estimate_compress_time(
            info.layout, args.num_bases, args.rank, args.schedule, args.steps, device=device
        )
        print(estimate.summary())


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


def _cmd_demo(args: argparse.Namespace) -> None:
    from ..demo import run_demo

    run_demo(args.workdir, steps=args.steps, target_ratio=args.target_ratio)


def _command(sub, name: str, help: str) -> argparse.ArgumentParser:
    """A subcommand whose --help shows every option's default."""
    return sub.add_parser(name, formatter_class=argparse.ArgumentDefaultsHelpFormatter, help=help)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mobe", description=__doc__)
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
    _add_mobe_options(p)
    p.set_defaults(func=_cmd_compress)

    p = _command(sub, "reconstruct", "rebuild dense experts from a native MoBE checkpoint")
    p.add_argument("native", help="native MoBE checkpoint folder")
    p.add_argument("-o", "--output", required=True, help="new output folder")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_reconstruct)

    p = _command(sub, "info", "architecture, parameters and the saving of given settings (no weights read)")
    p.add_argument("model", help="checkpoint folder or Hugging Face hub id")
    p.add_argument("--bases", "-m", dest="num_bases", type=int, default=None, help="m: bases per layer to cost")
    p.add_argument("--rank", "-r", type=int, default=None, help="r: rank to cost (default min(p, d))")
    p.add_argument("--groups", type=int, default=1, help="expert groups with their own bases")
    p.add_argument(
        "--schedule", choices=SCHEDULES, default=MobeConfig().schedule, help="schedule whose compress time to estimate"
    )
    p.add_argument("--steps", type=int, default=None, help="steps per job (default: the schedule's own)")
    p.add_argument("--device", default="auto", help="device whose step time is measured: auto, cpu, cuda, cuda:N, mps")
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
