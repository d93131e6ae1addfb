"""``carctl qa``: label-free quality control of an alignment (see :mod:`carctl.qa`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

NAME = "qa"
# Exit status when --fail-on is met (distinct from errors: 1, usage: 2).
FAILED_EXIT = 3


def command(
    moving: Annotated[str, typer.Argument(help="The moving image (as given to register).")],
    fixed: Annotated[str, typer.Argument(help="The fixed image.")],
    field: Annotated[
        str | None, typer.Option("--field", "-f", help="Displacement field to assess.")
    ] = None,
    affine: Annotated[
        str | None, typer.Option("--affine", "-a", help="Affine to assess (after --field).")
    ] = None,
    transform: Annotated[
        list[str] | None,
        typer.Option(
            "--transform",
            "-t",
            help="Transforms to assess, repeatable, as carctl apply -t (ANTs' order; "
            "'[AFFINE,1]' for an inverse). Instead of --field/--affine.",
        ),
    ] = None,
    warped: Annotated[
        str | None,
        typer.Option("--warped", "-w", help="Assess this already-warped moving image instead."),
    ] = None,
    out_dir: Annotated[
        Path,
        typer.Option(
            "--out-dir",
            "-o",
            help="Folder for the outputs not named by their own option (those go where named).",
        ),
    ] = Path("."),
    error_map: Annotated[
        str | None,
        typer.Option(
            "--error-map", help="Estimated misalignment (mm) as an image (default NAME_qa.nii.gz)."
        ),
    ] = None,
    png: Annotated[
        str | None,
        typer.Option("--png", help="Overlay picture, before and after (default NAME_qa.png)."),
    ] = None,
    json_out: Annotated[
        str | None, typer.Option("--json", help="Result as JSON to PATH, or - for stdout only.")
    ] = None,
    fail_on: Annotated[
        str | None,
        typer.Option(
            "--fail-on", help=f"suspect | failed: exit with {FAILED_EXIT} at this verdict."
        ),
    ] = None,
    device: Annotated[str, typer.Option("--device", help="auto | cpu | cuda.")] = "auto",
    threads: Annotated[int | None, typer.Option("--threads", help="CPU threads.")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Print nothing.")] = False,
    force: Annotated[bool, typer.Option("--force", help="Overwrite existing outputs.")] = False,
) -> None:
    """Score how well MOVING is aligned to FIXED, without labels: ok, suspect or failed.

    Assesses the alignment through the scanner headers (before) and, with --field/--affine,
    -t or --warped, the registered one (after). The score estimates the remaining misalignment
    in mm (how far two quick independent re-registrations agree they would still move the
    image, averaged over the anatomy; lower is better). Writes that map (NIfTI, on a working
    grid over the fixed image's anatomy) and a PNG overlay.
    """
    from carctl.cli.apply import chosen_transforms
    from carctl.cli.console import emit_json, key_value_table, stdout
    from carctl.errors import UsageError
    from carctl.io import (
        check_distinct,
        check_output,
        output_group,
        output_stem,
        transform_paths,
    )

    transforms = chosen_transforms(field, affine, transform)
    if warped and (field or affine or transforms):
        raise UsageError("give either --warped or --field/--affine (or -t), not both")
    if fail_on not in (None, "suspect", "failed"):
        raise UsageError("--fail-on takes suspect or failed")
    stem = output_stem(moving)
    outputs = {
        "error_map": error_map or str(out_dir / f"{stem}_qa.nii.gz"),
        "png": png or str(out_dir / f"{stem}_qa.png"),
    }
    check_distinct({**outputs, "json": json_out})
    inputs = [p for p in (moving, fixed, field, affine, warped) if p]
    inputs += transform_paths(transforms)
    check_output(outputs["error_map"], force=force, inputs=inputs)
    check_output(outputs["png"], force=force, inputs=inputs, extensions=(".png",))
    if json_out not in (None, "-"):
        check_output(json_out, force=force, inputs=inputs, extensions=(".json",))

    chain = (field, affine, transforms)
    with output_group():  # the error map, the picture and the JSON appear together or not at all
        result = run(moving, fixed, chain, warped, outputs, device, threads, force, inputs)
        emit_json(result, json_out, force=force, inputs=inputs)
    if not quiet and json_out != "-":
        from carctl import qa

        rows = []
        if "before" in result:
            b = result["before"]
            rows.append(("before (headers)", f"{qa.describe(b['score'])}  {b['verdict']}"))
        rows.append(
            (
                "after" if "before" in result else "score",
                f"{qa.describe(result['score'])}  {result['verdict']}",
            )
        )
        rows += [("misalignment map", outputs["error_map"]), ("overlay", outputs["png"])]
        title = "Quality control: estimated misalignment, mm (lower is better)"
        stdout().print(key_value_table(title, rows))
    ranks = {"ok": 0, "suspect": 1, "failed": 2}
    if fail_on and ranks[result["verdict"]] >= ranks[fail_on]:
        raise typer.Exit(FAILED_EXIT)


def run(moving, fixed, chain, warped, outputs, device, threads, force, inputs) -> dict:
    """The assessment; ``chain`` is ``(field, affine, -t transforms)``."""
    from carctl.io import (
        atomic_output,
        read_image,
        require_file,
        require_same_dimension,
        transform_paths,
        write_image,
    )
    from carctl.runtime import check_threads

    field, affine, transforms = chain
    # inputs before torch: a missing or unreadable one is refused at once
    check_threads(threads)
    moving_image, fixed_image = read_image(moving), read_image(fixed)
    warped_image = read_image(warped) if warped else None
    require_same_dimension(moving=moving_image, fixed=fixed_image, warped=warped_image)
    for path in [field, affine, *transform_paths(transforms)]:
        require_file(path)

    from carctl import pretrained, qa
    from carctl.registration.levels import require_contrast
    from carctl.resample import load_chain
    from carctl.runtime import resolve_device, set_threads

    set_threads(threads)
    device = resolve_device(device)
    model, card = pretrained.load(qa.WEIGHTS, device=device)
    # a constant image validates nothing (register refuses it before any stage)
    require_contrast("moving", moving_image.array)
    require_contrast("fixed", fixed_image.array)
    if warped_image is not None:  # one value everywhere read as perfectly aligned ("ok", 0)
        require_contrast("warped", warped_image.array)
    alignments = [(moving_image, [])]  # through the headers
    if field or affine or transforms:
        alignments.append(
            (moving_image, load_chain(field, affine, fixed_image.grid.ndim, transforms))
        )
    elif warped_image is not None:
        alignments.append((qa.content(warped_image), []))
    assessments = qa.assess_alignments(model, fixed_image, alignments, device)
    before, last = assessments[0], assessments[-1]
    write_image(qa.misalignment_image(last), outputs["error_map"], force=force, inputs=inputs)
    with atomic_output(outputs["png"], force=force, inputs=inputs, extensions=(".png",)) as tmp:
        tmp.write_bytes(qa.png_bytes(qa.overlay(assessments)))
    result = {
        "score": last.score,
        "verdict": qa.verdict(last.score),
        "thresholds": qa.THRESHOLDS,
        "imse_mean_error": last.mean_error,
        "weights": card.name,
        "error_map": outputs["error_map"],
        "png": outputs["png"],
    }
    if len(assessments) > 1:
        result["before"] = {
            "score": before.score,
            "verdict": qa.verdict(before.score),
            "imse_mean_error": before.mean_error,
        }
    return result
