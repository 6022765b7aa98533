"""Where the rounding error of integer MoBE factors lands: output error (weighted by each expert's routed inputs)
of dense rounding and of factors rounded in orthonormal coordinates, data-free and by GPTQ on the inputs.

For one MoE layer of each trained fixture, the default recipe is fitted data-free at a 25% cut and the calibration
pass collects each expert's input Grams S_i on the fixture's training-side text (those of the intermediate
activations for down). The relative output error sqrt(sum_i tr(dW_i S_i dW_i^T) / sum_i tr(W_i S_i W_i^T)) is
measured for: the fit in floating point; the original rounded to nearest and by GPTQ (H = S_i); the fit's factors
as `mobe quantize` stores them below 8 bits (bases at 8 bits, A in orthonormal coordinates, groups down its
columns), rounded to nearest (`--factor-rounding nearest`), by GPTQ on the Hessians the weights stand in for
(`weights`, what `mobe quantize` writes without calibration: `mobe.quantize.proxy`, with least-error scales), and by
GPTQ with the inputs' Hessian in those coordinates (H = Q_i S_i Q_i^T over A's columns where the inputs meet the
columns, H = S_i over its rows where they meet the rows). Group size 64.

    OMP_NUM_THREADS=2 python benchmarks/calibrated_rounding.py [--fixtures coarse fine]

Prints a table, writes benchmarks/results/calibrated_rounding.json and .png.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from data_free import _calibration_text
from mobe import CheckpointReader, MobeConfig, fit_mobe
from mobe.architectures import moe_layout
from mobe.calibrate.collect import calibration_ids, collect_statistics
from mobe.factorize import MobeFactors, oriented
from mobe.fixtures import FINE_FIXTURE, TRAINED_FIXTURE, trained_fixture_path
from mobe.pipeline import resolve_settings
from mobe.quantize.factors import quantize_factor, quantize_mobe, weight_gram_hessian
from mobe.quantize.gptq import gptq_quantize, gptq_round
from mobe.quantize.groupwise import dequantize, fake_quantize, group_scales
from mobe.quantize.proxy import down_hessians, expert_activation
from results_io import add_run_options, grouped_bars, pyplot, save_figure, verdict_lines, write_results

FIXTURES = {"coarse": TRAINED_FIXTURE, "fine": FINE_FIXTURE}
GROUP = 64
COLUMNS = (
    "float",
    "dense rtn4",
    "dense gptq4",
    "factors rtn4",
    "factors weights4",
    "factors gptq4",
    "dense rtn3",
    "dense gptq3",
    "factors rtn3",
    "factors weights3",
    "factors gptq3",
)


def output_error(W: torch.Tensor, rebuilt: torch.Tensor, S: torch.Tensor, matrix: str) -> float:
    """Relative output error of the (E, p, d) stack (down: its transpose), inputs' Grams S (E, k, k)."""
    dW, Wd, Sd = (rebuilt - W).double(), W.double(), S.double()
    pattern = "epd,epq,eqd->" if matrix == "down" else "epd,edk,epk->"  # down's inputs meet the rows (p)
    return (torch.einsum(pattern, dW, Sd, dW) / torch.einsum(pattern, Wd, Sd, Wd)).sqrt().item()


def measure_matrix(
    W: torch.Tensor, S: torch.Tensor, matrix: str, config: MobeConfig, fits: dict[str, MobeFactors], reader_config: dict
) -> dict[str, float]:
    """One matrix's row; its fit is added to `fits` (down's data-free Hessians need the layer's gate and up)."""
    torch.manual_seed(0)
    fitted, _ = fit_mobe(W, config)
    fits[matrix] = fitted
    bases = quantize_factor(fitted.bases, 8, GROUP).dequantize(fitted.bases.dtype)
    coords = fitted.in_orthonormal_coordinates(bases)
    Q = coords.row_bases()
    transposed = fitted.transposed == "1"

    def rebuild(A: torch.Tensor) -> torch.Tensor:
        out = torch.bmm(A, Q)
        return out.transpose(1, 2) if transposed else out

    inputs_on_rows = (matrix == "down") != transposed  # in the fitted orientation
    row = {"float": output_error(W, fitted.reconstruct(), S, matrix)}
    stored = oriented(matrix, W)  # the checkpoint's orientation: inputs on the last dimension
    At = coords.A.transpose(1, 2)  # (E, r, rows): the stored integers' layout, groups along the rows
    for bits in (4, 3):
        row[f"dense rtn{bits}"] = output_error(W, oriented(matrix, fake_quantize(stored, bits, GROUP)), S, matrix)
        q, scales = gptq_quantize(stored, S, bits, GROUP)
        dense = oriented(matrix, dequantize(q, scales, GROUP, torch.float32))
        row[f"dense gptq{bits}"] = output_error(W, dense, S, matrix)
        row[f"factors rtn{bits}"] = output_error(W, rebuild(fake_quantize(At, bits, GROUP).transpose(1, 2)), S, matrix)
        if inputs_on_rows:
            q, scales = gptq_quantize(At, S, bits, GROUP)
            A = dequantize(q, scales, GROUP, torch.float32).transpose(1, 2)
        else:
            entry = group_scales(At, bits, GROUP).float().repeat_interleave(GROUP, -1)[..., : At.shape[-1]]
            entry = entry.transpose(1, 2)
            A = gptq_round(coords.A, Q @ S @ Q.transpose(1, 2), entry, bits).float() * entry
        row[f"factors gptq{bits}"] = output_error(W, rebuild(A), S, matrix)
        if matrix == "down":
            gate, up = fits["gate"].reconstruct, fits["up"].reconstruct
            proxy = down_hessians(gate, up, W.shape[0], expert_activation(reader_config))
        else:
            proxy = weight_gram_hessian(fitted, inputs_on_rows)
        weights, _ = quantize_mobe(fitted, bits, GROUP, grams=proxy, inputs_on_rows=inputs_on_rows, observer="mse")
        row[f"factors weights{bits}"] = output_error(W, weights.reconstruct(), S, matrix)
    return row


