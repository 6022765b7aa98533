"""Integer MoBE factors at 8, 4 and 3 bits by three rounding schemes, beside the original at the same bits.

For each trained fixture and cut, the default recipe is fitted once (`mobe.compress`, data-free, gate/up/down) and
its factors are rounded:

- `as fitted`: A and the bases round-to-nearest at the bits, as they come out of the fit;
- `GPTQ, mixed basis`: the bases at 8 bits, A re-solved against the rounded bases' mixed basis M_i and rounded by
  GPTQ on H = M_i M_i^T (the data-free loss of rounding A_i is tr(dA_i M_i M_i^T dA_i^T));
- `orthonormal`: the bases at 8 bits, A in orthonormal coordinates of the rounded mixed basis, groups down its
  columns, rounded to nearest (`mobe quantize --factor-rounding nearest`; at 8 bits every scheme of `mobe quantize`
  writes the factors as fitted, which this row shows is as good there);
- `orthonormal, GPTQ on the weights`: what `mobe quantize` / `--quantize` write below 8 bits without calibration
  (`mobe.quantize.proxy`): the same storage, A rounded by GPTQ on the second moments the weights stand in for
  (gate, up: the experts' input-side Gram; down: its intermediate activations on Gaussian inputs shaped by that
  Gram, through the fitted gate and up), each group's scale the clip with the least rounding error.
- `orthonormal, GPTQ on sampled text`: what `mobe compress --quantize-factor-rounding sampled` writes
  (`mobe.calibrate.sample`): the same storage, A re-solved against the original experts on the routed inputs of
  tokens the original samples itself (compress's default count, `MobeConfig.calibration_tokens`), then rounded by
  GPTQ on them with least-error scales. Its recipe's 16-bit loss, the bar's, is the row `re-solved on sampled text`
  (A re-solved, not rounded).

Each variant's held-out perplexity is measured through mobe's runtime (the native model with the variant's factors
in place; the default one also from the checkpoint `mobe quantize` writes, whose stored bytes are counted), with
the settings of benchmarks/data_free.py; the original's experts are rounded to nearest at the same bits (what
`mobe quantize` writes for a dense checkpoint; the perplexity of that checkpoint equals the fake-quantised model's,
tests/quantize). Stored bytes count every tensor of the checkpoint: packed integers, 16-bit scales, the rest as
stored. Group size 64 everywhere (the fine fixture's p = 64).

    OMP_NUM_THREADS=1 python benchmarks/low_bit_factors.py [--fixtures coarse fine] [--ratios 0.25 0.5] [--steps 300]
        [--schemes ...] [--merge]

`--merge` keeps the rows of the JSON at --out that this run does not measure (other fixtures, schemes, or the
original's rows with --skip-original): the fit is seeded and deterministic, so its 16-bit rows of one setting agree
between runs (checked: where a fixture's 16-bit perplexities differ by more than 0.1%, torch's thread count moving them
by about 0.01%, only the original's rows of the old JSON are kept for it).

Prints a table and verdicts, writes benchmarks/results/low_bit_factors.json and .png.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from data_free import _calibration_text
from mobe import CheckpointReader, MobeConfig, QuantizeConfig, compress, quantize_checkpoint
from mobe.architectures import moe_layout
from mobe.calibrate.collect import calibration_ids, collect_statistics
from mobe.calibrate.run import calibration_grams, collect_sampled
from mobe.evaluate.perplexity import sliding_window_perplexity
from mobe.export import factor_tensor_names
from mobe.factorize import MobeFactors, oriented
from mobe.factorize.schedule import least_squares_factor
from mobe.fixtures import FINE_FIXTURE, TRAINED_FIXTURE, trained_fixture_path
from mobe.pipeline import read_native_factors
from mobe.quantize import fake_quantize, stored_bytes
from mobe.quantize.factors import quantize_factor, quantize_mobe, resolve_to_targets, weight_gram_hessian
from mobe.quantize.gptq import gptq_quantize
from mobe.quantize.groupwise import dequantize
from mobe.quantize.proxy import down_hessians, expert_activation
from results_io import add_run_options, pyplot, rewrite_verdicts, save_figure, verdict_lines, write_results

HERE = Path(__file__).resolve().parent
FIXTURES = {"coarse": TRAINED_FIXTURE, "fine": FINE_FIXTURE}
WEIGHTS = "orthonormal, GPTQ on the weights"  # the data-free default of `mobe quantize` below 8 bits
SAMPLED = "orthonormal, GPTQ on sampled text"  # --quantize-factor-rounding sampled: text the original samples
SCHEMES = ("as fitted", "GPTQ, mixed basis", "orthonormal", WEIGHTS, SAMPLED)
RESOLVED = "re-solved on sampled text"  # 16 bits: what SAMPLED rounds, A re-solved against the original on those inputs
CALIBRATED = "orthonormal, GPTQ on the inputs"  # --calibrated: fit, re-solve and rounding on the training-side text
GROUP = 64
SCALE_BYTES = 2  # 16-bit scales, as the bf16 fixtures store them


def _packed_bytes(shape: tuple[int, ...] | list[int], bits: int) -> int:
    """Bytes of a factor or weight stored as `bits`-bit values in groups of GROUP along its last dimension."""
    rows, n = math.prod(shape[:-1]), shape[-1]
    return rows * (math.ceil(n * bits / 8) + SCALE_BYTES * math.ceil(n / GROUP))


def round_factors(
    factors: MobeFactors,
    scheme: str,
    bits: int,
    grams: torch.Tensor | None = None,
    matrix: str = "",
    original: torch.Tensor | None = None,
) -> tuple[MobeFactors, int]:
    """The factors a rounding scheme stores, read back in float, and the bytes of A and the bases as stored
    (`grams`: the second moments of `matrix`'s inputs: the routed inputs' for the calibrated and sampled schemes,
    the weights' stand-ins for `WEIGHTS`; `original`: the original (E, p, d) stack, what `SAMPLED` re-solves A
    against)."""
    shared_shapes = [getattr(factors, f).shape for f in factors.shared_fields]  # MoBE's bases, SLBF's U and V
    if scheme == "as fitted":
        fields = {f: fake_quantize(getattr(factors, f), bits, GROUP) for f in ("A", *factors.shared_fields)}
        rounded = dataclasses.replace(factors, **fields)
        return rounded, _packed_bytes(factors.A.shape, bits) + sum(_packed_bytes(s, bits) for s in shared_shapes)
    shared = 8
    if scheme in ("orthonormal", WEIGHTS, CALIBRATED, SAMPLED):
        on_rows = (matrix == "down") != (factors.transposed == "1")
        extra = {"grams": grams, "inputs_on_rows": on_rows} if scheme in (WEIGHTS, CALIBRATED, SAMPLED) else {}
        if scheme in (WEIGHTS, SAMPLED):
            extra["observer"] = "mse"
        if scheme in (SAMPLED, CALIBRATED):  # what compress does: A re-solved against the original on the inputs
            extra["targets"] = original.transpose(1, 2) if factors.transposed == "1" else original
        rounded, _ = quantize_mobe(factors, bits, GROUP, shared_bits=shared, **extra)
        # A stored down its columns: groups along its rows
        a_shape = (*factors.A.shape[:-2], factors.A.shape[-1], factors.A.shape[-2])
        return rounded, _packed_bytes(a_shape, bits) + sum(_packed_bytes(s, shared) for s in shared_shapes)
    bases = quantize_factor(factors.bases, shared, GROUP).dequantize(factors.bases.dtype)
    M = dataclasses.replace(factors, bases=bases).mixed_bases().double()
    target = factors.A.double() @ factors.mixed_bases().double()
    A = least_squares_factor(target, M)
    q, scales = gptq_quantize(A, M @ M.transpose(1, 2), bits, GROUP)
    rounded = dataclasses.replace(factors, A=dequantize(q, scales, GROUP, torch.float32), bases=bases)
    return rounded, _packed_bytes(factors.A.shape, bits) + _packed_bytes(factors.bases.shape, shared)


def weight_hessians(fitted: dict[tuple[int, str], MobeFactors], config: dict) -> dict[tuple[int, str], torch.Tensor]:
    """The data-free Hessians `mobe quantize` rounds each (layer, matrix) by (`mobe.quantize.proxy`): gate's and up's
    input-side Gram, down's intermediate activations on Gaussian inputs through the layer's fitted gate and up."""
    out = {}
    for (layer, matrix), factors in fitted.items():
        inputs_on_rows = (matrix == "down") != (factors.transposed == "1")
        if matrix != "down":
            out[(layer, matrix)] = weight_gram_hessian(factors, inputs_on_rows)
        elif (layer, "gate") in fitted and (layer, "up") in fitted:
            gate, up = fitted[(layer, "gate")].reconstruct, fitted[(layer, "up")].reconstruct
            out[(layer, matrix)] = down_hessians(gate, up, factors.num_experts, expert_activation(config))
    return out


class Evaluator:
    """Held-out perplexity of one model object whose expert weights are swapped per variant."""

    def __init__(self, path: Path, ids: torch.Tensor, args: argparse.Namespace):
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        self.ids, self.args = ids, args

    def perplexity(self) -> float:
        a = self.args
        return sliding_window_perplexity(
            self.model, self.ids, context=a.context, stride=a.stride, progress=False
        ).perplexity

    @torch.no_grad()
    def set_products(self, layer: int, matrix: str, products: torch.Tensor) -> None:
        """Put a variant's expert products (E, p, d; down's as its transpose) into the original's fused experts
        (`gate_up_proj` (E, 2p, d): gate then up; `down_proj` (E, d, p)). A dense forward gives the perplexity of
        the factors' products at a fraction of the runtime's cost of re-orthonormalising the mixed bases every
        forward; the checkpoint `mobe quantize` writes is read through the runtime, and agrees."""
        experts = self.model.get_submodule(f"model.layers.{layer}.mlp.experts")
        p = products.shape[1]
        if matrix == "down":
            experts.down_proj.copy_(products.transpose(1, 2))
        else:
            rows = slice(0, p) if matrix == "gate" else slice(p, 2 * p)
            experts.gate_up_proj[:, rows].copy_(products)


def _relative_error(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    num = sum(((a.double() - b.double()) ** 2).sum().item() for a, b in pairs)
    return math.sqrt(num / sum((b.double() ** 2).sum().item() for _, b in pairs))


def _original_rows(fixture: Path, ids: torch.Tensor, args: argparse.Namespace, stacks: dict) -> list[dict]:
    """The original's experts round-to-nearest at each bit width (fake-quantised in place), perplexity and bytes."""
    reader = CheckpointReader(fixture)
    layout = moe_layout(reader.config)
    model = AutoModelForCausalLM.from_pretrained(fixture, dtype=torch.float32).eval()
    evaluator = Evaluator.__new__(Evaluator)
    evaluator.model, evaluator.ids, evaluator.args = model, ids, args
    experts = {
        layout.arch.tensor_name(layer, e, m)
        for layer in layout.moe_layers
        for e in range(layout.num_experts)
        for m in ("gate", "up", "down")
    }
    rest = stored_bytes(reader) - sum(math.prod(reader.shape(n)) * 2 for n in experts)
    fused = {n: p for n, p in model.named_parameters() if ".experts." in n}
    saved = {n: p.detach().clone() for n, p in fused.items()}
    rows = []
    for bits in (16, 8, 4, 3):
        with torch.no_grad():
            for n, p in fused.items():
                p.copy_(saved[n] if bits == 16 else fake_quantize(saved[n], bits, GROUP))
        start = time.perf_counter()
        ppl = evaluator.perplexity()
        expert_bytes = sum(
            math.prod(reader.shape(n)) * 2 if bits == 16 else _packed_bytes(reader.shape(n), bits) for n in experts
        )
        rows.append(
            {
                "variant": "original",
                "bits": bits,
                "scheme": "round to nearest",
                "perplexity": ppl,
                "stored_bytes": rest + expert_bytes,
                "seconds": time.perf_counter() - start,
                "relative_error": _relative_error(
                    [(oriented(m, fake_quantize(oriented(m, w), bits, GROUP)), w) for (_, m), w in stacks.items()]
                )
                if bits < 16
                else 0.0,
            }
        )
        print(f"  original int{bits if bits < 16 else '16'}: ppl {ppl:.3f}", flush=True)
    return rows


