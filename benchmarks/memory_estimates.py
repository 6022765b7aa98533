"""Every memory estimate `mobe info` prints against the peak the real command holds, on models of several shapes.

For each model (the two trained fixtures, and generated qwen3_moe / qwen2_moe checkpoints: wide and fine-grained
experts, a shared expert, 2 and 8 layers, float32 and bfloat16, up to hidden 2048 x 128 experts) each command runs in
a fresh process: `compress` (data-free), `compress --calibration`, the calibration pass alone (`collect_statistics`,
which also gives the bytes of one layer's statistics), then on the native output `quantize`, native inference
(`load_model` and a few generated tokens) and `distill`; and on `POOL_MODELS`, `pool`: the data-free compress on
the local device pool (`--device cpu,cpu`: `POOL_WORKERS` spawned worker processes, one job at a time each). The
child imports torch, transformers and mobe, records its resident memory (with the family's modelling code and the
tokenizer's library imported: mobe and transformers import lazily), resets the kernel's peak counter (VmHWM, via
/proc/self/clear_refs), runs the call, and reports VmHWM minus that baseline: what the command adds above an idle
interpreter, which is what the estimates count.
The `pool` row measures the process tree: the driver's VmHWM above its baseline plus, for each worker, the
highest RssAnon sampled every 20 ms (its private memory: its interpreter's and libraries' own and its jobs'; the
libraries' code pages, shared with the driver, are left out; the row also keeps the workers' VmHWM, shared pages
included). A sum of each process's peak: at least the peak of the sum.
The estimates come from `mobe.estimate` with the same settings (headers only). Each row's ratio is estimate /
measured; the target is 0.8-1.5 (never an under-estimate by more than a fifth, never a machine twice too large).

    python benchmarks/memory_estimates.py [--models fine-2L-f32 ...] [--steps 5] [--tokens 2048]

Prints a table and verdicts, writes benchmarks/results/memory_estimates.json and .png.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from results_io import ratio_text, write_results

HERE = Path(__file__).resolve().parent
LOW, HIGH = 0.8, 1.5  # estimate / measured
MODELS = {  # name: fixture name, or build_tiny_moe arguments
    "coarse-fixture": {"fixture": "qwen3-moe-trained"},
    "fine-fixture": {"fixture": "qwen2-moe-fine-trained"},
    "wide-2L-f32": dict(model_type="qwen3_moe", hidden_size=512, moe_intermediate_size=1024, num_experts=16),
    "fine-2L-f32": dict(model_type="qwen3_moe", hidden_size=2048, moe_intermediate_size=128, num_experts=64),
    "fine-8L-bf16": dict(
        model_type="qwen3_moe", hidden_size=512, moe_intermediate_size=128, num_experts=64, num_layers=8, top_k=8
    ),
    "shared-2L-bf16": dict(model_type="qwen2_moe", hidden_size=512, moe_intermediate_size=256, num_experts=32),
    "e128-2L-bf16": dict(model_type="qwen3_moe", hidden_size=2048, moe_intermediate_size=128, num_experts=128, top_k=8),
}
COMMANDS = ("compress", "calibrated", "calibration pass", "statistics", "quantize", "inference", "distill", "pool")
POOL_WORKERS = 2  # `pool`: compress (data-free) on the local device pool, one worker process per "cpu" device
POOL_MODELS = ("shared-2L-bf16",)  # 4 jobs: both workers fit at once


def _status_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def _text() -> Path:
    from mobe.fixtures import trained_fixture_path

    return trained_fixture_path() / "heldout.txt"


def _build(name: str, path: Path) -> Path:
    import torch

    from mobe.fixtures import build_tiny_moe, trained_fixture_path

    spec = dict(MODELS[name])
    if "fixture" in spec:
        return trained_fixture_path(spec["fixture"])
    dtype = torch.bfloat16 if name.endswith("bf16") else torch.float32
    model_type = spec.pop("model_type")
    build_tiny_moe(path, model_type, dtype=dtype, vocab_size=4096, max_shard_size="256MB", **spec)
    for file in ("tokenizer.json", "tokenizer_config.json"):  # the fixture's tokenizer: 4096 tokens
        shutil.copy(trained_fixture_path() / file, path / file)
    return path


def _config(args: argparse.Namespace, calibrated: bool, workers: int = 1):
    from mobe import MobeConfig

    return MobeConfig(
        steps=args.steps,
        matrices=("gate",) if calibrated else ("gate", "down"),
        calibration_tokens=args.tokens,
        threads=args.threads,
        device=",".join(["cpu"] * workers),
    )


class _TreeMonitor:
    """Samples this process's descendants (the pool's workers) every `interval` seconds from /proc: the highest
    RssAnon (private memory) and VmHWM (peak resident, shared library pages included) each reached."""

    def __init__(self, interval: float = 0.02):
        import threading

        self.interval, self.anon, self.hwm = interval, {}, {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        import psutil

        me = psutil.Process()
        while not self._stop.is_set():
            for child in me.children(recursive=True):
                try:
                    status = Path(f"/proc/{child.pid}/status").read_text()
                except OSError:
                    continue
                fields = {line.split(":")[0]: line.split()[1:2] for line in status.splitlines()}
                for key, peaks in (("RssAnon", self.anon), ("VmHWM", self.hwm)):
                    if fields.get(key):
                        peaks[child.pid] = max(peaks.get(child.pid, 0), int(fields[key][0]) / 1024)
            self._stop.wait(self.interval)

    def __enter__(self) -> _TreeMonitor:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def _distill_config(args: argparse.Namespace):
    from mobe import DistillConfig

    return DistillConfig(tokens=args.tokens, seq_len=256, epochs=1, device="cpu")


def _child(args: argparse.Namespace, command: str, src: str, out: str) -> dict:
    """Run one command; report the peak resident memory above this process's own baseline after imports."""
    import torch

    torch.set_num_threads(args.threads)
    import transformers.generation.utils
    import transformers.modeling_utils  # noqa: F401  (the libraries every command imports: part of the baseline)

    import mobe.distill
    import mobe.info
    import mobe.pipeline
    import mobe.quantize
    import mobe.runtime  # noqa: F401
    from mobe import compress
    from mobe.architectures import get_arch
    from mobe.architectures.derive import model_class
    from mobe.architectures.registry import base_model_type
    from mobe.checkpoint import CheckpointReader

    # mobe and transformers import lazily: the tokenizer's library and the family's modelling code (what building
    # the model imports) are imported here, so that the baseline holds them as it holds torch
    family = base_model_type(CheckpointReader(src.split("::")[0]).config["model_type"])
    model_class(family, get_arch(family).model_class)
    AutoTokenizer = transformers.AutoTokenizer  # noqa: N806, F841  (resolves the lazy name: imports tokenizers)

    extra: dict = {}
    baseline = _status_mib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    start = time.perf_counter()
    if command in ("compress", "calibrated"):
        calibrated = command == "calibrated"
        compress(src, out, _config(args, calibrated), calibration=_text() if calibrated else None, progress=False)
    elif command == "pool":
        with _TreeMonitor() as tree:
            compress(src, out, _config(args, False, POOL_WORKERS), progress=False)
        driver = _status_mib("VmHWM") - baseline
        extra = {
            "driver_mib": driver,
            "workers": len(tree.anon),
            "workers_anon_mib": sum(tree.anon.values()),
            "workers_hwm_mib": sum(tree.hwm.values()),
        }
        return {"baseline_mib": baseline, "measured_mib": driver + extra["workers_anon_mib"], **extra}
    elif command == "calibration pass":
        from mobe.architectures import moe_layout
        from mobe.calibrate import calibration_ids, collect_statistics
        from mobe.checkpoint import CheckpointReader

        reader = CheckpointReader(src)
        layout = moe_layout(reader.config)
        sequences = calibration_ids(reader.path, _text(), args.tokens, 512)
        held = []
        for _, stats in collect_statistics(reader, layout, sequences, layout.moe_layers):
            held.append(stats.nbytes)
            del stats
        extra["statistics_bytes"] = max(held)
    elif command == "quantize":
        from mobe.quantize import quantize_checkpoint

        quantize_checkpoint(src, out, progress=False)
    elif command == "inference":
        from mobe.runtime import load_model

        model = load_model(src)
        prompt = torch.arange(2, 2 + args.prompt)[None]
        with torch.no_grad():
            model.generate(prompt, max_new_tokens=args.new_tokens, do_sample=False)
    elif command == "distill":
        from mobe.distill import distill

        original, compressed = src.split("::")
        distill(original, compressed, out, _text(), _distill_config(args), progress=False)
    return {
        "baseline_mib": baseline,
        "measured_mib": _status_mib("VmHWM") - baseline,
        "seconds": time.perf_counter() - start,
        **extra,
    }


