"""Where jobs run: this process, one process per local device, or a Ray cluster."""

from .jobs import JobError, JobSpec, JobStore, fit_job, run_job
from .local import local_devices, run_device_pool, run_serial
from .ray_runner import require_ray, run_ray

__all__ = [
    "JobError",
    "JobSpec",
    "JobStore",
    "fit_job",
    "local_devices",
    "require_ray",
    "run_device_pool",
    "run_job",
    "run_ray",
    "run_serial",
]
