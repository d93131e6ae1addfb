"""``carctl register``: align a moving image to a fixed one (affine + instance optimisation)."""

from __future__ import annotations

import contextlib
import math
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

if TYPE_CHECKING:
    from carctl.config import RegistrationOptions

NAME = "register"


# Options that shape a registration, shared with ``carctl batch``.
Method = Annotated[
    str,
    typer.Option(
        "--method",
        help="auto (affine, network, short optimisation) | net (affine, network) | io "
        "(affine, optimisation) | affine | rigid.",
    ),
]
Loss = Annotated[
    str,
    typer.Option(
        "--loss", help="mind | mi | lncc | ncc | mse | imse | mind+imse (mind: any contrast)."
    ),
]
Diffeomorphic = Annotated[
    bool, typer.Option("--diffeomorphic", help="Stationary velocity field (scaling and squaring).")
]
Regularization = Annotated[
    float | None, typer.Option("--regularization", help="Smoothness weight (default per loss).")
]
Iterations = Annotated[
    int | None, typer.Option("--iterations", help="Deformable iterations per level.")
]
Resolution = Annotated[
    float | None, typer.Option("--resolution", help="Finest deformable spacing, mm.")
]
Search = Annotated[
    str,
    typer.Option(
        "--search",
        help="The start's rotations: default (0 and +-20 degrees about each axis) | wide "
        "(every 30 up to +-60, for orientations up to ~90 degrees apart; seconds more).",
    ),
]
Device = Annotated[str, typer.Option("--device", help="auto | cpu | cuda.")]
Threads = Annotated[int | None, typer.Option("--threads", help="CPU threads.")]
Seed = Annotated[int, typer.Option("--seed", help="Random seed (same seed, same result).")]


# register warns when the affine scales volumes outside this range (a 3 x 3 x 3 pair came
# out at 0.13 without a word).
VOLUME_WARNING = (0.5, 2.0)


def _default_names(moving: str) -> dict[str, str]:
    """Output names from the moving image's: ``t1w.nii.gz`` -> ``t1w_warped.nii.gz``, ..."""
    from carctl.io import output_stem

    stem = output_stem(moving)
    return {
        "warped": f"{stem}_warped.nii.gz",
        "field": f"{stem}_field.nii",  # floats barely compress; gzip costs seconds
        "affine": f"{stem}_affine.mat",
        "warped_labels": f"{stem}_warped_labels.nii.gz",
    }


