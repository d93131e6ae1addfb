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
import struct
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch

from carctl.errors import InputError, OutputError
from carctl.io import (
    AFFINE_EXTENSIONS,
    FIELD_EXTENSIONS,
    IMAGE_EXTENSIONS,
    NIFTI1_MAX_SIZE,
    NIFTI_DATA,
    NIFTI_DIM,
    atomic_output,
    grid_of,
    image_suffix,
    load_sitk,
    native_output_silenced,
    nifti1_header,
    nifti_header,
    one_line_reason,
    read_file,
    read_header,
    require_file,
    require_fit,
    write_sitk,
)
from carctl.spatial.grid import Grid
from carctl.spatial.transform import Affine, DisplacementField, Transform


def read_field(path: str | os.PathLike, finite: bool = True) -> DisplacementField:
    """An ITK displacement field; with ``finite``, one holding NaN or infinite vectors is
    refused (:class:`InputError`) rather than mapping points to NaN."""
    field = _read_nifti_field(path)
    if field is None:
        field = _read_itk_field(path)
    data = field.data
    if finite and not all(bool(part.isfinite().all()) for part in _chunks(data)):
        usable = torch.isfinite(data).all(dim=0)  # NaN points, and 0 % folding
        bad = int((~usable).sum())
        raise InputError(
            f"displacement field '{path}' has {bad} voxel{'s' * (bad > 1)} with a non-finite "
            f"vector (NaN or infinite) of {usable.numel()}"
        )
    return field


def _chunks(data: torch.Tensor, size: int = 1 << 22) -> list[torch.Tensor]:
    """A tensor's values in chunks (views of a contiguous tensor), for checks whose boolean
    temporaries would otherwise be the size of the whole field."""
    flat = data.reshape(-1) if data.is_contiguous() else data.movedim(0, -1).reshape(-1)
    return list(flat.split(size))


def _read_itk_field(path: str | os.PathLike) -> DisplacementField:
    sitk = load_sitk()
    image = read_file(path, what="displacement field")
    d, components = image.GetDimension(), image.GetNumberOfComponentsPerPixel()
    grid = single_slice_grid(path) if (d, components) == (2, 3) else None
    if grid is None and (d not in (2, 3) or components != d):
        raise InputError(
            f"'{path}' is not a displacement field: a {d}-D image with "
            f"{components} components per voxel (a field has one {d}-vector per voxel)"
        )
    array = sitk.GetArrayFromImage(image).astype(np.float32, copy=False)  # (*shape, D)
    if grid is not None:  # the slice's own axis back in front
        array = array[None]
    grid = grid or grid_of(image, path)
    # A channel-first view of the channel-last voxels: no copy (the tensor is not contiguous).
    return DisplacementField(grid, torch.from_numpy(array).movedim(-1, 0))


# NIfTI-1 header entries (byte offsets): intent code (int16), datatype (int16), scaling slope
# and intercept (float32); ITK's vector intent; float32 and float64 datatypes.
_NIFTI_INTENT, _NIFTI_DATATYPE, _NIFTI_SCALING = 68, 70, 112
_NIFTI_VECTOR, _NIFTI_FLOATS = 1007, {16: "f4", 64: "f8"}


