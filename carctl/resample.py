"""Resampling an image through saved transforms: what ``carctl apply`` does, as a function."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import numpy as np

from carctl.errors import InputError
from carctl.io import Image, Volumes, transform_spec
from carctl.spatial.files import read_affine, read_field, read_transform
from carctl.spatial.grid import Grid
from carctl.spatial.sample import INTERPOLATORS, warp
from carctl.spatial.transform import Affine, Transform


def load_chain(
    field: str | os.PathLike | None = None,
    affine: str | os.PathLike | None = None,
    ndim: int | None = None,
    transforms: Sequence[str] = (),
) -> list[Transform]:
    """The pull-back chain of a field and an affine: the field first, then the affine; with
    ``ndim``, each must be of that dimension (that of the images it maps). With
    ``transforms`` (``-t`` specs, given instead of the two), :func:`load_transforms`'s.

    This is what ``antsApplyTransforms -t FIELD -t AFFINE`` means, and how ANTs'
    ``1Warp.nii.gz`` and ``0GenericAffine.mat`` combine.
    """
    if transforms:
        return load_transforms(transforms, ndim)
    chain: list[Transform] = []
    for path, read in ((field, read_field), (affine, read_affine)):
        if path is None:
            continue
        chain.append(_of_dimension(read(path), path, ndim))
    return chain


def _of_dimension(transform: Transform, path, ndim: int | None) -> Transform:
    """``transform`` (read from ``path``), refused when not ``ndim``-D (None: any)."""
    if ndim is not None and transform.ndim != ndim:
        raise InputError(f"'{path}' is a {transform.ndim}-D transform; the images are {ndim}-D")
    return transform


def load_transforms(specs: Sequence[str], ndim: int | None = None) -> list[Transform]:
    """The pull-back chain of ``-t`` transforms in ANTs' order (``antsApplyTransforms -t
    W2 -t A2 -t W1 -t A1``): a point of the reference goes through the first listed first,
    so the outputs of two registrations chain as the later one's field and affine, then
    the earlier one's. ``[AFFINE,1]`` is the affine's inverse; a field's inverse is
    register's ``--inverse-field``."""
    chain: list[Transform] = []
    for spec in specs:
        path, inverse = transform_spec(spec)
        transform = _of_dimension(read_transform(path), path, ndim)
        if inverse:
            if not isinstance(transform, Affine):
                raise InputError(
                    f"-t '{spec}': a displacement field is not inverted here; give the inverse "
                    "field (register's --inverse-field) instead"
                )
            try:
                transform = transform.inverse()
            except InputError as error:
                raise InputError(f"-t '{spec}': {error}") from error
        chain.append(transform)
    return chain


def check_interpolation(name: str) -> None:
    if name not in INTERPOLATORS:
        raise InputError(f"unknown interpolation '{name}'; choose from {', '.join(INTERPOLATORS)}")


def resample_image(
    image: Image,
    reference: Grid,
    transforms: Sequence[Transform] = (),
    interpolation: str = "linear",
    fill: float = 0.0,
) -> Image:
    """``image`` resampled onto ``reference`` through ``transforms`` (see :func:`warp`).

    ``linear`` and ``bspline`` give float32 (float64 for a float64 input); ``nearest`` and
    ``label`` keep the input's pixel type (see :data:`INTERPOLATORS`).
    """
    _check(image.array.dtype, image.grid, reference, transforms, interpolation, fill)
    out = warp(image.tensor(), image.grid, reference, transforms, mode=interpolation, fill=fill)
    return Image(out[0, 0].numpy(), reference)


# Voxels (volumes x the larger of their grid and the reference) that resample_volumes reads
# in one call of warp(): bounds the memory of a chunk (a float32 chunk's output 128 MB).
VOLUME_CHUNK_VOXELS = 1 << 25


def resample_volumes(
    volumes: Volumes,
    reference: Grid,
    transforms: Sequence[Transform] = (),
    interpolation: str = "linear",
    fill: float = 0.0,
) -> Volumes:
    """Every volume of a 4-D image resampled as :func:`resample_image` resamples one (the
    same values; ``antsApplyTransforms -e 3``), the fourth axis kept. The volumes are read
    a chunk at a time as the channels of one image, so that the mapping of the reference's
    voxels is computed once per chunk, not once per volume."""
    _check(volumes.array.dtype, volumes.grid, reference, transforms, interpolation, fill)
    import torch

    per = max(
        1, VOLUME_CHUNK_VOXELS // max(math.prod(volumes.grid.size), math.prod(reference.size))
    )
    out = None
    for first in range(0, len(volumes), per):
        part = torch.from_numpy(np.ascontiguousarray(volumes.array[first : first + per]))[None]
        values = warp(part, volumes.grid, reference, transforms, mode=interpolation, fill=fill)
        if out is None:
            dtype = values.numpy().dtype
            out = np.empty((len(volumes), *reference.shape), dtype=dtype)
        out[first : first + per] = values[0].numpy()
    return Volumes(out, reference, volumes.step, volumes.start, volumes.sense)


def _check(
    kind: np.dtype,
    grid: Grid,
    reference: Grid,
    transforms: Sequence[Transform],
    interpolation: str,
    fill: float,
) -> None:
    """Refuse (:class:`InputError`) an interpolation, dimensions or a fill value that do not
    fit an image of voxel type ``kind`` on ``grid`` and the ``reference``."""
    check_interpolation(interpolation)
    for transform in transforms:
        if transform.ndim != reference.ndim:
            raise InputError(
                f"a {transform.ndim}-D transform cannot map a {reference.ndim}-D reference"
            )
    if grid.ndim != reference.ndim:
        raise InputError(f"the image is {grid.ndim}-D and the reference {reference.ndim}-D")
    if INTERPOLATORS[interpolation].keeps_type and np.issubdtype(kind, np.integer):
        limits = np.iinfo(kind)
        if not (math.isfinite(fill) and fill == int(fill) and limits.min <= fill <= limits.max):
            raise InputError(
                f"the fill value {fill:g} does not fit the image's {kind} voxels ({interpolation} "
                f"keeps their type): give a whole number from {limits.min} to {limits.max}"
            )
