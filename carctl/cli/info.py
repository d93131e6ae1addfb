"""``carctl info``: what an image is and where it lies in physical space."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

NAME = "info"


def command(
    image: Annotated[
        str,
        typer.Argument(help="Image file, FILE:N for volume N of a 4-D file, or DICOM directory."),
    ],
    series: Annotated[
        str | None,
        typer.Option("--series", help="DICOM series UID, when the directory holds several."),
    ] = None,
    json_out: Annotated[
        str | None,
        typer.Option("--json", help="Also write the facts as JSON to PATH, or - for stdout."),
    ] = None,
    force: Annotated[
        bool, typer.Option("--force", help="Overwrite an existing --json file.")
    ] = False,
) -> None:
    """Size, spacing, origin, direction, orientation and intensity range of an image.

    For a DICOM directory, also lists the series it holds.
    """
    from carctl.cli.console import emit_json, key_value_table, stdout
    from carctl.io import list_dicom_series, read_sitk

    payload: dict = {"path": image}
    if Path(image).is_dir():
        found = list_dicom_series(image)
        payload["dicom_series"] = [
            {
                "uid": s.uid,
                "modality": s.modality,
                "description": s.description,
                "files": len(s.files),
            }
            for s in found
        ]
        if len(found) > 1 and series is None:
            if json_out != "-":
                _show_series(payload["dicom_series"])
            emit_json(payload, json_out, force=force, inputs=[image])
            return
    facts = describe(read_sitk(image, series))
    payload.update(facts)
    if json_out != "-":
        rows = [(k.replace("_", " "), _format(v)) for k, v in facts.items()]
        stdout().print(key_value_table(image, rows))
        if "dicom_series" in payload:
            _show_series(payload["dicom_series"])
    emit_json(payload, json_out, force=force, inputs=[image])


def describe(image) -> dict:
    """Facts about a SimpleITK image, JSON-ready."""
    import numpy as np
    import SimpleITK as sitk

    from carctl.spatial.grid import Grid

    grid = Grid.from_sitk(image)
    array = sitk.GetArrayViewFromImage(image)
    finite = array[np.isfinite(array)] if array.dtype.kind == "f" else array
    return {
        "dimension": grid.ndim,
        "size": list(grid.size),
        "spacing": list(grid.spacing),
        "origin": list(grid.origin),
        "direction": [list(row) for row in grid.direction_matrix],
        "orientation": grid.orientation,
        "oblique": grid.is_oblique,
        "pixel_type": image.GetPixelIDTypeAsString(),
        "minimum": float(finite.min()) if finite.size else None,
        "maximum": float(finite.max()) if finite.size else None,
    }


def _format(value) -> str:
    if isinstance(value, list):
        if value and isinstance(value[0], list):
            return "\n".join(" ".join(f"{round(c, 6) + 0.0:+.6f}" for c in row) for row in value)
        return " x ".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value)
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _show_series(series: list[dict]) -> None:
    from rich.table import Table

    from carctl.cli.console import stdout

    table = Table(title="DICOM series", title_justify="left")
    for column in ("uid", "modality", "description", "files"):
        table.add_column(column)
    for s in series:
        table.add_row(s["uid"], s["modality"], s["description"], str(s["files"]))
    stdout().print(table)
    if len(series) > 1:
        stdout().print("Several series: choose one with --series UID.")
