"""Data-free stand-ins for the second moments of each expert's inputs, read off the weights alone.

GPTQ rounds a matrix so that its output error on its inputs is least, which needs E[x x^T] of those inputs. Without
a calibration text the weights still say where the inputs are: a trained matrix's large input directions follow the
inputs' energy.

- gate and up read the layer's hidden state, which all experts share: their input-side Gram sum_e W_e^T W_e
  (`input_gram`) stands in for its second moments;
- down reads each expert's own intermediate activations act(G_i x) * (U_i x). Their second moments S_i are
  estimated on Gaussian inputs x ~ N(0, C), C the gate's and up's input-side Gram scaled to a unit mean diagonal
  (`gaussian_inputs`), passed through the expert's own gate and up (`activation_grams`): the coupling between
  intermediate channels that a diagonal estimate would miss is what lets GPTQ move error onto the channels that
  are rarely large together.

GPTQ's result depends on the Hessian only up to scale, so no proxy needs the inputs' true magnitude. Everything is
computed a few experts at a time: no more than `ACTIVATION_ELEMENTS` intermediate activations are held at once.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import Tensor

SAMPLES = 4096  # Gaussian inputs per layer: enough for a full-rank S_i up to p = 4096
ACTIVATION_ELEMENTS = 2**20  # experts x samples x p held at once (4 MiB in float32)


def input_gram(products: Iterable[Tensor]) -> Tensor:
    """sum_e W_e^T W_e (d, d) in float64 over chunks of experts' products (n, p, d)."""
    gram = None
    for W in products:
        part = torch.einsum("epd,epk->dk", W.double(), W.double())
        gram = part if gram is None else gram + part
    if gram is None:
        raise ValueError("input_gram needs at least one chunk of products")
    return gram


def gaussian_inputs(gram: Tensor, samples: int = SAMPLES, seed: int = 0) -> Tensor:
    """(samples, d) float32 draws of x ~ N(0, C), C = `gram` / its mean diagonal (eigen-square-root: C may be
    singular); seeded, so every run and device draws the same inputs."""
    C = gram.double() / gram.diagonal().mean().clamp_min(torch.finfo(torch.float64).tiny)
    values, vectors = torch.linalg.eigh(C)
    root = vectors * values.clamp_min(0).sqrt()
    noise = torch.randn(samples, C.shape[0], generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return (noise @ root.T).float()


def expert_chunk(samples: int, p: int) -> int:
    """Experts per chunk so that chunk x samples x p stays within `ACTIVATION_ELEMENTS`."""
    return max(1, ACTIVATION_ELEMENTS // max(1, samples * p))


def activation_grams(gate: Tensor, up: Tensor, inputs: Tensor, activation: Callable[[Tensor], Tensor]) -> Tensor:
    """(n, p, p) float32: E[h h^T] over `inputs` (s, d) of h = activation(G_i x) * (U_i x), for the experts'
    gate and up products `gate`, `up` (n, p, d)."""
    x = inputs.to(gate.dtype)
    h = activation(torch.einsum("sd,epd->esp", x, gate)) * torch.einsum("sd,epd->esp", x, up)
    return (torch.einsum("esp,esq->epq", h, h) / inputs.shape[0]).float()


def down_hessians(
    gate: Callable[[Tensor], Tensor],
    up: Callable[[Tensor], Tensor],
    num_experts: int,
    activation: Callable[[Tensor], Tensor],
    samples: int = SAMPLES,
    seed: int = 0,
    chunk: int = 16,
) -> Tensor:
    """(E, p, p) float32 stand-ins for the second moments of each expert's intermediate activations (module
    docstring). `gate`, `up`: the experts' gate and up products (n, p, d) in float32 for a tensor of expert
    indices (the fitted factors' `reconstruct`, or rows of a dense stack), called `chunk` experts at a time."""
    spans = [torch.arange(start, min(start + chunk, num_experts)) for start in range(0, num_experts, chunk)]
    gram = input_gram(gate(span) for span in spans) + input_gram(up(span) for span in spans)
    inputs = gaussian_inputs(gram, samples, seed)
    del gram
    step = expert_chunk(samples, gate(torch.arange(1)).shape[1])
    parts = []
    for start in range(0, num_experts, step):
        span = torch.arange(start, min(start + step, num_experts))
        parts.append(activation_grams(gate(span), up(span), inputs, activation))
    return torch.cat(parts)


def expert_activation(config: dict) -> Callable[[Tensor], Tensor]:
    """The experts' activation named by a model config (`hidden_act`, or its text config's), through transformers'
    table; SiLU where it names none the table knows (a stand-in: the proxy only needs the activations' shape)."""
    from transformers.activations import ACT2FN

    name = config.get("hidden_act") or config.get("text_config", {}).get("hidden_act") or "silu"
    return ACT2FN[name] if name in ACT2FN else torch.nn.functional.silu
