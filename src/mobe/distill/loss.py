"""KL divergence to a teacher known only by its top-k log-probabilities (pure tensor maths, no I/O).

Storing the teacher's full distribution costs a vocabulary of floats per token; its top-k log-probabilities plus the
log-probability of everything else ("the tail") describe a coarsened distribution over k + 1 outcomes. The loss is
the exact KL divergence between the teacher's and the student's coarsenings: the full KL when k covers the
vocabulary, never above it otherwise (coarsening cannot increase a KL divergence).
"""

from __future__ import annotations

import torch
from torch import Tensor

_NEG = -1e30  # stands for log(0) where -inf would turn 0 * inf into NaN (values and gradients)


def _tail_logprob(logprobs: Tensor, indices: Tensor) -> Tensor:
    """log of the probability outside `indices`, computed over the remaining entries (exact, no 1 - sum)."""
    return logprobs.scatter(-1, indices, _NEG).logsumexp(dim=-1)


def teacher_topk(logits: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """The teacher's top-k log-probabilities (float32), their token ids and the tail's log-probability."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    values, indices = logprobs.topk(min(k, logits.shape[-1]), dim=-1)
    return values, indices, _tail_logprob(logprobs, indices)


def topk_kl(student_logits: Tensor, teacher_logprobs: Tensor, teacher_indices: Tensor, teacher_tail: Tensor) -> Tensor:
    """KL(teacher || student) of the coarsened (top-k + tail) distributions, per token.

    Args:
        student_logits: (..., vocab).
        teacher_logprobs, teacher_indices, teacher_tail: (..., k), (..., k), (...) from `teacher_topk`.
    Returns:
        (...) float32.
    """
    student = torch.log_softmax(student_logits.float(), dim=-1)
    s_top = student.gather(-1, teacher_indices)
    s_tail = _tail_logprob(student, teacher_indices)
    t_top, t_tail = teacher_logprobs.float(), teacher_tail.float().clamp(min=_NEG)
    return (t_top.exp() * (t_top - s_top)).sum(-1) + t_tail.exp() * (t_tail - s_tail)


def router_logits(output: Tensor | tuple) -> Tensor:
    """A router module's logits over the experts, (tokens, experts): its output, or the first of its outputs.

    transformers' top-k routers return (logits, top-k weights, top-k ids); plain linear gates return the logits.
    """
    logits = output[0] if isinstance(output, tuple | list) else output
    return logits.reshape(-1, logits.shape[-1])
