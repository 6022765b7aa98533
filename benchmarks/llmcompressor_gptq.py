"""llm-compressor's own GPTQ, run inside its own virtual environment (never imported by mobe or its tests).

llm-compressor 0.14 pins transformers <= 5.17 and compressed-tensors 0.19, which clash with mobe's environment, so
benchmarks/gptq_baselines.py builds a separate venv for it (`--venv`; see `ensure_venv` there) and runs this file
with that venv's python. It imports only llm-compressor, transformers, torch and safetensors.

Two modes:

    python llmcompressor_gptq.py checkpoint MODEL OUT --ids IDS.json --bits 4 --group-size 128
        `oneshot` with a GPTQModifier (symmetric int, group-wise, the library's defaults otherwise: static
        act-order, dampening 0.01, block 128, every expert calibrated on every token) on the routed experts'
        Linear modules only (lm_head, routers, attention and shared experts stay in 16 bits), calibrated on the
        token sequences in IDS.json; writes the compressed-tensors checkpoint to OUT.

    python llmcompressor_gptq.py layer IN.safetensors OUT.safetensors --bits 4 2 --group-size 128 [--actorder static]
        One weight matrix `weight` (rows, cols) and its Hessian `hessian` (cols, cols) from IN; the library's
        weight observer (memoryless min-max) and its `quantize_weight` (the maths GPTQModifier calls), with the
        modifier's defaults; writes IN's tensors plus, per bit width B, `qB` (int8 values), `scaleB` and
        `dequantizedB` (bf16, as the module keeps it).
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch

EXPERTS = r"re:.*mlp\.experts\.\d+\.(gate_proj|up_proj|down_proj)$"  # routed experts, once linearised


def quant_args(bits: int, group_size: int, actorder: str | None):
    from compressed_tensors.quantization import QuantizationArgs

    return QuantizationArgs(
        num_bits=bits, type="int", symmetric=True, strategy="group", group_size=group_size, actorder=actorder
    )


def checkpoint(args: argparse.Namespace) -> None:
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modeling.moe.linearize import linearize_moe
    from llmcompressor.modifiers.gptq import GPTQModifier
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(args.threads)
    sequences = json.loads(Path(args.ids).read_text())
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype="auto")
    linearize_moe(model)  # per-expert Linear modules (what load_quantizable_moe does after loading)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    dataset = Dataset.from_dict({"input_ids": sequences, "attention_mask": [[1] * len(s) for s in sequences]})
    scheme = {"targets": [EXPERTS], "weights": quant_args(args.bits, args.group_size, None).model_dump()}
    recipe = GPTQModifier(config_groups={"group_0": scheme}, ignore=["lm_head"])
    oneshot(
        model=model,
        dataset=dataset,
        recipe=recipe,
        num_calibration_samples=len(sequences),
        max_seq_length=max(len(s) for s in sequences),
        shuffle_calibration_samples=False,
        moe_calibrate_all_experts=not args.routed_only,
    )
    model.save_pretrained(args.out, save_compressed=True)
    tokenizer.save_pretrained(args.out)
    for name in ("generation_config.json",):
        if (Path(args.model) / name).exists():
            shutil.copy(Path(args.model) / name, Path(args.out) / name)
    print(json.dumps({"seconds": time.perf_counter() - start}))


def layer(args: argparse.Namespace) -> None:
    from importlib.metadata import version

    from llmcompressor.modifiers.gptq.gptq_quantize import quantize_weight
    from llmcompressor.observers import Observer
    from safetensors.torch import load_file, save_file

    tensors = load_file(args.input)
    weight, hessian = tensors["weight"], tensors["hessian"]
    metadata = {
        "rounded_by": "benchmarks/llmcompressor_gptq.py layer",
        "llmcompressor": version("llmcompressor"),
        "compressed_tensors": version("compressed-tensors"),
        "torch": torch.__version__,
        "group_size": str(args.group_size),
        "actorder": str(args.actorder),
    }
    out = dict(tensors)
    for bits in args.bits:
        qargs = quant_args(bits, args.group_size, args.actorder)
        observer = Observer.load_from_registry("memoryless_minmax", base_name="weight", args=qargs)
        observer(weight)
        qparams = observer.get_qparams()
        scale, zero_point = qparams["scale"], qparams["zero_point"]
        # as GPTQModifier's prepare_batch: float32 working weights, the observer's scales stacked; the Hessian's
        # scale does not matter (the damping is relative to its mean diagonal)
        result, _, fallback = quantize_weight(
            weights=weight[None].float(),
            hessians=hessian[None].float().clone(),  # factorised in place
            scale=scale[None],
            zero_point=zero_point[None],
            global_scale=None,
            quant_args=qargs,
        )
        dequantized = result[0].to(weight.dtype)  # update_batch_qparams: cast to the module's dtype
        q = torch.round(dequantized.float() / scale.float().repeat_interleave(args.group_size, dim=-1))
        out |= {f"q{bits}": q.to(torch.int8), f"scale{bits}": scale, f"dequantized{bits}": dequantized}
        metadata[f"rtn_fallback{bits}"] = str(bool(fallback[0]))
    save_file({k: v.contiguous() for k, v in out.items()}, args.output, metadata)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="mode", required=True)
    p = sub.add_parser("checkpoint")
    p.add_argument("model")
    p.add_argument("out")
    p.add_argument("--ids", required=True, help="JSON list of token-id lists (the calibration sequences)")
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument(
        "--routed-only",
        action="store_true",
        help="each expert calibrated on its routed tokens only (moe_calibrate_all_experts=False), as mobe does",
    )
    p.set_defaults(func=checkpoint)
    p = sub.add_parser("layer")
    p.add_argument("input")
    p.add_argument("output")
    p.add_argument("--bits", type=int, nargs="+", default=[4])
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--actorder", default="static", help="static | weight | none")
    p.set_defaults(func=layer)
    args = parser.parse_args()
    if getattr(args, "actorder", None) == "none":
        args.actorder = None
    args.func(args)


if __name__ == "__main__":
    main()
