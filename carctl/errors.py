"""Errors that carctl reports to its user as one line, without a traceback.

Every error raised on purpose by carctl derives from :class:`CarctlError`; the CLI prints
its message on stderr and exits with :attr:`CarctlError.exit_code`. Anything else is a bug
and is reported as an internal error.
"""

from __future__ import annotations


class CarctlError(Exception):
    """An error that the user can act on; its message is a single line."""

    exit_code = 1


class InputError(CarctlError):
    """An input is missing, unreadable, or not something carctl can work with."""


class OutputError(CarctlError):
    """An output cannot be written (exists already, is an input, bad extension, ...)."""


class UsageError(CarctlError):
    """The options given do not make sense together."""

    exit_code = 2