def run_fixture(name: str, args: argparse.Namespace, tmp: Path) -> dict:
    fixture = trained_fixture_path(FIXTURES[name])
    reader = CheckpointReader(fixture)
    layout = moe_layout(reader.config)
    ids = AutoTokenizer.from_pretrained(fixture)((fixture / "heldout.txt").read_text(), return_tensors="pt").input_ids
    ids = ids[0][: args.tokens]
    stacks = {
        (layer, m): oriented(m, layout.read_experts(reader, layer, m).float())
        for layer in layout.moe_layers
        for m in ("gate", "up", "down")
    }
    print(f"{name}: E={layout.num_experts} p={layout.intermediate_size} d={layout.hidden_size}", flush=True)
    rows = [] if args.skip_original else _original_rows(fixture, ids, args, stacks)
    original = rows[0]["perplexity"] if rows else _kept_original(args.out, name)
    calibration, stats = {}, {}
    if args.calibrated:  # the calibrated fit's text, and the Grams the rounding uses (what compress collects)
        text = _calibration_text(fixture, tmp)
        calibration = dict(calibration=str(text), calibration_tokens=args.calibration_tokens, calibration_seq_len=512)
        sequences = calibration_ids(fixture, text, args.calibration_tokens, 512)
        stats = dict(collect_statistics(reader, layout, sequences, layout.moe_layers))
    sampled = None
    for ratio in args.ratios:
        kind = "calibrated" if args.calibrated else "data-free"
        method = "" if args.method == "mobe" else f"-{args.method}"
        native = (Path(args.fits) if args.fits else tmp) / f"{name}-{ratio}-{args.steps}steps-{kind}{method}"
        start = time.perf_counter()
        settings = MobeConfig(method=args.method, target_ratio=ratio, steps=args.steps, device="cpu", **calibration)
        fit_seconds = None  # --fits: a finished fit of these settings is reused (seeded: the same factors)
        if not (native / "config.json").exists():
            compress(fixture, native, settings, progress=False)
            fit_seconds = time.perf_counter() - start
        nreader = CheckpointReader(native)
        nlayout = moe_layout(nreader.config)
        jobs = [(layer, m) for layer in nreader.config["mobe"]["layers"] for m in nreader.config["mobe"]["matrices"]]
        fitted = {job: read_native_factors(nreader, nlayout, *job) for job in jobs}
        # the fields stored as 16-bit floats and rounded (not the mixing weights, not SLBF's integer pivots)
        names = {
            job: {
                f: n
                for f, n in factor_tensor_names(nlayout, *job, fitted[job].tensor_fields).items()
                if f != "coef" and f not in fitted[job].index_fields
            }
            for job in jobs
        }
        factor_names = {n for job in jobs for n in names[job].values()}
        rest = stored_bytes(nreader) - sum(math.prod(nreader.shape(n)) * 2 for job in jobs for n in names[job].values())
        evaluator = Evaluator(fixture, ids, args)
        schemes = [
            s
            for s in (("orthonormal", WEIGHTS, CALIBRATED) if args.calibrated else SCHEMES)
            if s in args.schemes and (args.method == "mobe" or s != "GPTQ, mixed basis")
        ]
        proxies = weight_hessians(fitted, config=nreader.config) if WEIGHTS in schemes else {}
        if SAMPLED in schemes and sampled is None:  # what compress collects: the same for every cut
            start = time.perf_counter()
            folder = tmp / f"{name}-sampled"
            tokens = settings.calibration_tokens  # compress's default count
            collect_sampled(reader, layout, settings, tokens, 512, folder, layout.moe_layers, False)
            sampled = calibration_grams(folder)
            print(f"  sampled {tokens} tokens: {time.perf_counter() - start:.0f} s", flush=True)
        variants = [("16-bit", 16)] + ([(RESOLVED, 16)] if SAMPLED in schemes else [])
        variants += [(s, b) for b in args.bits for s in schemes]
        for scheme, bits in variants:
            start = time.perf_counter()
            pairs, factor_bytes = [], 0
            for job in jobs:
                factors = fitted[job]
                if bits == 16:
                    rounded, size = (
                        factors,
                        sum(math.prod(nreader.shape(n)) * 2 for n in names[job].values()),
                    )
                    if scheme == RESOLVED:  # the 16-bit loss of the sampled scheme's recipe: fit, then re-solve
                        on_rows = (job[1] == "down") != (factors.transposed == "1")
                        target = stacks[job].transpose(1, 2) if factors.transposed == "1" else stacks[job]
                        orthonormal = factors.in_orthonormal_coordinates()
                        rounded = resolve_to_targets(orthonormal, target, sampled(*job), on_rows)
                else:
                    grams = None
                    if scheme == CALIBRATED:
                        grams = stats[job[0]].gram(job[1]).float()
                    elif scheme == WEIGHTS:
                        grams = proxies[job]
                    elif scheme == SAMPLED:
                        grams = sampled(*job)
                    rounded, size = round_factors(factors, scheme, bits, grams, job[1], stacks[job])
                factor_bytes += size
                evaluator.set_products(*job, rounded.reconstruct())
                pairs.append((rounded.reconstruct(), stacks[job]))
            ppl = evaluator.perplexity()
            row = {
                "variant": f"{'SLBF' if args.method == 'slbf' else 'MoBE'} {100 * ratio:.0f}%",
                "ratio": ratio,
                "bits": bits,
                "scheme": scheme,
                "perplexity": ppl,
                "relative_error": _relative_error(pairs),
                "stored_bytes": rest + factor_bytes,
                "seconds": time.perf_counter() - start,
                "fit_seconds": fit_seconds,
            }
            if scheme in (WEIGHTS, SAMPLED) and bits in args.written_bits and not args.calibrated:
                # what `mobe quantize` writes, or `mobe compress --quantize-factor-rounding sampled`
                out = tmp / f"{name}-{ratio}-int{bits}-{'sampled' if scheme == SAMPLED else 'weights'}"
                how = QuantizeConfig(bits=bits, group_size=GROUP, factor_rounding="weights")
                extra = {}
                if scheme == SAMPLED:
                    how = dataclasses.replace(how, factor_rounding="sampled")
                    extra = {"grams": sampled, "targets": lambda layer, m: stacks[(layer, m)]}
                quantize_checkpoint(native, out, how, progress=False, **extra)
                written = Evaluator(out, ids, args)
                row["checkpoint_perplexity"] = written.perplexity()
                row["checkpoint_bytes"] = stored_bytes(out)
                del written
            rows.append(row)
            print(
                f"  {row['variant']} {scheme:>18} int{bits:<2} err {row['relative_error']:.4f} ppl {ppl:.3f} "
                f"({ppl - original:+.3f})",
                flush=True,
            )
        del evaluator, factor_names
    for row in rows:
        row["perplexity_change"] = row["perplexity"] - original
        row["relative_change"] = row["perplexity"] / original - 1
    return {
        "fixture": FIXTURES[name],
        "shape": {"E": layout.num_experts, "p": layout.intermediate_size, "d": layout.hidden_size},
        "original_perplexity": original,
        "rows": rows,
    }