def run(args: argparse.Namespace, tmp: Path) -> dict:
    fixtures = {}
    for name in args.fixtures:
        fixture = trained_fixture_path(FIXTURES[name])
        reader = CheckpointReader(fixture)
        layout = moe_layout(reader.config)
        sequences = calibration_ids(fixture, _calibration_text(fixture, tmp), args.calibration_tokens, 512)
        stats = dict(collect_statistics(reader, layout, sequences, [args.layer]))[args.layer]
        config = resolve_settings(layout, MobeConfig(target_ratio=args.ratio, steps=args.steps))
        rows, fits = [], {}
        for matrix in ("gate", "up", "down"):
            W = oriented(matrix, layout.read_experts(reader, args.layer, matrix).float())
            S = stats.gram(matrix).float()
            row = {"matrix": matrix, **measure_matrix(W, S, matrix, config, fits, reader.config)}
            rows.append(row)
            print(f"  {name} {matrix}: " + " ".join(f"{k} {row[k]:.4f}" for k in COLUMNS), flush=True)
        fixtures[name] = {"fixture": FIXTURES[name], "rank": config.rank, "rows": rows}
    return {"fixtures": fixtures}


def verdicts(result: dict) -> list[str]:
    out = []
    for name, fixture in result["fixtures"].items():
        for bits in (4, 3):
            ratios = [r[f"factors rtn{bits}"] / r[f"factors gptq{bits}"] for r in fixture["rows"]]
            over = [r[f"factors rtn{bits}"] / r[f"dense rtn{bits}"] for r in fixture["rows"]]
            proxy = [r[f"factors weights{bits}"] / r[f"dense rtn{bits}"] for r in fixture["rows"]]
            out.append(
                f"{name} int{bits}: data-free factors rounded to nearest leave {min(over):.2f}-{max(over):.2f}x the "
                f"output error of the original rounded to nearest, by GPTQ on the weights' stand-in Hessians "
                f"{min(proxy):.2f}-{max(proxy):.2f}x; GPTQ on the inputs in orthonormal coordinates cuts round to "
                f"nearest's {min(ratios):.1f}-{max(ratios):.1f}x"
            )
    return out


def table(result: dict) -> str:
    lines = ["| fixture | matrix | " + " | ".join(COLUMNS) + " |", "|---|---|" + "---:|" * len(COLUMNS)]
    for name, fixture in result["fixtures"].items():
        for r in fixture["rows"]:
            lines.append(f"| {name} | {r['matrix']} | " + " | ".join(f"{r[k]:.4f}" for k in COLUMNS) + " |")
    return "\n".join(lines + verdict_lines(result)) + "\n"


def plot(result: dict, path: Path) -> None:
    plt = pyplot()
    names = list(result["fixtures"])
    fig, axes = plt.subplots(1, len(names), figsize=(7 * len(names), 4), dpi=120, squeeze=False)
    for ax, name in zip(axes[0], names, strict=True):
        rows = result["fixtures"][name]["rows"]
        grouped_bars(ax, [r["matrix"] for r in rows], {k: [r[k] for r in rows] for k in COLUMNS}, 8)
        ax.set_ylabel("relative output error (routed inputs)")
        ax.set_title(f"{name}: layer {result['args']['layer']}, {100 * result['args']['ratio']:.0f}% cut")
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=6, ncol=2)
    save_figure(fig, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layer", type=int, default=1)
    parser.add_argument("--ratio", type=float, default=0.25)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--calibration-tokens", type=int, default=8192)
    add_run_options(parser, "calibrated_rounding", threads=2, fixtures=list(FIXTURES))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        result = run(args, Path(tmp))
    result["verdicts"] = verdicts(result)
    print("\n" + table(result))
    write_results(result, args, start, plot, args.out)


if __name__ == "__main__":
    main()
