"""The field's quantisers as a baseline: round-to-nearest, llm-compressor's GPTQ (run by its own library) and mobe's
GPTQ, on both trained fixtures at 8, 4, 3 and 2 bits.

Every variant quantises the routed experts only (symmetric int, one scale per group of input columns: 128 on the
coarse fixture, 64 on the fine one, whose expert intermediate size p = 64 is below 128; attention, routers, shared
experts and lm_head stay bf16), is written as a compressed-tensors checkpoint, and is measured here: stored bytes of
the whole checkpoint, held-out perplexity with the settings of benchmarks/data_free.py (16,384 tokens, context
256, stride 128), and the wall time of writing it.

- `rtn`: `mobe quantize MODEL --bits B` (round to nearest, compressed-tensors' min-max scales);
- `llm-compressor GPTQ`: `oneshot` with a `GPTQModifier` (llm-compressor 0.14.0.1, its defaults: static act-order,
  dampening 0.01, block 128, every expert calibrated on every token), run by benchmarks/llmcompressor_gptq.py in a
  virtual environment of its own (it pins transformers <= 5.17 and compressed-tensors 0.19; built at --venv on first
  use: `python -m venv` + `pip install torch==2.13.0 llmcompressor==0.14.0.1 transformers==5.17.0`); its time
  includes that interpreter's start-up and model load;
- `mobe GPTQ`: `mobe quantize MODEL --bits B --calibration TEXT` (Hessians of the tokens routed to each expert,
  every layer measured on the original model's hidden states);
- `mobe GPTQ sequential`: the same with `--sequential` (each layer measured after the layers before it are
  rounded, as llm-compressor's sequential pipeline does);
- `llm-compressor GPTQ routed` (only with --methods): llm-compressor with `moe_calibrate_all_experts=False`, each
  expert calibrated on its routed tokens as mobe's is.

Both GPTQs calibrate on the same sequences: the first --calibration-tokens tokens of the fixture's training-side
text (as benchmarks/reap.py and equal_bytes.py use), cut into --context-token sequences.

    OMP_NUM_THREADS=1 python benchmarks/gptq_baselines.py [--fixtures coarse fine] [--bits 8 4 3 2]

Prints a table per fixture, writes benchmarks/results/gptq_baselines.json and .png. Importing this file is cheap
(benchmarks/tables.py uses its `table`): the heavy imports are inside the functions that run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
VENV = Path.home() / ".cache" / "mobe" / "venv-llmcompressor"
VENV_PACKAGES = ("torch==2.13.0", "llmcompressor==0.14.0.1", "transformers==5.17.0")
METHODS = ("rtn", "llm-compressor GPTQ", "mobe GPTQ", "mobe GPTQ sequential")
ROUTED = "llm-compressor GPTQ routed"  # ablation, not run by default: moe_calibrate_all_experts=False
FIXTURES = {"coarse": "qwen3-moe-trained", "fine": "qwen2-moe-fine-trained"}  # as benchmarks/data_free.py


def ensure_venv(venv: Path) -> Path:
    """The python of a virtual environment holding llm-compressor 0.14 (built on first use; PyPI reached)."""
    python = venv / "bin" / "python"
    check = [str(python), "-c", "import llmcompressor"]
    if python.exists() and subprocess.run(check, capture_output=True).returncode == 0:
        return python
    print(f"building {venv} with {' '.join(VENV_PACKAGES)} (once)", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "-q", *VENV_PACKAGES], check=True)
    subprocess.run(check, check=True)
    return python


def group_size_for(p: int, d: int, largest: int = 128) -> int:
    """The largest power of two up to `largest` that tiles every expert row (inputs of d and of p columns)."""
    g = largest
    while p % g or d % g:
        g //= 2
    return g


def run_fixture(name: str, args: argparse.Namespace, python: Path, tmp: Path) -> dict:
    from transformers import AutoTokenizer

    from compare import _perplexity  # same directory: run as python benchmarks/gptq_baselines.py
    from data_free import _calibration_text
    from mobe.architectures import moe_layout
    from mobe.calibrate import calibration_ids
    from mobe.config import QuantizeConfig
    from mobe.quantize import quantize_checkpoint, stored_bytes

    fixture = HERE.parent / "fixtures" / FIXTURES[name]
    layout = moe_layout(json.loads((fixture / "config.json").read_text()))
    group = group_size_for(layout.intermediate_size, layout.hidden_size)
    tokenizer = AutoTokenizer.from_pretrained(fixture)
    ids = tokenizer((fixture / "heldout.txt").read_text(), return_tensors="pt").input_ids[0][: args.tokens]
    text = _calibration_text(fixture, tmp)
    sequences = calibration_ids(fixture, text, args.calibration_tokens, args.context)
    ids_file = tmp / f"calibration-ids-{name}.json"
    ids_file.write_text(json.dumps([s.tolist() for s in sequences]))
    original = {"method": "original", "bits": 16, "bytes": stored_bytes(fixture)}
    original["perplexity"] = _perplexity(fixture, ids, args.context, args.stride)
    print(
        f"\n{name} fixture {fixture.name}: E={layout.num_experts} p={layout.intermediate_size} "
        f"d={layout.hidden_size}, group {group}; original perplexity {original['perplexity']:.3f} "
        f"({ids.numel()} held-out tokens, {sum(s.numel() for s in sequences)} calibration tokens)",
        flush=True,
    )
    rows = [original]
    for bits in args.bits:
        for method in args.methods:
            out = tmp / f"{name}-{method.replace(' ', '-')}-int{bits}"
            start = time.perf_counter()
            if method in ("llm-compressor GPTQ", ROUTED):
                env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "TOKENIZERS_PARALLELISM": "false"}
                cmd = [str(python), str(HERE / "llmcompressor_gptq.py"), "checkpoint", str(fixture), str(out)]
                cmd += ["--ids", str(ids_file), "--bits", str(bits), "--group-size", str(group)]
                cmd += ["--threads", str(args.threads), *(["--routed-only"] if method == ROUTED else [])]
                done = subprocess.run(cmd, env=env, capture_output=True, text=True)
                if done.returncode:
                    raise SystemExit(f"llm-compressor failed ({' '.join(cmd)}):\n{done.stderr[-3000:]}")
            else:
                config = QuantizeConfig(
                    bits=bits,
                    group_size=group,
                    calibration=None if method == "rtn" else str(text),
                    sequential=method == "mobe GPTQ sequential",
                    calibration_tokens=args.calibration_tokens,
                    calibration_seq_len=args.context,
                )
                quantize_checkpoint(fixture, out, config, progress=False)
            seconds = time.perf_counter() - start
            row = {"method": method, "bits": bits, "group_size": group, "seconds": seconds}
            row["bytes"] = stored_bytes(out)
            row["perplexity"] = _perplexity(out, ids, args.context, args.stride)
            rows.append(row)
            print(
                f"  int{bits} {method:<20} {row['bytes'] / 2**20:7.2f} MiB  ppl {row['perplexity']:8.3f} "
                f"({100 * (row['perplexity'] / original['perplexity'] - 1):+7.2f}%)  {seconds:6.1f} s",
                flush=True,
            )
            shutil.rmtree(out)
    return {
        "fixture": fixture.name,
        "shape": {"E": layout.num_experts, "p": layout.intermediate_size, "d": layout.hidden_size},
        "group_size": group,
        "original_perplexity": original["perplexity"],
        "original_bytes": original["bytes"],
        "tokens": int(ids.numel()),
        "calibration_tokens": int(sum(s.numel() for s in sequences)),
        "rows": rows,
    }


def _row(fixture: dict, method: str, bits: int) -> dict | None:
    return next((r for r in fixture["rows"] if r["method"] == method and r["bits"] == bits), None)


def verdicts(result: dict) -> list[str]:
    """Per fixture and bit width: mobe's GPTQ against llm-compressor's, and GPTQ against round-to-nearest."""
    lines = []
    for name, fixture in result["fixtures"].items():
        base = fixture["original_perplexity"]
        for bits in sorted({r["bits"] for r in fixture["rows"] if r["method"] != "original"}, reverse=True):
            rtn, theirs, ours, sequential = (_row(fixture, m, bits) for m in METHODS)
            if ours and theirs:
                gap = 100 * (ours["perplexity"] / theirs["perplexity"] - 1)
                lines.append(
                    f"{name} int{bits}: mobe GPTQ {ours['perplexity']:.3f} vs llm-compressor "
                    f"{theirs['perplexity']:.3f} ({gap:+.2f}%; original {base:.3f}), "
                    f"{ours['seconds']:.0f} s vs {theirs['seconds']:.0f} s"
                )
            if ours and sequential:
                lines.append(
                    f"{name} int{bits}: mobe GPTQ sequential {sequential['perplexity']:.3f} vs on the original's "
                    f"hidden states {ours['perplexity']:.3f}"
                )
            if ours and rtn:
                rtn_cost = rtn["perplexity"] / base - 1
                ours_cost = ours["perplexity"] / base - 1
                share = "round-to-nearest within 0.1%: nothing to recover"
                if rtn_cost > 0.001:
                    share = f"{100 * (1 - ours_cost / rtn_cost):.0f}% of round-to-nearest's cost recovered"
                lines.append(
                    f"{name} int{bits}: round-to-nearest {100 * rtn_cost:+.2f}%, mobe GPTQ {100 * ours_cost:+.2f}% "
                    f"perplexity ({share})"
                )
    return lines


def table(result: dict) -> str:
    """Markdown: one block per fixture, a row per bit width, perplexity change and wall time per method."""
    lines = []
    for name, fixture in result["fixtures"].items():
        s = fixture["shape"]
        base, orig_bytes = fixture["original_perplexity"], fixture["original_bytes"]
        lines.append(
            f"**{name}** (`{fixture['fixture']}`, E={s['E']} p={s['p']} d={s['d']}, group {fixture['group_size']}; "
            f"original perplexity {base:.3f}, {orig_bytes / 2**20:.2f} MiB; {fixture['calibration_tokens']} "
            "calibration tokens)"
        )
        lines.append("")
        methods = [m for m in (*METHODS, ROUTED) if any(r["method"] == m for r in fixture["rows"])]
        lines.append("| bits | MiB (share) | " + " | ".join(f"{m}: ppl (change) | s" for m in methods) + " |")
        lines.append("|---|---:|" + "---:|---:|" * len(methods))
        for bits in sorted({r["bits"] for r in fixture["rows"] if r["method"] != "original"}, reverse=True):
            found = [_row(fixture, m, bits) for m in methods]
            best = min(r["perplexity"] for r in found if r)
            size = next(r for r in found if r)["bytes"]
            cells = []
            for r in found:
                if r is None:
                    cells += ["", ""]
                    continue
                text = f"{r['perplexity']:.3f} ({100 * (r['perplexity'] / base - 1):+.2f}%)"
                cells += [f"**{text}**" if r["perplexity"] == best else text, f"{r['seconds']:.0f}"]
            lines.append(f"| int{bits} | {size / 2**20:.2f} ({size / orig_bytes:.0%}) | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def plot(result: dict, path: Path) -> None:
    """Perplexity against stored bytes per fixture, one line per method through its bit widths (redraw from the JSON:
    `python -c` with gptq_baselines.plot)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fixtures = result["fixtures"]
    fig, axes = plt.subplots(1, len(fixtures), figsize=(6.2 * len(fixtures), 4.4), dpi=120, squeeze=False)
    styles = {
        "rtn": ("tab:gray", "o"),
        "llm-compressor GPTQ": ("tab:orange", "s"),
        ROUTED: ("tab:red", "v"),
        "mobe GPTQ": ("tab:blue", "^"),
        "mobe GPTQ sequential": ("tab:cyan", "D"),
    }
    for ax, (name, fixture) in zip(axes[0], fixtures.items(), strict=True):
        for method, (color, marker) in styles.items():
            rows = sorted((r for r in fixture["rows"] if r["method"] == method), key=lambda r: r["bytes"])
            if not rows:
                continue
            ax.plot(
                [r["bytes"] / 2**20 for r in rows],
                [r["perplexity"] for r in rows],
                marker=marker,
                color=color,
                label=method,
                alpha=0.85,
            )
            for r in rows if method == "rtn" else []:  # one label per bit width
                ax.annotate(
                    f"int{r['bits']}",
                    (r["bytes"] / 2**20, r["perplexity"]),
                    fontsize=6,
                    xytext=(3, 3),
                    textcoords="offset points",
                )
        ax.axhline(fixture["original_perplexity"], color="black", lw=0.8, ls="--", label="original (bf16)")
        ax.set_xlabel("stored bytes of the whole model (MiB)")
        ax.set_ylabel("held-out perplexity")
        ppl = [r["perplexity"] for r in fixture["rows"]]
        if max(ppl) > 3 * min(ppl):
            ax.set_yscale("log")
        ax.set_title(f"{name}: {fixture['fixture']} (original {fixture['original_bytes'] / 2**20:.1f} MiB)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fixtures", nargs="+", default=list(FIXTURES), choices=list(FIXTURES))
    parser.add_argument("--bits", type=int, nargs="+", default=[8, 4, 3, 2], choices=[8, 4, 3, 2])
    parser.add_argument(
        "--methods",
        nargs="+",
        default=list(METHODS),
        choices=[*METHODS, ROUTED],
        help=f"'{ROUTED}': llm-compressor calibrating each expert on its routed tokens only, as mobe does",
    )
    parser.add_argument("--calibration-tokens", type=int, default=16384, help="calibration tokens of both GPTQs")
    parser.add_argument("--tokens", type=int, default=16384, help="held-out tokens scored")
    parser.add_argument("--context", type=int, default=256, help="also the calibration sequences' length")
    parser.add_argument("--stride", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--venv", type=Path, default=VENV, help="llm-compressor's venv (built if absent)")
    parser.add_argument("--out", default=str(HERE / "results" / "gptq_baselines"))
    args = parser.parse_args()
    import torch

    from results_io import write_results

    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    needs_venv = {"llm-compressor GPTQ", ROUTED} & set(args.methods)
    python = ensure_venv(args.venv) if needs_venv else Path(sys.executable)
    with tempfile.TemporaryDirectory() as tmp:
        result = {"fixtures": {name: run_fixture(name, args, python, Path(tmp)) for name in args.fixtures}}
    print("\n" + table(result))
    result["verdicts"] = verdicts(result)
    result["command"] = " ".join(["python", *sys.argv])
    print("\n".join(result["verdicts"]))
    args.venv = str(args.venv)
    write_results(result, args, start, plot, args.out)


if __name__ == "__main__":
    main()