def _row_key(row: dict) -> tuple:
    return row["variant"], row["bits"], row["scheme"]


def _kept_original(out: str, name: str) -> float:
    """The original's perplexity of fixture `name` in the JSON at `out` (--skip-original)."""
    path = Path(out).with_suffix(".json")
    if not path.exists():
        raise SystemExit(f"--skip-original needs {path} with the original's rows of {name}")
    return json.loads(path.read_text())["fixtures"][name]["original_perplexity"]


def merge(result: dict, out: str) -> dict:
    """`result` with the rows of the JSON at `out` that it lacks (other fixtures; per fixture, rows of other
    variants, bits or schemes), in the old order with the new rows where they were. Where a fixture's 16-bit factor
    rows differ by more than 0.1% the fits are not the same: only the original's rows are kept for it."""
    path = Path(out).with_suffix(".json")
    if not path.exists():
        return result
    old = json.loads(path.read_text())
    fixtures = {}
    for name in {**old["fixtures"], **result["fixtures"]}:
        if name not in result["fixtures"]:
            fixtures[name] = old["fixtures"][name]
            continue
        new = result["fixtures"][name]
        if name not in old["fixtures"]:
            fixtures[name] = new
            continue
        kept = {_row_key(r): r for r in old["fixtures"][name]["rows"]}
        fresh = {_row_key(r): r for r in new["rows"]}
        for key, row in fresh.items():
            if key in kept and row["bits"] == 16 and abs(row["perplexity"] / kept[key]["perplexity"] - 1) > 1e-3:
                print(
                    f"{name} {key}: 16-bit perplexity {row['perplexity']:.4f} against the kept "
                    f"{kept[key]['perplexity']:.4f}: another fit; only the original's rows are kept",
                    flush=True,
                )
                kept = {k: r for k, r in kept.items() if r["variant"] == "original"}
                break
        order = list(kept) + [k for k in fresh if k not in kept]
        rows = [fresh.get(k, kept.get(k)) for k in order]
        original = new["original_perplexity"]
        for row in rows:
            row["perplexity_change"] = row["perplexity"] - original
            row["relative_change"] = row["perplexity"] / original - 1
        fixtures[name] = {**new, "rows": rows}
    return {**result, "fixtures": fixtures, "merged_from": str(path.name)}