def command(
    moving: Annotated[str, typer.Argument(help="Image to align (file, FILE:N or DICOM folder).")],
    fixed: Annotated[str, typer.Argument(help="Image whose grid and space the result takes.")],
    out_dir: Annotated[
        Path,
        typer.Option(
            "--out-dir",
            "-o",
            help="Folder for the outputs not named by their own option (those go where named).",
        ),
    ] = Path("."),
    warped: Annotated[
        str | None, typer.Option("--warped", help="Moving image resampled onto the fixed grid.")
    ] = None,
    field: Annotated[
        str | None,
        typer.Option(
            "--field",
            help="The whole mapping (affine and deformable) as one ITK displacement field on "
            "the fixed grid: antsApplyTransforms -t FIELD alone reproduces --warped.",
        ),
    ] = None,
    affine: Annotated[
        str | None, typer.Option("--affine", help="The affine part alone, as an ITK .mat/.tfm.")
    ] = None,
    inverse_field: Annotated[
        str | None,
        typer.Option(
            "--inverse-field",
            help="The inverse mapping (fixed -> moving images) on the moving grid.",
        ),
    ] = None,
    labels: Annotated[
        str | None, typer.Option("--labels", help="Label map in moving space to carry along.")
    ] = None,
    warped_labels: Annotated[
        str | None, typer.Option("--warped-labels", help="Where the warped --labels go.")
    ] = None,
    fixed_mask: Annotated[
        str | None, typer.Option("--fixed-mask", help="Only voxels inside count (fixed space).")
    ] = None,
    moving_mask: Annotated[
        str | None, typer.Option("--moving-mask", help="Only voxels inside count (moving space).")
    ] = None,
    initial_affine: Annotated[
        str | None,
        typer.Option(
            "--initial-affine",
            help="Start from this affine (ITK .mat/.tfm, fixed -> moving, as --affine writes "
            "and ANTs reads) instead of searching for a start.",
        ),
    ] = None,
    method: Method = "auto",
    loss: Loss = "mind",
    diffeomorphic: Diffeomorphic = False,
    regularization: Regularization = None,
    iterations: Iterations = None,
    resolution: Resolution = None,
    search: Search = "default",
    device: Device = "auto",
    threads: Threads = None,
    seed: Seed = 0,
    json_out: Annotated[
        str | None,
        typer.Option("--json", help="Write the summary as JSON to PATH, or - for stdout only."),
    ] = None,
    qa: Annotated[
        bool,
        typer.Option(
            "--qa/--no-qa",
            help="Score the alignment before and after (carctl qa: estimated misalignment in "
            "mm, a few seconds more) and warn when the result looks worse than its input.",
        ),
    ] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress or summary.")] = False,
    force: Annotated[bool, typer.Option("--force", help="Overwrite existing outputs.")] = False,
) -> None:
    """Align MOVING to FIXED: initialisation, rigid, affine, the pretrained network, then
    deformable optimisation.

    Writes the warped image, the whole mapping as one displacement field and the affine part
    (ITK/ANTs conventions: LPS mm, pull-back from fixed to moving), and prints a summary.
    """
    import time

    from carctl.errors import UsageError

    start = time.perf_counter()
    names = _default_names(moving)
    outputs = {
        "warped": warped or str(out_dir / names["warped"]),
        "field": field or str(out_dir / names["field"]),
        "affine": affine or str(out_dir / names["affine"]),
    }
    if inverse_field:
        outputs["inverse_field"] = inverse_field
    if warped_labels and not labels:
        raise UsageError("--warped-labels needs --labels")
    if labels:
        outputs["warped_labels"] = warped_labels or str(out_dir / names["warped_labels"])
    from carctl.config import RegistrationOptions
    from carctl.io import check_distinct

    check_distinct({**outputs, "json": json_out})

    settings = RegistrationOptions(  # checks every value before any image is read
        method=method,
        loss=loss,
        diffeomorphic=diffeomorphic,
        regularization=regularization,
        iterations=iterations,
        resolution=resolution,
        device=device,
        seed=seed,
        search=search,
    )
    warn_unused(settings)
    if json_out == "-":
        quiet = True
    inputs = [i for i in (moving, fixed, labels, fixed_mask, moving_mask, initial_affine) if i]
    if json_out not in (None, "-"):  # refused now rather than after the work
        from carctl.io import check_output

        check_output(json_out, force=force, inputs=inputs, extensions=(".json",))
    from carctl.cli.console import emit_json
    from carctl.io import output_group

    with output_group():  # the JSON too: all the outputs appear, or none
        summary = run(
            moving,
            fixed,
            outputs,
            settings,
            inputs=inputs,
            labels=labels,
            fixed_mask=fixed_mask,
            moving_mask=moving_mask,
            initial_affine=initial_affine,
            threads=threads,
            quiet=quiet,
            force=force,
            started=start,
            qa=qa,
        )
        emit_json(summary, json_out, force=force, inputs=inputs)


def warn_unused(settings) -> None:
    """Say on stderr (even with --quiet: the user asked for something that will not happen)
    which options ``settings``' method does not use (:meth:`RegistrationOptions.unused`)."""
    unused = settings.unused()
    if unused:
        from carctl.cli.console import stderr

        stderr().print(
            f"warning: {', '.join(unused)} {'has' if len(unused) == 1 else 'have'} no effect "
            f"with --method {settings.method} (no deformable stage)"
        )


