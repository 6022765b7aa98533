"""How long compressing a whole model takes: one step measured on a small stack here, scaled by FLOPs.

The cost of a step of every schedule is dominated by a few batched matmuls over the (E, p, d) stack, whose FLOPs
`step_flops` counts. `calibrate` times steps of the real fitting code on a small stack of the model's proportions
on the chosen device; `estimate_compress_time` assumes the device keeps that FLOP rate at the model's size (a
small stack uses a device less fully than a large one, so on a GPU the figure is an upper bound).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from .architectures import MoeLayout
from .config import MobeConfig
from .factorize import fit_mobe
from .factorize.schedule import WARM_FRACTION
from .factorize.synthetic import realistic_stack

NEWTON_SCHULZ_STEPS = 5
CALIBRATION_FLOPS = {"cpu": 2e8, "cuda": 2e10, "mps": 2e9}  # per step: tens of ms at the device's usual rate


def step_flops(E: int, p: int, d: int, rank: int, num_bases: int, schedule: str) -> float:
    """FLOPs of one step over one (E, p, d) stack at rank r with m bases (matmuls and factorisations only).

    adam / paper: forward (mix the bases: 2 E m r d; A_i M_i: 2 E p r d) and a backward of twice that.
    fast: the joint phase does the same on the k = min(p, d) row-space rows; a projected step mixes (forward and
    backward), forms M M^T and C M^T, solves by Cholesky, takes the residual and X^T R, and orthogonalises the m
    basis updates by Newton-Schulz.
    """
    r, m = rank, num_bases
    mix = 2.0 * E * m * r * d
    if schedule != "fast":
        return 3.0 * (mix + 2.0 * E * p * r * d)
    k = min(p, d)
    joint = 3.0 * (mix + 2.0 * E * k * r * d)
    newton_schulz = NEWTON_SCHULZ_STEPS * m * (4.0 * r * r * d + 2.0 * r**3)
    projected = 3.0 * mix + 2.0 * E * r * r * d + 6.0 * E * k * r * d + 2.0 * E * k * r * r + E * r**3 + newton_schulz
    return WARM_FRACTION * joint + (1.0 - WARM_FRACTION) * projected


@dataclass
class Calibration:
    """Seconds per step measured on one small stack, and the FLOP rate that implies."""

    shape: tuple[int, int, int]  # (E, p, d)
    rank: int
    num_bases: int
    schedule: str
    device: str
    seconds_per_step: float

    @property
    def flops_per_second(self) -> float:
        E, p, d = self.shape
        return step_flops(E, p, d, self.rank, self.num_bases, self.schedule) / self.seconds_per_step


def calibration_shape(E: int, p: int, d: int, num_bases: int, target_flops: float) -> tuple[int, int, int, int]:
    """A stack (E', p', d', m') of the model's aspect ratio p/d whose adam step costs about `target_flops`."""
    E_c = min(E, 16)
    m_c = max(1, min(E_c, round(num_bases * E_c / E)))
    scale = (target_flops / step_flops(E_c, p, d, min(p, d), m_c, "adam")) ** (1.0 / 3.0)
    return E_c, max(4, round(p * min(scale, 1.0))), max(4, round(d * min(scale, 1.0))), m_c


def measure_step_seconds(
    shape: tuple[int, int, int], rank: int, num_bases: int, schedule: str, device: torch.device, steps: int = 6
) -> float:
    """Seconds per step of `schedule` on a synthetic stack: fits of `steps` and `steps // 3` steps, differenced so
    that the set-up (SVD initialisation, copies) cancels out."""
    E, p, d = shape
    weights = realistic_stack(E, p, d, seed=0)

    def timed(n: int) -> float:
        config = MobeConfig(num_bases=num_bases, rank=rank, schedule=schedule, steps=n, stop_tol=0.0, device="cpu")
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fit_mobe(weights, config, device=device)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - start

    timed(2)  # warm-up: kernels, allocator
    short, long = max(1, steps // 3), steps
    return max((timed(long) - timed(short)) / (long - short), 1e-9)


def calibrate(layout_shape: tuple[int, int, int], num_bases: int, schedule: str, device: torch.device) -> Calibration:
    """Measure seconds per step on a stack of the model's proportions sized for this device (well under 2 s)."""
    E, p, d = layout_shape
    E_c, p_c, d_c, m_c = calibration_shape(E, p, d, num_bases, CALIBRATION_FLOPS.get(device.type, 4e7))
    rank = min(p_c, d_c)
    seconds = measure_step_seconds((E_c, p_c, d_c), rank, m_c, schedule, device)
    return Calibration((E_c, p_c, d_c), rank, m_c, schedule, str(device), seconds)


@dataclass
class TimeEstimate:
    calibration: Calibration
    shape: tuple[int, int, int]
    rank: int
    num_bases: int
    steps: int
    jobs: int
    matrices: tuple[str, ...]
    moe_layers: int

    @property
    def seconds_per_step(self) -> float:
        E, p, d = self.shape
        return step_flops(E, p, d, self.rank, self.num_bases, self.calibration.schedule) / (
            self.calibration.flops_per_second
        )

    @property
    def seconds(self) -> float:
        return self.seconds_per_step * self.steps * self.jobs

    def summary(self) -> str:
        c, (E, p, d) = self.calibration, self.shape
        stop = ", or fewer where the stop rule ends a fit early" if c.schedule == "fast" else ""
        return "\n".join(
            [
                f"compress time:  ~{_duration(self.seconds)} on one {c.device} ({c.schedule} schedule), estimated:",
                f"  measured {c.seconds_per_step * 1e3:.2f} ms/step on a calibration stack E={c.shape[0]} "
                f"p={c.shape[1]} d={c.shape[2]} r={c.rank} m={c.num_bases} ({c.flops_per_second / 1e9:.1f} GFLOP/s)",
                f"  scaled by FLOPs to E={E} p={p} d={d} r={self.rank} m={self.num_bases}: "
                f"{self.seconds_per_step:.3g} s/step, assuming the same FLOP rate at that size (an upper bound "
                "on a GPU, which runs small stacks below its peak)",
                f"  x {self.steps} steps per job{stop} x {self.jobs} jobs ({self.moe_layers} MoE layers x "
                f"{'+'.join(self.matrices)}), one job at a time; a list of N devices divides it by about N",
            ]
        )


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def estimate_compress_time(
    layout: MoeLayout,
    num_bases: int,
    rank: int | None = None,
    schedule: str | None = None,
    steps: int | None = None,
    matrices: tuple[str, ...] = ("gate", "up"),
    device: torch.device | str = "cpu",
    calibration: Calibration | None = None,
) -> TimeEstimate:
    """Wall time to compress every MoE layer's `matrices` with MoBE, from one calibration on `device`."""
    defaults = MobeConfig(num_bases=num_bases, steps=steps, **({"schedule": schedule} if schedule else {}))
    shape = (layout.num_experts, layout.intermediate_size, layout.hidden_size)  # down is fitted transposed: same
    device = torch.device(device)
    calibration = calibration or calibrate(shape, num_bases, defaults.schedule, device)
    rank = rank or min(shape[1], shape[2])
    moe_layers = len(layout.moe_layers)
    return TimeEstimate(
        calibration, shape, rank, num_bases, defaults.steps, moe_layers * len(matrices), tuple(matrices), moe_layers
    )