def _estimates(args: argparse.Namespace, src: Path, native: Path | None) -> dict[str, float]:
    """MiB of every estimate for `src` (and its native compression) with the settings the commands run with."""
    from mobe.architectures import moe_layout
    from mobe.checkpoint import CheckpointReader
    from mobe.estimate import compress_memory_estimate, distill_memory, quantize_bytes
    from mobe.estimate.memory import RUNTIME_BYTES, factor_stats_bytes, routed_counts
    from mobe.pipeline import resolve_settings

    reader = CheckpointReader(src)
    layout = moe_layout(reader.config)
    out = {}
    for command, calibrated in (("compress", False), ("calibrated", True)):
        config = resolve_settings(layout, _config(args, calibrated))
        estimate = compress_memory_estimate(reader, config)
        out[command] = estimate.compress_host(calibrated)
    out["calibration pass"] = estimate.calibration_pass + RUNTIME_BYTES["calibration"]
    out["pool"] = estimate.compress_host(False, workers=POOL_WORKERS)
    counts = routed_counts(layout.num_experts, args.tokens, estimate.top_k)  # held once compacted
    out["statistics"] = factor_stats_bytes(counts, layout.intermediate_size, layout.hidden_size)
    context = args.prompt + args.new_tokens
    config = resolve_settings(layout, _config(args, False))
    from mobe.estimate import memory_estimate

    inference = memory_estimate(
        reader,
        config.num_bases,
        config.rank,
        config.groups,
        tuple(config.matrices),
        args.tokens,
        context=context,
        prompt=args.prompt,
    )
    out["inference"] = inference.inference_total
    if native is not None:
        compressed = CheckpointReader(native)
        out["quantize"] = quantize_bytes(compressed)
        out["distill"] = distill_memory(compressed, _distill_config(args), reader).total
    return {k: v / 2**20 for k, v in out.items()}


