"""What ``carctl evaluate`` computes, as a function returning a JSON-ready report."""

from __future__ import annotations

import os

import numpy as np
import torch

from carctl import metrics
from carctl.errors import InputError
from carctl.io import (
    Image,
    Volumes,
    points_dimension,
    read_grid,
    read_image_or_volumes,
    read_points,
    write_image,
)
from carctl.resample import load_chain
from carctl.spatial.transform import Transform, jacobian_determinant

PathLike = str | os.PathLike


def evaluate(
    fixed_labels: PathLike | None = None,
    warped_labels: PathLike | None = None,
    field: PathLike | None = None,
    affine: PathLike | None = None,
    fixed_points: PathLike | None = None,
    moving_points: PathLike | None = None,
    fixed_image: PathLike | None = None,
    moving_image: PathLike | None = None,
    jacobian: PathLike | None = None,
    force: bool = False,
) -> dict:
    """Scores of a registration; each part is present when its inputs are given.

    ``labels``: per-label Dice, HD95 and HD (mm) with their means; ``field``: folding % and
    Jacobian statistics of the displacement field; ``landmarks``: error statistics before and
    after mapping the fixed landmarks through the field then the affine. With ``jacobian``
    (a path), the field's Jacobian determinant is also written there as an image on the
    field's grid (float32; ``force`` overwrites).
    """
    report: dict = {}
    if fixed_labels is not None and warped_labels is not None:
        report.update(_label_report(fixed_labels, warped_labels))
    chain = load_chain(field, affine)
    if len({t.ndim for t in chain}) > 1:
        raise InputError(f"--field is {chain[0].ndim}-D and --affine {chain[1].ndim}-D")
    if field is not None:
        determinant = jacobian_determinant(chain[0])
        report["field"] = metrics.jacobian_summary(determinant)
        if jacobian is not None:
            image = Image(determinant.to(torch.float32).numpy(), chain[0].grid)
            write_image(image, jacobian, force=force, inputs=[field])
            report["field"]["jacobian_image"] = os.fspath(jacobian)
    if fixed_points is not None and moving_points is not None:
        report["landmarks"] = _landmark_report(
            fixed_points, moving_points, chain, fixed_image, moving_image
        )
    return report


def _label_report(fixed_path: PathLike, warped_path: PathLike) -> dict:
    """Per-label scores of two label maps on one grid; of two 4-D maps (one volume per
    structure, as ``register --labels`` carries them), volume by volume, each entry with its
    ``volume``."""
    fixed, warped = read_image_or_volumes(fixed_path), read_image_or_volumes(warped_path)

    def count(maps: Image | Volumes) -> int | None:  # volumes of a 4-D map, None for one map
        return len(maps) if isinstance(maps, Volumes) else None

    if count(fixed) != count(warped):
        described = [f"{n} volumes" if n else "one map" for n in (count(fixed), count(warped))]
        raise InputError(
            f"'{fixed_path}' ({described[0]}) and '{warped_path}' ({described[1]}) do not pair "
            "up: give two label maps, or two 4-D files of as many volumes (or FILE:N each)"
        )
    if not fixed.grid.same_as(warped.grid, tolerance=1e-3):
        raise InputError(
            f"'{warped_path}' is not on the grid of '{fixed_path}' "
            f"({warped.grid.differences(fixed.grid, 1e-3)}); resample it with carctl apply "
            "--interp label"
        )
    pairs = (
        [(n, fixed.array[n], warped.array[n]) for n in range(len(fixed))]
        if count(fixed)
        else [(None, fixed.array, warped.array)]
    )
    entries = []
    for volume, a, b in pairs:
        try:
            a = metrics.as_label_map(a, f"'{fixed_path}'")
            b = metrics.as_label_map(b, f"'{warped_path}'")
        except ValueError as error:
            raise InputError(str(error)) from error
        for score in metrics.label_scores(a, b, fixed.grid):
            entries.append(({"volume": volume} if volume is not None else {}) | vars(score))
    if not entries:
        raise InputError(f"no labels (non-zero voxels) in '{fixed_path}' or '{warped_path}'")
    hd95 = [e["hd95"] for e in entries if e["hd95"] is not None]
    hd = [e["hd"] for e in entries if e["hd"] is not None]
    report = {
        "labels": entries,
        "dice_mean": float(np.mean([e["dice"] for e in entries])),
        "hd95_mean": float(np.mean(hd95)) if hd95 else None,
        "hd_mean": float(np.mean(hd)) if hd else None,
    }
    if fixed.grid.is_sheared:
        report["hd_note"] = (
            "HD95 and HD not computed: the label maps' grid is sheared (its axes are not "
            "orthogonal); resample them onto an orthogonal grid (carctl apply --interp label)"
        )
    return report


def _landmark_report(
    fixed_points: PathLike,
    moving_points: PathLike,
    chain: list[Transform],
    fixed_image: PathLike | None,
    moving_image: PathLike | None,
) -> dict:
    fixed_grid = read_grid(fixed_image) if fixed_image is not None else None
    moving_grid = read_grid(moving_image) if moving_image is not None else None
    named: list[tuple[str, int]] = []  # what fixes the points' dimension
    if chain:
        named.append(("the transforms", chain[0].ndim))
    for what, grid in ((fixed_image, fixed_grid), (moving_image, moving_grid)):
        if grid is not None:
            named.append((f"'{what}'", grid.ndim))
    if len({n for _, n in named}) > 1:
        raise InputError(
            "landmarks: " + " and ".join(f"{what} {n}-D" for what, n in named) + " do not match"
        )
    ndim = named[0][1] if named else (points_dimension(fixed_points) or 3)
    p_fixed = read_points(fixed_points, ndim, fixed_grid)
    p_moving = read_points(moving_points, ndim, moving_grid)
    if p_fixed.shape != p_moving.shape:
        raise InputError(
            f"{len(p_fixed)} fixed and {len(p_moving)} moving landmarks: they must correspond"
        )
    mapped = torch.from_numpy(p_fixed)
    for transform in chain:
        mapped = transform.transform_points(mapped)
    before = np.linalg.norm(p_fixed - p_moving, axis=1)
    after = np.linalg.norm(mapped.numpy() - p_moving, axis=1)
    return {
        "before": metrics.landmark_summary(before),
        "after": metrics.landmark_summary(after),
        "errors": after.tolist(),
    }
