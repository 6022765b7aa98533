"""Write tests/data/gptq_reference/: one expert matrix, its Hessian, and llm-compressor's GPTQ of it.

The matrix is down_proj of expert EXPERT in layer LAYER of fixtures/qwen3-moe-trained (128 x 256: two GPTQ blocks of
128 columns); its Hessian is the Gram of that expert's intermediate activations on the first TOKENS tokens of the
fixture's heldout.txt, routed as the model routes them (`mobe.calibrate.collect_statistics`). llm-compressor 0.14
(its own virtual environment, benchmarks/gptq_baselines.py `ensure_venv`) rounds it with its weight observer and
`quantize_weight` at its defaults (static act-order, dampening 0.01, block 128), through
benchmarks/llmcompressor_gptq.py `layer`. tests/quantize/test_gptq_reference.py compares mobe's GPTQ with it.

    python scripts/make_gptq_reference.py [--venv ~/.cache/mobe/venv-llmcompressor]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parent.parent
FIXTURE = ROOT / "fixtures" / "qwen3-moe-trained"
OUT = ROOT / "tests" / "data" / "gptq_reference" / "qwen3-moe-trained-down.safetensors"
LAYER, EXPERT, TOKENS, GROUP, BITS = 1, 3, 4096, 128, (4, 3, 2)


def main() -> None:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from gptq_baselines import VENV, ensure_venv
    from mobe.architectures import moe_layout
    from mobe.calibrate import calibration_ids, collect_statistics
    from mobe.checkpoint import CheckpointReader

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--venv", type=Path, default=VENV)
    args = parser.parse_args()
    python = ensure_venv(args.venv)
    reader = CheckpointReader(FIXTURE)
    layout = moe_layout(reader.config)
    sequences = calibration_ids(FIXTURE, FIXTURE / "heldout.txt", TOKENS, 256)
    _, stats = next(collect_statistics(reader, layout, sequences, [LAYER]))
    weight = layout.read_experts(reader, LAYER, "down")[EXPERT]
    hessian = stats.factor("down").gram([EXPERT])[0].float()
    metadata = {
        "fixture": FIXTURE.name,
        "tensor": layout.arch.tensor_name(LAYER, EXPERT, "down"),
        "hessian": f"Gram of the expert's routed intermediate activations, first {TOKENS} tokens of heldout.txt",
        "routed_tokens": str(int(stats.counts[EXPERT])),
        "made_by": "python scripts/make_gptq_reference.py",
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "in.safetensors"
        save_file({"weight": weight.contiguous(), "hessian": hessian.contiguous()}, source, metadata)
        script = ROOT / "benchmarks" / "llmcompressor_gptq.py"
        cmd = [str(python), str(script), "layer", str(source), str(OUT), "--group-size", str(GROUP), "--bits"]
        subprocess.run([*cmd, *map(str, BITS)], check=True)
    from safetensors import safe_open

    with safe_open(OUT, "pt") as f:  # llm-compressor's side wrote its own metadata: add where the inputs came from
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = {**metadata, **(f.metadata() or {})}
    save_file(tensors, OUT, meta)
    print(f"wrote {OUT} ({OUT.stat().st_size} bytes): {meta}")


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
