"""``carctl train``: train the networks that carctl ships."""

from __future__ import annotations

from collections.abc import Callable
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


def require_non_negative(option: str, value: float) -> None:
    """Refuse a value of ``option`` below 0, NaN or infinite (one-line usage error)."""
    import math

    from carctl.errors import UsageError

    if not (value >= 0 and math.isfinite(value)):
        raise UsageError(f"{option} must be a number, at least 0")


def _common(
    data_dir: Path | None,
    steps: int,
    threads: int | None,
    device: str,
    name: str,
    learning_rate: float,
    validate_every: int,
    seed: int,
):
    """Checks shared by every ``train`` command; returns (data folder, device)."""
    from carctl.config import DEVICES, check_seed
    from carctl.errors import InputError, UsageError
    from carctl.runtime import resolve_device, set_threads

    set_threads(threads)
    if steps < 1:
        raise UsageError("--steps must be at least 1")
    if validate_every < 1:
        raise UsageError("--validate-every must be at least 1")
    require_non_negative("--lr", learning_rate)
    check_seed(seed)
    if device not in DEVICES:
        raise UsageError(f"unknown --device '{device}'; choose from {', '.join(DEVICES)}")
    if not name or name != Path(name).name or name in (".", ".."):
        raise UsageError(f"--name '{name}' must be a plain file name (written into --out)")
    if name in RESERVED:  # its weights or card would replace the checkpoint's files
        raise UsageError(f"--name '{name}' names a checkpoint file in --out; choose another")
    root = data_dir or _default_data()
    if not root.is_dir():
        what = "is a file, not a folder" if root.exists() else "does not exist"
        raise InputError(f"data folder {root} {what}")
    return root, resolve_device(device)


def _recipe(card: Path) -> tuple[list[str], int]:
    """The commands and steps that produced the weights of ``card`` (a resumed run's, or a
    fine-tuning run's starting weights'), so the new card records the whole recipe in
    order; none without a readable card."""
    from carctl import pretrained

    c = pretrained.read_card(card)
    training = c.data.get("training") if c is not None else None
    if not isinstance(training, dict):
        return [], 0
    commands = training.get("commands") or ([training["command"]] if "command" in training else [])
    return list(commands), int(training.get("steps_done", 0))


COMMANDS = "commands.json"  # in --out: the commands of the run so far, in order
# File stems of a checkpoint in --out (carctl.training.loop), which no --name may take.
RESERVED = ("model", "optimizer", "state", "commands")


def _card_of(weights: str | Path) -> Path:
    from carctl import pretrained

    return Path(weights).with_suffix(pretrained.CARD_SUFFIX)


def _commands(out: Path, name: str, resume: bool, started: list[str], command: str) -> list[str]:
    """The commands that made the run in ``out``, this one last, kept in ``out`` as they
    grow: a fine-tuning run's start with its starting weights' (``started``, from their
    card), a resumed run's with the commands before it. Written before training, so that a
    run stopped before it wrote its card still passes its command on, and a run resumed
    under another ``--name`` (no card of that name to read them from) keeps them all."""
    import json

    from carctl import pretrained
    from carctl.io import write_text

    commands: list[str] = []
    if resume:
        path = out / COMMANDS
        try:
            kept = json.loads(path.read_text())
        except (OSError, ValueError):
            kept = None
        if isinstance(kept, list) and all(isinstance(c, str) for c in kept):
            commands = kept
        else:  # a checkpoint from before commands.json: its card, if it has this name
            commands = _recipe(out / f"{name}{pretrained.CARD_SUFFIX}")[0]
            if path.exists():  # never lost in silence
                from carctl.cli.console import stderr

                card = f"{name}{pretrained.CARD_SUFFIX}"
                stderr().print(
                    f"warning: {path} is not a list of commands: the card lists "
                    + (f"{card}'s and this one" if commands else "this command alone")
                )
    if not commands:  # a fresh fine-tuning run starts with its weights' recipe
        commands = list(started)
    if not commands or commands[-1] != command:
        commands.append(command)
    text = json.dumps(commands, indent=1) + "\n"
    write_text(text, out / COMMANDS, force=True, extensions=(".json",))
    return commands


