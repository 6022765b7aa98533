"""Device names from the command line or the API, checked before any work starts."""

from __future__ import annotations

import torch


class DeviceError(ValueError):
    pass


def resolve_device(device: str) -> torch.device:
    """`auto` (CUDA when present, else CPU), `cpu`, `cuda`, `cuda:N` or `mps`; one clear line when unusable."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError):
        raise DeviceError(f"--device {device!r} is not a device name (use auto, cpu, cuda, cuda:N or mps)") from None
    if resolved.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise DeviceError(f"--device {device!r} asked for, but no CUDA device is available")
        if resolved.index is not None and resolved.index >= count:
            raise DeviceError(f"--device {device!r} asked for, but only {count} CUDA device(s) are visible")
    elif resolved.type == "mps" and not torch.backends.mps.is_available():
        raise DeviceError(f"--device {device!r} asked for, but MPS is not available")
    elif resolved.type not in ("cpu", "cuda", "mps"):
        raise DeviceError(f"--device {device!r}: mobe runs on cpu, cuda or mps")
    return resolved
