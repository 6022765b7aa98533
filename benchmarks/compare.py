"""MoBE against the comparison methods at matched expert-parameter budgets.

For each method and each expert-parameter reduction: parameters, per-layer relative weight error, held-out
perplexity and its change against the original, and wall time, on a trained MoE (the project's fixture by
default). Then the same methods on a synthetic layer whose experts share structure, for the weight error alone.
Prints tables, writes JSON and a PNG (perplexity against parameter count, one line per method).

    python benchmarks/compare.py [--model DIR --text FILE] [--ratios 0.25 0.4 0.5] [--steps 2000]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from mobe import MobeConfig, compress
from mobe.evaluate import weight_error
from mobe.evaluate.perplexity import sliding_window_perplexity
from mobe.factorize import budget_for_ratio, get_method
from results_io import add_run_options, bold, pyplot, save_figure, write_results

HERE = Path(__file__).resolve().parent
METHODS = ("mobe", "svd", "d2moe", "molae")


def _perplexity(path: Path, ids: torch.Tensor, context: int, stride: int) -> float:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return sliding_window_perplexity(model, ids, context=context, stride=stride, progress=False).perplexity


def _config(method: str, ratio: float, args: argparse.Namespace) -> MobeConfig:
    return MobeConfig(
        method=method,
        target_ratio=ratio,
        num_bases=args.bases,
        activation=args.activation,
        steps=args.steps,
        eval_every=args.eval_every,
        schedule=args.schedule,
        matrices=tuple(args.matrices),
        device="cpu",
    )


def run_model(args: argparse.Namespace) -> dict:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    ids = tokenizer(Path(args.text).read_text(), return_tensors="pt").input_ids[0][: args.tokens]
    original = _perplexity(Path(args.model), ids, args.context, args.stride)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for ratio in args.ratios:
            for method in args.methods:
                out = Path(tmp) / f"{method}-{ratio}"
                start = time.perf_counter()
                report = compress(args.model, out, _config(method, ratio, args), reconstruct=True, progress=False)
                seconds = time.perf_counter() - start
                ppl = _perplexity(out, ids, args.context, args.stride)
                summary = report.summary()
                rows.append(
                    {
                        "method": method,
                        "target_ratio": ratio,
                        "rank": report.config["rank"],
                        "expert_params": summary["expert_params_after"],
                        "model_params": summary["model_params_after"],
                        "expert_reduction": summary["expert_reduction"],
                        "mean_relative_error": summary["mean_relative_error"],
                        "relative_error": {f"{r.layer}.{r.matrix}": r.relative_error for r in report.results},
                        "perplexity": ppl,
                        "perplexity_change": ppl - original,
                        "seconds": seconds,
                    }
                )
                print(
                    f"  {method:>6} @ {ratio:.2f}: err {summary['mean_relative_error']:.4f} ppl {ppl:.3f} "
                    f"({seconds:.0f} s)",
                    flush=True,
                )
                for path in out.iterdir():
                    path.unlink()
    return {
        "original_perplexity": original,
        "tokens": int(ids.numel()),
        "rows": rows,
        "model_params": report.model_params_before,
    }


def verdicts(result: dict) -> list[str]:
    """Which method is best at each cut: lowest perplexity increase (trained model), lowest error (synthetic)."""
    out = []
    for key, rows, label in (
        ("perplexity_change", result["rows"], "held-out d ppl"),
        ("relative_error", result.get("synthetic", []), "synthetic rel. err"),
    ):
        for ratio in sorted({r["target_ratio"] for r in rows}):
            ranked = sorted((r for r in rows if r["target_ratio"] == ratio), key=lambda r: r[key])
            order = " < ".join(
                f"{r['method']} {r[key]:+.3f}" if key == "perplexity_change" else f"{r['method']} {r[key]:.4f}"
                for r in ranked
            )
            out.append(f"{label} @ {ratio:.2f}: best {ranked[0]['method']} ({order})")
    return out


def synthetic_layer(E: int, p: int, d: int, seed: int = 0) -> torch.Tensor:
    """Experts = one common component + an expert-specific part, each with a 1/k singular-value spectrum."""
    g = torch.Generator().manual_seed(seed)
    spectrum = torch.diag(torch.arange(1, p + 1, dtype=torch.float32) ** -1.0)

    def component() -> torch.Tensor:
        U = torch.linalg.qr(torch.randn(p, p, generator=g))[0]
        V = torch.linalg.qr(torch.randn(d, p, generator=g))[0]
        return U @ spectrum @ V.T

    common = component()
    return torch.stack([common + 0.6 * component() for _ in range(E)])


def run_synthetic(args: argparse.Namespace) -> list[dict]:
    E, p, d = args.synthetic
    W = synthetic_layer(E, p, d)
    rows = []
    for ratio in args.ratios:
        for method in args.methods:
            config = _config(method, ratio, args)
            impl = get_method(method)
            rank = impl.rank_for_budget(E, p, d, config, budget_for_ratio(E, p, d, ratio, len(args.matrices)))
            start = time.perf_counter()
            factors, _ = impl.fit(
                W, MobeConfig(**{**config.to_dict(), "rank": rank, "target_ratio": None}), "cpu", None
            )
            rows.append(
                {
                    "method": method,
                    "target_ratio": ratio,
                    "rank": rank,
                    "params": factors.num_parameters(),
                    "relative_error": weight_error(W, factors.reconstruct())[0],
                    "seconds": time.perf_counter() - start,
                }
            )
    return rows


def plot(result: dict, path: Path) -> None:
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(6.5, 4.2), dpi=120)
    for method in dict.fromkeys(r["method"] for r in result["rows"]):
        rows = sorted((r for r in result["rows"] if r["method"] == method), key=lambda r: r["model_params"])
        ax.plot([r["model_params"] / 1e6 for r in rows], [r["perplexity"] for r in rows], "o-", label=method)
    ax.axhline(result["original_perplexity"], color="gray", ls="--", label="original")
    ax.set_xlabel("model parameters (millions)")
    ax.set_yscale("log")
    ax.set_ylabel("held-out perplexity (log scale)")
    ax.set_title("Perplexity at matched parameter budgets")
    ax.grid(alpha=0.3)
    ax.legend()
    save_figure(fig, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="MoE checkpoint with a tokenizer (default: the trained fixture)")
    parser.add_argument("--text", default=None, help="held-out text (default: the fixture's heldout.txt)")
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.25, 0.4, 0.5])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--bases", type=int, default=4)
    parser.add_argument("--matrices", nargs="+", default=["gate", "up"], choices=["gate", "up", "down"])
    parser.add_argument("--activation", default="silu")
    parser.add_argument("--schedule", default="adam")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--context", type=int, default=256)
    parser.add_argument("--stride", type=int, default=128)
    parser.add_argument("--synthetic", type=int, nargs=3, default=[32, 128, 256], metavar=("E", "P", "D"))
    add_run_options(parser, "compare")
    args = parser.parse_args()
    torch.set_num_threads(2)
    if args.model is None or args.text is None:
        from mobe.fixtures import trained_fixture_path

        args.model = args.model or str(trained_fixture_path())
        args.text = args.text or str(trained_fixture_path() / "heldout.txt")

    start = time.perf_counter()
    print(f"model {args.model}", flush=True)
    result = run_model(args)
    base = result["original_perplexity"]
    print(
        f"\noriginal: {result['model_params']:,} parameters, held-out perplexity {base:.3f} ({result['tokens']} tokens)"
    )
    print(
        f"{'method':>6} {'target':>6} {'rank':>5} {'expert red.':>11} {'model params':>13} {'rel.err':>8} "
        f"{'ppl':>8} {'d ppl':>7} {'sec':>6}"
    )
    for r in result["rows"]:
        print(
            f"{r['method']:>6} {r['target_ratio']:>6.2f} {r['rank']:>5} {100 * r['expert_reduction']:>10.1f}% "
            f"{r['model_params']:>13,} {r['mean_relative_error']:>8.4f} {r['perplexity']:>8.3f} "
            f"{r['perplexity_change']:>+7.3f} {r['seconds']:>6.0f}"
        )

    result["synthetic"] = run_synthetic(args)
    E, p, d = args.synthetic
    print(f"\nsynthetic layer (E={E}, p={p}, d={d}; shared + expert-specific parts, decaying spectra)")
    print(f"{'method':>6} {'target':>6} {'rank':>5} {'params':>9} {'rel.err':>8}")
    for r in result["synthetic"]:
        print(
            f"{r['method']:>6} {r['target_ratio']:>6.2f} {r['rank']:>5} {r['params']:>9,} {r['relative_error']:>8.4f}"
        )

    result["verdicts"] = verdicts(result)
    print("\n" + "\n".join(result["verdicts"]))
    write_results(result, args, start, plot, args.out)


# --- tables for README.md and docs/ (written by benchmarks/tables.py from this script's JSON) ---
def table(result: dict, details: bool = True) -> str:
    """compare.py on the trained model: one row per method and cut; the best error and perplexity of each cut bold."""
    rows = result["rows"]
    best = {
        ratio: (
            min(r["mean_relative_error"] for r in rows if r["target_ratio"] == ratio),
            min(r["perplexity_change"] for r in rows if r["target_ratio"] == ratio),
        )
        for ratio in {r["target_ratio"] for r in rows}
    }
    original = f"Original held-out perplexity {result['original_perplexity']:.2f} ({result['tokens']} tokens).\n\n"
    head = "| method | target | rank | expert params cut |" + (" model params |" if details else "")
    head += " mean rel. error | perplexity | change |" + (" seconds |" if details else "")
    lines = [head, "|---|" + "---:|" * (8 if details else 6)]
    for r in rows:
        err_min, ppl_min = best[r["target_ratio"]]
        err_best, ppl_best = r["mean_relative_error"] == err_min, r["perplexity_change"] == ppl_min
        cells = [r["method"], f"{r['target_ratio']:.2f}", str(r["rank"]), f"{100 * r['expert_reduction']:.1f}%"]
        cells += [f"{r['model_params']:,}"] if details else []
        cells += [
            bold(f"{r['mean_relative_error']:.4f}", err_best),
            bold(f"{r['perplexity']:.2f}", ppl_best),
            bold(f"{r['perplexity_change']:+.2f}", ppl_best),
        ]
        cells += [f"{r['seconds']:.1f}"] if details else []
        lines.append("| " + " | ".join(cells) + " |")
    return original + "\n".join(lines) + "\n"


def synthetic_table(result: dict) -> str:
    """compare.py on its synthetic layer: weight error per method and cut, the best of each cut bold."""
    rows = result["synthetic"]
    best = {
        ratio: min(r["relative_error"] for r in rows if r["target_ratio"] == ratio)
        for ratio in {r["target_ratio"] for r in rows}
    }
    lines = ["| method | target | rank | parameters | relative error |", "|---|---:|---:|---:|---:|"]
    for r in rows:
        error = bold(f"{r['relative_error']:.4f}", r["relative_error"] == best[r["target_ratio"]])
        lines.append(f"| {r['method']} | {r['target_ratio']:.2f} | {r['rank']} | {r['params']:,} | {error} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
