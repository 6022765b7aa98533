"""Peak RAM of `mobe compress` must scale with one MoE layer, not with the model.

Builds two checkpoints with identical layers (2 and 8 MoE layers), compresses each in a fresh process
and compares peak RSS. Prints a table and writes JSON.

    python benchmarks/compress_memory.py [--hidden 512 --experts 32 --intermediate 256 --steps 20]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _child_build(args: argparse.Namespace, layers: int, path: str) -> None:
    from mobe.fixtures import build_tiny_moe

    build_tiny_moe(
        path,
        "qwen3_moe",
        hidden_size=args.hidden,
        moe_intermediate_size=args.intermediate,
        num_experts=args.experts,
        num_layers=layers,
        vocab_size=1024,
        max_shard_size="64MB",
    )


def _child_compress(args: argparse.Namespace, src: str, out: str, reconstruct: bool) -> None:
    from mobe import MobeConfig, compress

    start = time.perf_counter()
    compress(
        src,
        out,
        MobeConfig(num_bases=args.bases, rank=args.intermediate // 2, steps=args.steps),
        reconstruct=reconstruct,
        progress=False,
    )
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"peak_rss_mib": peak_mib, "seconds": time.perf_counter() - start}))


def _run(argv: list[str]) -> dict:
    out = subprocess.run([sys.executable, __file__, *argv], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1]) if out.stdout.strip() else {}


def _dir_mib(path: Path) -> float:
    return sum(p.stat().st_size for p in path.iterdir()) / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--experts", type=int, default=32)
    parser.add_argument("--intermediate", type=int, default=256)
    parser.add_argument("--bases", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--layers", type=int, nargs=2, default=[2, 8])
    parser.add_argument("--json", default=str(HERE / "results" / "compress_memory.json"))
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, *rest = args.child
        if kind == "build":
            _child_build(args, int(rest[0]), rest[1])
        else:
            _child_compress(args, rest[0], rest[1], kind == "dense")
        return

    sizes = [
        "--hidden",
        str(args.hidden),
        "--experts",
        str(args.experts),
        "--intermediate",
        str(args.intermediate),
        "--bases",
        str(args.bases),
        "--steps",
        str(args.steps),
    ]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for layers in args.layers:
            src = Path(tmp) / f"src{layers}"
            _run([*sizes, "--child", "build", str(layers), str(src)])
            for fmt in ("native", "dense"):
                out = Path(tmp) / f"out{layers}-{fmt}"
                result = _run([*sizes, "--child", fmt, str(src), str(out)])
                rows.append(
                    {
                        "layers": layers,
                        "format": fmt,
                        "checkpoint_mib": _dir_mib(src),
                        "layer_experts_mib": 3 * args.experts * args.intermediate * args.hidden * 4 / 2**20,
                        **result,
                    }
                )
    small, large = args.layers
    ratios, verdicts = {}, []
    print(f"{'layers':>6} {'format':>7} {'ckpt MiB':>9} {'layer MiB':>10} {'peak RSS MiB':>13} {'sec':>6}")
    for r in rows:
        print(
            f"{r['layers']:>6} {r['format']:>7} {r['checkpoint_mib']:>9.1f} {r['layer_experts_mib']:>10.1f} "
            f"{r['peak_rss_mib']:>13.1f} {r['seconds']:>6.1f}"
        )
    for fmt in ("native", "dense"):
        a, b = (next(r for r in rows if r["layers"] == n and r["format"] == fmt) for n in (small, large))
        ratios[fmt] = b["peak_rss_mib"] / a["peak_rss_mib"]
        verdict = "PASS" if ratios[fmt] <= 1.25 else "FAIL"
        verdicts.append(
            f"{fmt}: peak RSS {large} vs {small} layers = {ratios[fmt]:.3f}x "
            f"(checkpoint {b['checkpoint_mib'] / a['checkpoint_mib']:.2f}x larger; target <= 1.25x) {verdict}"
        )
        print(verdicts[-1])
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(
        json.dumps(
            {"args": vars(args) | {"child": None}, "rows": rows, "peak_rss_ratio": ratios, "verdicts": verdicts},
            indent=2,
        )
        + "\n"
    )
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
