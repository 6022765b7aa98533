"""The `fast` MoBE schedule: a short joint Adam phase, then variable projection with orthogonalised basis steps.

Measured on the trained fixture (benchmarks/schedules.py), three things make it reach the error of the paper's
10k Adam steps in a fraction of the time:

1. Row-space coordinates. With T_i = U_i C_i (thin SVD, C_i = S_i V_i^T of min(p, d) rows),
   ||A_i M - T_i|| = ||X_i M - C_i|| for A_i = U_i X_i, and the best A_i always lies in span(U_i). Fitting C
   instead of T is exact and costs min(p, d) / p of the work (half on a layer with p = 2d).
2. Variable projection. After a short joint phase that moves the bases into the non-linear range of the
   activation, every step solves each expert's X_i exactly (an r x r Cholesky solve) and follows the gradient
   of the reduced loss over bases and logits alone (by the envelope theorem, the partial gradient at the
   optimal X_i). Solving X_i only every few steps, or from the start, measured worse.
3. Orthogonalised momentum on the bases (Newton-Schulz, as in the Muon optimiser) with a cosine decay, and
   Adam on the logits; this beat Adam on the bases at the same step count on every fixture matrix tried.

With an output metric (calibration), the loss is sum_i ||(A_i M_i - W_i) L_i||^2 (right: gate, up) or
||L_i^T (A_i M_i - W_i)||^2 (left: down). A left metric only changes variables, A'_i = L_i^T A_i, so the fit is the
unweighted one of the whitened targets L_i^T W_i, and A_i = L_i^{-T} A'_i at the end. A right metric acts on the
mixed bases: every step solves X_i against M_i L_i and the row space of W_i L_i, which is the same algorithm with
one more (differentiable) product per expert.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ..config import DEFAULT_RIDGE, MobeConfig
from .base import FitStats
from .primitives import expert_chunks, init_svd_groups, softmax_mix
from .weighted import OutputWeighting, init_svd_groups_weighted

WARM_FRACTION = 0.15  # share of the steps spent in the joint Adam phase
BASES_LR = 0.3  # step of the orthogonalised basis update (the bases' entries are O(1) after the warm phase)
LOGITS_LR = 0.1  # Adam step of the coefficient logits in the projected phase
MOMENTUM = 0.95


def row_space_targets(
    target: Tensor, chunk: int | None = None, metric: OutputWeighting | None = None
) -> tuple[Tensor, Tensor]:
    """T_i = U_i C_i with U_i orthonormal (E, p, k) and C_i = S_i V_i^T (E, k, d), k = min(p, d); with a right
    `metric`, of the whitened T_i L_i. Each matrix's SVD is its own: computed `chunk` experts at a time, so that
    the SVD's and the metric's transients are a chunk's, not the stack's."""
    num_experts, p, d = target.shape
    chunk = chunk or num_experts
    U = target.new_empty(num_experts, p, min(p, d))
    C = target.new_empty(num_experts, min(p, d), d)
    for start in range(0, num_experts, chunk):
        idx = slice(start, min(start + chunk, num_experts))
        part = target[idx] if metric is None else metric.apply(target[idx], idx)
        left, S, Vh = torch.linalg.svd(part, full_matrices=False)
        U[idx] = left
        torch.mul(S.unsqueeze(-1), Vh, out=C[idx])
    return U, C


def joint_loss_backward(
    A: Tensor,
    bases: Tensor,
    logits: Tensor,
    target: Tensor,
    act: Callable[[Tensor], Tensor],
    chunk: int,
    numel: int,
    metric: OutputWeighting | None = None,
) -> float:
    """sum_i ||A_i M_i L_i - C_i||^2 / numel (the loss of Algorithm 1; L_i = I without a right `metric`);
    accumulates its gradient into all three."""
    total = 0.0
    for g, idx in expert_chunks(target.shape[0], bases.shape[0], chunk):
        mixed = whitened_mixed(bases[g], logits[idx], act, metric, idx)
        part = (torch.bmm(A[idx], mixed) - target[idx]).pow(2).sum() / numel
        if part.requires_grad:
            part.backward()
        total += part.item()
        del mixed, part  # not held beside the next chunk's forward
    return total


def whitened_mixed(
    bases: Tensor, logits: Tensor, act: Callable[[Tensor], Tensor], metric: OutputWeighting | None, idx: slice
) -> Tensor:
    """The mixed bases of experts `idx`, times their right metric L_i where there is one: (n, r, d)."""
    mixed = softmax_mix(bases, logits, act)
    return mixed if metric is None else metric.apply(mixed, idx)


def least_squares_factor(target: Tensor, mixed: Tensor, exact: bool = True, ridge: float = DEFAULT_RIDGE) -> Tensor:
    """argmin_X ||X_i M_i - C_i||^2 + lambda_i ||X_i||^2 for each expert: X_i = C_i M_i^T (M_i M_i^T + lambda_i I)^-1,
    by one batched Cholesky factor; lambda_i is `ridge` times the mean diagonal of M_i M_i^T.

    `exact=False` multiplies by the explicit inverse from the factor instead of two triangular solves: a quarter
    less time for a projected step's solve on CPU, for a gradient that need not be exact to the last bit.
    """
    exact_dtype = torch.promote_types(target.dtype, torch.float32)  # Cholesky needs float32 under a bf16 autocast
    gram = (mixed @ mixed.transpose(1, 2)).to(exact_dtype)
    damping = ridge * gram.diagonal(dim1=1, dim2=2).mean(-1).clamp_min(1e-30)
    gram = gram + damping[:, None, None] * torch.eye(gram.shape[-1], device=gram.device, dtype=gram.dtype)
    cross = (target @ mixed.transpose(1, 2)).to(exact_dtype)
    factor = torch.linalg.cholesky(gram)
    if exact:
        return torch.cholesky_solve(cross.transpose(1, 2), factor).transpose(1, 2)
    return cross @ torch.cholesky_inverse(factor)  # half the time of the triangular solves on CPU


def projected_loss_backward(
    bases: Tensor,
    logits: Tensor,
    target: Tensor,
    act: Callable[[Tensor], Tensor],
    chunk: int,
    numel: int,
    metric: OutputWeighting | None = None,
    ridge: float = DEFAULT_RIDGE,
) -> float:
    """Reduced loss min_X sum_i ||X_i M_i - C_i||^2 / numel; accumulates its gradient into bases and logits.

    The optimal X_i makes the partial derivative in X vanish, so the reduced gradient is that of the full loss
    at fixed X_i: dL/dM_i = -2 X_i^T (C_i - X_i M_i) / numel, pushed through the mixing by autograd.
    """
    total = 0.0
    for g, idx in expert_chunks(target.shape[0], bases.shape[0], chunk):
        mixed = whitened_mixed(bases[g], logits[idx], act, metric, idx)
        with torch.no_grad():
            flat = mixed.detach()
            X = least_squares_factor(target[idx], flat, exact=False, ridge=ridge)
            residual = torch.baddbmm(target[idx], X, flat, alpha=-1)
            total += torch.dot(residual.view(-1), residual.view(-1)).item() / numel
            grad = torch.bmm(X.transpose(1, 2), residual).mul_(-2.0 / numel)
            del residual  # not held through the backward
        mixed.backward(grad)
        del mixed, flat, grad  # nor beside the next chunk's forward
    return total


def solve_factors(
    bases: Tensor,
    logits: Tensor,
    target: Tensor,
    act: Callable[[Tensor], Tensor],
    chunk: int,
    metric: OutputWeighting | None = None,
    ridge: float = DEFAULT_RIDGE,
) -> Tensor:
    """Exact X for every expert given bases and logits: (E, k, r)."""
    X = target.new_empty(target.shape[0], target.shape[1], bases.shape[2])
    with torch.no_grad():
        for g, idx in expert_chunks(target.shape[0], bases.shape[0], chunk):
            mixed = whitened_mixed(bases[g], logits[idx], act, metric, idx)
            X[idx] = least_squares_factor(target[idx], mixed, ridge=ridge)
            del mixed
    return X


@functools.cache
def newton_schulz_dtype(device: torch.device) -> torch.dtype:
    """bfloat16 where its matmuls are native (CUDA, CPUs with AVX512-BF16/AMX): the iteration only needs a direction,
    and there it halves the cost of a projected step's basis update; float32 elsewhere."""
    if device.type == "cuda" or (device.type == "cpu" and torch.ops.mkldnn._is_mkldnn_bf16_supported()):
        return torch.bfloat16
    return torch.float32