def _output_path(key: str, path: str, grid, moving: str, force: bool, inputs) -> str:
    """Where output ``key`` on ``grid`` goes: ``path``, or for a default name in a format
    that would not read back on ``grid`` (a sheared grid in NIfTI, :func:`carctl.io.unfit_for`;
    a field one voxel thick in NIfTI, :func:`carctl.spatial.files.thin_in_nifti`) the same
    name in ``.mha``; a given name that would not is refused before any work."""
    from carctl.io import check_output, image_suffix, require_fit, unfit_for
    from carctl.spatial.files import require_field_format, thin_in_nifti

    names = _default_names(moving)
    field = key in ("field", "inverse_field")
    defaults = {names["warped"], names["warped_labels"], names["field"]}
    defaults.add(f"{Path(names['field']).stem}_inverse.nii")
    unfit = unfit_for(path, grid) or (field and thin_in_nifti(path, grid))
    if unfit and Path(path).name in defaults:
        path = str(Path(path).with_name(Path(path).name[: -len(image_suffix(path))] + ".mha"))
        check_output(path, force=force, inputs=inputs)
    if field:
        require_field_format(path, grid)  # require_fit's check, and the thin one
    else:
        require_fit(path, grid)
    return path


def finish(pool) -> None:
    """Wait for every job of the executor ``pool`` to end, through any number of Ctrl-C (the
    jobs here write files for a few tenths of a second), then pass the interrupt on (it was
    swallowed, and the command exited 0 with every output written)."""
    interrupted = None
    while True:
        try:
            pool.shutdown(wait=True)
            break
        except KeyboardInterrupt as error:
            interrupted = interrupted or error
    if interrupted is not None:
        raise interrupted


