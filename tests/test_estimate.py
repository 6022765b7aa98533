"""The compress-time estimate: its FLOP count against torch's counter, its scaling against a measured run."""

import re

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from mobe.cli.main import main
from mobe.estimate import calibrate_at, calibration_shape, measure_step_seconds, step_flops
from mobe.factorize.mobe import _sum_squared_error, init_svd_groups


@pytest.mark.parametrize("shape", [(8, 12, 40, 4, 12), (6, 30, 20, 3, 10)])
def test_adam_step_flops_match_torchs_count_of_a_real_step(shape):
    E, p, d, m, r = shape
    A, bases, logits = (t.requires_grad_() for t in init_svd_groups(torch.randn(E, p, d), m, r, 1, 1.0))
    with FlopCounterMode(display=False) as counter:
        for part in _sum_squared_error(A, bases, logits, torch.randn(E, p, d), torch.tanh, chunk=E):
            part.backward()
    assert step_flops(E, p, d, r, m, "adam") == pytest.approx(counter.get_total_flops(), rel=0.02)


def test_calibration_stack_keeps_the_aspect_ratio_and_the_flop_target():
    E, p, d, m = calibration_shape(128, 768, 2048, 32, 2e8)
    assert (E, m) == (16, 4) and d / p == pytest.approx(2048 / 768, rel=0.05)
    assert step_flops(E, p, d, p, m, "adam") == pytest.approx(2e8, rel=0.1)


@pytest.mark.parametrize("schedule", ["paper", "fast"])
def test_calibration_at_two_sizes_predicts_a_measured_step_8_times_larger(schedule):
    """Loose (a factor 3 each way: a shared CPU is noisy; 2.78 measured on a clean-clone run of the suite), but a
    wrong power of p or d is off by 4x or more between these sizes, so the test can fail."""
    torch.set_num_threads(1)
    calibration = calibrate_at((8, 32, 128), 2, schedule, torch.device("cpu"))  # and (8, 64, 256)
    measured = measure_step_seconds((8, 128, 512), 2, schedule, torch.device("cpu"))
    predicted = calibration.predict(step_flops(8, 128, 512, 128, 2, schedule))
    assert 1 / 3 < predicted / measured < 3


def test_info_prints_the_estimate_with_its_assumptions(tiny_checkpoints, capsys):
    argv = ["info", str(tiny_checkpoints["qwen3_moe"]), "--bases", "2", "--schedule", "fast", "--device", "cpu"]
    assert main([*argv, "--steps", "300"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"compress time: +~\d+ s on one cpu \(fast schedule\)", out)
    assert "ms/step on calibration stacks" in out and "x 300 steps per job" in out
    assert "6 jobs (2 MoE layers x gate+up+down)" in out  # the default --matrices
