"""Low-bit MoBE factors: bases at 8 bits, A re-solved in orthonormal coordinates of the rounded mixed basis and
rounded with its groups down the columns; checked against the same steps written out another way (Cholesky instead
of QR, a per-group loop instead of the grouped quantiser) and against the error of rounding the dense products."""

import dataclasses
import json
import math

import pytest
import torch
from test_quantize import IDS, logits, reference_fake_quantize
from transformers import AutoModelForCausalLM

from mobe import MobeConfig, QuantizeConfig, compress
from mobe.architectures import moe_layout
from mobe.checkpoint import CheckpointReader
from mobe.cli.main import main
from mobe.factorize import MobeFactors, oriented
from mobe.factorize.mobe import orthonormal_rows
from mobe.fixtures import build_tiny_moe
from mobe.pipeline import read_native_factors
from mobe.quantize import fake_quantize, quantize_checkpoint, stored_bytes
from mobe.quantize.factors import quantize_mobe, weight_gram_hessian
from mobe.quantize.proxy import down_hessians
from mobe.runtime import MobeExperts


def _ill_conditioned_factors(seed: int = 0, E: int = 8, p: int = 48, r: int = 24, d: int = 64, m: int = 4):
    """Factors whose mixed bases have a wide spread of singular values, A solved exactly against them (what a fit
    returns): A is large and rests on cancellations."""
    g = torch.Generator().manual_seed(seed)
    spread = torch.logspace(0, -1.5, r)[:, None]
    bases = (torch.randn(1, m, r, d, generator=g) * spread).contiguous()
    coef = torch.softmax(torch.randn(E, m, generator=g), -1)
    factors = MobeFactors(A=torch.zeros(E, p, r), bases=bases, coef=coef, activation="tanh")
    M = factors.mixed_bases()
    W = torch.randn(E, p, d, generator=g) @ torch.linalg.pinv(M) @ M + 0.3 * torch.randn(E, p, d, generator=g)
    A = W @ torch.linalg.pinv(M)
    return dataclasses.replace(factors, A=A)


