"""The optimiser loop of the iterative fits that keep the best state seen (MoBE's adam and paper schedules, SLBF)."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .base import FitStats


@dataclass
class KeptState:
    """What `keep_best` returns: the kept tensors and their loss, the first loss and the trace, as measured."""

    state: tuple[Tensor, ...]
    best_loss: float
    best_step: int
    init_loss: float
    trace: list[tuple[float, int, float]] = field(default_factory=list)

    def fit_stats(self, steps: int, start: float, scale: float) -> FitStats:
        """The fit's statistics, its losses back in the original units (a fit of W / scale), timed from `start`."""
        unit = scale**2
        return FitStats(
            self.init_loss * unit,
            self.best_loss * unit,
            self.best_step,
            steps,
            time.perf_counter() - start,
            scale,
            self.trace,
        )


def keep_best(
    loss_and_backward: Callable[[bool], float],
    params: Sequence[Tensor],
    optimizer: torch.optim.Optimizer,
    steps: int,
    eval_every: int,
    *,
    start: float,
    unit: float = 1.0,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    late: bool = False,
    desc: str | None = None,
) -> KeptState:
    """Run `steps` optimiser steps and one last evaluation; keep a copy of `params` at their best checked loss.

    `loss_and_backward(train)` returns the loss of the current state and, when `train`, accumulates its gradient.
    The loss is checked every `eval_every`-th step and after the last one. `late=True` is the authors' train.py
    bookkeeping (the `paper` schedule): every `eval_every`-th step checks the loss measured before that step but
    keeps the state after it, and a run that never checked keeps its last state. The trace holds (seconds since
    `start`, step, loss * `unit`).
    """

    def snapshot() -> tuple[Tensor, ...]:
        return tuple(t.detach().clone() for t in params)

    kept = KeptState(snapshot(), math.inf, 0, math.nan)
    bar = tqdm(range(steps + 1), desc=desc, leave=False, disable=desc is None)
    for step in bar:
        optimizer.zero_grad(set_to_none=True)
        final = step == steps
        loss = loss_and_backward(not final)
        if step == 0:
            kept.init_loss = loss
        kept.trace.append((time.perf_counter() - start, step, loss * unit))
        if not late and (step % eval_every == 0 or final) and loss < kept.best_loss:  # the state that gave this loss
            kept.state, kept.best_loss, kept.best_step = snapshot(), loss, step
        if final:
            if late and kept.best_step == 0:  # never checked (steps < eval_every): keep the last state
                kept.state, kept.best_loss, kept.best_step = snapshot(), loss, step
            break
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        if late and (step + 1) % eval_every == 0 and loss < kept.best_loss:
            kept.state, kept.best_loss, kept.best_step = snapshot(), loss, step + 1
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss:.3e}", best=f"{kept.best_loss:.3e}")
    bar.close()
    return kept
