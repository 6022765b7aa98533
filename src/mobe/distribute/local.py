"""Running jobs on this machine: in this process, or one worker process per local device."""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait
from typing import Any

import torch

from .jobs import JobSpec, run_job

OnDone = Callable[[JobSpec, dict[str, Any]], None]

_worker_device: str | None = None


def local_devices(device: str) -> list[str]:
    """The devices a run uses: a comma-separated list as given, every visible GPU for cuda/auto, else one."""
    if "," in device:
        return [part.strip() for part in device.split(",") if part.strip()]
    if device in ("auto", "cuda") and torch.cuda.device_count() > 1:
        return [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    if device == "auto":
        return ["cuda" if torch.cuda.is_available() else "cpu"]
    return [device]


def run_serial(specs: Sequence[JobSpec], device: str, on_done: OnDone, progress: bool) -> None:
    for spec in specs:
        on_done(spec, run_job(spec, device, progress))


def _claim_device(queue: Any, cpu_workers: int) -> None:
    global _worker_device
    _worker_device = queue.get()
    if _worker_device == "cpu":  # share the cores instead of oversubscribing them
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // cpu_workers))


def _pool_job(spec: JobSpec) -> dict[str, Any]:
    assert _worker_device is not None
    return run_job(spec, _worker_device)


def run_device_pool(specs: Sequence[JobSpec], devices: Sequence[str], on_done: OnDone) -> None:
    """One worker process per device, one job at a time on each; the first failure cancels the rest."""
    context = multiprocessing.get_context("spawn")  # CUDA cannot be used in forked children
    queue = context.Queue()
    for device in devices:
        queue.put(device)
    cpu_workers = sum(device == "cpu" for device in devices)
    with ProcessPoolExecutor(
        len(devices), mp_context=context, initializer=_claim_device, initargs=(queue, cpu_workers)
    ) as pool:
        pending = {pool.submit(_pool_job, spec): spec for spec in specs}
        try:
            while pending:
                done, _ = wait(pending, return_when=FIRST_EXCEPTION)
                for future in done:
                    on_done(pending.pop(future), future.result())
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)
            raise
