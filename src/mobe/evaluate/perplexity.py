"""Sliding-window perplexity of a causal LM on a token sequence (the usual strided evaluation)."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)

# Fewer scored tokens than this: the perplexity is reported with a warning (a handful of tokens says little about a
# model, and two compressions' perplexities on them differ by noise).
MIN_MEANINGFUL_TOKENS = 64


@dataclass
class PerplexityResult:
    perplexity: float
    nll: float  # mean negative log-likelihood per scored token (nats)
    tokens: int  # tokens scored
    context: int
    stride: int

    def to_dict(self) -> dict:
        return self.__dict__.copy()


@torch.no_grad()
def sliding_window_perplexity(
    model: torch.nn.Module, input_ids: torch.Tensor, context: int = 512, stride: int = 256, progress: bool = True
) -> PerplexityResult:
    """Perplexity of `input_ids` (1-D or (1, N)) scored in chunks of `stride` targets.

    Every token after the first is scored exactly once; the chunk of targets [t, t + stride) is scored by one
    forward pass over the `context` tokens that end at its last target, so each target sees at least
    `context - stride` tokens of history (fewer only near the start). Fewer than `MIN_MEANINGFUL_TOKENS` scored
    tokens are still scored, with a warning.
    """
    if stride < 1 or context < 2 or stride >= context:
        raise ValueError(f"need 1 <= stride < context, got context={context}, stride={stride}")
    ids = input_ids.reshape(-1)
    if ids.numel() < 2:
        raise ValueError("need at least 2 tokens to measure perplexity")
    if ids.numel() - 1 < MIN_MEANINGFUL_TOKENS:
        logger.warning(
            "perplexity over only %d tokens (fewer than %d) is not meaningful: use a longer text (thousands of tokens)",
            ids.numel() - 1,
            MIN_MEANINGFUL_TOKENS,
        )
    device = next(model.parameters()).device
    total_nll = 0.0
    chunk_starts = range(1, ids.numel(), stride)
    for first in tqdm(chunk_starts, desc="Perplexity", disable=not progress, leave=False):
        last = min(first + stride, ids.numel())  # targets [first, last)
        begin = max(0, last - context)
        window = ids[begin:last].unsqueeze(0).to(device)
        logits = model(window).logits[0, first - begin - 1 : last - begin - 1].float()
        total_nll += torch.nn.functional.cross_entropy(logits, ids[first:last].to(device), reduction="sum").item()
    tokens = ids.numel() - 1
    mean = total_nll / tokens
    return PerplexityResult(math.exp(mean), mean, tokens, context, stride)
