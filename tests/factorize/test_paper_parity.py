"""`--schedule paper` ends where the authors' own train.py ends, on a layer both were run on.

The layer is tests/data/paper_parity/ (a one-layer checkpoint: model.safetensors + its index, float32, 8 experts,
gate_proj and up_proj of 32 x 16 each). It was written once by

    g = torch.Generator().manual_seed(0)
    for matrix in ("gate_proj", "up_proj"):
        shared = torch.randn(2, 32, 16, generator=g)
        w = torch.stack([shared[i % 2] + 0.3 * torch.randn(32, 16, generator=g) for i in range(8)]) * 0.02
        # saved as model.layers.0.mlp.experts.{i}.{matrix}.weight = w[i]

The reference errors below come from the authors' code, github.com/inclusionAI/MoBE at commit
7f3501da2a9f7b12d773cb52c454a0be0ceeb185, train.py run UNMODIFIED (it picks the CPU itself when there is no
CUDA) with torch 2.13 CPU, from a checkout of that commit:

    OMP_NUM_THREADS=1 python train.py --index_path tests/data/paper_parity/model.safetensors.index.json \\
        --base_dir tests/data/paper_parity --save_path OUT --num_hidden_layers 1 --num_matrices 8 \\
        --rows_per_matrix 32 --cols 16 --num_epochs 1000 --batch_size 8 --num_batches 1 --learning_rate 0.01 \\
        --num_B 2 --truncation 8 --start_layer 0 --end_layer 1 --matrix_type gate_proj --activation silu

and the same with `--matrix_type up_proj --activation tanh`. The number recorded is the relative Frobenius error
(mobe.evaluate.weight_error, float64) of the reconstruction it saves, OUT/model_layers_0_mlp_{matrix}_weight
.safetensors, against the float32 weights of the checkpoint. OMP_NUM_THREADS=2 gave the same numbers to the last
digit. Settings: E=8, p=32, d=16, m=2, r=8 (r < d, so the layer is really compressed: 0.57 of its parameters;
at r = d = 16 both fits reach ~0 error and the comparison would say nothing), 1000 Adam steps (the best-state
check at every 200th step runs five times).

Why lr 0.01 and not the published 0.07: at 0.07 the end point is chaotic. On this layer, multiplying the
learning rate by 1 + 1e-6 moves our final error by 1e-3 (the authors' code run at 0.07 agrees with ours to 1e-9
here, but only because both run the very same float kernels; another CPU's rounding could move either by 1e-3).
At 0.01 the same nudge moves it by less than 1e-7, so the comparison should hold on other CPUs too.

Tolerance: our `paper` fit computes the same float32 maths in another order, and lands within 1.7e-9 (relative)
of the authors' numbers on both matrices. rtol = 1e-5 leaves a hundred times the rounding sensitivity measured
above while staying a thousand times below what the replayed quirks change on this layer: the `adam` schedule
(float32 targets, SVD initialisation of the scaled weights, best state kept without the one-step lag) ends 1.7e-2
(gate/silu) and 1.2e-2 (up/tanh) away.
"""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mobe import MobeConfig
from mobe.evaluate import weight_error
from mobe.factorize import fit_mobe

LAYER = Path(__file__).resolve().parent.parent / "data" / "paper_parity" / "model.safetensors"
# matrix, activation, relative error of the authors' train.py reconstruction (1000 steps, lr 0.01; module docstring)
AUTHORS = [("gate_proj", "silu", 0.5026877402632092), ("up_proj", "tanh", 0.49032043013312626)]


def _experts(matrix: str) -> torch.Tensor:
    tensors = load_file(LAYER)
    return torch.stack([tensors[f"model.layers.0.mlp.experts.{i}.{matrix}.weight"] for i in range(8)])


@pytest.mark.parametrize(("matrix", "activation", "authors_error"), AUTHORS)
def test_paper_schedule_ends_at_the_authors_error(matrix, activation, authors_error):
    weights = _experts(matrix)
    config = MobeConfig(
        num_bases=2, rank=8, activation=activation, steps=1000, schedule="paper", lr=0.01, basis_side="hidden"
    )
    factors, stats = fit_mobe(weights, config)
    assert stats.steps == 1000
    assert weight_error(weights, factors.reconstruct())[0] == pytest.approx(authors_error, rel=1e-5)


def test_the_adam_schedule_is_told_apart_at_this_tolerance():
    """The check above can fail: the Algorithm-1 schedule without the replayed quirks ends outside it."""
    matrix, activation, authors_error = AUTHORS[1]
    weights = _experts(matrix)
    config = MobeConfig(
        num_bases=2, rank=8, activation=activation, steps=1000, schedule="adam", lr=0.01, basis_side="hidden"
    )
    factors, _ = fit_mobe(weights, config)
    assert weight_error(weights, factors.reconstruct())[0] != pytest.approx(authors_error, rel=1e-5)
