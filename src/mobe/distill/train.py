"""The distillation loop: the student's trainable tensors against the teacher's stored top-k targets.

The loss per token is KL(teacher || student) of the next-token distributions plus `router_weight` times the mean
over MoE layers of KL(teacher's routing || student's routing) (both coarsened to the teacher's top-k, see loss.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..config import DistillConfig
from ..export import FACTOR_PREFIX
from .loss import topk_kl
from .targets import TeacherTargets
from .trainable import RouterHooks

MAX_HALVINGS = 6  # a held-out check that does not improve halves the learning rate; the 7th stops training


@dataclass
class Evaluation:
    """Token-weighted means over some sequences: KL to the teacher and the student's next-token perplexity."""

    kl: float
    perplexity: float
    tokens: int


def split(n: int, heldout_fraction: float) -> tuple[list[int], list[int]]:
    """Training and held-out sequence indices: the held-out part is the text's last tenth (at least one)."""
    held = max(1, math.ceil(n * heldout_fraction))
    if held >= n:
        raise ValueError(f"the distillation text gives {n} sequence(s): too few to hold some out")
    return list(range(n - held)), list(range(n - held, n))


def routing_kl(student_logits: list[Tensor], targets: TeacherTargets, i: int) -> Tensor:
    """Per token of sequence i: the mean over MoE layers of KL(teacher's routing || student's routing), from the
    student routers' logits of its forward."""
    total = 0.0
    for k, logits in enumerate(student_logits):
        out = logits.device
        total = total + topk_kl(
            logits,
            targets.router_logprobs[i][k].to(out),
            targets.router_indices[i][k].to(out).long(),
            targets.router_tail[i][k].to(out),
        )
    return total / len(student_logits)


def _forward(model: nn.Module, targets: TeacherTargets, i: int) -> tuple[Tensor, Tensor]:
    """(KL per token, next-token NLL per token) of sequence i."""
    ids = targets.input_ids[i].to(model.get_input_embeddings().weight.device)
    logits = model(input_ids=ids[None]).logits[0]
    out = logits.device  # the last device when the model is spread over several
    kl = topk_kl(logits, targets.logprobs[i].to(out), targets.indices[i].to(out), targets.tail[i].to(out))
    ids = ids.to(out)
    nll = torch.nn.functional.cross_entropy(logits[:-1].float(), ids[1:], reduction="none")
    return kl, nll


def lr_factor(step: int, total: int, warmup: float) -> float:
    """Linear warmup over the first `warmup` share of the steps, then a cosine decay to zero at `total`."""
    warm = max(1, round(warmup * total))
    if step < warm:
        return (step + 1) / warm
    return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))


@torch.no_grad()
def evaluate(model: nn.Module, targets: TeacherTargets, indices: list[int]) -> Evaluation:
    kl_sum = nll_sum = 0.0
    kl_n = nll_n = 0
    for i in indices:
        kl, nll = _forward(model, targets, i)
        kl_sum, kl_n = kl_sum + kl.sum().item(), kl_n + kl.numel()
        nll_sum, nll_n = nll_sum + nll.sum().item(), nll_n + nll.numel()
    return Evaluation(kl_sum / kl_n, math.exp(nll_sum / max(nll_n, 1)), kl_n)


def train(
    model: nn.Module,
    params: dict[str, nn.Parameter],
    targets: TeacherTargets,
    config: DistillConfig,
    progress: bool = False,
    routers: list[nn.Module] | None = None,
) -> tuple[list[dict], int]:
    """Train `params` for `config.epochs`; `model` ends with the state best on the held-out part (its output KL).

    Schedule `cosine`: linear warmup, then cosine decay. Schedule `halve`: a held-out check that is not better than
    the best so far returns to the best state and halves the learning rate. `routers` (the student's, in the
    order of the teacher's recorded routing) take part in the loss when `config.router_weight` > 0.

    Returns the history (one row per held-out check, the first before any step) and the best state's step.
    """
    train_idx, held_idx = split(len(targets), config.heldout_fraction)
    own = [p for n, p in params.items() if n.endswith(f".{FACTOR_PREFIX}A")]  # each expert's own factor
    rest = [p for n, p in params.items() if not n.endswith(f".{FACTOR_PREFIX}A")]
    groups = [{"params": rest, "lr": config.lr}, {"params": own, "lr": config.lr * config.a_lr_scale}]
    optimizer = torch.optim.AdamW([g for g in groups if g["params"]], weight_decay=0.0)
    base_lrs = [g["lr"] for g in optimizer.param_groups]
    generator = torch.Generator().manual_seed(config.seed)
    steps_per_epoch = math.ceil(len(train_idx) / config.batch)
    total = steps_per_epoch * config.epochs

    first = evaluate(model, targets, held_idx)
    history = [{"step": 0, "train_kl": None, "heldout_kl": first.kl, "heldout_perplexity": first.perplexity}]
    best_kl, best_step = first.kl, 0
    best = {n: p.detach().clone() for n, p in params.items()}
    if total == 0:
        return history, best_step
    model.train()  # gradient checkpointing applies in training mode only
    batches = []
    for _ in range(config.epochs):
        order = [train_idx[j] for j in torch.randperm(len(train_idx), generator=generator).tolist()]
        batches += [order[start : start + config.batch] for start in range(0, len(order), config.batch)]
    use_routing = config.router_weight > 0 and bool(routers) and targets.has_routing
    routed: list[Tensor | None] = [None] * len(routers or [])  # the student routers' logits of the latest forward
    hooks = RouterHooks(routers if use_routing else [], routed.__setitem__)
    running, running_tokens, halvings = 0.0, 0, 0
    bar = tqdm(total=total, desc="Distill", disable=not progress, leave=False)
    with hooks, bar:  # an interrupted run leaves no hook on the caller's model
        for step, batch in enumerate(batches, start=1):
            if config.schedule == "cosine":
                for group, base in zip(optimizer.param_groups, base_lrs, strict=True):
                    group["lr"] = base * lr_factor(step - 1, total, config.warmup)
            tokens = sum(targets.input_ids[i].numel() for i in batch)
            optimizer.zero_grad(set_to_none=True)
            for i in batch:
                kl, _ = _forward(model, targets, i)
                loss = kl.sum()
                if use_routing:
                    loss = loss + config.router_weight * routing_kl(routed, targets, i).sum()
                (loss / tokens).backward()
                running, running_tokens = running + kl.sum().item(), running_tokens + kl.numel()
            optimizer.step()
            bar.update()
            if step % config.eval_every and step != total:
                continue
            model.eval()
            held = evaluate(model, targets, held_idx)
            model.train()
            history.append(
                {
                    "step": step,
                    "train_kl": running / running_tokens,
                    "heldout_kl": held.kl,
                    "heldout_perplexity": held.perplexity,
                    "lr": optimizer.param_groups[0]["lr"],
                }
            )
            running, running_tokens = 0.0, 0
            bar.set_postfix(heldout_kl=f"{held.kl:.4f}")
            if held.kl < best_kl:
                best_kl, best_step = held.kl, step
                best = {n: p.detach().clone() for n, p in params.items()}
                continue
            if config.schedule == "cosine":  # the schedule goes on; the best state is what is kept
                continue
            halvings += 1  # overshot: back to the best state, at half the learning rate, with fresh moments
            if halvings > MAX_HALVINGS:
                break
            with torch.no_grad():
                for name, param in params.items():
                    param.copy_(best[name])
            optimizer.state.clear()
            for group in optimizer.param_groups:
                group["lr"] *= 0.5
    model.eval()
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(best[name])
    return history, best_step