def join(paths: list[str], out: str) -> None:
    """`--join`: one result from several runs' JSONs, each fixture from the last run that measured it."""
    runs = [json.loads(Path(path).read_text()) for path in paths]
    fixtures = {}
    for run in runs:
        for name in run["args"]["fixtures"]:
            fixtures[name] = run["fixtures"][name]
    result = {
        "fixtures": fixtures,
        "joined": [{"file": Path(p).name, "args": r["args"]} for p, r in zip(paths, runs, strict=True)],
    }
    result["verdicts"] = verdicts(result)
    result["args"] = runs[-1]["args"] | {"fixtures": list(fixtures)}
    result["seconds"] = sum(r["seconds"] for r in runs)
    stem = Path(out)
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    plot(result, stem.with_suffix(".png"))
    print("\n".join(result["verdicts"]))


def verdicts(result: dict) -> list[str]:
    """int4 / int3 factors against 1.25 x (the recipe's 16-bit loss + the original's loss at the bits) + 0.1%."""
    out = []
    gptq = {}
    path = HERE / "results" / "gptq_baselines.json"
    if path.exists():  # the original's GPTQ losses (llm-compressor), where that benchmark has run
        gptq = json.loads(path.read_text())
    for name, fixture in result["fixtures"].items():
        rows = fixture["rows"]
        orig = {r["bits"]: r["relative_change"] for r in rows if r["variant"] == "original"}
        for ratio in sorted({r["ratio"] for r in rows if "ratio" in r}):
            mine = [r for r in rows if r.get("ratio") == ratio]
            plain16 = next(r["relative_change"] for r in mine if r["bits"] == 16 and r["scheme"] == "16-bit")
            resolved16 = next((r["relative_change"] for r in mine if r["scheme"] == RESOLVED), None)
            for bits, scheme in ((b, s) for b in (4, 3) for s in (WEIGHTS, SAMPLED, CALIBRATED)):
                row = next((r for r in mine if r["bits"] == bits and r["scheme"] == scheme), None)
                if row is None:
                    continue
                # the same recipe's 16-bit loss: the sampled scheme re-solves A before it rounds
                loss16 = resolved16 if scheme == SAMPLED and resolved16 is not None else plain16
                base, source = orig[bits], "round-to-nearest"
                reference = _gptq_loss(gptq, name, bits) if bits == 3 else None  # the int3 bar is GPTQ's
                if reference is not None:
                    base, source = reference, "GPTQ (llm-compressor)"
                bar = 1.25 * (loss16 + base) + 0.001
                ok = row["relative_change"] <= bar
                out.append(
                    f"{name} {100 * ratio:.0f}% int{bits} factors ({scheme}): {100 * row['relative_change']:+.2f}% "
                    "perplexity "
                    f"against at most {100 * bar:.2f}% (1.25 x ({100 * loss16:+.2f}% 16-bit"
                    f"{' re-solved' if scheme == SAMPLED and resolved16 is not None else ''} + {100 * base:+.2f}% "
                    f"original int{bits} by {source}) + 0.1%): {'yes' if ok else 'NO'}"
                )
    return out


