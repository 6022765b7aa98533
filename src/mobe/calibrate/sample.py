"""Calibration tokens the model samples itself: GPTQ's routed inputs without a data set.

Each sequence starts from one token drawn uniformly from the vocabulary (special tokens left out) and continues by
sampling the model's own next-token distribution (temperature 1, no top-k or top-p cut, end-of-sequence
suppressed), the recipe of data-free quantisation-aware training (LLM-QAT, Liu et al. 2023): the text follows the
model's own distribution, so the hidden states, the router's choices and each expert's inputs look like those of
real text far more than Gaussian stand-ins do. Seeded: the same checkpoint, count and seed give the same tokens on
the same device.

Unlike the streamed statistics of `collect`, sampling runs the whole model at once (one forward per new token, with
its key-value cache): memory is the model in its stored dtype (float32 on the CPU, where bfloat16 matmuls are slow)
plus the cache of one batch. transformers' own experts kernel (grouped matmuls) serves the batches of generation:
on the CPU it sampled the fine fixture twice as fast as the per-expert loop `collect` streams layers with.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ..devices import resolve_device
from .collect import TOKENIZER_FILES

BATCH = 32  # sequences generated together


def first_token_choices(checkpoint: Path, vocab_size: int) -> Tensor:
    """Token ids a sequence may start from: the tokenizer's ordinary tokens (its special ones left out), else the
    model's whole vocabulary."""
    if any((Path(checkpoint) / name).is_file() for name in TOKENIZER_FILES):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(checkpoint)
        special = set(tokenizer.all_special_ids)
        ids = [i for i in range(min(len(tokenizer), vocab_size)) if i not in special]
        if ids:
            return torch.tensor(ids)
    return torch.arange(vocab_size)


def sample_sequences(
    checkpoint: str | Path,
    tokens: int,
    seq_len: int,
    *,
    seed: int = 0,
    device: str = "auto",
    batch: int = BATCH,
    progress: bool = False,
) -> list[Tensor]:
    """ceil(tokens / seq_len) sequences of `seq_len` token ids (int64, on the CPU) sampled from the causal LM at
    `checkpoint` (module docstring)."""
    from transformers import AutoModelForCausalLM

    if tokens < 2 or seq_len < 2:
        raise ValueError(f"sampling needs tokens >= 2 and seq_len >= 2, got {tokens} and {seq_len}")
    target = resolve_device(device)
    dtype = torch.float32 if target.type == "cpu" else "auto"
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=dtype).to(target)
    model.eval()
    choices = first_token_choices(Path(checkpoint), model.config.get_text_config().vocab_size)
    eos = model.generation_config.eos_token_id
    pad = model.generation_config.pad_token_id
    if pad is None:
        pad = (eos[0] if isinstance(eos, list) else eos) if eos is not None else 0
    count = math.ceil(tokens / seq_len)
    generator = torch.Generator().manual_seed(seed)
    starts = choices[torch.randint(len(choices), (count,), generator=generator)]
    out: list[Tensor] = []
    devices = [target.index or 0] if target.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), torch.no_grad():
        torch.manual_seed(seed)
        for first in tqdm(starts.split(batch), desc="Sampling calibration text", disable=not progress, leave=False):
            ids = first[:, None].to(target)
            generated = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                do_sample=True,
                temperature=1.0,
                top_k=0,
                top_p=1.0,
                max_new_tokens=seq_len - 1,
                min_new_tokens=seq_len - 1,
                pad_token_id=pad,
            )
            out.extend(generated.cpu())
    del model
    return out
