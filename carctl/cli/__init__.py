"""The ``carctl`` command line.

Each command lives in its own module and imports torch, SimpleITK and carctl's numerical
code inside its body, so that ``carctl --help`` and ``carctl --version`` stay instant.
"""

from __future__ import annotations

import inspect
import os
import sys
from typing import Annotated

import typer

from carctl import __version__
from carctl.cli import (
    apply,
    batch,
    demo,
    evaluate,
    info,
    points,
    qa,
    register,
    train,
    translate,
    weights,
)
from carctl.cli.console import run_guarded, set_debug, terminate_as_interrupt
from carctl.runtime import keep_freed_memory

app = typer.Typer(
    name="carctl",
    help="Contrast-agnostic registration of medical images (MR, CT, ultrasound).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"carctl {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_version, is_eager=True, help="Print the version."),
    ] = False,
    debug: Annotated[
        bool, typer.Option("--debug", help="Show tracebacks (also accepted after a command).")
    ] = False,
) -> None:
    """Contrast-agnostic registration of medical images (MR, CT, ultrasound)."""
    if debug:
        set_debug(True)


def prose(text: str | None) -> str | None:
    """A docstring as help text: its paragraphs each on one line. Typer's rich help keeps a
    docstring's single line breaks, so a paragraph wrapped at 100 columns in the source came
    out broken mid-sentence in the commands list and in each command's help."""
    if text is None:
        return None
    return "\n\n".join(" ".join(p.split()) for p in inspect.cleandoc(text).split("\n\n"))


for module in (register, batch, apply, points, evaluate, qa, translate, info, demo):
    app.command(name=module.NAME, help=module.command.__doc__)(module.command)
app.add_typer(train.app)
app.add_typer(weights.app)
for group in (app, train.app, weights.app):
    for command_info in group.registered_commands:
        command_info.help = prose(command_info.help or command_info.callback.__doc__)


def main(argv: list[str] | None = None) -> None:
    """Console entry point: ``--debug`` is accepted anywhere before ``--``."""
    args = list(sys.argv[1:] if argv is None else argv)
    head = args[: args.index("--")] if "--" in args else args
    if "--debug" in head:
        set_debug(True)
        args.remove("--debug")
    keep_freed_memory()  # a short-lived process: reuse memory rather than fault it in again
    terminate_as_interrupt()
    sys.exit(run_guarded(lambda: app(args=args, prog_name="carctl")))


def entry() -> None:
    """The ``carctl`` program: :func:`main`, then an exit that skips the interpreter's teardown
    once torch is loaded (unloading it took 0.4-0.7 s of every registration's wall time, after
    the work; everything carctl writes is closed and moved into place by then)."""
    try:
        main()
        code = 0
    except SystemExit as done:
        code = done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
    if "torch" not in sys.modules:
        sys.exit(code)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe: nothing more can be said
            code = code or 1
    os._exit(code)
