"""``carctl info``: what an image or a transform file is and where it lies in physical space."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

NAME = "info"


def command(
    image: Annotated[
        str,
        typer.Argument(
            help="Image file, FILE:N for volume N of a 4-D file, DICOM directory, or a "
            "transform: an ITK affine (.mat/.tfm) or displacement field."
        ),
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
    threads: Annotated[
        int | None,
        typer.Option("--threads", help="CPU threads (a displacement field's summary)."),
    ] = None,
) -> None:
    """Size, spacing, origin, direction, orientation and intensity range of an image.

    For a DICOM directory, also lists the series it holds. For an affine (.mat/.tfm): its
    matrix, centre, translation, rotation angle, scales and determinant; for a displacement
    field: its grid, displacement lengths, folding and Jacobian range.
    """
    from carctl.cli.console import emit_json, key_value_table, stdout
    from carctl.io import check_output, list_dicom_series, read_sitk
    from carctl.runtime import check_threads

    check_threads(threads)  # loads nothing: an image's facts need no torch
    if json_out not in (None, "-"):  # refused before the table is printed
        check_output(json_out, force=force, inputs=[image], extensions=(".json",))

    payload: dict = {"path": image}
    kind = _transform_kind(image)
    if kind is not None:
        facts = describe_affine(image) if kind == "affine" else describe_field(image, threads)
        payload.update(facts)
        if json_out != "-":
            rows = [(k.replace("_", " "), _format(v)) for k, v in facts.items()]
            stdout().print(key_value_table(image, rows))
        emit_json(payload, json_out, force=force, inputs=[image])
        return
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
    facts = describe(read_sitk(image, series, series_option="--series", whole=True), image)
    payload.update(facts)
    if json_out != "-":
        rows = [(k.replace("_", " "), _format(v)) for k, v in facts.items()]
        stdout().print(key_value_table(image, rows))
        if "dicom_series" in payload:
            _show_series(payload["dicom_series"])
    emit_json(payload, json_out, force=force, inputs=[image])


def describe(image, spec: str) -> dict:
    """Facts about a SimpleITK image (read from ``spec``), JSON-ready."""
    import numpy as np
    import SimpleITK as sitk

    from carctl.io import first_volume, grid_of
    from carctl.padding import padding, summarised

    grid = grid_of(first_volume(image), spec)
    array = sitk.GetArrayViewFromImage(image)
    finite = array[np.isfinite(array)] if array.dtype.kind == "f" else array
    volumes = {}
    if image.GetDimension() == 4:  # the file's dimension, its volumes' grid, the fourth axis
        volumes = {
            "dimension": 4,
            "volumes": image.GetSize()[3],
            "volume_spacing": image.GetSpacing()[3],
            "volume_origin": image.GetOrigin()[3],
            "volume_direction": image.GetDirection()[15],
        }
    facts = {
        **_grid_facts(grid),
        **volumes,
        "oblique": grid.is_oblique,
        "pixel_type": image.GetPixelIDTypeAsString(),
        "minimum": float(finite.min()) if finite.size else None,
        "maximum": float(finite.max()) if finite.size else None,
    }
    if finite.size < array.size:  # NaN and infinities: read as no data by register and qa
        facts["non_finite_voxels"] = int(array.size - finite.size)
    scalar = image.GetNumberOfComponentsPerPixel() == 1 and not volumes
    found = padding(array) if scalar else None
    if found is not None:  # what register and qa leave out (see carctl.padding)
        facts["padding"] = summarised(found)
    return facts


def _grid_facts(grid) -> dict:
    """Where a :class:`~carctl.spatial.grid.Grid` lies, JSON-ready."""
    return {
        "dimension": grid.ndim,
        "size": list(grid.size),
        "spacing": list(grid.spacing),
        "origin": list(grid.origin),
        "direction": [list(row) for row in grid.direction_matrix],
        "orientation": grid.orientation,
    }


def _transform_kind(spec: str) -> str | None:
    """``"affine"`` for an ITK transform file, ``"field"`` for an image file holding one
    D-vector per voxel, else None (an image, or something the image path will refuse)."""
    from carctl.io import AFFINE_EXTENSIONS, image_suffix, load_sitk, native_output_silenced

    path = Path(spec)
    if not path.is_file():
        return None
    if image_suffix(path) in (".mat", ".tfm", ".h5") or (
        image_suffix(path) in AFFINE_EXTENSIONS and path.read_bytes()[:64].startswith(b"#Insight")
    ):
        return "affine"
    sitk = load_sitk()
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        with native_output_silenced():
            reader.ReadImageInformation()
    except RuntimeError:
        return None
    d, components = reader.GetDimension(), reader.GetNumberOfComponents()
    if (d, components) == (2, 3):  # a single-slice 3-D field, as ITK reads it
        from carctl.spatial.files import single_slice_grid

        return "field" if single_slice_grid(path) is not None else None
    return "field" if d in (2, 3) and components == d else None


def describe_affine(path: str) -> dict:
    """Facts about an ITK affine file (fixed -> moving, LPS mm), JSON-ready: its matrix and
    centre, the polar decomposition of its linear part (a rotation times a symmetric
    stretch: the rotation's angle, the stretch's scales), its determinant and how far it
    moves its centre."""
    import numpy as np

    from carctl.spatial.files import read_affine

    affine = read_affine(path)
    a = affine.matrix
    d = affine.ndim
    u, scales, vt = np.linalg.svd(a)

    def degrees(rotation: np.ndarray) -> float:
        if d == 3:
            return float(np.degrees(np.arccos(np.clip((np.trace(rotation) - 1) / 2, -1.0, 1.0))))
        return float(np.degrees(np.arctan2(rotation[1, 0], rotation[0, 0])))

    reflection = bool(np.linalg.det(u @ vt) < 0)
    if reflection:  # the nearest rotation after flipping the weakest axis (of equal ones, the
        # flip that turns least: diag(-1, 1, 1) is a mirror that turns by 0, not 180 degrees)
        weakest = np.flatnonzero(scales <= scales.min() * (1 + 1e-9))
        turns = []
        for axis in weakest:
            flipped = u.copy()
            flipped[:, axis] = -flipped[:, axis]
            turns.append(degrees(flipped @ vt))
        angle = min(turns, key=abs)
    else:
        angle = degrees(u @ vt)
    return {
        "kind": "affine transform (pull-back, LPS mm)",
        "dimension": d,
        "matrix": [list(map(float, row)) for row in affine.homogeneous],
        "center": [float(c) for c in affine.center],
        "translation": [float(t) for t in affine.translation],
        "translation_mm": float(np.linalg.norm(affine.translation)),
        "rotation_degrees": float(angle),
        "scales": [float(v) for v in scales],
        "determinant": float(np.linalg.det(a)),
        "reflection": reflection,
    }


def describe_field(path: str, threads: int | None = None) -> dict:
    """Facts about a displacement field file, JSON-ready: its grid, the lengths of its
    displacements (mm) and its Jacobian determinant's summary (on ``threads`` CPU threads,
    or ``$CARCTL_THREADS``, or the libraries' default)."""
    import torch

    from carctl.metrics import jacobian_summary
    from carctl.runtime import set_threads
    from carctl.spatial.files import read_field
    from carctl.spatial.transform import jacobian_determinant

    set_threads(threads)

    field = read_field(path, finite=False)  # described, NaN and all
    # the length of each vector as a sum of squared components (torch's vector_norm over the
    # components took 12 s on a 512 x 512 x 400 CT's field, this 0.16 s)
    data = field.data.float()
    length = data[0].square()
    for component in data[1:]:
        length.addcmul_(component, component)
    length.sqrt_()
    finite = torch.isfinite(length)
    bad = int((~finite).sum())
    usable = length if bad == 0 else length[finite]
    return {
        "kind": "displacement field (pull-back, LPS mm)",
        **_grid_facts(field.grid),
        "displacement_mean_mm": float(usable.mean()) if usable.numel() else None,
        "displacement_max_mm": float(usable.max()) if usable.numel() else None,
        "non_finite_voxels": bad,
        **jacobian_summary(jacobian_determinant(field)),
    }


def _format(value) -> str:
    if isinstance(value, dict) and "voxels" in value:  # padding
        from carctl.padding import described

        return f"{described(value)}, with their neighbours: register leaves it out"
    if isinstance(value, list):
        if value and isinstance(value[0], list):
            return "\n".join(" ".join(f"{round(c, 6) + 0.0:+.6f}" for c in row) for row in value)
        return " x ".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value)
    if isinstance(value, float):  # whole numbers in full: 4000000000..4000000949 read 4e+09
        return f"{value:.17g}" if value.is_integer() and abs(value) < 2**53 else f"{value:g}"
    return str(value)


def _show_series(series: list[dict]) -> None:
    """One line per series, its UID whole (what --series takes; a table cut it short on a
    narrow terminal)."""
    from carctl.cli.console import stdout

    console = stdout()
    console.print("DICOM series (uid, modality, description, files):")
    for s in series:
        console.print(f"  {s['uid']}  {s['modality']}  {s['description'] or '-'}  {s['files']}")
    if len(series) > 1:
        console.print("Several series: choose one with --series UID.")
