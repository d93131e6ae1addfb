"""``carctl qa``: label-free quality control of an alignment (IMSE's evaluator)."""

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
    warped: Annotated[
        str | None,
        typer.Option("--warped", "-w", help="Assess this already-warped moving image instead."),
    ] = None,
    out_dir: Annotated[
        Path, typer.Option("--out-dir", "-o", help="Folder for outputs given without a path.")
    ] = Path("."),
    error_map: Annotated[
        str | None,
        typer.Option("--error-map", help="Predicted |error| as an image (default NAME_qa.nii.gz)."),
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

    Assesses the alignment through the scanner headers (before) and, with --field/--affine
    or --warped, the registered one (after). Writes the predicted error map (NIfTI, on a
    working grid over the fixed image's anatomy) and a PNG overlay; the score is the mean
    predicted error inside the anatomy (lower is better).
    """
    from carctl.cli.console import emit_json, key_value_table, stdout
    from carctl.errors import UsageError
    from carctl.io import check_output, output_stem

    if warped and (field or affine):
        raise UsageError("give either --warped or --field/--affine, not both")
    if fail_on not in (None, "suspect", "failed"):
        raise UsageError("--fail-on takes suspect or failed")
    stem = output_stem(moving)
    outputs = {
        "error_map": error_map or str(out_dir / f"{stem}_qa.nii.gz"),
        "png": png or str(out_dir / f"{stem}_qa.png"),
    }
    inputs = [p for p in (moving, fixed, field, affine, warped) if p]
    check_output(outputs["error_map"], force=force, inputs=inputs)
    check_output(outputs["png"], force=force, inputs=inputs, extensions=(".png",))
    if json_out not in (None, "-"):
        check_output(json_out, force=force, inputs=inputs, extensions=(".json",))

    if fail_on:  # refused before any work when the weights give no verdict
        from carctl import pretrained, qa

        if qa.thresholds_of(pretrained.card(qa.WEIGHTS).data) is None:
            raise UsageError("--fail-on needs calibrated weights; these give no verdict")
    result = run(moving, fixed, field, affine, warped, outputs, device, threads, force, inputs)
    emit_json(result, json_out, force=force, inputs=inputs)
    if not quiet and json_out != "-":
        rows = []
        if "before" in result:
            b = result["before"]
            rows.append(("before (headers)", f"{b['score']:.4f}  {b['verdict']}"))
        rows.append(
            (
                "after" if "before" in result else "score",
                f"{result['score']:.4f}  {result['verdict']}",
            )
        )
        rows += [("error map", outputs["error_map"]), ("overlay", outputs["png"])]
        stdout().print(key_value_table("Quality control (lower is better)", rows))
    ranks = {"ok": 0, "suspect": 1, "failed": 2}
    if fail_on and ranks[result["verdict"]] >= ranks[fail_on]:
        raise typer.Exit(FAILED_EXIT)


def run(moving, fixed, field, affine, warped, outputs, device, threads, force, inputs) -> dict:
    from carctl import pretrained, qa
    from carctl.cli.console import stderr
    from carctl.io import atomic_output, read_image, write_image
    from carctl.resample import load_chain
    from carctl.runtime import resolve_device, set_threads

    set_threads(threads)
    device = resolve_device(device)
    model, card = pretrained.load(qa.WEIGHTS, device=device)
    thresholds = qa.thresholds_of(card.data)
    if thresholds is None:
        stderr().print(
            "warning: these evaluator weights are not calibrated (no verdict thresholds in "
            f"{card.path.name}): the score is experimental and the verdict 'uncalibrated'"
        )
    moving_image = read_image(moving)
    alignments = [(moving_image, [])]  # through the headers
    if field or affine:
        alignments.append((moving_image, load_chain(field, affine)))
    elif warped:
        alignments.append((read_image(warped), []))
    assessments = qa.assess_alignments(model, read_image(fixed), alignments, device)
    before, last = assessments[0], assessments[-1]
    write_image(qa.error_image(last), outputs["error_map"], force=force, inputs=inputs)
    with atomic_output(outputs["png"], force=force, inputs=inputs, extensions=(".png",)) as tmp:
        tmp.write_bytes(qa.png_bytes(qa.overlay(assessments)))
    result = {
        "score": last.score,
        "verdict": qa.verdict(last.score, thresholds),
        "thresholds": thresholds,
        "weights": card.name,
        "error_map": outputs["error_map"],
        "png": outputs["png"],
    }
    if len(assessments) > 1:
        result["before"] = {"score": before.score, "verdict": qa.verdict(before.score, thresholds)}
    return result