def _restore(path: Path, text: str | None) -> None:
    """``path`` back to ``text`` (removed where it held none)."""
    from carctl.io import write_text

    if text is None:
        path.unlink(missing_ok=True)
    else:
        write_text(text, path, force=True, extensions=(".json",))


def _check_checkpoint(out: Path, resume: bool) -> None:
    """Refuse a fresh run into an ``out`` holding a checkpoint, and a resume without one."""
    from carctl.errors import UsageError

    if (out / "state.json").exists() and not resume:  # a fresh run would replace it
        raise UsageError(
            f"{out} holds a training checkpoint: --resume continues it, another --out starts "
            "a new run"
        )
    if resume and not (out / "state.json").exists():  # a mistyped --out began a new run
        raise UsageError(
            f"--resume: {out} holds no training checkpoint to continue; leave --resume out "
            "to start a run there"
        )


def _check_network(out: Path, settings: dict) -> None:
    """Refuse, before anything is written, a resume whose network options differ from its
    checkpoint's (the weights would not load; the refusal came from torch's state-dict error
    after the command had joined the run's recipe, whose replay then stopped at it)."""
    import json

    from carctl.errors import UsageError

    try:
        before = json.loads((out / "state.json").read_text()).get("settings", {}).get("network")
    except (OSError, ValueError, AttributeError):
        return
    now = json.loads(json.dumps(settings["network"]))  # tuples as the checkpoint holds them
    if not isinstance(before, dict):
        return
    changed = [
        f"{key} {before[key]!r} -> {value!r}"
        for key, value in now.items()
        if key in before and before[key] != value
    ]
    if changed:
        raise UsageError(
            f"--resume: the checkpoint in {out} is of another network than these options make "
            f"(network {'; '.join(changed)}); resume with its options or start a new run in "
            "another --out"
        )


def _warn_of_changes(out: Path, settings: dict) -> None:
    """Warn when a resumed run's settings differ from its checkpoint's beyond ``--steps``
    (which continues on the longer schedule): another seed, crop or learning rate is taken
    from here on, and the run no longer equals an uninterrupted one with either setting."""
    import json

    from carctl.cli.console import stderr

    try:
        before = json.loads((out / "state.json").read_text()).get("settings", {})
    except (OSError, ValueError, AttributeError):
        return
    now = json.loads(json.dumps(settings))  # tuples as the checkpoint holds them: lists
    changed = [
        f"{key} {before[key]!r} -> {value!r}"
        for key, value in now.items()
        # another network is refused when the checkpoint loads
        if key not in ("steps", "network") and key in before and before[key] != value
    ]
    if changed:
        stderr().print(
            "warning: resuming with other settings than the checkpoint's ("
            + "; ".join(changed)
            + "): the run goes on with these"
        )


