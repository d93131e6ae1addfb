"""Everything the CLI shows: rich consoles, one-line errors, tables.

The library never prints; commands hand their results here.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import traceback
from collections.abc import Callable
from typing import Any

from rich.console import Console
from rich.table import Table

from carctl.errors import CarctlError

_state = {"debug": os.environ.get("CARCTL_DEBUG", "") not in ("", "0")}
INTERNAL_ERROR = 70  # EX_SOFTWARE


def set_debug(value: bool) -> None:
    _state["debug"] = value


def is_debug() -> bool:
    return _state["debug"]


def stdout() -> Console:
    return Console(highlight=False, soft_wrap=True, markup=False)


def stderr() -> Console:
    return Console(stderr=True, highlight=False, soft_wrap=True, markup=False)


# The exit status of a run stopped by Ctrl-C (128 + SIGINT), as shells report it.
INTERRUPTED = 130
TERMINATED = 143  # 128 + SIGTERM


def run_guarded(fn: Callable[[], Any]) -> int:
    """Run ``fn``; errors become one line on stderr and an exit code (tracebacks with --debug)."""
    try:
        fn()
    except SystemExit as done:
        code = done.code
        if code == INTERRUPTED:  # typer turns Ctrl-C (and SIGTERM, see below) into this exit
            return _stopped()
        return code if isinstance(code, int) else (0 if code is None else 1)
    except CarctlError as error:
        if is_debug():
            traceback.print_exc()
        _print_error(str(error))
        return error.exit_code
    except KeyboardInterrupt:
        return _stopped()
    except Exception as error:  # a bug (or no memory left): keep it short unless asked
        if is_debug():
            traceback.print_exc()
        memory = out_of_memory(error)
        if memory:
            _print_error(memory)
            return 1
        message = str(error).strip().splitlines()[0] if str(error).strip() else ""
        _print_error(
            f"internal error: {type(error).__name__}: {message} (run with --debug for details)"
        )
        return INTERNAL_ERROR
    return 0


def _stopped() -> int:
    """Say why the run stopped (Ctrl-C, or SIGTERM: :func:`terminate_as_interrupt`); its
    exit status."""
    if _state.get("terminated"):
        _print_error("terminated")
        return TERMINATED
    _print_error("interrupted")
    return INTERRUPTED


def terminate_as_interrupt() -> None:
    """From now on SIGTERM stops the program as Ctrl-C does (a KeyboardInterrupt in the main
    thread), so that the cleanup an interrupt runs runs too, and exits with 143: a `register`
    killed while writing left its staging folder, with a partial field of 10-67 MB, beside
    its outputs."""
    import signal

    def raise_terminated(signum, frame):
        _state["terminated"] = True
        raise KeyboardInterrupt

    with contextlib.suppress(ValueError):  # not the main thread (an embedding program's)
        signal.signal(signal.SIGTERM, raise_terminated)


def out_of_memory(error: BaseException) -> str | None:
    """The one-line message for an allocation that failed (Python's MemoryError, torch's
    "can't allocate memory"), which was reported as an internal error; None for others."""
    text = str(error)
    if isinstance(error, MemoryError) or (
        isinstance(error, RuntimeError)
        and ("can't allocate memory" in text or "DefaultCPUAllocator" in text)
    ):
        return (
            "not enough memory for this work (try fewer --threads, smaller images, or a "
            "machine with more memory)"
        )
    return None


def _print_error(message: str) -> None:
    print(f"carctl: error: {' '.join(message.split())}", file=sys.stderr)


def emit_json(payload: dict, target: str | None, *, force: bool, inputs=()) -> None:
    """Write ``payload`` as JSON to ``target`` (``-``: stdout); nothing when ``target`` is None."""
    if target is None:
        return
    text = json.dumps(numbers_or_none(payload), indent=2, allow_nan=False, default=_jsonable) + "\n"
    if target == "-":
        sys.stdout.write(text)
    else:
        from carctl.io import write_text

        write_text(text, target, force=force, inputs=inputs, extensions=(".json",))


def numbers_or_none(value: Any) -> Any:
    """``value`` with every non-finite float (a score over no voxels, a NaN field's Jacobian)
    as ``None``: JSON has no NaN, and pipelines read null as "no value"."""
    if getattr(value, "ndim", None) == 0 and hasattr(value, "item"):  # a NumPy scalar
        value = value.item()
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: numbers_or_none(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [numbers_or_none(v) for v in value]
    return value


def _jsonable(value: Any) -> Any:
    import numpy as np

    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def key_value_table(title: str, rows: list[tuple[str, str]]) -> Table:
    table = Table(title=title, show_header=False, title_justify="left", box=None, pad_edge=False)
    table.add_column(style="bold")
    table.add_column()
    for key, value in rows:
        table.add_row(key, value)
    return table