def _gptq_loss(gptq: dict, name: str, bits: int) -> float | None:
    """The original's relative perplexity change by llm-compressor's GPTQ at `bits` (gptq_baselines.py)."""
    fixture = gptq.get("fixtures", {}).get(name)
    if not fixture:
        return None
    for row in fixture.get("rows", []):
        if row.get("bits") == bits and row.get("method") == "llm-compressor GPTQ":
            return row["perplexity"] / fixture["original_perplexity"] - 1
    return None


def summary(result: dict) -> str:
    """One sentence for the README: int4 factors of each fixture's 25% cut, by the default data-free rounding and on
    sampled text, against its 16-bit factors and the original in int4."""
    parts = []
    for name, fixture in result["fixtures"].items():
        rows = [r for r in fixture["rows"] if r.get("ratio") == 0.25]
        mobe = {(r["bits"], r["scheme"]): r for r in rows}
        orig4 = next((r for r in fixture["rows"] if r["variant"] == "original" and r["bits"] == 4), None)
        if (4, WEIGHTS) not in mobe or (16, "16-bit") not in mobe or orig4 is None:
            continue
        sampled = mobe.get((4, SAMPLED))
        on_sampled = f", on sampled text {100 * sampled['relative_change']:+.2f}%" if sampled else ""
        parts.append(
            f"{name} {100 * mobe[4, WEIGHTS]['relative_change']:+.2f}%{on_sampled} at "
            f"{mobe[4, WEIGHTS]['stored_bytes'] / 2**20:.1f} MiB (16-bit factors "
            f"{100 * mobe[16, '16-bit']['relative_change']:+.2f}%, the original in int4 "
            f"{100 * orig4['relative_change']:+.2f}% at {orig4['stored_bytes'] / 2**20:.1f} MiB)"
        )
    return (
        "Integer MoBE factors (`--quantize int4` on a 25% cut, data-free: rounded on the weights, the default, and "
        "with `--quantize-factor-rounding sampled` on text the model samples itself; "
        "[docs/quantize.md](docs/quantize.md#integer-mobe-factors-below-8-bits)), held-out perplexity change: "
        + "; ".join(parts)
        + ".\n"
    )