def _run(args: argparse.Namespace, command: str, src: str, out: str) -> dict:
    argv = [sys.executable, __file__, "--child", command, src, out, "--steps", str(args.steps)]
    argv += ["--tokens", str(args.tokens), "--threads", str(args.threads)]
    proc = subprocess.run(argv, capture_output=True, text=True)
    if proc.returncode:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def table(result: dict) -> str:
    """The markdown table of a result: estimate, measured and their ratio per model and command."""
    lines = [
        "| model | shape (E x p x d, layers, dtype) | command | estimate MiB | measured MiB | estimate / measured |",
        "|---|---|---|---:|---:|---:|",
    ]
    for r in result["rows"]:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['shape']} | {r['command']} | | | failed: {r['error'][:60]} |")
            continue
        ratio = r["ratio"]
        mark = "" if LOW <= ratio <= HIGH else (" **under**" if ratio < LOW else " **over**")
        lines.append(
            f"| {r['model']} | {r['shape']} | {r['command']} | {r['estimate_mib']:,.0f} | {r['measured_mib']:,.0f} | "
            f"{ratio_text(ratio, LOW if ratio < 1 else HIGH)}{mark} |"
        )
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["rows"] if "ratio" in r]
    fig, ax = plt.subplots(figsize=(9, 4.5), dpi=120)
    commands = [c for c in COMMANDS if any(r["command"] == c for r in rows)]
    models = list(dict.fromkeys(r["model"] for r in rows))
    width = 0.8 / max(1, len(models))
    for k, model in enumerate(models):
        xs, ys = [], []
        for i, command in enumerate(commands):
            match = [r for r in rows if r["model"] == model and r["command"] == command]
            if match:
                xs.append(i + k * width)
                ys.append(match[0]["ratio"])
        ax.bar(xs, ys, width, label=model)
    ax.axhspan(LOW, HIGH, color="green", alpha=0.1, label=f"target {LOW}-{HIGH}")
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(commands))], commands, fontsize=8)
    ax.set_ylabel("estimate / measured peak above baseline")
    ax.set_title("mobe's memory estimates against the real commands", fontsize=10)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _shape(src: Path) -> str:
    from mobe.architectures import moe_layout
    from mobe.checkpoint import CheckpointReader

    reader = CheckpointReader(src)
    lay = moe_layout(reader.config)
    dtype = reader.dtype_name(lay.stored_names(lay.moe_layers[0], "gate")[0])
    shared = ", shared expert" if any("shared_expert." in n for n in reader.weight_map) else ""
    return (
        f"{lay.num_experts} x {lay.intermediate_size} x {lay.hidden_size}, {lay.num_layers}L, "
        f"{dtype}, top-{reader.config.get('num_experts_per_tok')}{shared}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--commands", nargs="+", default=list(COMMANDS), choices=list(COMMANDS))
    parser.add_argument("--steps", type=int, default=5, help="fitting steps (memory does not depend on them)")
    parser.add_argument("--tokens", type=int, default=2048, help="calibration and distillation tokens")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--prompt", type=int, default=16, help="prompt tokens of the inference run")
    parser.add_argument("--new-tokens", type=int, default=8, help="tokens generated by the inference run")
    parser.add_argument("--out", default=str(HERE / "results" / "memory_estimates"), help="stem of the JSON and PNG")
    parser.add_argument(
        "--measured",
        nargs="+",
        default=None,
        help="JSON of earlier runs: keep their measurements, rebuild the models and compute the estimates again",
    )
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(_child(args, *args.child)))
        return

    start = time.perf_counter()
    rows = []
    earlier: dict[str, dict[str, dict]] = {}
    for path in args.measured or []:
        for row in json.loads(Path(path).read_text())["rows"]:
            if "error" in row:  # stopped or failed there: not a measurement
                continue
            keep = ("baseline_mib", "measured_mib", "seconds", "statistics_bytes", "driver_mib", "workers")
            keep += ("workers_anon_mib", "workers_hwm_mib")
            earlier.setdefault(row["model"], {})[row["command"]] = {k: row[k] for k in keep if k in row}
    if args.measured:
        args.models = [m for m in MODELS if m in earlier]
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            src = _build(name, Path(tmp) / name)
            shape = _shape(src)
            native = Path(tmp) / f"{name}-native"
            measured = earlier.get(name, {})
            if measured and any(c in measured for c in ("quantize", "distill")):
                quick = argparse.Namespace(**{**vars(args), "steps": 1})  # the same shapes, whatever the steps
                _run(quick, "compress", str(src), str(native))  # the native output the estimates read
            for command in args.commands if not args.measured else ():
                if command == "statistics" or (command == "pool" and name not in POOL_MODELS):
                    continue  # from the calibration pass's run; the pool on the models where it is measured
                if command in ("quantize", "inference", "distill") and not native.exists():
                    continue
                target = native if command == "compress" else Path(tmp) / f"{name}-{command.replace(' ', '-')}"
                source = (
                    f"{src}::{native}"
                    if command == "distill"
                    else str(
                        native
                        if command
                        in (
                            "quantize",
                            "inference",
                        )
                        else src
                    )
                )
                measured[command] = _run(args, command, source, str(target))
                print(f"{name} {command}: {measured[command]}", file=sys.stderr, flush=True)
                if command != "compress":
                    shutil.rmtree(target, ignore_errors=True)
            if "statistics_bytes" in measured.get("calibration pass", {}):
                measured["statistics"] = {"measured_mib": measured["calibration pass"]["statistics_bytes"] / 2**20}
            estimates = _estimates(args, src, native if native.exists() else None)
            for command, m in measured.items():
                row = {"model": name, "shape": shape, "command": command, **m}
                if "error" not in m:
                    row["estimate_mib"] = estimates[command]
                    row["ratio"] = estimates[command] / max(m["measured_mib"], 1e-9)
                rows.append(row)
            if "fixture" not in MODELS[name]:
                shutil.rmtree(src)
            shutil.rmtree(native, ignore_errors=True)

    result = {"rows": rows}
    print(table(result))
    print(
        "(measured: peak resident memory above the process's own baseline after imports; statistics: the bytes one "
        "layer's factored statistics hold, largest layer; estimates from mobe.estimate with the same settings)"
    )
    measured_rows = [r for r in rows if "ratio" in r]
    outside = [f"{r['model']} {r['command']} {r['ratio']:.2f}" for r in measured_rows if not LOW <= r["ratio"] <= HIGH]
    under = [r for r in measured_rows if r["ratio"] < LOW]
    verdicts = {
        "every_ratio_within_target": f"{len(measured_rows) - len(outside)} of {len(measured_rows)} within "
        f"{LOW}-{HIGH}"
        + (f"; outside: {', '.join(outside)}" if outside else "")
        + f": {'yes' if not outside else 'NO'}",
        "no_under_estimate_beyond_a_fifth": f"{len(under)} rows under {LOW}: {'yes' if not under else 'NO'}",
        "every_command_ran": f"{sum('error' in r for r in rows)} failed: "
        f"{'yes' if not any('error' in r for r in rows) else 'NO'}",
    }
    print()
    for name, line in verdicts.items():
        print(f"{name}: {line}")
    result = {"rows": rows, "verdicts": verdicts}
    if args.measured:  # the measurements of those runs, the estimates of this code
        result["merged_from"] = args.measured
    write_results(result, args, start, plot, args.out)


if __name__ == "__main__":
    main()