def _read_nifti_field(path: str | os.PathLike) -> DisplacementField | None:
    """An uncompressed NIfTI-1 vector field (carctl's and ANTs' layout: x fastest, the
    components slowest) read straight into a channel-first array, or None for any other file
    (:func:`_read_itk_field` reads it). The geometry is ITK's reading of the same header. ITK
    reads the voxels, reorders them channels-last and SimpleITK copies them: a 512 x 512 x
    400 CT's 1.26 GB field took 8.9 s and 4.8 GB, this 2.5 s and one copy; the same values."""
    path = Path(path)
    found = nifti1_header(path) if image_suffix(path) == ".nii" else None
    if found is None or found[0][344:348] != b"n+1\0":  # a single-file NIfTI-1
        return None
    header, order = found
    dims = struct.unpack_from(f"{order}8h", header, NIFTI_DIM)
    intent, datatype = struct.unpack_from(f"{order}2h", header, _NIFTI_INTENT)
    slope, intercept = struct.unpack_from(f"{order}2f", header, _NIFTI_SCALING)
    offset = int(struct.unpack_from(f"{order}f", header, _NIFTI_VOX_OFFSET)[0])
    components = dims[5]
    d = 3 if dims[3] > 1 else 2
    if (
        dims[0] != 5
        or dims[4] != 1
        or components != d
        or min(dims[1 : 1 + d]) < 1
        or intent != _NIFTI_VECTOR
        or datatype not in _NIFTI_FLOATS
        or slope not in (0.0, 1.0)
        or intercept != 0.0
        or offset < NIFTI_DATA
    ):
        return None
    shape = tuple(int(n) for n in reversed(dims[1 : 1 + d]))  # (Z, Y, X) or (Y, X)
    count = components * int(np.prod(shape))
    dtype = np.dtype(order + _NIFTI_FLOATS[datatype])
    if path.stat().st_size < offset + count * dtype.itemsize:
        return None  # truncated: read_file says so
    reader = read_header(path)
    if reader is None or reader.GetDimension() != d or reader.GetNumberOfComponents() != d:
        return None
    grid = grid_of(reader, path)
    if grid.shape != shape:
        return None
    array = np.fromfile(path, dtype=dtype, count=count, offset=offset)
    array = array.astype(np.float32, copy=False).reshape(components, *shape)
    return DisplacementField(grid, torch.from_numpy(array))


