"""Transform files in ITK's conventions, read unchanged by ANTs, ITK and SimpleITK.

* A displacement field is a vector image on the fixed grid, physical LPS mm, pull-back
  (``moving_point = fixed_point + u(fixed_point)``); in NIfTI it is a 5-D image with the
  vector intent, like ANTs' ``1Warp.nii.gz``; MetaImage and NRRD work too.
* An affine is an ITK transform file: ``.mat`` (MATLAB v4, like ANTs' ``0GenericAffine.mat``)
  or ``.tfm``/``.txt`` (ITK text). Any linear ITK transform is read (Euler, similarity,
  versor, affine, ...); carctl writes ``AffineTransform_double_D_D``.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch

from carctl.errors import InputError, OutputError
from carctl.io import (
    IMAGE_EXTENSIONS,
    atomic_output,
    image_suffix,
    load_sitk,
    native_output_silenced,
    one_line_reason,
    read_file,
    write_sitk,
)
from carctl.spatial.grid import Grid
from carctl.spatial.transform import Affine, DisplacementField, Transform

AFFINE_EXTENSIONS = (".mat", ".tfm", ".txt")
FIELD_EXTENSIONS = (".nii.gz", ".nii", ".mha", ".mhd", ".nrrd")


def read_field(path: str | os.PathLike) -> DisplacementField:
    sitk = load_sitk()
    image = read_file(path, what="displacement field")
    d = image.GetDimension()
    if d not in (2, 3) or image.GetNumberOfComponentsPerPixel() != d:
        raise InputError(
            f"'{path}' is not a displacement field: a {d}-D image with "
            f"{image.GetNumberOfComponentsPerPixel()} components per voxel "
            f"(a field has one {d}-vector per voxel)"
        )
    array = sitk.GetArrayFromImage(image).astype(np.float32, copy=False)  # (*shape, D)
    # A channel-first view of the channel-last voxels: no copy (the tensor is not contiguous).
    data = torch.from_numpy(array).movedim(-1, 0)
    return DisplacementField(Grid.from_sitk(image), data)


def write_field(
    field: DisplacementField,
    path: str | os.PathLike,
    *,
    force: bool = False,
    inputs: Iterable[str | os.PathLike] = (),
) -> Path:
    """Write ``field`` as an ITK displacement field (float32 vectors, vector intent in NIfTI)."""
    sitk = load_sitk()
    if image_suffix(path) not in FIELD_EXTENSIONS:
        raise OutputError(f"cannot write field '{path}': use one of {', '.join(FIELD_EXTENSIONS)}")
    array = field.data.detach().to(torch.float32).movedim(0, -1).contiguous().numpy()
    image = field.grid.copy_to(sitk.GetImageFromArray(array, isVector=True))
    return write_sitk(image, path, force=force, inputs=inputs)


def read_affine(path: str | os.PathLike) -> Affine:
    sitk = load_sitk()
    path = Path(path)
    if not path.is_file():
        raise InputError(f"no such file: '{path}'")
    try:
        with native_output_silenced():
            transform = sitk.ReadTransform(os.fspath(path))
    except RuntimeError as error:
        raise InputError(f"cannot read transform '{path}': {one_line_reason(error)}") from error
    if not transform.IsLinear():
        raise InputError(f"'{path}' holds a non-linear transform; carctl reads affines from it")
    d = transform.GetDimension()
    # Any linear transform is fully known from the images of the origin and unit vectors.
    offset = np.asarray(transform.TransformPoint((0.0,) * d))
    matrix = np.stack(
        [np.asarray(transform.TransformPoint(tuple(np.eye(d)[i]))) - offset for i in range(d)],
        axis=1,
    )
    center = np.zeros(d)
    fixed = transform.GetFixedParameters()
    if len(fixed) >= d:  # linear ITK transforms keep their centre first (Euler adds a flag)
        center = np.asarray(fixed[:d])
    homogeneous = np.eye(d + 1)
    homogeneous[:d, :d], homogeneous[:d, d] = matrix, offset
    return Affine.from_homogeneous(homogeneous, center)


def write_affine(
    affine: Affine,
    path: str | os.PathLike,
    *,
    force: bool = False,
    inputs: Iterable[str | os.PathLike] = (),
) -> Path:
    """Write ``affine`` as ITK ``AffineTransform_double_D_D`` (``.mat`` as ANTs writes it)."""
    sitk = load_sitk()
    transform = sitk.AffineTransform(affine.ndim)
    transform.SetMatrix(tuple(affine.matrix.ravel()))
    transform.SetTranslation(tuple(affine.translation))
    transform.SetCenter(tuple(affine.center))
    with atomic_output(path, force=force, inputs=inputs, extensions=AFFINE_EXTENSIONS) as tmp:
        try:
            sitk.WriteTransform(transform, os.fspath(tmp))
        except RuntimeError as error:
            raise OutputError(f"cannot write '{path}': {one_line_reason(error)}") from error
    return Path(path)


def read_transform(path: str | os.PathLike) -> Transform:
    """A field or an affine, told apart by the file extension."""
    suffix = image_suffix(path)
    if suffix in AFFINE_EXTENSIONS:
        return read_affine(path)
    if suffix in IMAGE_EXTENSIONS:
        return read_field(path)
    raise InputError(
        f"'{path}': not a transform file (fields: {', '.join(FIELD_EXTENSIONS)}; "
        f"affines: {', '.join(AFFINE_EXTENSIONS)})"
    )