def run(
    moving: str, fixed: str, outputs: dict[str, str], settings: RegistrationOptions, **options
) -> dict:
    """Everything after parsing: read, register, write, summarise (returns the summary)."""
    import dataclasses
    import time
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np

    from carctl.cli.console import stderr
    from carctl.errors import InputError
    from carctl.io import (
        AFFINE_EXTENSIONS,
        FIELD_EXTENSIONS,
        IMAGE_EXTENSIONS,
        Volumes,
        check_output,
        headers_read,
        output_group,
        read_image,
        read_image_or_volumes,
        require_file,
        write_image,
        write_volumes,
    )
    from carctl.runtime import check_threads, import_in_background

    check_threads(options["threads"])
    force, inputs = options["force"], options["inputs"]
    transforms = {"affine": AFFINE_EXTENSIONS, "field": FIELD_EXTENSIONS}
    transforms["inverse_field"] = FIELD_EXTENSIONS
    for key, path in outputs.items():
        check_output(
            path, force=force, inputs=inputs, extensions=transforms.get(key, IMAGE_EXTENSIONS)
        )
    # the images before torch: a missing or unreadable input is refused in a fraction of a
    # second instead of after loading torch (about 1.3 s); once their headers read, torch is
    # imported while their voxels are read (BraTS `--method net` 4.80 -> 4.62 s, the spine
    # pair 4.50 -> 4.35 s whole-process, four rounds interleaved)
    require_file(options.get("initial_affine"))
    if headers_read(moving, fixed):
        import_in_background("torch")
    moving_image = read_image(moving)
    fixed_image = read_image(fixed)
    fixed_mask = read_image(options["fixed_mask"]) if options["fixed_mask"] else None
    moving_mask = read_image(options["moving_mask"]) if options["moving_mask"] else None
    # a 4-D label map (one map per structure, as the prostate data's): every volume carried
    labels = read_image_or_volumes(options["labels"]) if options["labels"] else None
    if labels is not None and labels.grid.ndim != moving_image.grid.ndim:
        raise InputError(
            f"--labels: the label map is {labels.grid.ndim}-D and the moving image "
            f"{moving_image.grid.ndim}-D"
        )
    if options.get("initial_affine") and settings.search != "default":
        stderr().print(
            f"warning: --search {settings.search} has no effect with an initial affine (it "
            "replaces the search)"
        )
    for key in ("warped", "warped_labels", "field", "inverse_field"):
        if key in outputs:
            grid = moving_image.grid if key == "inverse_field" else fixed_image.grid
            outputs[key] = _output_path(key, outputs[key], grid, moving, force, inputs)

    import torch

    from carctl.metrics import jacobian_summary
    from carctl.registration.pipeline import register
    from carctl.resample import resample_image, resample_volumes
    from carctl.runtime import resolve_device, set_threads
    from carctl.spatial.files import read_affine, write_affine, write_field
    from carctl.spatial.transform import jacobian_determinant

    set_threads(options["threads"])
    settings = dataclasses.replace(settings, device=resolve_device(settings.device))
    given = options.get("initial_affine")
    initial = read_affine(given).homogeneous if given else None
    console = stderr()
    quiet = options["quiet"]
    if not quiet:
        console.print(f"moving  {moving_image.grid.describe()}   ({moving})")
        console.print(f"fixed   {fixed_image.grid.describe()}   ({fixed})")
    with _progress(console, quiet) as progress:
        result = register(
            moving_image, fixed_image, settings, fixed_mask, moving_mask, progress, initial
        )

    written_start = time.perf_counter()
    with output_group():  # all of them or none
        # the two large files are written (compressed, copied) in threads while the rest is
        # computed: on a 1 mm brain the two and the Jacobian summary 1.0-1.4 -> 0.6-0.75 s
        # alone; in `register --method net` 1.0-1.3 s (without the Jacobian) -> 0.76-0.88.
        # The field (ready first) is written while the warped image is resampled.
        writers = ThreadPoolExecutor(max_workers=2)
        try:
            written = [
                writers.submit(
                    write_field, result.field, outputs["field"], force=force, inputs=inputs
                )
            ]
            warped = resample_image(moving_image, fixed_image.grid, [result.field])
            written.append(
                writers.submit(write_image, warped, outputs["warped"], force=force, inputs=inputs)
            )
            write_affine(result.affine, outputs["affine"], force=force, inputs=inputs)
            if isinstance(labels, Volumes):
                warped_maps = resample_volumes(labels, fixed_image.grid, [result.field], "label")
                write_volumes(warped_maps, outputs["warped_labels"], force=force, inputs=inputs)
            elif labels is not None:
                warped_labels = resample_image(labels, fixed_image.grid, [result.field], "label")
                write_image(warped_labels, outputs["warped_labels"], force=force, inputs=inputs)
            if "inverse_field" in outputs:
                inverse = result.inverse(moving_image.grid)
                write_field(inverse, outputs["inverse_field"], force=force, inputs=inputs)
            jacobian = jacobian_summary(jacobian_determinant(result.field))
        finally:
            # the writers end before the group removes its staging folders, even on Ctrl-C:
            # a writer still at work then left a partial field in a `.carctl-*` folder, or
            # moved its file into place after the group had given up
            finish(writers)
        for job in written:
            job.result()  # its error, if any, raised here
    for stage in result.stages:
        if "warning" in stage.detail:
            console.print(f"warning: {stage.detail['warning']}")
    volume = float(np.linalg.det(result.affine.matrix))
    if not VOLUME_WARNING[0] <= volume <= VOLUME_WARNING[1]:
        console.print(
            f"warning: the affine changes volumes by a factor of {volume:.2f}; check the "
            "result (small or very different images may not fix all of an affine's parameters; "
            "try --method rigid)"
        )
    summary = {
        "moving": moving,
        "fixed": fixed,
        "method": settings.method,
        "loss": settings.loss,
        "diffeomorphic": settings.diffeomorphic,
        "device": settings.device,
        "seed": settings.seed,
        "threads": torch.get_num_threads(),  # another count can move the result a little
        "initialisation": next(
            (s.detail.get("start") for s in result.stages if s.name == "initialise"), None
        ),
        "initial_affine": given,
        "stages": [
            {
                "name": s.name,
                "seconds": round(s.seconds, 3),
                "loss_before": s.loss_before,
                "loss_after": s.loss_after,
                **s.detail,
            }
            for s in result.stages
        ],
        "levels": result.levels,
        "write_seconds": round(time.perf_counter() - written_start, 3),
        "total_seconds": round(time.perf_counter() - options["started"], 3),
        **jacobian,
        "affine": result.affine.homogeneous.tolist(),
        "outputs": outputs,
    }
    if options.get("qa", False):
        summary["qa"] = _quality(moving_image, fixed_image, result, settings.device, console)
        summary["total_seconds"] = round(time.perf_counter() - options["started"], 3)
    if not quiet:
        _show(summary, console)
    return summary