def single_slice_grid(path: str | os.PathLike) -> Grid | None:
    """The 3-D grid of a NIfTI field one voxel thick along its third axis (sizes
    ``(X, Y, 1, 1, 3)``), or None for any other file.

    ITK reads such a field as a 2-D image of 3-vectors, losing the third axis' spacing,
    origin and direction: carctl's own fields of single-slice images could not be applied.
    The grid is what ITK reads from the same header made two voxels thick (a small proxy
    file), so it follows ITK's reading of qform and sform exactly.
    """
    import tempfile

    found = nifti1_header(path)
    if found is None:
        return None
    header, order = found
    dims = struct.unpack_from(f"{order}8h", header, NIFTI_DIM)
    if dims[0] != 5 or dims[3:6] != (1, 1, 3):
        return None
    bits = struct.unpack_from(f"{order}h", header, _NIFTI_BITPIX)[0]
    struct.pack_into(f"{order}3h", header, NIFTI_DIM + 2, 2, 2, 2)
    struct.pack_into(f"{order}f", header, _NIFTI_VOX_OFFSET, float(NIFTI_DATA))
    header[348:NIFTI_DATA] = bytes(NIFTI_DATA - 348)  # no extensions
    with tempfile.TemporaryDirectory() as folder:
        proxy = Path(folder) / "proxy.nii"
        proxy.write_bytes(bytes(header) + bytes(2 * 2 * 2 * 3 * max(bits // 8, 1)))
        reader = read_header(proxy)
    if reader is None or reader.GetDimension() != 3:
        return None
    size = (int(dims[1]), int(dims[2]), 1)
    return Grid(size, reader.GetSpacing(), reader.GetOrigin(), reader.GetDirection())


def write_field(
    field: DisplacementField,
    path: str | os.PathLike,
    *,
    force: bool = False,
    inputs: Iterable[str | os.PathLike] = (),
) -> Path:
    """Write ``field`` as an ITK displacement field (float32 vectors, vector intent in NIfTI)."""
    sitk = load_sitk()
    suffix = image_suffix(path)
    if suffix not in FIELD_EXTENSIONS:
        raise OutputError(f"cannot write field '{path}': use one of {', '.join(FIELD_EXTENSIONS)}")
    require_field_format(path, field.grid)
    if suffix == ".nii" and max(field.grid.size) <= NIFTI1_MAX_SIZE:
        return _write_nifti_field(field, path, force=force, inputs=inputs)
    array = field.data.detach().to(torch.float32).movedim(0, -1).contiguous().numpy()
    image = field.grid.copy_to(sitk.GetImageFromArray(array, isVector=True))
    return write_sitk(image, path, force=force, inputs=inputs)


def thin_in_nifti(path: str | os.PathLike, grid: Grid) -> bool:
    """Whether a field on ``grid`` written to ``path`` would not read back as written: a 3-D
    grid one voxel thick in NIfTI, which ITK and ANTs read as a 2-D image of 3-vectors (its
    third axis and origin lost: ``antsApplyTransforms`` ignored such a field)."""
    return grid.ndim == 3 and min(grid.size) == 1 and image_suffix(path) in (".nii", ".nii.gz")


def require_field_format(path: str | os.PathLike, grid: Grid) -> None:
    """Refuse (:class:`OutputError`) a field file that would not read back (see
    :func:`thin_in_nifti` and :func:`carctl.io.unfit_for`)."""
    require_fit(path, grid)
    if thin_in_nifti(path, grid):
        raise OutputError(
            f"cannot write field '{path}': its grid is one voxel thick, and ITK and ANTs read "
            "such a field in NIfTI as a 2-D image (its third axis lost); write it as .mha or "
            ".nrrd"
        )


# NIfTI-1: bits per voxel (int16) and the data's offset (float32) in the header.
_NIFTI_BITPIX, _NIFTI_VOX_OFFSET = 72, 108


def _write_nifti_field(
    field: DisplacementField, path: str | os.PathLike, *, force: bool, inputs
) -> Path:
    """An uncompressed NIfTI field without ITK's copy of the vectors.

    NIfTI stores a vector image component by component (x fastest, the components slowest),
    which is the layout of ``field.data`` ``(D, *shape)``: its bytes are written as they are,
    after the header SimpleITK writes for the same geometry (:func:`carctl.io.nifti_header`;
    a 1 mm brain: 0.3-0.5 s less).
    """
    grid, d = field.grid, field.grid.ndim
    data = np.ascontiguousarray(field.data.detach().to(torch.float32).numpy())
    with atomic_output(path, force=force, inputs=inputs, extensions=FIELD_EXTENSIONS) as tmp:
        try:
            header = nifti_header(grid, np.dtype(np.float32), tmp.parent, components=d)
        except RuntimeError as error:
            raise OutputError(f"cannot write '{path}': {one_line_reason(error)}") from error
        with open(tmp, "wb") as out:
            out.write(header)
            out.write(memoryview(data).cast("B"))
    return Path(path)


def read_affine(path: str | os.PathLike) -> Affine:
    sitk = load_sitk()
    path = Path(path)
    require_file(path)
    if image_suffix(path) in IMAGE_EXTENSIONS:
        raise InputError(f"'{path}' is an image, not an affine transform (.mat, .tfm, .txt, .h5)")
    if path.stat().st_size == 0:
        raise InputError(f"cannot read transform '{path}': the file is empty")
    # a .mat's sizes before ITK reads it (ITK fills a file cut short from memory)
    suffix = path.suffix.lower()
    matlab = _matlab_sections(path) if suffix == ".mat" else None
    try:
        with native_output_silenced():
            transform = sitk.ReadTransform(os.fspath(path))
    except RuntimeError as error:
        reason = one_line_reason(error)
        if reason == str(path) or reason == path.name:  # ITK names the file, not the problem
            reason = "not an ITK transform file"
        elif "unsupported type" in reason:  # no reader took it: an .h5 cut short, say
            reason = "not a readable ITK transform file (damaged or cut short?)"
        elif "parameters array size" in reason:
            reason = "its parameters are missing or not numbers"
        raise InputError(f"cannot read transform '{path}': {reason}") from error
    if not transform.IsLinear():
        raise InputError(f"'{path}' holds a non-linear transform; carctl reads affines from it")
    if suffix != ".h5":  # HDF5 keeps its arrays' sizes: ITK refuses one cut short itself
        _require_complete(path, _text_sections(path) if matlab is None else matlab)
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
    if not (np.isfinite(homogeneous).all() and np.isfinite(center).all()):
        raise InputError(f"'{path}' holds an affine that is not finite (NaN or infinite values)")
    return Affine.from_homogeneous(homogeneous, center)


# MATLAB v4 element sizes by the type code's precision digit (double, single, int32, int16,
# uint16, uint8), as ITK's MatlabTransformIO writes and reads them.
_MATLAB_BYTES = {0: 8, 1: 4, 2: 4, 3: 2, 4: 2, 5: 1}


def _matlab_sections(path: Path) -> list[tuple[str, int | None, int | None]]:
    """``(type, parameters, fixed parameters)`` of the transform in a MATLAB v4 transform
    file (ITK's ``.mat``, as ANTs writes it: the parameters as a matrix named by the
    transform's type, then ``fixed``; none listed for another layout), refusing a file whose
    matrix headers do not add up to its size: ITK's reader takes a file cut short and fills
    the missing values from memory (a centre of -3.4e231, or a point moved 2.3 mm, exit 0)."""
    data = path.read_bytes()
    found, at = [], 0
    while at < len(data):
        if len(data) - at < 20:
            reason = "the file is cut short" if found else "not an ITK transform file"
            raise InputError(f"cannot read transform '{path}': {reason}")
        order = "little" if int.from_bytes(data[at : at + 4], "little") < 1000 else "big"
        code, rows, columns, imaginary, length = (
            int.from_bytes(data[at + 4 * i : at + 4 * i + 4], order, signed=True) for i in range(5)
        )
        precision = (code // 10) % 10  # the type code MOPT: 0 little-endian, 1 big-endian
        valid = code >= 0 and code % 1000 // 100 == 0 and precision in _MATLAB_BYTES
        if not valid or min(rows, columns, length) < 0:
            raise InputError(f"cannot read transform '{path}': not an ITK transform file")
        name = data[at + 20 : at + 20 + length].split(b"\0")[0].decode("latin-1")
        at += 20 + length + rows * columns * _MATLAB_BYTES[precision] * (2 if imaginary else 1)
        found.append((name, rows * columns))
    if at != len(data):
        raise InputError(f"cannot read transform '{path}': the file is cut short")
    if len(found) != 2:  # ITK writes one transform and its fixed parameters
        return []
    (kind, parameters), (_, fixed) = found
    return [(kind, parameters, fixed)]


def _text_sections(path: Path) -> list[tuple[str, int | None, int | None]]:
    """``(type, parameters, fixed parameters)`` of every transform in an ITK text transform
    file (None where its line is missing), composite headers left out."""
    sections: list[dict] = []
    for line in path.read_text(errors="replace").splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "Transform":
            sections.append({"type": value.strip()})
        elif key in ("Parameters", "FixedParameters") and sections:
            sections[-1][key] = len(value.split())
    return [
        (s["type"], s.get("Parameters"), s.get("FixedParameters"))
        for s in sections
        if not s["type"].startswith("CompositeTransform")
    ]


def _expected_counts(kind: str) -> list[tuple[int, int]] | None:
    """The parameters and fixed parameters that an ITK transform type
    (``AffineTransform_double_3_3``) takes: those of a new one of that type (None for a type
    SimpleITK does not name), and for Euler3D also the centre alone as fixed parameters, as
    ITK wrote it before its ZYX flag."""
    sitk = load_sitk()
    base, *rest = kind.split("_")
    try:
        d = int(rest[-1])
    except (IndexError, ValueError):
        return None
    if base in ("AffineTransform", "MatrixOffsetTransformBase"):
        return [(d * d + d, d)]
    make = getattr(sitk, base, None)
    if make is None or base == "CompositeTransform":
        return None
    for arguments in ((d,), ()):
        try:
            fresh = make(*arguments)
        except (TypeError, RuntimeError, NotImplementedError):
            continue
        if fresh.GetDimension() == d:
            counts = (fresh.GetNumberOfParameters(), fresh.GetNumberOfFixedParameters())
            older = [(counts[0], counts[1] - 1)] if base == "Euler3DTransform" else []
            return [counts, *older]
    return None


def _require_complete(path: Path, sections: list[tuple[str, int | None, int | None]]) -> None:
    """Refuse a transform file whose ``sections`` (:func:`_text_sections`,
    :func:`_matlab_sections`) hold fewer or more values than their transforms take: ITK's
    readers take a text file without its ``FixedParameters`` line as the identity, and one
    with too few or too many parameters as a truncated or padded transform, silently."""
    for kind, parameters, fixed in sections:
        wanted = _expected_counts(kind)
        if parameters is None or fixed is None or (wanted and (parameters, fixed) not in wanted):
            holds = ", ".join(
                f"{'no' if n is None else n} {what}"
                for n, what in ((parameters, "parameters"), (fixed, "fixed parameters"))
            )
            takes = f"; a {kind} takes {wanted[0][0]} and {wanted[0][1]}" if wanted else ""
            raise InputError(
                f"cannot read transform '{path}': it is incomplete or malformed (it holds "
                f"{holds}{takes})"
            )


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
