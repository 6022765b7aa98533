"""How long compressing a whole model takes: steps measured on small stacks here, scaled by FLOPs.

The cost of a step of every schedule is dominated by a few batched matmuls over the (E, p, d) stack, whose FLOPs
`step_flops` counts. `calibrate` times steps of the real fitting code on two small stacks of the model's proportions
on the chosen device (a fixed cost per step plus a FLOP rate); `estimate_compress_time` assumes the device keeps
that FLOP rate at the model's size (a small stack uses a device less fully than a large one, so on a GPU the figure
is an upper bound).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from ..architectures import MoeLayout
from ..config import DEFAULT_MATRICES, MobeConfig
from ..factorize import fit_mobe
from ..factorize.mobe import fitted_shape
from ..factorize.schedule import WARM_FRACTION
from ..factorize.synthetic import realistic_stack

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
    """Seconds per step measured on two small stacks (8x apart in FLOPs): a fixed cost per step plus a FLOP rate.

    Small stacks spend much of a step on fixed costs (kernel launches, Python); fitting both terms from two sizes
    keeps that cost from being scaled up with the FLOPs.
    """

    shapes: tuple[tuple[int, int, int], tuple[int, int, int]]  # (E, p, d) of each
    num_bases: int
    schedule: str
    device: str
    seconds: tuple[float, float]  # per step, at each shape

    def flops(self, i: int) -> float:
        E, p, d = self.shapes[i]
        return step_flops(E, p, d, min(p, d), self.num_bases, self.schedule)

    @property
    def flops_per_second(self) -> float:
        rise = self.seconds[1] - self.seconds[0]
        if rise <= 0:  # timing noise swamped the difference: charge every second to the FLOPs (pessimistic)
            return self.flops(1) / self.seconds[1]
        return (self.flops(1) - self.flops(0)) / rise

    @property
    def overhead_seconds(self) -> float:
        return max(0.0, self.seconds[0] - self.flops(0) / self.flops_per_second)

    def predict(self, flops: float) -> float:
        """Seconds per step of a step of `flops`."""
        return self.overhead_seconds + flops / self.flops_per_second


def calibration_shape(E: int, p: int, d: int, num_bases: int, target_flops: float) -> tuple[int, int, int, int]:
    """A stack (E', p', d', m') of the model's aspect ratio p/d whose adam step costs about `target_flops`."""
    E_c = min(E, 16)
    m_c = max(1, min(E_c, round(num_bases * E_c / E)))
    scale = (target_flops / step_flops(E_c, p, d, min(p, d), m_c, "adam")) ** (1.0 / 3.0)
    return E_c, max(4, round(p * min(scale, 1.0))), max(4, round(d * min(scale, 1.0))), m_c


def measure_step_seconds(
    shape: tuple[int, int, int], num_bases: int, schedule: str, device: torch.device, steps: int = 12
) -> float:
    """Seconds per step of `schedule` at rank min(p, d) on a synthetic stack.

    Fits of `steps` and `steps // 3` steps are differenced, so that the set-up (SVD initialisation, copies) drops
    out; the better of two tries is kept. On a CPU the clock is this process's CPU time divided by torch's thread
    count (perfect scaling over the threads assumed), so that other processes on a shared machine do not count.
    """
    E, p, d = shape
    weights = realistic_stack(E, p, d, seed=0)
    clock = time.process_time if device.type == "cpu" else time.perf_counter

    def timed(n: int) -> float:
        config = MobeConfig(num_bases=num_bases, schedule=schedule, steps=n, stop_tol=0.0, device=str(device))
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = clock()
        fit_mobe(weights, config, device=device)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return clock() - start

    timed(2)  # warm-up: kernels, allocator
    short = max(1, steps // 3)
    per_step = min((timed(steps) - timed(short)) / (steps - short) for _ in range(2))
    if per_step <= 0:  # the clock's resolution or noise swamped the difference: whole fits, set-up included
        per_step = timed(steps) / steps
    threads = torch.get_num_threads() if device.type == "cpu" else 1
    return max(per_step / threads, 1e-9)


def calibrate_at(
    small: tuple[int, int, int], num_bases: int, schedule: str, device: torch.device, steps: int = 12
) -> Calibration:
    """Measure at `small` (E, p, d) and at twice its p and d (8x the FLOPs)."""
    E, p, d = small
    large = (E, 2 * p, 2 * d)
    seconds = tuple(measure_step_seconds(shape, num_bases, schedule, device, steps) for shape in (small, large))
    return Calibration((small, large), num_bases, schedule, str(device), seconds)  # type: ignore[arg-type]


def calibrate(layout_shape: tuple[int, int, int], num_bases: int, schedule: str, device: torch.device) -> Calibration:
    """Calibrate on stacks of the model's proportions sized for this device (about a second in all)."""
    E, p, d = layout_shape
    E_c, p_c, d_c, m_c = calibration_shape(E, p, d, num_bases, CALIBRATION_FLOPS.get(device.type, 2e8) / 8)
    return calibrate_at((E_c, p_c, d_c), m_c, schedule, device)


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
        return self.calibration.predict(step_flops(E, p, d, self.rank, self.num_bases, self.calibration.schedule))

    @property
    def seconds(self) -> float:
        return self.seconds_per_step * self.steps * self.jobs

    def summary(self) -> str:
        c, (E, p, d) = self.calibration, self.shape
        stop = ", or fewer where the stop rule ends a fit early" if c.schedule == "fast" else ""
        return "\n".join(
            [
                f"compress time:  ~{_duration(self.seconds)} on one {c.device} ({c.schedule} schedule), estimated:",
                f"  measured {c.seconds[0] * 1e3:.2f} and {c.seconds[1] * 1e3:.2f} ms/step on calibration stacks "
                f"E={c.shapes[0][0]} m={c.num_bases} r=p, p x d {c.shapes[0][1]}x{c.shapes[0][2]} and "
                f"{c.shapes[1][1]}x{c.shapes[1][2]}: {c.overhead_seconds * 1e3:.2f} ms fixed + "
                f"{c.flops_per_second / 1e9:.1f} GFLOP/s",
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
    matrices: tuple[str, ...] = DEFAULT_MATRICES,
    device: torch.device | str = "cpu",
    calibration: Calibration | None = None,
    basis_side: str | None = None,
) -> TimeEstimate:
    """Wall time to compress every MoE layer's `matrices` with MoBE, from one calibration on `device`."""
    defaults = MobeConfig(
        num_bases=num_bases, steps=steps, basis_side=basis_side, **({"schedule": schedule} if schedule else {})
    )
    p, d = fitted_shape(layout.intermediate_size, layout.hidden_size, defaults.basis_side)  # down: oriented the same
    shape = (layout.num_experts, p, d)
    device = torch.device(device)
    calibration = calibration or calibrate(shape, num_bases, defaults.schedule, device)
    rank = rank or min(p, d)
    moe_layers = len(layout.moe_layers)
    return TimeEstimate(
        calibration, shape, rank, num_bases, defaults.steps, moe_layers * len(matrices), tuple(matrices), moe_layers
    )