def _run(
    kind: str,
    module,
    settings,
    root: Path,
    out: Path,
    name: str,
    architecture: str,
    description: str,
    resume: bool,
    stop_at: int | None,
    device: str,
    quiet: bool,
    shown: Callable[[dict], str],
    scales: tuple[float, ...] | None = None,
) -> None:
    """Load the data (each volume at ``scales``, default :data:`carctl.training.data.SCALES`),
    train with a progress bar, write the weights and their card."""
    import contextlib
    import shlex
    import sys
    import time

    import torch

    from carctl import __version__, pretrained
    from carctl.cli.console import stdout
    from carctl.errors import CarctlError, InputError
    from carctl.io import folder_lock
    from carctl.training import data, loop

    _check_checkpoint(out, resume)
    if resume:
        _check_network(out, loop.settings_dict(settings))
        _warn_of_changes(out, loop.settings_dict(settings))
    rank = loop.distributed()[0]  # under torchrun: joins the group, takes its GPU
    quiet = quiet or rank != 0
    console = stdout()
    began = time.perf_counter()
    scales = scales or data.SCALES
    volumes = data.load_volumes(root, data.TRAINING_IMAGES, scales=scales)
    volumes += data.load_volumes(root, data.TRAINING_LABELS, labels=True, scales=scales)
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
            TextColumn(kind),
            BarColumn(),
            TextColumn("{task.completed}/{task.total}"),
            TextColumn("{task.fields[info]}"),
            TimeRemainingColumn(),
            console=console,
        )
        task = bar.add_task("train", total=settings.steps, info="")

        def progress_fn(step: int, metrics: dict) -> None:
            bar.update(task, completed=step, info=shown(metrics))

    init = getattr(settings, "init", None)
    # the starting weights' recipe and steps (their card), which this run's continue
    recipe = _recipe(_card_of(init)) if init else ([], 0)
    command = (
        f"carctl train {kind} " + shlex.join(sys.argv[sys.argv.index(kind) + 1 :])
        if kind in sys.argv
        else f"carctl train {kind}"
    ).strip()
    # one run at a time in --out (two wrote each other's checkpoints)
    with folder_lock(out, f"carctl train {kind}") if rank == 0 else contextlib.nullcontext():
        if rank == 0:
            # again, now that no other run writes here: one that ended while this one loaded
            # its data left a checkpoint, which a fresh run trained over
            _check_checkpoint(out, resume)
            recorded = out / COMMANDS
            before = recorded.read_text() if recorded.is_file() else None
            commands = _commands(out, name, resume, recipe[0], command)
        if bar is not None:
            bar.start()
        try:
            model, metrics = module.train(
                settings,
                volumes,
                validation,
                out,
                resume=resume,
                device=device,
                progress=progress_fn,
                stop=stop_at,
            )
        except CarctlError:  # refused (a checkpoint that does not load, ...): not a step of
            if rank == 0:  # the recipe, whose replay would stop at it
                _restore(recorded, before)
            raise
        finally:
            if bar is not None:
                bar.stop()
            loop.finish()
        if rank != 0:
            return  # process 0 writes the weights
        card = pretrained.write(
            model,
            out,
            name,
            {
                "architecture": {"kind": architecture, "config": settings.network.to_dict()},
                "description": description,
                "training": {
                    "command": " && ".join(commands),
                    "commands": commands,
                    "settings": loop.settings_dict(settings),
                    "steps_done": metrics["step"] + recipe[1],
                    **({"init_sha256": pretrained.sha256(Path(init))} if init else {}),
                    "data": sorted({v.name.split("@")[0] for v in volumes}),
                    "validation_data": sorted({v.name.split("@")[0] for v in validation}),
                    "device": device,
                    "torch": torch.__version__,
                    "carctl": __version__,
                },
                "validation": metrics,
            },
        )
    if not validation:  # said even with --quiet: the card's metrics mean less
        from carctl.cli.console import stderr

        stderr().print(
            f"warning: no validation volumes under {root} "
            f"({', '.join(str(v) for v in data.VALIDATION_IMAGES)}): validated on training "
            "volumes"
        )
    if not quiet:
        console.print(f"wrote {card.weights} and {card.path}: validation {shown(metrics)}")