def _quality(moving, fixed, result, device: str, console) -> dict:
    """Label-free QA (see :mod:`carctl.qa`) of the headers and of ``result``: scores and
    verdicts, and a warning when the registration looks worse than its input."""
    import time

    from carctl import qa

    started = time.perf_counter()
    alignments = [(moving, []), (moving, [result.field])]
    out = {
        name: {"score": a.score, "verdict": qa.verdict(a.score)}
        for name, a in zip(
            ("before", "after"), qa.assess_alignments(None, fixed, alignments, device), strict=True
        )
    }
    out["seconds"] = round(time.perf_counter() - started, 3)
    before, after = out["before"]["score"], out["after"]["score"]
    # no score after: no overlap left; none before (the headers left the images apart) and
    # one after is no loss
    if math.isnan(after) or after > before:
        console.print(
            "warning: the registered result looks worse than its input to the quality check "
            f"(estimated misalignment in mm: {qa.describe(after)} after, "
            f"{qa.describe(before)} through the headers); inspect it with carctl qa"
        )
    return out


class _StageBars:
    """The pipeline's progress callback: one rich bar per stage."""

    def __init__(self, bars) -> None:
        self._bars = bars
        self._task = None
        self._total = 0

    def start(self, stage: str, total: int) -> None:
        self.finish()
        self._total = max(total, 1)
        self._task = self._bars.add_task(stage, total=self._total)

    def advance(self, steps: int = 1) -> None:
        self._bars.advance(self._task, steps)

    def finish(self) -> None:
        if self._task is not None:  # a stage may stop early (nothing left to do)
            self._bars.update(self._task, completed=self._total)


@contextlib.contextmanager
def _progress(console, quiet: bool):
    """A :class:`_StageBars` on ``console`` (None when quiet)."""
    if quiet:
        yield None
        return
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    columns = (TextColumn("{task.description:<13}"), BarColumn())  # "rigid, turned"
    columns += (TextColumn("{task.completed}/{task.total}"), TimeElapsedColumn())
    with Progress(*columns, console=console) as bars:
        stages = _StageBars(bars)
        yield stages
        stages.finish()


def _show(summary: dict, console) -> None:
    from carctl.cli.console import key_value_table

    def loss(value) -> str:
        return "" if value is None else f"{value:.4f}"

    rows = []
    for stage in summary["stages"]:
        change = ""
        if stage["loss_before"] is not None:
            change = f"   loss {loss(stage['loss_before'])} -> {loss(stage['loss_after'])}"
        for why in ("skipped", "discarded", "set_aside"):
            if why in stage:
                change += f"   ({why.replace('_', ' ')}: {stage[why]})"
        rows.append((stage["name"], f"{stage['seconds']:.2f} s{change}"))
    quality = summary.get("qa", {})
    if "after" in quality:
        from carctl import qa

        before, after = quality["before"], quality["after"]
        rows.append(
            (
                "quality",
                f"{qa.describe(before['score'], 4)} ({before['verdict']}) -> "
                f"{qa.describe(after['score'], 4)} ({after['verdict']}), lower is better",
            )
        )
    rows.append(("start", str(summary["initialisation"])))
    padding = next((s["padding"] for s in summary["stages"] if "padding" in s), None)
    if padding:  # scanner padding, left out (see carctl.padding)
        from carctl.padding import described

        found = ", ".join(f"{name} {described(p)}" for name, p in padding.items())
        rows.append(("padding", f"{found}: left out, as beyond the scan"))
    rows += [
        ("folding", f"{summary['folding_percent']:.4f} % of voxels"),
        ("Jacobian", f"{summary['jacobian_min']:.3f} .. {summary['jacobian_max']:.3f}"),
        ("total", f"{summary['total_seconds']:.1f} s"),
    ]
    rows += [(key, path) for key, path in summary["outputs"].items()]
    console.print(key_value_table("registration", rows))