def orthogonalize(update: Tensor, steps: int = 5) -> Tensor:
    """Approximate U V^T of each matrix in `update` (..., r, d) by a quintic Newton-Schulz iteration (Muon's).

    An update with all singular values near 1 moves every direction of a basis at the same rate, which the
    ill-conditioned basis gradients need; five iterations suffice because only the direction matters, and so does
    bfloat16 (as in Muon): it moves the result by about 3% of its norm, well inside the iteration's own spread.
    """
    a, b, c = 3.4445, -4.7750, 2.0315
    X = (update / (update.norm(dim=(-2, -1), keepdim=True) + 1e-7)).to(newton_schulz_dtype(update.device))
    wide = X.shape[-2] <= X.shape[-1]
    if not wide:
        X = X.transpose(-2, -1)
    for _ in range(steps):
        gram = X @ X.transpose(-2, -1)
        X = a * X + (b * gram + c * gram @ gram) @ X
    return (X if wide else X.transpose(-2, -1)).to(update.dtype)


def cosine(step: int, total: int) -> float:
    return 0.5 * (1.0 + math.cos(math.pi * step / max(total, 1)))


def fit_fast(
    target: Tensor,
    rank: int,
    config: MobeConfig,
    act: Callable[[Tensor], Tensor],
    chunk: int,
    desc: str | None = None,
    weighting: OutputWeighting | None = None,
) -> tuple[Tensor, Tensor, Tensor, FitStats]:
    """Fit the scaled stack `target` (E, p, d); returns (A (E, p, r), bases, logits, stats), losses scaled.

    Starts from the paper's SVD-of-groups initialisation (computed on the row-space targets, which gives the
    same bases; in the output metric where there is one). The kept state is the best reduced loss seen, its A
    solved exactly, so the returned loss is never above that of any state the projected phase visited.
    """
    if weighting is not None and weighting.side == "left":  # a change of variables: fit L^T W, unwhiten A
        weighting = weighting.to(target.device)
        A, bases, logits, stats = fit_fast(weighting.apply(target), rank, config, act, chunk, desc)
        return weighting.unwhiten(A), bases, logits, stats
    start = time.perf_counter()
    metric = None if weighting is None else weighting.to(target.device)
    U, C = row_space_targets(target, chunk, metric)
    numel = target.numel()
    steps = config.steps
    warm = min(steps, round(WARM_FRACTION * steps))
    if metric is None:
        init = init_svd_groups(C, config.num_bases, rank, config.groups, config.start_logit)
    else:
        # The start of the plain fit (SVD groups of the row-space factors of W), in the metric: with identity Grams
        # it is the plain fit's start. Its A_i = U'_i A0_i is then expressed in the whitened row space, U_i^T A_i.
        U_plain, C_plain = row_space_targets(target, chunk)
        A0, bases0, logits0 = init_svd_groups_weighted(
            C_plain, metric, config.num_bases, rank, config.groups, config.start_logit
        )
        init = (U.transpose(1, 2) @ U_plain @ A0, bases0, logits0)
        del U_plain, C_plain, A0  # the plain row space served the start only: not held beside the fit
    A, bases, logits = (t.requires_grad_() for t in init)
    trace: list[tuple[float, int, float]] = []
    init_loss = math.nan
    bar = tqdm(total=steps, desc=desc, leave=False, disable=desc is None)

    if warm == 0:
        with torch.no_grad():
            init_loss = joint_loss_backward(A, bases, logits, C, act, chunk, numel, metric)
    optimizer = torch.optim.Adam([A, bases, logits], lr=config.lr)
    for step in range(warm):
        optimizer.zero_grad(set_to_none=True)
        loss = joint_loss_backward(A, bases, logits, C, act, chunk, numel, metric)
        init_loss = loss if step == 0 else init_loss
        trace.append((time.perf_counter() - start, step, loss))
        optimizer.step()
        bar.update()
    del optimizer  # its moments (two of every parameter) are not used by the projected phase

    logit_opt = torch.optim.Adam([logits], lr=LOGITS_LR)
    momentum = torch.zeros_like(bases)
    best_loss, best_step, best_state = math.inf, warm, (bases.detach().clone(), logits.detach().clone())
    checked_loss = math.inf
    projected = steps - warm
    step = warm
    for k in range(projected + 1):  # the last pass only evaluates the final state
        step = warm + k
        logit_opt.zero_grad(set_to_none=True)
        bases.grad = None
        loss = projected_loss_backward(bases, logits, C, act, chunk, numel, metric, config.ridge)
        trace.append((time.perf_counter() - start, step, loss))
        if loss < best_loss:
            best_loss, best_step = loss, step
            best_state = (bases.detach().clone(), logits.detach().clone())
        if k == projected:
            break
        if k % config.eval_every == 0:  # stop rule: too little gain since the last check
            if config.stop_tol > 0 and best_loss > (1.0 - config.stop_tol) * checked_loss:
                break
            checked_loss = best_loss
        lr_scale = cosine(k, projected)
        for group in logit_opt.param_groups:
            group["lr"] = LOGITS_LR * lr_scale
        logit_opt.step()
        with torch.no_grad():
            momentum.mul_(MOMENTUM).add_(bases.grad)
            bases.sub_(BASES_LR * lr_scale * orthogonalize(bases.grad + MOMENTUM * momentum))
        bar.update()
        if k % 50 == 0:
            bar.set_postfix(loss=f"{loss:.3e}", best=f"{best_loss:.3e}")
    bar.close()

    bases_best, logits_best = best_state
    X = solve_factors(bases_best, logits_best, C, act, chunk, metric, config.ridge)
    stats = FitStats(init_loss, best_loss, best_step, step, time.perf_counter() - start, 1.0, trace)
    return torch.bmm(U, X), bases_best, logits_best, stats