def table(result: dict) -> str:
    """Markdown: per fixture, perplexity change and weight error of each variant, with stored bytes."""
    lines = []
    for name, fixture in result["fixtures"].items():
        s = fixture["shape"]
        lines += [
            f"**{name}** (`{fixture['fixture']}`, E={s['E']} p={s['p']} d={s['d']}; original perplexity "
            f"{fixture['original_perplexity']:.2f})",
            "",
            "| variant | bits | rounding | MiB stored | d ppl | written checkpoint: d ppl | rel. weight error |",
            "|---|---:|---|---:|---:|---:|---:|",
        ]
        original = fixture["original_perplexity"]
        for r in fixture["rows"]:
            bits = "16" if r["bits"] == 16 else f"int{r['bits']}"
            written = ""
            if "checkpoint_perplexity" in r and r["bits"] < 8:
                written = f"{r['checkpoint_perplexity'] - original:+.3f} ({r['checkpoint_bytes'] / 2**20:.2f} MiB)"
            lines.append(
                f"| {r['variant']} | {bits} | {r['scheme']} | {r['stored_bytes'] / 2**20:.2f} | "
                f"{r['perplexity_change']:+.3f} ({100 * r['relative_change']:+.2f}%) | {written} | "
                f"{r['relative_error']:.3f} |"
            )
        lines.append("")
    return "\n".join(lines + verdict_lines(result)).rstrip() + "\n"


