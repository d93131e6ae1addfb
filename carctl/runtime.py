"""Process-wide settings chosen by the user: threads and device."""

from __future__ import annotations

import os

# The most --threads takes (100 000 crashed torch's thread pool, 10 000 hung); within it, no
# more threads are started than the CPUs this process may run on (more only wait on each
# other: two OpenMP teams on two cores made every stage several times slower).
MAX_THREADS = 1024


def check_threads(threads: int | None) -> int | None:
    """The thread count to use: ``threads``, else ``$CARCTL_THREADS``, else None (the
    libraries' defaults); refuses a count outside 1 to :data:`MAX_THREADS`. Loads nothing."""
    from carctl.errors import UsageError

    option = "--threads"
    if threads is None:
        env = os.environ.get("CARCTL_THREADS", "").strip()
        if not env:
            return None
        option = "CARCTL_THREADS"
        try:
            threads = int(env)
        except ValueError:
            raise UsageError(f"CARCTL_THREADS must be a whole number, not '{env}'") from None
    if not 1 <= threads <= MAX_THREADS:
        raise UsageError(f"{option} must be from 1 to {MAX_THREADS}, not {threads}")
    return threads


def available_cpus() -> int:
    """The CPUs this process may run on (its affinity mask where the system has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def set_threads(threads: int | None) -> None:
    """Use ``threads`` CPU threads in torch and SimpleITK (see :func:`check_threads`), at most
    :func:`available_cpus`."""
    threads = check_threads(threads)
    if threads is None:
        return
    threads = min(threads, available_cpus())
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


# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4


def keep_freed_memory() -> bool:
    """Let glibc's allocator reuse freed memory instead of returning every large block to
    the system (by default each array over 32 MB is a fresh ``mmap``, and touching its pages
    again costs as much as the arithmetic on a 1 mm brain: 1-3 s of a registration).
    For command-line runs only (the process keeps its peak memory until it exits); a no-op
    returning False outside glibc."""
    import ctypes
    import platform

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(
            libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1)
        )
    except (OSError, AttributeError):
        return False


def import_in_background(name: str) -> None:
    """Start importing the module ``name`` on another thread, so that the caller's work in
    the meantime (reading images: SimpleITK leaves the interpreter lock while it reads and
    decompresses) overlaps it; the caller's own ``import`` of it later waits for it to end.
    For a module that the caller will import in any case (torch, after the inputs are read):
    should its import fail, the caller's own import fails again and says why (the thread says
    nothing: a traceback on stderr from it would precede the one-line error)."""
    import contextlib
    import importlib
    import threading

    def load() -> None:
        with contextlib.suppress(BaseException):  # the caller's own import reports it
            importlib.import_module(name)

    threading.Thread(target=load, daemon=True).start()
