"""Process-wide settings chosen by the user: threads and device."""

from __future__ import annotations

import os


def set_threads(threads: int | None) -> None:
    """Use ``threads`` CPU threads in torch and SimpleITK (their defaults when None)."""
    if threads is None:
        env = os.environ.get("CARCTL_THREADS")
        threads = int(env) if env else None
    if threads is None:
        return
    if threads < 1:
        from carctl.errors import UsageError

        raise UsageError(f"--threads must be at least 1, not {threads}")
    import SimpleITK as sitk
    import torch

    torch.set_num_threads(threads)
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads)


def resolve_device(name: str) -> str:
    """``auto`` -> ``cuda`` when a CUDA device is there, else ``cpu``; ``cuda`` must exist."""
    import torch

    from carctl.errors import UsageError

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available")
    return name