def plot(result: dict, path: Path) -> None:
    """Perplexity increase against stored bytes: one colour per variant and scheme, the bits written beside."""
    plt = pyplot()
    names = list(result["fixtures"])
    fig, axes = plt.subplots(1, len(names), figsize=(6.5 * len(names), 4.5), dpi=120, squeeze=False)
    markers = {
        "round to nearest": "s",
        "as fitted": "x",
        "GPTQ, mixed basis": "^",
        "orthonormal": "o",
        WEIGHTS: "D",
        SAMPLED: "P",
        "16-bit": "*",
    }
    for ax, name in zip(axes[0], names, strict=True):
        colours: dict[str, str] = {}
        for r in result["fixtures"][name]["rows"]:
            plain = r["bits"] == 16 and r["variant"] != "original" and r["scheme"] != RESOLVED
            scheme = "16-bit" if plain else r["scheme"]
            label = f"{r['variant']}, {scheme}"
            colour = colours.setdefault(label, f"C{len(colours) % 10}")
            x, y = r["stored_bytes"] / 2**20, max(r["relative_change"], 1e-5) * 100
            ax.scatter(x, y, marker=markers.get(scheme, "*"), color=colour, s=30, label=label)
            ax.annotate(str(r["bits"]), (x, y), fontsize=6)
        ax.set_yscale("log")
        ax.set_xlabel("MiB stored (whole checkpoint)")
        ax.set_ylabel("held-out perplexity increase, % (bits beside each point)")
        ax.set_title(name)
        ax.grid(alpha=0.3)
        handles, labels = ax.get_legend_handles_labels()
        unique = dict(zip(labels, handles, strict=True))
        ax.legend(unique.values(), unique.keys(), fontsize=6)
    save_figure(fig, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.25, 0.5])
    parser.add_argument("--bits", type=int, nargs="+", default=[8, 4, 3], choices=[2, 3, 4, 8])
    parser.add_argument("--steps", type=int, default=300, help="steps of the default recipe's fit")
    parser.add_argument(
        "--method",
        default="mobe",
        choices=["mobe", "slbf"],
        help="the fit whose factors are rounded: mobe (the default recipe) or slbf (its low-rank bases, U and V, "
        "stand for the bases; the scheme `GPTQ, mixed basis` is MoBE's only)",
    )
    parser.add_argument(
        "--calibrated",
        action="store_true",
        help="fit on the fixture's training-side text and round the factors also by GPTQ on its routed inputs "
        "(what compress --calibration --quantize writes), beside the data-free rounding",
    )
    parser.add_argument("--schemes", nargs="+", default=[*SCHEMES, CALIBRATED], choices=[*SCHEMES, CALIBRATED])
    parser.add_argument(
        "--written-bits",
        type=int,
        nargs="*",
        default=[4, 3],
        help="bits at which the checkpoint `mobe quantize` writes is also read through the runtime",
    )
    parser.add_argument("--fits", help="keep the fits in this folder and reuse them (same --steps, seeded)")
    parser.add_argument("--merge", action="store_true", help="keep the rows at --out this run does not measure")
    parser.add_argument(
        "--skip-original", action="store_true", help="with --merge: keep the original's rows at --out, not rerun"
    )
    parser.add_argument("--calibration-tokens", type=int, default=16384)
    parser.add_argument("--tokens", type=int, default=16384, help="held-out tokens scored")
    parser.add_argument("--context", type=int, default=256)
    parser.add_argument("--stride", type=int, default=128)
    add_run_options(parser, "low_bit_factors", threads=1, fixtures=list(FIXTURES))
    parser.add_argument(
        "--reverdict",
        action="store_true",
        help="recompute the verdicts of the JSON at --out from its rows (after benchmarks/gptq_baselines.py ran)",
    )
    parser.add_argument(
        "--join",
        nargs="+",
        metavar="JSON",
        help="write --out from these runs' fixtures (a later file's fixture replaces an earlier one's), verdicts "
        "and plot recomputed: runs of one fixture each, side by side in one table",
    )
    args = parser.parse_args()
    if args.reverdict:
        return rewrite_verdicts(args.out, verdicts)
    if args.join:
        return join(args.join, args.out)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        result = {"fixtures": {name: run_fixture(name, args, Path(tmp)) for name in args.fixtures}}
    if args.merge:
        result = merge(result, args.out)
    result["verdicts"] = verdicts(result)
    print("\n" + table(result))
    print("\n".join(result["verdicts"]))
    write_results(result, args, start, plot, args.out)


if __name__ == "__main__":
    main()
