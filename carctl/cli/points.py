"""``carctl points``: map landmarks through a saved displacement field and/or affine."""

from __future__ import annotations

from typing import Annotated

import typer

NAME = "points"


def command(
    points: Annotated[
        str,
        typer.Argument(
            help="Points: CSV with x,y[,z] columns (LPS mm), an elastix/ITK point set or a "
            "3D Slicer .fcsv (RAS or LPS, as its header says)."
        ),
    ],
    output: Annotated[
        str,
        typer.Option(
            "--output",
            "-o",
            help="Mapped points: .csv (x,y,z columns), .txt (elastix set) or .fcsv (Slicer).",
        ),
    ],
    field: Annotated[
        str | None,
        typer.Option(
            "--field",
            "-f",
            help="ITK displacement field (pull-back, LPS mm): carctl's --field or "
            "--inverse-field, ANTs' Warp.nii.gz.",
        ),
    ] = None,
    affine: Annotated[
        str | None,
        typer.Option("--affine", "-a", help="ITK affine (.mat/.tfm), applied after the field."),
    ] = None,
    invert_affine: Annotated[
        bool,
        typer.Option(
            "--invert-affine", help="Map through the affine's inverse (moving -> fixed points)."
        ),
    ] = False,
    transform: Annotated[
        list[str] | None,
        typer.Option(
            "--transform",
            "-t",
            help="A transform in ANTs' order and syntax, repeatable (as carctl apply -t): "
            "-t FIELD -t AFFINE, '[AFFINE,1]' for its inverse. Instead of --field/--affine.",
        ),
    ] = None,
    image: Annotated[
        str | None,
        typer.Option("--image", help="Image whose grid 'index' points refer to."),
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing output.")] = False,
    threads: Annotated[int | None, typer.Option("--threads", help="CPU threads.")] = None,
) -> None:
    """Map points through --field and/or --affine, as antsApplyTransformsToPoints does.

    The transforms are pull-back maps (fixed -> moving, the field first, then the affine):
    points of the FIXED image come out where they lie in the MOVING image. For the other
    way, give register's --inverse-field (the whole inverse mapping), or --invert-affine
    with an affine alone. A CSV keeps its header and other columns; 'index' points are
    read on --image's grid and written as physical points.
    """
    from carctl.cli.apply import chosen_transforms
    from carctl.cli.console import stderr
    from carctl.errors import UsageError
    from carctl.io import (
        POINT_EXTENSIONS,
        check_output,
        load_points,
        read_grid,
        transform_paths,
        write_points,
    )
    from carctl.runtime import set_threads

    transforms = chosen_transforms(field, affine, transform)
    if field is None and affine is None and not transforms:
        raise UsageError("nothing to map the points through: give --field and/or --affine, or -t")
    if invert_affine and transforms:
        raise UsageError("--invert-affine: with -t, write the affine as '[AFFINE,1]'")
    if invert_affine and (affine is None or field is not None):
        raise UsageError(
            "--invert-affine takes an --affine alone; to map moving points with a field, "
            "give register's --inverse-field as --field"
        )
    inputs = [p for p in (points, field, affine, image) if p is not None]
    inputs += transform_paths(transforms)
    check_output(output, force=force, inputs=inputs, extensions=POINT_EXTENSIONS)
    set_threads(threads)

    import numpy as np
    import torch

    from carctl.errors import InputError
    from carctl.resample import load_chain
    from carctl.spatial.transform import DisplacementField

    chain = load_chain(field, affine, transforms=transforms)
    if invert_affine:
        try:
            chain = [chain[0].inverse()]
        except InputError as error:
            raise InputError(f"--affine '{affine}': {error}") from error
    grid = read_grid(image) if image is not None else None
    ndim = grid.ndim if grid is not None else chain[0].ndim
    if any(t.ndim != ndim for t in chain):
        raise UsageError(f"the transforms are not all {ndim}-D")
    before, table = load_points(points, ndim, grid)
    mapped = torch.from_numpy(before)
    outside = 0
    for transform in chain:
        if isinstance(transform, DisplacementField):  # no displacement outside its grid
            inside = transform.grid.contains_index(transform.grid.to_index(mapped))
            outside = max(outside, int((~inside).sum()))
        mapped = transform.transform_points(mapped)
    after = mapped.numpy()
    write_points(after, output, like=table, force=force, inputs=inputs)
    moved = np.linalg.norm(after - before, axis=1)
    console = stderr()
    console.print(
        f"wrote {output}: {len(after)} points, moved {moved.mean():.2f} mm on average "
        f"(at most {moved.max():.2f})"
    )
    if outside:
        console.print(
            f"warning: {outside} of the points lie outside the field's grid, where it "
            "displaces nothing"
        )
