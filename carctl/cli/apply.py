"""``carctl apply``: resample an image through a saved displacement field and/or affine."""

from __future__ import annotations

from typing import Annotated

import typer

NAME = "apply"


def command(
    image: Annotated[
        str,
        typer.Argument(
            help="Image to resample (file, FILE:N or DICOM directory); a 4-D file: every volume."
        ),
    ],
    reference: Annotated[
        str,
        typer.Option(
            "--reference", "-r", help="Image whose grid the output takes (the fixed image)."
        ),
    ],
    output: Annotated[str, typer.Option("--output", "-o", help="Output image path.")],
    field: Annotated[
        str | None,
        typer.Option(
            "--field",
            "-f",
            help="ITK displacement field (pull-back, LPS mm), e.g. carctl's or ANTs' Warp.nii.gz.",
        ),
    ] = None,
    affine: Annotated[
        str | None,
        typer.Option(
            "--affine",
            "-a",
            help="ITK affine (.mat/.tfm), applied after the field "
            "(as antsApplyTransforms -t FIELD -t AFFINE).",
        ),
    ] = None,
    transform: Annotated[
        list[str] | None,
        typer.Option(
            "--transform",
            "-t",
            help="A transform in ANTs' order and syntax, repeatable: -t FIELD -t AFFINE, "
            "'[AFFINE,1]' for its inverse; two registrations chain as -t W2 -t A2 -t W1 -t A1. "
            "Instead of --field/--affine.",
        ),
    ] = None,
    interp: Annotated[
        str,
        typer.Option(
            "--interp", "-n", help="linear, nearest, label (label maps) or bspline (cubic)."
        ),
    ] = "linear",
    fill: Annotated[float, typer.Option("--fill", help="Value outside the image.")] = 0.0,
    series: Annotated[
        str | None, typer.Option("--series", help="DICOM series UID of IMAGE (a directory).")
    ] = None,
    reference_series: Annotated[
        str | None,
        typer.Option("--reference-series", help="DICOM series UID of --reference (a directory)."),
    ] = None,
    threads: Annotated[int | None, typer.Option("--threads", help="CPU threads.")] = None,
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing output.")] = False,
) -> None:
    """Resample IMAGE onto the grid of --reference through --field and/or --affine, or
    through a chain of -t transforms.

    Each reference voxel is mapped through physical space: first by the field, then by the
    affine (-t: in the order given); with neither, the image is resampled through the
    scanner headers alone. A 4-D IMAGE (a time series, one map per channel) has every volume
    resampled, its fourth axis kept (FILE:N picks one volume).
    """
    from carctl.cli.console import stderr
    from carctl.io import (
        Volumes,
        check_output,
        read_grid,
        read_image_or_volumes,
        require_fit,
        transform_paths,
        write_image,
        write_volumes,
    )
    from carctl.resample import check_interpolation, load_chain, resample_image, resample_volumes
    from carctl.runtime import set_threads

    transforms = chosen_transforms(field, affine, transform)
    inputs = [i for i in (image, reference, field, affine) if i is not None]
    inputs += transform_paths(transforms)
    check_output(output, force=force, inputs=inputs)
    check_interpolation(interp)
    set_threads(threads)
    moving = read_image_or_volumes(image, series, series_option="--series")
    # the reference's grid only (its header, where the format allows): reading a large
    # reference's voxels cost a second and its size in memory for nothing
    grid = read_grid(reference, reference_series, series_option="--reference-series")
    require_fit(output, grid)  # before the work
    chain = load_chain(field, affine, moving.grid.ndim, transforms)
    if isinstance(moving, Volumes):
        warped = resample_volumes(moving, grid, chain, interpolation=interp, fill=fill)
        write_volumes(warped, output, force=force, inputs=inputs)
        stderr().print(f"wrote {output} ({grid.describe()}, {len(warped)} volumes)")
        return
    warped = resample_image(moving, grid, chain, interpolation=interp, fill=fill)
    write_image(warped, output, force=force, inputs=inputs)
    stderr().print(f"wrote {output} ({grid.describe()})")


def chosen_transforms(field: str | None, affine: str | None, transforms: list[str] | None) -> list:
    """The -t transforms, refused beside --field or --affine (which order would hold?)."""
    from carctl.errors import UsageError

    if transforms and (field is not None or affine is not None):
        raise UsageError("give the transforms as --field/--affine or as -t, not both")
    return list(transforms or [])
