"""``carctl evaluate``: how good is a registration? Dice, HD95, folding, landmark error."""

from __future__ import annotations

from typing import Annotated

import typer

NAME = "evaluate"


def command(
    fixed_labels: Annotated[
        str | None, typer.Option("--fixed-labels", help="Label map of the fixed image.")
    ] = None,
    warped_labels: Annotated[
        str | None,
        typer.Option(
            "--warped-labels",
            help="Moving label map warped onto the fixed grid (carctl apply --interp label).",
        ),
    ] = None,
    field: Annotated[
        str | None,
        typer.Option(
            "--field", "-f", help="Displacement field: folding and Jacobian; maps the landmarks."
        ),
    ] = None,
    affine: Annotated[
        str | None,
        typer.Option("--affine", "-a", help="Affine applied after the field to map the landmarks."),
    ] = None,
    fixed_points: Annotated[
        str | None,
        typer.Option(
            "--fixed-points",
            help="Fixed landmarks: CSV x,y,z (LPS mm), an elastix/ITK point set or a Slicer .fcsv.",
        ),
    ] = None,
    moving_points: Annotated[
        str | None,
        typer.Option("--moving-points", help="Corresponding moving landmarks, same formats."),
    ] = None,
    fixed_image: Annotated[
        str | None,
        typer.Option(
            "--fixed-image", help="Grid of 'index' fixed landmarks (default: --fixed-labels)."
        ),
    ] = None,
    moving_image: Annotated[
        str | None, typer.Option("--moving-image", help="Grid of 'index' moving landmarks.")
    ] = None,
    jacobian: Annotated[
        str | None,
        typer.Option(
            "--jacobian",
            help="Write the field's Jacobian determinant as an image on its grid (needs --field).",
        ),
    ] = None,
    json_out: Annotated[
        str | None,
        typer.Option("--json", help="Write the results as JSON to PATH, or - for stdout only."),
    ] = None,
    threads: Annotated[int | None, typer.Option("--threads", help="CPU threads.")] = None,
    force: Annotated[
        bool, typer.Option("--force", help="Overwrite an existing --json or --jacobian file.")
    ] = False,
) -> None:
    """Score a registration: Dice and HD95 per label, folding and log-Jacobian spread of the
    field, landmark error before and after.

    Folding is the percentage of voxels whose Jacobian determinant is <= 0; the landmark error
    is |T(p_fixed) - p_moving| for the pull-back transform T (field, then affine).
    """
    from carctl.cli.console import emit_json, stdout
    from carctl.errors import UsageError
    from carctl.evaluation import evaluate
    from carctl.runtime import set_threads

    if (fixed_labels is None) != (warped_labels is None):
        raise UsageError("--fixed-labels and --warped-labels go together")
    if (fixed_points is None) != (moving_points is None):
        raise UsageError("--fixed-points and --moving-points go together")
    if fixed_labels is None and field is None and fixed_points is None:
        raise UsageError("nothing to evaluate: give labels, a field, or landmarks")
    if jacobian is not None and field is None:
        raise UsageError("--jacobian needs --field")
    inputs = [
        p
        for p in (
            fixed_labels,
            warped_labels,
            field,
            affine,
            fixed_points,
            moving_points,
            fixed_image,
            moving_image,
        )
        if p is not None
    ]
    from carctl.io import check_output

    if json_out not in (None, "-"):
        check_output(json_out, force=force, inputs=inputs, extensions=(".json",))
    if jacobian is not None:
        check_output(jacobian, force=force, inputs=inputs)
    set_threads(threads)
    report = evaluate(
        fixed_labels=fixed_labels,
        warped_labels=warped_labels,
        field=field,
        affine=affine,
        fixed_points=fixed_points,
        moving_points=moving_points,
        fixed_image=fixed_image or fixed_labels,
        moving_image=moving_image,
        jacobian=jacobian,
        force=force,
    )
    if json_out != "-":
        show_report(report, stdout())
    emit_json(report, json_out, force=force, inputs=inputs)


def _number(value, unit: str = "") -> str:
    return "n/a" if value is None else f"{value:.4g}{unit}"


def _millimetres(value) -> str:
    """A landmark distance to the micrometre: the spread of equal errors printed as
    ``1.826e-15`` (their float rounding) before."""
    return _number(None if value is None else round(value, 6) + 0.0)


def show_report(report: dict, console) -> None:
    """Print an :func:`carctl.evaluation.evaluate` report as rich tables."""
    from rich.table import Table

    if "labels" in report:
        table = Table(title="Label overlap", title_justify="left")
        for column in ("label", "Dice", "HD95 (mm)", "HD (mm)", "fixed voxels", "warped voxels"):
            table.add_column(column, justify="right")
        for score in report["labels"]:
            volume = score.get("volume")
            table.add_row(
                str(score["label"]) if volume is None else f"{volume}:{score['label']}",
                _number(score["dice"]),
                _number(score["hd95"]),
                _number(score["hd"]),
                str(score["voxels_fixed"]),
                str(score["voxels_warped"]),
            )
        table.add_section()
        table.add_row(
            "mean",
            _number(report["dice_mean"]),
            _number(report["hd95_mean"]),
            _number(report["hd_mean"]),
            "",
            "",
        )
        console.print(table)
        if "hd_note" in report:
            console.print(f"note: {report['hd_note']}")
    if "field" in report:
        f = report["field"]
        console.print(
            f"Field: folding {f['folding_percent']:.4f} % of voxels, "
            f"std log|J| {f['log_jacobian_std']:.4f}, "
            f"det J in [{f['jacobian_min']:.3f}, {f['jacobian_max']:.3f}]"
        )
    if "landmarks" in report:
        before, after = report["landmarks"]["before"], report["landmarks"]["after"]
        table = Table(title=f"Landmark error (mm), {after['count']} pairs", title_justify="left")
        for column in ("", "mean", "std", "median", "max"):
            table.add_column(column, justify="right")
        for name, s in (("before", before), ("after", after)):
            table.add_row(name, *(_millimetres(s[k]) for k in ("mean", "std", "median", "max")))
        console.print(table)