def _reference_rounding(
    factors: MobeFactors, bits: int, group: int, shared_bits: int | None = 8
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(rounded coordinates A', the entries that sit on a half step of the grid, orthonormal rows Q) of the integer
    factors, by Cholesky orthonormalisation and a per-group RTN loop. The grid puts each group's largest entry on a
    half step (scale = max|w| / ((2^b - 1) / 2)), so 1e-7 of difference between two computations may round it
    either way: those entries are compared apart."""
    bases = factors.bases if shared_bits is None else reference_fake_quantize(factors.bases, shared_bits, group)
    M = dataclasses.replace(factors, bases=bases).mixed_bases().double()
    L = torch.linalg.cholesky(M @ M.transpose(1, 2))
    Q = torch.linalg.solve_triangular(L, M, upper=False)  # orthonormal rows, same span, diag(L) > 0
    coords = (factors.A.double() @ factors.mixed_bases().double() @ Q.transpose(1, 2)).transpose(1, 2).float()
    rounded = reference_fake_quantize(coords, bits, group)
    step = torch.cat([g.abs().amax(-1, keepdim=True).expand_as(g) for g in coords.split(group, -1)], -1)
    ratio = coords / (step / ((2**bits - 1) / 2))
    ties = ((ratio.abs() - ratio.abs().floor()) - 0.5).abs() < 1e-3
    return rounded.transpose(1, 2), ties.transpose(1, 2), Q


def _assert_same_rounding(
    got: MobeFactors, factors: MobeFactors, bits: int, group: int, shared_bits: int | None = 8
) -> None:
    expected, ties, Q = _reference_rounding(factors, bits, group, shared_bits)
    assert ties.float().mean() < 0.25  # about one entry a group: the comparison covers the rest
    torch.testing.assert_close(got.A[~ties], expected[~ties], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got.row_bases().double(), Q, rtol=0, atol=1e-5)


def test_orthonormal_rows_is_the_cholesky_basis():
    M = _ill_conditioned_factors().mixed_bases().double()
    L = torch.linalg.cholesky(M @ M.transpose(1, 2))
    torch.testing.assert_close(orthonormal_rows(M), torch.linalg.solve_triangular(L, M, upper=False))


def test_orthonormal_coordinates_keep_the_products():
    factors = _ill_conditioned_factors()
    moved = factors.in_orthonormal_coordinates()
    assert moved.orthonormal == "1"
    torch.testing.assert_close(moved.reconstruct(), factors.reconstruct(), rtol=0, atol=1e-4)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_quantize_mobe_matches_the_reference_and_rounds_like_the_dense_products(bits):
    factors, group = _ill_conditioned_factors(bits), 16
    rounded, stored = quantize_mobe(factors, bits, group)
    assert stored["bases"].bits == 8 and stored["A"].bits == bits and stored["A"].column_groups
    _assert_same_rounding(rounded, factors, bits, group)
    products = factors.reconstruct()

    def error(w):
        return ((w - products).norm() / products.norm()).item()

    naive = dataclasses.replace(
        factors, A=fake_quantize(factors.A, bits, group), bases=fake_quantize(factors.bases, 8, group)
    )
    dense = error(fake_quantize(products, bits, group))
    assert error(rounded.reconstruct()) < 1.1 * dense  # what rounding the dense matrices costs
    assert error(naive.reconstruct()) > 1.7 * error(rounded.reconstruct())  # the factors as fitted: far worse


@pytest.fixture(scope="module")
def native(tmp_path_factory):
    root = tmp_path_factory.mktemp("lowbit")
    model = build_tiny_moe(root / "qwen3_moe", "qwen3_moe", initializer_range=0.2)
    out = root / "native"
    compress(model, out, MobeConfig(num_bases=4, steps=20, device="cpu"), progress=False)
    return out


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_native_low_bit_checkpoint_runs_and_reads_back_as_its_integer_factors(native, bits, tmp_path):
    out, group = tmp_path / f"int{bits}", 6  # divides neither r = 16 nor the rows: short last groups
    quantize_checkpoint(
        native, out, QuantizeConfig(bits=bits, group_size=group, factor_rounding="nearest"), progress=False
    )
    section = json.loads((out / "config.json").read_text())["mobe"]
    quantization = section["quantization"]
    assert quantization["field_bits"] == {"bases": 8} and quantization["column_groups"] == ["A"]
    assert all(meta["orthonormal"] == "1" for meta in section["factor_meta"].values())

    source, reader = CheckpointReader(native), CheckpointReader(out)
    layout = moe_layout(source.config)
    for layer in section["layers"]:
        for matrix in section["matrices"]:
            got = read_native_factors(reader, layout, layer, matrix)
            assert got.orthonormal == "1"
            _assert_same_rounding(got, read_native_factors(source, layout, layer, matrix), bits, group)

    # stored bytes: A's packed values down its columns, the bases' at 8 bits, plus float32 scales
    shapes, per_layer = section["factor_shapes"], 0
    for matrix in section["matrices"]:
        for field, shape in shapes[matrix].items():
            if field == "A":
                *lead, rows, cols = shape
                stored = math.prod(lead) * cols * (math.ceil(rows * bits / 8) + 4 * math.ceil(rows / group))
            elif field == "bases":
                stored = math.prod(shape[:-1]) * (shape[-1] + 4 * math.ceil(shape[-1] / group))
            else:
                continue
            per_layer += math.prod(shape) * 4 - stored
    assert stored_bytes(native) - stored_bytes(out) == per_layer * len(section["layers"])

    quantized = AutoModelForCausalLM.from_pretrained(out).eval()
    assert not [n for n, _ in quantized.named_parameters() if n.endswith(("mobe_A", "mobe_bases"))]
    dense = tmp_path / "dense"
    assert main(["reconstruct", str(out), "-o", str(dense), "-q"]) == 0
    with torch.no_grad():
        expected = logits(dense)
        torch.testing.assert_close(quantized(IDS).logits, expected, rtol=0, atol=1e-4)
        for module in (m for m in quantized.modules() if isinstance(m, MobeExperts)):
            module.configure(workspace_experts=2, cache_mib=1)  # the decoding path and the cache
        torch.testing.assert_close(quantized(IDS[:, :1]).logits, logits(dense)[:, :1], rtol=0, atol=1e-4)


def test_bases_kept_in_floating_point_with_shared_bits_16(native, tmp_path):
    out, group = tmp_path / "int3-float-bases", 6
    quantize_checkpoint(
        native, out, QuantizeConfig(bits=3, group_size=group, shared_bits=16, factor_rounding="nearest"), progress=False
    )
    section = json.loads((out / "config.json").read_text())["mobe"]
    assert section["quantization"]["fields"] == ["A"] and "field_bits" not in section["quantization"]
    source, reader = CheckpointReader(native), CheckpointReader(out)
    layout = moe_layout(source.config)
    for layer in section["layers"]:
        for matrix in section["matrices"]:
            fitted, got = (read_native_factors(r, layout, layer, matrix) for r in (source, reader))
            assert torch.equal(got.bases, fitted.bases)
            _assert_same_rounding(got, fitted, 3, group, shared_bits=None)
    dense = tmp_path / "dense"
    assert main(["reconstruct", str(out), "-o", str(dense), "-q"]) == 0
    with torch.no_grad():
        quantized = AutoModelForCausalLM.from_pretrained(out).eval()
        torch.testing.assert_close(quantized(IDS).logits, logits(dense), rtol=0, atol=1e-4)


def test_calibrated_rounding_lowers_the_output_error_and_compress_uses_it(tmp_path):
    """With the routed inputs' Grams S_i, A' is rounded by GPTQ (over its rows on S_i where the inputs meet them,
    else over its columns on Q_i S_i Q_i^T): the output error sum_i tr(dW_i S_i dW_i^T) falls below round-to-nearest's
    at the same bytes; `compress --calibration --quantize` rounds so, A first re-solved against the originals."""
    from mobe.calibrate.collect import calibration_ids, collect_statistics
    from mobe.fixtures import trained_fixture_path

    source = trained_fixture_path()
    text = tmp_path / "calibration.txt"
    text.write_text("The :mod:`os` module provides a portable way of using operating system functionality.\n" * 40)
    settings = dict(num_bases=2, rank=16, steps=4, eval_every=2, layers=(0, 3), matrices=("gate", "down"))
    settings |= dict(device="cpu", calibration=str(text), calibration_tokens=600, calibration_seq_len=128)
    native = tmp_path / "native"
    compress(source, native, MobeConfig(**settings), progress=False)
    reader = CheckpointReader(source)
    layout = moe_layout(reader.config)
    stats = dict(collect_statistics(reader, layout, calibration_ids(source, text, 600, 128), [0, 3]))
    quantize = QuantizeConfig(bits=3, group_size=16)
    plain, calibrated = tmp_path / "rtn", tmp_path / "gptq"
    quantize_checkpoint(native, plain, dataclasses.replace(quantize, factor_rounding="nearest"), progress=False)
    quantize_checkpoint(
        native, calibrated, quantize, progress=False, grams=lambda layer, m: stats[layer].gram(m).float()
    )
    assert stored_bytes(plain) == stored_bytes(calibrated)

    def output_error(path) -> float:
        total = 0.0
        for layer in (0, 3):
            for matrix in ("gate", "down"):
                fitted = read_native_factors(CheckpointReader(native), layout, layer, matrix).reconstruct().double()
                got = read_native_factors(CheckpointReader(path), layout, layer, matrix).reconstruct().double()
                dW, S = got - fitted, stats[layer].gram(matrix)  # (E, p, d) stacks; down's inputs meet the rows
                pattern = "epd,epq,eqd->" if matrix == "down" else "epd,edk,epk->"
                total += torch.einsum(pattern, dW, S, dW).item()
        return total

    assert output_error(calibrated) < 0.5 * output_error(plain)  # measured: 0.19

    # compress also re-solves A against the original experts on those inputs before rounding (`targets`)
    both, resolved = tmp_path / "compress-gptq", tmp_path / "gptq-resolved"
    compress(source, both, MobeConfig(**settings), progress=False, quantize=quantize)
    quantize_checkpoint(
        native,
        resolved,
        quantize,
        progress=False,
        grams=lambda layer, m: stats[layer].gram(m).float(),
        targets=lambda layer, m: oriented(m, layout.read_experts(reader, layer, m)),
    )
    for layer in (0, 3):
        for matrix in ("gate", "down"):
            a, b = (read_native_factors(CheckpointReader(p), layout, layer, matrix) for p in (both, resolved))
            torch.testing.assert_close(a.A, b.A, rtol=0, atol=1e-5)


def _shared_input_factors(transposed: str, seed: int = 0, E: int = 8, p: int = 48, r: int = 24, d: int = 64):
    """Factors whose products W_e (the unfitted orientation) share one set of input directions of spread energies:
    W_e = X_e diag(s) R with R one rotation for all experts, as the experts of a layer reading one hidden state."""
    g = torch.Generator().manual_seed(seed)
    bases = 0.5 * torch.randn(1, 4, r, d, generator=g)
    coef = torch.softmax(torch.randn(E, 4, generator=g), -1)
    factors = MobeFactors(A=torch.zeros(E, p, r), bases=bases, coef=coef, activation="tanh", transposed=transposed)
    k = p if transposed == "1" else d  # the unfitted products' input side: the fitted rows where transposed
    R = torch.linalg.qr(torch.randn(k, k, generator=g))[0]
    unfitted = torch.randn(E, d if transposed == "1" else p, k, generator=g) @ (torch.logspace(0, -2, k)[:, None] * R)
    fitted = unfitted.transpose(1, 2) if transposed == "1" else unfitted
    return dataclasses.replace(factors, A=fitted @ torch.linalg.pinv(factors.mixed_bases()))


@pytest.mark.parametrize("transposed", ["0", "1"])
@pytest.mark.parametrize("bits", [3, 4])
def test_weight_gram_lowers_the_error_on_inputs_shaped_like_the_weights(transposed, bits):
    """Inputs x ~ N(0, H) with H = sum_e W_e^T W_e, the products' own input-side Gram: their mean squared output
    error tr(dW_e H dW_e^T) is what GPTQ on that Gram lowers (measured 0.77-0.86 of round-to-nearest's over seeds
    and bits); the bytes stored are the same. Where the inputs meet the unfitted rows (down) there is no such Gram."""
    factors = _shared_input_factors(transposed)
    W = factors.reconstruct().double()  # (E, p_out, k): inputs on the last dimension
    H = torch.einsum("epd,epk->dk", W, W)

    def error(rounded: MobeFactors) -> float:
        dW = rounded.reconstruct().double() - W
        return torch.einsum("epd,dk,epk->", dW, H, dW).item()

    inputs_on_rows = transposed == "1"  # in the fitted orientation
    gram = weight_gram_hessian(factors, inputs_on_rows)
    torch.testing.assert_close(gram.double(), H, rtol=1e-5, atol=1e-5)
    plain, plain_stored = quantize_mobe(factors, bits, 16)
    weighted, stored = quantize_mobe(factors, bits, 16, grams=gram, inputs_on_rows=inputs_on_rows)
    assert stored["A"].values.shape == plain_stored["A"].values.shape
    assert stored["A"].scales.shape == plain_stored["A"].scales.shape
    assert error(weighted) < 0.9 * error(plain)
    assert weight_gram_hessian(factors, not inputs_on_rows) is None
    with pytest.raises(ValueError, match="inputs_on_rows"):
        quantize_mobe(factors, bits, 16, grams=gram)


def test_down_hessians_match_isserlis_closed_form():
    """With an identity activation h = (G x) * (U x) and x ~ N(0, C), Isserlis' theorem gives
    E[h_k h_l] = (g_k C u_k)(g_l C u_l) + (g_k C g_l)(u_k C u_l) + (g_k C u_l)(u_k C g_l); C is the gate's and up's
    input-side Gram over its mean diagonal. The Monte Carlo stand-in agrees within its sampling error, and in chunks
    of any size."""
    g = torch.Generator().manual_seed(0)
    E, p, d = 5, 3, 6
    G, U = torch.randn(E, p, d, generator=g), torch.randn(E, p, d, generator=g)
    C = (torch.einsum("epd,epk->dk", G, G) + torch.einsum("epd,epk->dk", U, U)).double()
    C = C / C.diagonal().mean()
    Gd, Ud = G.double(), U.double()
    gCu = torch.einsum("epd,dk,eqk->epq", Gd, C, Ud)  # (g_k C u_l)
    gCg = torch.einsum("epd,dk,eqk->epq", Gd, C, Gd)
    uCu = torch.einsum("epd,dk,eqk->epq", Ud, C, Ud)
    own = gCu.diagonal(dim1=1, dim2=2)
    want = own[:, :, None] * own[:, None, :] + gCg * uCu + gCu * gCu.transpose(1, 2)
    got = down_hessians(lambda i: G[i], lambda i: U[i], E, lambda x: x, samples=400_000, chunk=2)
    scale = want.diagonal(dim1=1, dim2=2).mean()
    assert ((got.double() - want).abs().max() / scale).item() < 0.03
    again = down_hessians(lambda i: G[i], lambda i: U[i], E, lambda x: x, samples=400_000, chunk=E)
    torch.testing.assert_close(again, got, rtol=1e-4, atol=1e-4 * scale.item())


def test_data_free_checkpoint_rounds_every_matrix_by_its_weight_hessian(native, tmp_path):
    """`QuantizeConfig()` (factor_rounding "weights") writes what `quantize_mobe` gives on the data-free Hessians:
    gate and up by their input-side Gram, down by its intermediate activations' Grams from the layer's fitted gate
    and up; scales by the least-error clip; the same bytes as round to nearest ("nearest"), and a lower output error
    on those Hessians than it."""
    out, plain, group = tmp_path / "weights", tmp_path / "rtn", 6
    quantize_checkpoint(native, out, QuantizeConfig(bits=3, group_size=group), progress=False)
    quantize_checkpoint(
        native, plain, QuantizeConfig(bits=3, group_size=group, factor_rounding="nearest"), progress=False
    )
    assert stored_bytes(out) == stored_bytes(plain)
    section = json.loads((out / "config.json").read_text())["mobe"]
    source = CheckpointReader(native)
    layout = moe_layout(source.config)
    for layer in section["layers"]:
        fitted = {m: read_native_factors(source, layout, layer, m) for m in section["matrices"]}
        for matrix in section["matrices"]:
            inputs_on_rows = (matrix == "down") != (fitted[matrix].transposed == "1")
            if matrix == "down":
                E = fitted[matrix].num_experts
                gram = down_hessians(fitted["gate"].reconstruct, fitted["up"].reconstruct, E, torch.nn.functional.silu)
            else:
                gram = weight_gram_hessian(fitted[matrix], inputs_on_rows)
            want, _ = quantize_mobe(fitted[matrix], 3, group, grams=gram, inputs_on_rows=inputs_on_rows, observer="mse")
            got = read_native_factors(CheckpointReader(out), layout, layer, matrix)
            torch.testing.assert_close(got.A, want.A, rtol=0, atol=1e-6)
            nearest = read_native_factors(CheckpointReader(plain), layout, layer, matrix)
            W = fitted[matrix].reconstruct().double()
            pattern = "epd,epq,eqd->" if matrix == "down" else "epd,dk,epk->"
            errors = [
                torch.einsum(pattern, f.reconstruct() - W, gram.double(), f.reconstruct() - W) for f in (got, nearest)
            ]
            assert errors[0] < errors[1]


@pytest.mark.parametrize("inputs_on_rows", [False, True])
def test_resolve_to_targets_is_the_least_squares_fit_on_the_inputs(inputs_on_rows):
    """A' re-solved against the original weights W_i in the metric of inputs X_i equals the least-squares solution
    of min ||(W_i - A Q_i) X_i^T|| (columns) / ||X_i (W_i - A Q_i)|| (rows) computed by lstsq on the samples
    themselves; an expert that saw no input keeps its A'."""
    from mobe.quantize.factors import resolve_to_targets

    g = torch.Generator().manual_seed(3)
    E, p, r, d, n = 4, 12, 6, 10, 40
    factors = MobeFactors(
        A=torch.randn(E, p, r, generator=g, dtype=torch.float64),
        bases=torch.randn(1, 3, r, d, generator=g, dtype=torch.float64),
        coef=torch.softmax(torch.randn(E, 3, generator=g, dtype=torch.float64), -1),
        activation="tanh",
    ).in_orthonormal_coordinates()
    W = torch.randn(E, p, d, generator=g, dtype=torch.float64)
    k = p if inputs_on_rows else d
    X = torch.randn(E, n, k, generator=g, dtype=torch.float64) * torch.logspace(0, -1, k, dtype=torch.float64)
    X[-1] = 0  # the last expert saw no token
    S = X.transpose(1, 2) @ X
    got = resolve_to_targets(factors, W, S, inputs_on_rows, damping=0.0).A
    Q = factors.row_bases().double()
    for e in range(E - 1):
        if inputs_on_rows:  # X (W - A Q): the inputs weight the rows, the least-squares A is W Q^T for any full X
            want = W[e] @ Q[e].T
        else:  # (W - A Q) X^T: A (Q X^T) = W X^T
            want = torch.linalg.lstsq((Q[e] @ X[e].T).T, (W[e] @ X[e].T).T).solution.T
        torch.testing.assert_close(got[e], want, rtol=1e-7, atol=1e-9)
    if not inputs_on_rows:
        torch.testing.assert_close(got[-1], factors.A[-1], rtol=0, atol=0)


@pytest.mark.parametrize("bits", [3, 4])
def test_slbf_factors_solved_against_their_mixed_bases_round_like_the_dense_products(bits):
    """SLBF's A_i multiplies a mixed basis as MoBE's does: solved exactly against it (what a converged fit returns),
    rounding A as it is multiplies the error (here 5x); in orthonormal coordinates of the mixed basis of 8-bit U and
    V it is what rounding the dense products costs."""
    from mobe.factorize.slbf import SlbfFactors

    g = torch.Generator().manual_seed(0)
    E, r, c, k, group = 8, 16, 48, 4, 8
    factors = SlbfFactors(
        A=torch.zeros(E, r, r),
        U=torch.randn(E, r - k, k, generator=g),
        V=torch.randn(E, k, c, generator=g) * torch.logspace(0, -1, k)[:, None],
        pivots=torch.arange(k).expand(E, k).contiguous(),
        coef=torch.softmax(torch.randn(E, E, generator=g), -1),
        activation="silu",
        transposed="0",
    )
    factors = dataclasses.replace(
        factors, A=torch.randn(E, r, c, generator=g) @ torch.linalg.pinv(factors.mixed_bases())
    )
    products = factors.reconstruct()

    def error(w):
        return ((w - products).norm() / products.norm()).item()

    moved = factors.in_orthonormal_coordinates()
    torch.testing.assert_close(moved.reconstruct(), products, rtol=0, atol=1e-4)
    rounded, stored = quantize_mobe(factors, bits, group)
    assert stored["U"].bits == stored["V"].bits == 8 and stored["A"].bits == bits and stored["A"].column_groups
    naive = dataclasses.replace(
        factors,
        A=fake_quantize(factors.A, bits, group),
        U=fake_quantize(factors.U, 8, group),
        V=fake_quantize(factors.V, 8, group),
    )
    assert error(rounded.reconstruct()) < 1.1 * error(fake_quantize(products, bits, group))
    assert error(naive.reconstruct()) > 3 * error(rounded.reconstruct())


@pytest.mark.parametrize("transposed", [False, True])
def test_slbf_checkpoint_rounds_in_orthonormal_coordinates_and_runs(tmp_path, transposed):
    """A native SLBF checkpoint below 8 bits keeps U and V at 8 bits and A in orthonormal coordinates; it records
    so, reads back as those factors and runs through the runtime as its reconstruction."""
    from mobe.factorize.slbf import SlbfFactors

    sizes = dict(hidden_size=32, moe_intermediate_size=48) if transposed else {}
    model = build_tiny_moe(tmp_path / "qwen3_moe", "qwen3_moe", initializer_range=0.2, **sizes)
    native = tmp_path / "slbf"
    compress(model, native, MobeConfig(method="slbf", target_ratio=0.2, steps=30, device="cpu"), progress=False)
    out, group = tmp_path / "int3", 8
    quantize_checkpoint(
        native, out, QuantizeConfig(bits=3, group_size=group, factor_rounding="nearest"), progress=False
    )
    section = json.loads((out / "config.json").read_text())["mobe"]
    assert section["quantization"]["field_bits"] == {"U": 8, "V": 8}
    assert section["quantization"]["column_groups"] == ["A"]
    source, reader = CheckpointReader(native), CheckpointReader(out)
    layout = moe_layout(source.config)
    for layer in section["layers"]:
        for matrix in section["matrices"]:
            fitted = read_native_factors(source, layout, layer, matrix)
            got = read_native_factors(reader, layout, layer, matrix)
            assert isinstance(got, SlbfFactors) and got.orthonormal == "1"
            assert got.transposed == fitted.transposed == ("1" if transposed else "0")
            want, _ = quantize_mobe(fitted, 3, group)
            torch.testing.assert_close(got.reconstruct(), want.reconstruct(), rtol=0, atol=1e-5)
    quantized = AutoModelForCausalLM.from_pretrained(out).eval()
    dense = tmp_path / "dense"
    assert main(["reconstruct", str(out), "-o", str(dense), "-q"]) == 0
    with torch.no_grad():
        torch.testing.assert_close(quantized(IDS).logits, logits(dense), rtol=0, atol=1e-4)
