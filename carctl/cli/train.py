"""``carctl train``: train the networks that carctl ships."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

NAME = "train"

app = typer.Typer(
    name=NAME,
    help="Train the networks carctl ships (resumable; weights and model card at the end).",
    no_args_is_help=True,
)


def _default_data() -> Path:
    """``$CARCTL_SHARED_DATA``, else ``../shared/data`` from here or from the checkout."""
    import os

    if os.environ.get("CARCTL_SHARED_DATA"):
        return Path(os.environ["CARCTL_SHARED_DATA"])
    for base in (Path.cwd(), Path(__file__).resolve().parents[2]):
        if (base.parent / "shared" / "data").is_dir():
            return base.parent / "shared" / "data"
    return Path("../shared/data")


@app.command("imse")
def imse(
    out: Annotated[
        Path, typer.Option("--out", "-o", help="Folder for checkpoints, weights and card.")
    ] = Path("runs/imse"),
    data_dir: Annotated[
        Path | None,
        typer.Option(
            "--data", help="Data folder (default: ../shared/data or $CARCTL_SHARED_DATA)."
        ),
    ] = None,
    steps: Annotated[int, typer.Option("--steps", help="Optimiser steps in all.")] = 10000,
    batch: Annotated[int, typer.Option("--batch", help="Samples per step.")] = 2,
    patch: Annotated[int, typer.Option("--patch", help="Crop edge in voxels.")] = 48,
    width: Annotated[int, typer.Option("--width", help="Channels at full resolution.")] = 8,
    blocks: Annotated[int, typer.Option("--blocks", help="Residual blocks at 1/4.")] = 4,
    learning_rate: Annotated[float, typer.Option("--lr", help="Initial learning rate.")] = 5e-4,
    validate_every: Annotated[
        int, typer.Option("--validate-every", help="Steps between validations and checkpoints.")
    ] = 500,
    seed: Annotated[int, typer.Option("--seed", help="Random seed.")] = 0,
    name: Annotated[str, typer.Option("--name", help="Name of the weights written.")] = "imse",
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue from the checkpoint in --out.")
    ] = False,
    stop_at: Annotated[
        int | None,
        typer.Option(
            "--stop-at",
            help="Stop at this step (checkpoint and weights written; the learning-rate "
            "schedule stays that of --steps, so --resume later finishes the same run).",
        ),
    ] = None,
    device: Annotated[str, typer.Option("--device", help="auto | cpu | cuda.")] = "auto",
    threads: Annotated[int | None, typer.Option("--threads", help="CPU threads.")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
) -> None:
    """Train IMSE's spatial evaluator from single-contrast volumes with Shuffle Remap.

    Writes checkpoints to --out every --validate-every steps (resume with --resume) and, at
    the end, NAME.safetensors with its model card NAME.json; copy both into weights/ to ship.
    """
    import shlex
    import sys
    import time

    import torch

    from carctl import __version__, pretrained
    from carctl.cli.console import stdout
    from carctl.errors import InputError, UsageError
    from carctl.networks.evaluator import EvaluatorConfig
    from carctl.runtime import resolve_device, set_threads
    from carctl.training import data
    from carctl.training import imse as training

    set_threads(threads)
    device = resolve_device(device)
    for option, value in (("--steps", steps), ("--batch", batch), ("--width", width)):
        if value < 1:
            raise UsageError(f"{option} must be at least 1")
    if patch < 16 or patch % 4:
        raise UsageError("--patch must be a multiple of 4, at least 16")
    root = data_dir or _default_data()
    if not root.is_dir():
        raise InputError(f"data folder {root} does not exist")
    settings = training.ImseTraining(
        steps=steps,
        batch=batch,
        patch=patch,
        learning_rate=learning_rate,
        seed=seed,
        validate_every=validate_every,
        network=EvaluatorConfig(ndim=3, width=width, blocks=blocks),
    )
    console = stdout()
    began = time.perf_counter()
    volumes = data.load_volumes(root, data.TRAINING_IMAGES)
    volumes += data.load_volumes(root, data.TRAINING_LABELS, labels=True)
    validation = data.load_volumes(root, data.VALIDATION_IMAGES)
    if not volumes:
        raise InputError(f"no training volumes found under {root}")
    if not quiet:
        console.print(
            f"{len(volumes)} training volumes, {len(validation)} validation volumes "
            f"({time.perf_counter() - began:.0f} s to load); device {device}"
        )
    progress_fn, bar = None, None
    if not quiet:
        from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

        bar = Progress(
            TextColumn("imse"),
            BarColumn(),
            TextColumn("{task.completed}/{task.total}"),
            TextColumn("{task.fields[info]}"),
            TimeRemainingColumn(),
            console=console,
        )
        task = bar.add_task("train", total=steps, info="")

        def progress_fn(step: int, metrics: dict) -> None:
            info = f"loss {metrics['loss']:.4f}"
            if "spearman" in metrics:
                info += f"  val L1 {metrics['l1']:.4f}  rho {metrics['spearman']:.3f}"
            bar.update(task, completed=step, info=info)

    if bar is not None:
        bar.start()
    try:
        model, metrics = training.train(
            settings,
            volumes,
            validation,
            out,
            resume=resume,
            device=device,
            progress=progress_fn,
            stop=stop_at,
        )
    finally:
        if bar is not None:
            bar.stop()
    command = (
        "carctl train imse " + shlex.join(sys.argv[sys.argv.index("imse") + 1 :])
        if ("imse" in sys.argv)
        else "carctl train imse"
    )
    card = pretrained.write(
        model,
        out,
        name,
        {
            "architecture": {"kind": "imse-evaluator", "config": settings.network.to_dict()},
            "description": "IMSE spatial evaluator: predicts reference - other' (the error map "
            "in the reference's contrast) from (reference, other), intensities in [-1, 1].",
            "training": {
                "command": command.strip(),
                "settings": training._settings_dict(settings),
                "steps_done": metrics["step"],
                "data": sorted({v.name.split("@")[0] for v in volumes}),
                "validation_data": sorted({v.name.split("@")[0] for v in validation}),
                "device": device,
                "torch": torch.__version__,
                "carctl": __version__,
            },
            "validation": metrics,
        },
    )
    if not quiet:
        console.print(
            f"wrote {card.weights} and {card.path}: validation L1 "
            f"{metrics.get('l1', float('nan')):.4f}, Spearman "
            f"{metrics.get('spearman', float('nan')):.3f}"
        )
