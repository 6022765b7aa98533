"""Running jobs as Ray tasks on a cluster: one task per (layer, matrix), one GPU each when fitting on CUDA.

Ray does the scheduling and the retries: a task whose worker or node dies is run again elsewhere
(`max_retries`); the driver only submits, waits, and reports each result as it arrives. Workers read the
checkpoint and write their factors themselves, so the checkpoint and the work folder must be on storage
every node sees (a shared filesystem; a hub id is downloaded into each node's hub cache).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .jobs import JobSpec, run_job
from .local import OnDone


def require_ray() -> Any:
    """The ray module, or an ImportError that says how to install it."""
    try:
        import ray
    except ImportError:
        raise ImportError("--ray needs Ray, an optional extra: pip install 'mobe[ray]'") from None
    return ray


def _task(spec: JobSpec, device: str) -> dict[str, Any]:
    return run_job(spec, device)


def run_ray(
    specs: Sequence[JobSpec],
    address: str | None,
    device: str,
    cpus_per_job: int,
    on_done: OnDone,
    max_retries: int = 3,
) -> None:
    """Run `specs` on the Ray cluster at `address` (None: RAY_ADDRESS, a running local cluster, or a new one).

    `device` is cpu, cuda, or auto (cuda when the cluster has GPUs). Connects only if this process is not
    connected yet, and disconnects again in that case.
    """
    ray = require_ray()
    connected_here = not ray.is_initialized()
    if connected_here:
        ray.init(address=address, log_to_driver=False, configure_logging=False)
    try:
        if device == "auto":
            device = "cuda" if ray.cluster_resources().get("GPU", 0) > 0 else "cpu"
        on_gpu = device.startswith("cuda")
        task = ray.remote(_task).options(
            name="mobe-job",
            num_cpus=1 if on_gpu else cpus_per_job,
            num_gpus=1 if on_gpu else 0,
            max_retries=max_retries,
            retry_exceptions=False,
        )
        # Ray hides all but the task's GPU (CUDA_VISIBLE_DEVICES), so the task's device is plain "cuda".
        pending = {task.remote(spec, "cuda" if on_gpu else "cpu"): spec for spec in specs}
        try:
            while pending:
                done, _ = ray.wait(list(pending), num_returns=1)
                for ref in done:
                    spec = pending.pop(ref)
                    try:
                        result = ray.get(ref)
                    except ray.exceptions.RayTaskError as err:
                        raise err.cause from None  # the job's own error (one line), not Ray's traceback
                    on_done(spec, result)
        finally:
            for ref in pending:
                ray.cancel(ref)
    finally:
        if connected_here:
            ray.shutdown()