OUT_HELP = "Folder for checkpoints, weights and card."
STOP_HELP = (
    "Stop at this step (checkpoint and weights written; the learning-rate schedule stays "
    "that of --steps, so --resume later finishes the same run)."
)
# Options every ``train`` command takes (each command sets its own default where one differs).
Data = Annotated[
    Path | None,
    typer.Option("--data", help="Data folder (default: ../shared/data or $CARCTL_SHARED_DATA)."),
]
Steps = Annotated[int, typer.Option("--steps", help="Optimiser steps in all.")]
LearningRate = Annotated[float, typer.Option("--lr", help="Initial learning rate.")]
ValidateEvery = Annotated[
    int, typer.Option("--validate-every", help="Steps between validations and checkpoints.")
]
Seed = Annotated[int, typer.Option("--seed", help="Random seed.")]
Name = Annotated[str, typer.Option("--name", help="Name of the weights written.")]
Resume = Annotated[bool, typer.Option("--resume", help="Continue from the checkpoint in --out.")]
StopAt = Annotated[int | None, typer.Option("--stop-at", help=STOP_HELP)]
Device = Annotated[str, typer.Option("--device", help="auto | cpu | cuda.")]
Threads = Annotated[int | None, typer.Option("--threads", help="CPU threads.")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")]


@app.command("imse")
def imse(
    out: Annotated[Path, typer.Option("--out", "-o", help=OUT_HELP)] = Path("runs/imse"),
    data_dir: Data = None,
    steps: Steps = 10000,
    batch: Annotated[int, typer.Option("--batch", help="Samples per step.")] = 2,
    patch: Annotated[int, typer.Option("--patch", help="Crop edge in voxels.")] = 48,
    width: Annotated[int, typer.Option("--width", help="Channels at full resolution.")] = 8,
    blocks: Annotated[int, typer.Option("--blocks", help="Residual blocks at 1/4.")] = 4,
    lookup: Annotated[
        int,
        typer.Option(
            "--lookup", help="Groups of the rank lookup given as a third input (0: none)."
        ),
    ] = 1024,
    learning_rate: LearningRate = 2e-3,
    validate_every: ValidateEvery = 500,
    seed: Seed = 0,
    name: Name = "imse",
    resume: Resume = False,
    stop_at: StopAt = None,
    device: Device = "auto",
    threads: Threads = None,
    quiet: Quiet = False,
) -> None:
    """Train IMSE's spatial evaluator from single-contrast volumes with Shuffle Remap.

    Writes checkpoints to --out every --validate-every steps (resume with --resume) and, at
    the end, NAME.safetensors with its model card NAME.json; copy both into weights/ to ship.
    """
    from carctl.errors import UsageError
    from carctl.networks.evaluator import EvaluatorConfig
    from carctl.training import imse as training

    root, device = _common(
        data_dir, steps, threads, device, name, learning_rate, validate_every, seed
    )
    for option, value in (("--batch", batch), ("--width", width)):
        if value < 1:
            raise UsageError(f"{option} must be at least 1")
    if lookup < 0:
        raise UsageError("--lookup must be at least 0")
    if patch < 16 or patch % 4:
        raise UsageError("--patch must be a multiple of 4, at least 16")
    settings = training.ImseTraining(
        steps=steps,
        batch=batch,
        patch=patch,
        learning_rate=learning_rate,
        seed=seed,
        validate_every=validate_every,
        network=EvaluatorConfig(ndim=3, width=width, blocks=blocks, lookup=lookup),
    )

    def shown(metrics: dict) -> str:
        info = f"loss {metrics['loss']:.4f}" if "loss" in metrics else ""
        if "spearman" in metrics:
            info += f"  val L1 {metrics['l1']:.4f}  rho {metrics['spearman']:.3f}"
        return info

    _run(
        "imse",
        training,
        settings,
        root,
        out,
        name,
        "imse-evaluator",
        "IMSE spatial evaluator: predicts reference - other' (the error map in the reference's "
        "contrast) from (reference, other), intensities in [-1, 1].",
        resume,
        stop_at,
        device,
        quiet,
        shown,
    )


@app.command("car")
def car(
    out: Annotated[Path, typer.Option("--out", "-o", help=OUT_HELP)] = Path("runs/car"),
    data_dir: Data = None,
    steps: Steps = 12000,
    patch: Annotated[
        int, typer.Option("--patch", help="Crop edge in voxels (a multiple of 16).")
    ] = 32,
    width: Annotated[int, typer.Option("--width", help="Encoder channels at 1/2 size.")] = 16,
    learning_rate: LearningRate = 1e-3,
    regularization: Annotated[
        float, typer.Option("--regularization", help="Diffusion weight (lambda 1).")
    ] = 1.0,
    contrast: Annotated[
        float, typer.Option("--contrast", help="Contrast-invariance weight (lambda 2).")
    ] = 0.1,
    supervision: Annotated[
        float,
        typer.Option("--supervision", help="Weight of the known-field end-point error (0: off)."),
    ] = 0.05,
    max_displacement: Annotated[
        float, typer.Option("--max-displacement", help="Largest smooth displacement, voxels.")
    ] = 6.0,
    same_contrast: Annotated[
        float,
        typer.Option(
            "--same-contrast", help="Fraction of views whose two images share one contrast."
        ),
    ] = 0.5,
    init: Annotated[
        Path | None,
        typer.Option(
            "--init",
            help="Start from these weights (a .safetensors of 'train car' with the same "
            "--width; its card beside it is checked and its commands head the new card's).",
        ),
    ] = None,
    scales: Annotated[
        str,
        typer.Option(
            "--scales",
            help="Spacings of the training views, comma-separated, in units of each "
            "volume's working spacing (about 2 mm on a brain).",
        ),
    ] = "1,1.5",
    bias: Annotated[
        float,
        typer.Option(
            "--bias", help="Largest log-amplitude of a smooth bias field on each input (0: none)."
        ),
    ] = 0.0,
    unpaired: Annotated[
        float,
        typer.Option(
            "--unpaired",
            help="Probability that an input gets blobs its partner lacks (lesion-like; 0: none).",
        ),
    ] = 0.0,
    blur: Annotated[
        float,
        typer.Option(
            "--blur",
            help="Largest Gaussian sigma (voxels, drawn per axis) blurring each input (0: none).",
        ),
    ] = 0.0,
    blend: Annotated[
        float,
        typer.Option(
            "--blend",
            help="With --init: write this weight of the fine-tuned weights plus the rest of "
            "--init's (WiSE-FT; 1: the fine-tuned weights alone).",
        ),
    ] = 1.0,
    validate_every: ValidateEvery = 250,
    seed: Seed = 0,
    name: Name = "car",
    resume: Resume = False,
    stop_at: StopAt = None,
    device: Device = "auto",
    threads: Threads = None,
    quiet: Quiet = False,
) -> None:
    """Train CAR's contrast-agnostic registration network (random-convolution contrasts,
    contrast-invariance loss, LNCC on the single-contrast images).

    Writes checkpoints to --out every --validate-every steps (resume with --resume) and, at
    the end, NAME.safetensors with its model card NAME.json; copy both into weights/ to ship.
    """
    from carctl.errors import UsageError
    from carctl.networks.car import CarConfig
    from carctl.training import car as training

    root, device = _common(
        data_dir, steps, threads, device, name, learning_rate, validate_every, seed
    )
    if width < 2:
        raise UsageError("--width must be at least 2")
    if patch < 16 or patch % 16:
        raise UsageError("--patch must be a multiple of 16")
    for option, value in (
        ("--regularization", regularization),
        ("--contrast", contrast),
        ("--supervision", supervision),
        ("--max-displacement", max_displacement),
        ("--bias", bias),
        ("--blur", blur),
    ):
        require_non_negative(option, value)
    for option, value in (("--same-contrast", same_contrast), ("--unpaired", unpaired)):
        if not 0 <= value <= 1:
            raise UsageError(f"{option} must be between 0 and 1")
    if not 0 < blend <= 1:
        raise UsageError("--blend must be above 0 and at most 1")
    if blend < 1 and init is None:
        raise UsageError("--blend needs --init (the weights to blend with)")
    try:
        factors = tuple(float(f) for f in scales.split(","))
    except ValueError:
        factors = ()
    if not factors or not all(0.25 <= f <= 4 for f in factors):
        raise UsageError(
            f"--scales must be numbers between 0.25 and 4, comma-separated: {scales!r}"
        )
    settings = training.CarTraining(
        steps=steps,
        patch=patch,
        learning_rate=learning_rate,
        seed=seed,
        validate_every=validate_every,
        max_displacement=max_displacement,
        regularization=regularization,
        contrast=contrast,
        supervision=supervision,
        same_contrast=same_contrast,
        network=CarConfig(ndim=3, width=width),
        init=str(init) if init else None,
        scales=factors,
        bias=bias,
        unpaired=unpaired,
        blur=blur,
        blend=blend,
    )

    def shown(metrics: dict) -> str:
        info = f"loss {metrics['loss']:.4f}" if "loss" in metrics else ""
        if "epe" in metrics and "epe_before" in metrics:
            info += f"  val EPE {metrics['epe']:.2f}/{metrics['epe_before']:.2f} vx"
        return info

    _run(
        "car",
        training,
        settings,
        root,
        out,
        name,
        "car-registration",
        "CAR registration network: (moving, fixed) on one working grid, intensities in "
        "[0, 1] -> displacement in voxels of that grid (x first), moving read at index + u.",
        resume,
        stop_at,
        device,
        quiet,
        shown,
        settings.scales,
    )
