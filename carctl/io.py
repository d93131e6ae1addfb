"""Reading and writing images and point sets, with their geometry kept (SimpleITK).

Readable: NIfTI (``.nii``, ``.nii.gz``), MetaImage (``.mha``, ``.mhd``), NRRD (``.nrrd``,
``.nhdr``), Analyze (``.hdr``/``.img``), a single DICOM file and a DICOM series given as a
directory. 2-D and 3-D scalar images; a 4-D file is read one volume at a time with the
``PATH:N`` syntax (see :func:`split_volume`), or whole where a command takes every volume
(``apply``, ``register --labels``: :func:`read_image_or_volumes`; ``info``).

Every output is written atomically: into a temporary folder beside the target, then moved
into place, so that an interrupted run leaves no partial file. An existing output is only
replaced with ``force``, and an input is never written over.
"""

from __future__ import annotations

import contextlib
import csv
import gzip
import io
import os
import re
import shutil
import struct
import sys
import tempfile
import threading
import zlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from carctl.errors import InputError, OutputError
from carctl.spatial.grid import Grid

if TYPE_CHECKING:
    import SimpleITK as sitk
    import torch

#: Extensions carctl writes images to; a ``.hdr`` header is written with its ``.img``.
IMAGE_EXTENSIONS = (".nii.gz", ".nii", ".mha", ".mhd", ".nrrd", ".nhdr", ".hdr")
# Transform files (read and written by carctl.spatial.files; here so that commands check
# their outputs' names before loading torch).
AFFINE_EXTENSIONS = (".mat", ".tfm", ".txt", ".h5")
FIELD_EXTENSIONS = (".nii.gz", ".nii", ".mha", ".mhd", ".nrrd")
# Files that an image format writes next to its header.
_COMPANIONS = {".mhd": (".raw", ".zraw"), ".hdr": (".img", ".img.gz"), ".nhdr": (".raw.gz",)}
_VOLUME_SUFFIX = re.compile(r"^(?P<path>.+):(?P<volume>\d+)$")
_DICOM_DESCRIPTION = "0008|103e"
_DICOM_MODALITY = "0008|0060"


@dataclass(eq=False)
class Image:
    """A scalar image: voxel ``array`` in ``(Z, Y, X)`` order and its physical ``grid``."""

    array: np.ndarray
    grid: Grid

    def __post_init__(self) -> None:
        if self.array.shape != self.grid.shape:
            raise ValueError(f"array of shape {self.array.shape} on a grid of {self.grid.shape}")

    def tensor(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The voxels as a ``(1, 1, *shape)`` tensor (the array's dtype unless ``dtype``)."""
        import torch

        t = torch.from_numpy(np.ascontiguousarray(self.array))
        return t[None, None] if dtype is None else t[None, None].to(dtype)

    def to_sitk(self) -> sitk.Image:
        import SimpleITK as sitk

        return self.grid.copy_to(sitk.GetImageFromArray(self.array, isVector=False))

    @classmethod
    def from_sitk(cls, image: sitk.Image) -> Image:
        import SimpleITK as sitk

        return cls(sitk.GetArrayFromImage(image), Grid.from_sitk(image))


@dataclass(eq=False)
class Volumes:
    """The volumes of a 4-D file on one 3-D grid (a time series, or one map per channel):
    ``array`` ``(T, Z, Y, X)`` and the fourth axis's spacing, origin and direction (``step``,
    ``start``, ``sense``), which are written back as read."""

    array: np.ndarray
    grid: Grid
    step: float = 1.0
    start: float = 0.0
    sense: float = 1.0  # the fourth axis's direction: +1, or -1 (later volumes earlier)

    def __post_init__(self) -> None:
        if self.grid.ndim != 3 or self.array.shape[1:] != self.grid.shape:
            raise ValueError(f"volumes of shape {self.array.shape} on a grid of {self.grid.shape}")

    def __len__(self) -> int:
        return self.array.shape[0]

    def to_sitk(self) -> sitk.Image:
        """The 4-D SimpleITK image (the fourth axis apart from the three spatial ones)."""
        import SimpleITK as sitk

        image = sitk.GetImageFromArray(self.array, isVector=False)
        direction = np.eye(4)
        direction[:3, :3] = self.grid.direction_matrix
        direction[3, 3] = self.sense
        image.SetSpacing((*self.grid.spacing, self.step))
        image.SetOrigin((*self.grid.origin, self.start))
        image.SetDirection(tuple(float(c) for c in direction.ravel()))
        return image


@dataclass(frozen=True)
class DicomSeries:
    uid: str
    description: str
    modality: str
    files: tuple[str, ...]


# --- reading --------------------------------------------------------------------------------


@contextlib.contextmanager
def native_output_silenced() -> Iterator[None]:
    """Hide what native code writes straight to the process's stdout and stderr.

    Some ITK readers (MetaImage) print their complaints there; carctl reports errors itself,
    in one line. Only on the main thread: the descriptors are the whole process's, and a writer
    thread's redirection ending after the main thread's had begun left stdout on /dev/null
    (`register --json -` printed nothing, exit 0, in 3 of 6 runs); other threads leave them be.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 1)
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in saved:
            os.close(fd)


def load_sitk():
    import SimpleITK as sitk

    # ITK prints warnings (e.g. "Analyze file is deprecated") straight to stderr.
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    return sitk


def one_line_reason(error: Exception) -> str:
    """One line out of a multi-line ITK exception message."""
    text = str(error)
    for pattern, reason in (
        (
            r"Unable to determine ImageIO reader|Could not create IO object",
            "not an image carctl can read",
        ),
        (
            r"(?i)zlib|inflate|unexpected end|short read|truncat|read failed|premature eof"
            r"|file cannot be read|expected \d+ bytes|fread got only",
            "the file is truncated or corrupted",
        ),
    ):
        if re.search(pattern, text):
            return reason
    if "Bad direction" in text:  # ITK's message goes on with the matrix, row by row
        return "its direction matrix is singular (two axes point the same way, or one is 0)"
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[-1].split(": ")[-1][:200] if lines else "unreadable"


def split_volume(spec: str | os.PathLike) -> tuple[Path, int | None]:
    """``PATH:N`` -> (PATH, N) for volume N of a 4-D file; a plain path -> (path, None)."""
    text = os.fspath(spec)
    match = _VOLUME_SUFFIX.match(text)
    if match and not os.path.exists(text):
        return Path(match["path"]), int(match["volume"])
    return Path(text), None


def list_dicom_series(directory: str | os.PathLike) -> list[DicomSeries]:
    """The DICOM series in ``directory`` (not recursive), each with its files sorted by position."""
    sitk = load_sitk()
    directory = os.fspath(directory)
    series = []
    for uid in sitk.ImageSeriesReader.GetGDCMSeriesIDs(directory):
        files = tuple(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(directory, uid))
        reader = sitk.ImageFileReader()
        reader.SetFileName(files[0])
        description = modality = ""
        with contextlib.suppress(RuntimeError):
            reader.ReadImageInformation()
            if reader.HasMetaDataKey(_DICOM_DESCRIPTION):
                description = reader.GetMetaData(_DICOM_DESCRIPTION).strip()
            if reader.HasMetaDataKey(_DICOM_MODALITY):
                modality = reader.GetMetaData(_DICOM_MODALITY).strip()
        series.append(DicomSeries(uid, description, modality, files))
    return series


def _read_dicom_directory(directory: Path, series: str | None, option: str | None) -> sitk.Image:
    sitk = load_sitk()
    found = list_dicom_series(directory)
    if not found:
        raise InputError(f"no DICOM series found in directory '{directory}'")
    if series is None:
        if len(found) > 1:
            listing = "; ".join(
                f"{s.uid} ({s.modality} '{s.description}', {len(s.files)} files)" for s in found
            )
            choose = (
                f"choose one with {option} UID"
                if option
                else "give a folder holding one of them (copy its files into a folder of their own)"
            )
            raise InputError(
                f"directory '{directory}' holds {len(found)} DICOM series; {choose}: {listing}"
            )
        chosen = found[0]
    else:
        matches = [s for s in found if s.uid == series]
        if not matches:
            uids = ", ".join(s.uid for s in found)
            raise InputError(f"no DICOM series '{series}' in '{directory}'; it holds: {uids}")
        chosen = matches[0]
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(list(chosen.files))
    reader.MetaDataDictionaryArrayUpdateOn()  # each slice's position, for the check below
    with native_output_silenced():
        image = reader.Execute()
    _require_regular_slices(reader, image, directory)
    return image


# Slice positions may stray this far (mm) from the regular grid ITK puts a series on.
_SLICE_TOLERANCE_MM = 0.05


def _require_regular_slices(reader, image: sitk.Image, directory: Path) -> None:
    """Refuse a DICOM series whose slices do not lie on one regular grid: ITK stacks them at
    the mean step along the slice normal, so a missing slice put the others up to half a
    step off, and a gantry tilt (slices offset sideways) was read as an upright stack, both
    in silence (ITK's own warning is one of those carctl keeps off the terminal)."""
    count = len(reader.GetFileNames())
    if count < 2 or image.GetDimension() != 3:
        return
    positions = _slice_values(reader, directory, "0020|0032", "position", 3)
    if positions is None:
        return  # no positions to check (ITK then stacks the files by their order)
    for tag, what, length, tolerance in (
        ("0020|0037", "orientation", 6, 1e-4),
        ("0028|0030", "pixel spacing", 2, 1e-4),
    ):
        values = _slice_values(reader, directory, tag, what, length)
        if values is not None and np.abs(values - values[0]).max() > tolerance:
            odd = reader.GetFileNames()[int(np.abs(values - values[0]).max(axis=1).argmax())]
            raise InputError(
                f"the DICOM series in '{directory}' mixes slices of different geometry: "
                f"'{Path(odd).name}' differs in its {what} ({tag}) from the first slice; read as "
                "one image its slices would lie where their headers do not put them"
            )
    direction = np.asarray(image.GetDirection()).reshape(3, 3)
    along = (positions - positions[0]) @ direction  # (slices, axes) in the image's axes
    expected = np.arange(count) * image.GetSpacing()[2]
    off = np.abs(along[:, 2] - expected).max()
    sideways = np.abs(along[:, :2]).max()
    if max(off, sideways) <= _SLICE_TOLERANCE_MM:
        return
    steps = np.diff(along[:, 2])
    what = (
        f"its slices step by {steps.min():.3g} to {steps.max():.3g} mm (a missing slice?)"
        if off > sideways
        else f"its slices are offset sideways by up to {sideways:.3g} mm (a gantry tilt?)"
    )
    raise InputError(
        f"the DICOM series in '{directory}' is not on a regular grid: {what}; read as one, its "
        f"slices would lie up to {max(off, sideways):.2g} mm from where their headers put them. "
        "Convert it first with a tool that resamples such series (dcm2niix corrects a tilt)"
    )


def _slice_values(reader, directory: Path, tag: str, what: str, length: int):
    """The numbers of DICOM ``tag`` in every slice of ``reader``'s series ``(slices,
    length)``, None when no slice has them; a series in which only some slices have them is
    refused (ITK then stacked the slices out of order, or skipped the checks, in silence)."""
    rows = []
    for i in range(len(reader.GetFileNames())):
        try:
            row = [float(v) for v in reader.GetMetaData(i, tag).split("\\")]
        except (RuntimeError, ValueError):
            row = None
        rows.append(row if row is not None and len(row) == length else None)
    if all(row is None for row in rows):
        return None
    missing = next((i for i, row in enumerate(rows) if row is None), None)
    if missing is not None:
        name = Path(reader.GetFileNames()[missing]).name
        raise InputError(
            f"the DICOM series in '{directory}' is incomplete: '{name}' has no readable "
            f"{what} ({tag}) while other slices have one"
        )
    return np.array(rows)


def read_sitk(
    spec: str | os.PathLike,
    series: str | None = None,
    *,
    series_option: str | None = None,
    whole: bool = False,
) -> sitk.Image:
    """Read ``spec`` (a file, ``FILE:N`` or a DICOM directory) as a 2-D or 3-D scalar image.

    ``series`` picks a series of a DICOM directory; ``series_option`` names the command-line
    option that sets it, for the message that asks for it (None: the command has none, and
    the message asks for a folder of one series). With ``whole``, a 4-D file of several
    volumes named without ``:N`` comes back 4-D, its fourth axis apart from the three
    spatial ones (as NIfTI's time axis is; refused otherwise).
    """
    image, path, volume = _read_scalar(spec, series, series_option)
    size = image.GetSize()
    if not whole or image.GetDimension() != 4 or volume is not None or size[3] == 1:
        return _select_volume(image, path, volume)
    _fourth_axis_apart(image, path)
    return image


def first_volume(image: sitk.Image) -> sitk.Image:
    """The first volume of a 4-D image (where its grid is read), or the image itself."""
    if image.GetDimension() != 4:
        return image
    return load_sitk().Extract(image, [*image.GetSize()[:3], 0], [0, 0, 0, 0])


def _read_scalar(
    spec: str | os.PathLike, series: str | None, series_option: str | None
) -> tuple[sitk.Image, Path, int | None]:
    """The scalar image ``spec`` names as read (a 4-D file whole), its path and the volume
    its ``:N`` asks for; see :func:`read_sitk`."""
    path, volume = split_volume(spec)
    if not path.exists():
        head, colon, tail = os.fspath(spec).rpartition(":")
        if colon and head and os.path.exists(head):
            raise InputError(
                f"'{spec}': the volume after ':' must be a whole number, 0 or more (FILE:N), "
                f"not '{tail}'"
            )
        raise InputError(f"no such file or directory: '{path}'")
    if path.is_dir():
        try:
            image = _read_dicom_directory(path, series, series_option)
        except RuntimeError as error:
            raise InputError(f"cannot read image '{path}': {one_line_reason(error)}") from error
    else:
        if series is not None:
            raise InputError(
                f"{series_option or 'a series'} applies to a DICOM directory, not to the file "
                f"'{path}'"
            )
        image = read_file(path)
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(
            f"'{path}' has {image.GetNumberOfComponentsPerPixel()} components per voxel; "
            "carctl registers scalar images"
        )
    if "complex" in image.GetPixelIDTypeAsString():
        raise InputError(f"'{path}' holds complex values; carctl registers real scalar images")
    return image, path, volume


def require_same_dimension(**images: Image | None) -> None:
    """Refuse (:class:`InputError`) images of different dimension, named by their keywords
    (``moving=..., fixed=...``; None is left out): a 2-D image against a 3-D one stopped
    ``qa`` and ``translate`` with internal errors."""
    given = [(name, image) for name, image in images.items() if image is not None]
    (first, reference), *others = given
    for name, image in others:
        if image.grid.ndim != reference.grid.ndim:
            raise InputError(
                f"the {first} image is {reference.grid.ndim}-D and the {name} image "
                f"{image.grid.ndim}-D"
            )


def require_file(path: str | os.PathLike | None) -> None:
    """Refuse a missing file (``None``: nothing given) in the words :func:`read_file` uses:
    commands check their transform files before loading what reads them."""
    if path is not None and not Path(path).is_file():
        raise InputError(f"no such file: '{path}'")


def read_file(path: str | os.PathLike, what: str = "image") -> sitk.Image:
    """Read one image file as SimpleITK does, refusing in one line what it should not accept.

    Empty and truncated files are refused (ITK reads a truncated NIfTI or Analyze file with
    zeros in place of the missing voxels); native reader chatter is kept off the terminal.
    ``what`` names the file in messages ("image", "displacement field").
    """
    sitk = load_sitk()
    path = Path(path)
    require_file(path)
    if path.stat().st_size == 0:
        raise InputError(f"cannot read {what} '{path}': the file is empty")
    try:
        with native_output_silenced():
            image = sitk.ReadImage(os.fspath(path))
    except RuntimeError as error:
        raise InputError(f"cannot read {what} '{path}': {one_line_reason(error)}") from error
    problem = _incomplete(path)
    if problem:
        raise InputError(f"cannot read {what} '{path}': {problem}")
    return image


def _nifti_data_bytes(header: bytes) -> tuple[int, int] | None:
    """(offset of the voxels, their byte count) from a NIfTI-1/2 or Analyze header."""
    for endian in "<>":
        size = struct.unpack(endian + "i", header[:4])[0]
        if size == 348:  # NIfTI-1 or Analyze 7.5
            dims = struct.unpack(endian + "8h", header[40:56])
            bitpix = struct.unpack(endian + "h", header[72:74])[0]
            offset = int(struct.unpack(endian + "f", header[108:112])[0])
            break
        if size == 540:  # NIfTI-2
            dims = struct.unpack(endian + "8q", header[16:80])
            bitpix = struct.unpack(endian + "h", header[14:16])[0]
            offset = struct.unpack(endian + "q", header[168:176])[0]
            break
    else:
        return None
    count = int(np.prod([max(int(d), 1) for d in dims[1 : 1 + max(0, min(int(dims[0]), 7))]]))
    return offset, count * max(int(bitpix), 8) // 8


def nifti1_header(path: str | os.PathLike) -> tuple[bytearray, str] | None:
    """The 352 header bytes of a ``.nii`` or ``.nii.gz`` file and their byte order (``<`` or
    ``>``), or None for any other file (NIfTI-2's fields lie elsewhere) and for one that
    cannot be read (its reader says why)."""
    suffix = image_suffix(path)
    if suffix not in (".nii", ".nii.gz") or not Path(path).is_file():
        return None
    try:
        with (gzip.open if suffix == ".nii.gz" else open)(path, "rb") as file:
            header = bytearray(file.read(NIFTI_DATA))
    except (OSError, EOFError, zlib.error):
        return None
    if len(header) < NIFTI_DATA:
        return None
    orders = [o for o in "<>" if struct.unpack_from(f"{o}i", header, 0)[0] == 348]
    return (header, orders[0]) if orders else None


def _single_volume_4d(path: Path) -> bool:
    """Whether ``path`` is a NIfTI file whose header is 4-D with one volume (which ITK reads
    as 3-D)."""
    found = nifti1_header(path)
    if found is None:
        return False
    header, order = found
    dims = struct.unpack_from(f"{order}8h", header, NIFTI_DIM)
    return dims[0] == 4 and dims[4] == 1


def _content_length(path: Path, expected: int) -> int:
    """Length of a file's content; for a gzip file the decompressed length.

    A gzip file whose trailer records ``expected`` (mod 2**32) is taken as complete: a
    truncated file ends in compressed data, which matches with probability 2**-32. Otherwise
    the stream is decompressed to the end (also the case of multi-member files).
    """
    if not path.name.lower().endswith(".gz"):
        return path.stat().st_size
    with open(path, "rb") as raw:
        raw.seek(max(path.stat().st_size - 4, 0))
        trailer = raw.read(4)
    if len(trailer) == 4 and struct.unpack("<I", trailer)[0] == expected % 2**32:
        return expected
    length = 0
    with gzip.open(path, "rb") as stream:
        while chunk := stream.read(1 << 22):
            length += len(chunk)
    return length


def _incomplete(path: Path) -> str | None:
    """Why a NIfTI/Analyze file is incomplete (ITK reads it silently), or None."""
    suffix = image_suffix(path)
    if suffix not in (".nii", ".nii.gz", ".hdr"):
        return None
    opener = gzip.open if suffix == ".nii.gz" else open
    try:
        with opener(path, "rb") as stream:
            header = stream.read(540)
        layout = _nifti_data_bytes(header)
        if layout is None:
            return None
        offset, needed = layout
        data_file = path
        if suffix == ".hdr":
            stem = path.name[: -len(suffix)]
            data = [path.with_name(stem + e) for e in (".img", ".img.gz", ".IMG")]
            data_file = next((f for f in data if f.exists()), None)
            if data_file is None:
                return "its .img data file is missing"
        if _content_length(data_file, offset + needed) < offset + needed:
            return "the file is truncated"
    except (OSError, EOFError, zlib.error, struct.error):
        return "the file is truncated or corrupted"
    return None


def _volumes(count: int) -> str:
    return f"{count} volume" + ("s" if count != 1 else "")


def _fourth_axis_apart(image: sitk.Image, path: Path) -> None:
    """Refuse (:class:`InputError`) a 4-D image whose fourth axis is not apart from the three
    spatial ones: its volumes lie at other places in space (ITK's ``Extract`` put each at the
    first one's origin, along a direction that is not a rotation)."""
    direction = np.asarray(image.GetDirection(), float).reshape(4, 4)
    mixed = max(np.abs(direction[3, :3]).max(), np.abs(direction[:3, 3]).max()) > 1e-6
    if mixed or abs(abs(direction[3, 3]) - 1.0) > 1e-6:
        raise InputError(
            f"'{path}': its fourth axis is not apart from the three spatial ones (its direction "
            "mixes them), so its volumes cannot be placed in space; resample it with ITK first"
        )


def _select_volume(image: sitk.Image, path: Path, volume: int | None) -> sitk.Image:
    sitk = load_sitk()
    dim = image.GetDimension()
    if dim == 4:
        size = list(image.GetSize())
        if volume is None and size[3] == 1:
            volume = 0
        if volume is None:
            raise InputError(
                f"'{path}' is 4-D with {_volumes(size[3])}; choose one as '{path}:N' (N from 0)"
            )
        if volume >= size[3]:
            raise InputError(f"'{path}' has {_volumes(size[3])}; there is no volume {volume}")
        _fourth_axis_apart(image, path)
        return sitk.Extract(image, [*size[:3], 0], [0, 0, 0, volume])
    if volume is not None and _single_volume_4d(path):  # ITK read it as 3-D
        if volume == 0:  # a loop over :N works
            return image
        raise InputError(f"'{path}' has 1 volume; there is no volume {volume}")
    if volume is not None:
        raise InputError(f"'{path}' is {dim}-D; ':{volume}' selects a volume of a 4-D file")
    if dim not in (2, 3):
        raise InputError(f"'{path}' is {dim}-D; carctl reads 2-D and 3-D images")
    return image


def read_image(
    spec: str | os.PathLike, series: str | None = None, *, series_option: str | None = None
) -> Image:
    """Read a 2-D or 3-D scalar image with its geometry; see :func:`read_sitk`."""
    image = read_sitk(spec, series, series_option=series_option)
    return Image(load_sitk().GetArrayFromImage(image), grid_of(image, spec))


def read_image_or_volumes(
    spec: str | os.PathLike, series: str | None = None, *, series_option: str | None = None
) -> Image | Volumes:
    """:func:`read_image`, except that a 4-D file of several volumes named without ``:N``
    comes back whole, as :class:`Volumes` (``apply``, ``register --labels``). Its fourth axis
    must be apart from the three spatial ones (as NIfTI's time axis is)."""
    sitk = load_sitk()
    image = read_sitk(spec, series, series_option=series_option, whole=True)
    array = sitk.GetArrayFromImage(image)
    if image.GetDimension() != 4:
        return Image(array, grid_of(image, spec))
    spacing, origin = image.GetSpacing()[3], image.GetOrigin()[3]
    sense = 1.0 if image.GetDirection()[15] > 0 else -1.0
    grid = grid_of(first_volume(image), spec)
    return Volumes(array, grid, float(spacing), float(origin), sense)


def grid_of(image: sitk.Image | sitk.ImageFileReader, spec: str | os.PathLike) -> Grid:
    """The grid of ``image`` (read from ``spec``; or of the reader that read its header);
    a header no grid can come from (a singular direction, a NaN origin) refused in one line."""
    try:
        return Grid.from_sitk(image)
    except ValueError as error:
        raise InputError(f"'{spec}' has an unusable geometry: {error}") from error


def read_header(path: str | os.PathLike) -> sitk.ImageFileReader | None:
    """ITK's reader of ``path`` with the image's information (geometry, dimension, pixel
    type) read and its voxels not, or None when ITK cannot read it."""
    reader = load_sitk().ImageFileReader()
    reader.SetFileName(os.fspath(path))
    try:
        with native_output_silenced():
            reader.ReadImageInformation()
    except RuntimeError:
        return None
    return reader


def read_grid(
    spec: str | os.PathLike, series: str | None = None, series_option: str | None = None
) -> Grid:
    """The grid of an image, from its header alone where the format allows."""
    path, volume = split_volume(spec)
    if path.is_file() and volume is None:
        reader = read_header(path)  # None: read_image below says why, in one line
        if reader is not None and reader.GetDimension() in (2, 3):
            try:
                return Grid.from_sitk(reader)
            except ValueError:
                pass  # read_image below says why, in one line
    return read_image(spec, series, series_option=series_option).grid


def headers_read(*specs: str | os.PathLike) -> bool:
    """Whether each image of ``specs`` is a directory (a DICOM series) or a file whose header
    reads: what a command checks before it starts work that only pays off if the images
    will read (see :func:`carctl.runtime.import_in_background`)."""
    for spec in specs:
        path, _ = split_volume(spec)
        if not path.is_dir() and not (path.is_file() and read_header(path) is not None):
            return False
    return True


def input_files(spec: str | os.PathLike) -> list[Path]:
    """Every file an input reads: the file itself, its data files (those its format's writer
    names after it, and those its header names), or a directory's files."""
    path, _ = split_volume(spec)
    if path.is_dir():
        return [p for p in path.iterdir() if p.is_file()]
    files = [path]
    suffix = image_suffix(path)
    for companion in _COMPANIONS.get(suffix, ()):
        files.append(path.with_name(path.name[: -len(suffix)] + companion))
    if suffix in _DATA_FILE_KEYS:
        files += header_data_files(path)
    return files


# Names the NIfTI writer cuts at the first of these words (w.nii.nii.gz -> w.nii.gz,
# j.hdr.nii.gz -> j.hdr.gz, n.NII.nii.gz -> n.NII.GZ), as it determines a name's extension.
_NIFTI_SUFFIXES = (".nii.gz", ".nii", ".hdr")
_NIFTI_WORDS = {"nii", "hdr", "img"}
# Header fields that name a separate data file: MetaImage's (its last field, "KEY = value")
# and NRRD's ("key: value", a detached header).
_DATA_FILE_KEYS = {
    ".mhd": ("elementdatafile",),
    ".mha": ("elementdatafile",),
    ".nhdr": ("data file", "datafile"),
    ".nrrd": ("data file", "datafile"),
}
_HEADER_BYTES = 1 << 16


def header_data_files(path: Path) -> list[Path]:
    """The data files a MetaImage or NRRD header at ``path`` names (relative to its folder):
    one file, a ``LIST`` of them on the lines after, or a printf pattern with its first,
    last and step numbers; none for data inside the file (``LOCAL``) or an unreadable
    header. A writer told to write ``w.mhd`` writes ``w.zraw``; the header of an input
    ``in.mhd`` may name that same ``w.zraw``."""
    keys = _DATA_FILE_KEYS.get(image_suffix(path), ())
    try:
        with open(path, "rb") as stream:
            text = stream.read(_HEADER_BYTES).decode("latin-1")
    except OSError:
        return []
    lines = text.splitlines()
    meta = keys == ("elementdatafile",)
    for number, line in enumerate(lines):
        if not meta and not line.strip():
            return []  # the end of an NRRD header: its data follows in the file
        key, found, value = line.partition("=" if meta else ":")
        if not found or key.strip().lower() not in keys:
            continue
        value = value.strip()
        words = value.split()
        if not words or value.upper() == "LOCAL":
            return []
        if words[0].upper() == "LIST":
            names = [n.strip() for n in lines[number + 1 :] if n.strip()]
        elif "%" in words[0] and len(words) >= 3:
            try:
                first, last = int(words[1]), int(words[2])
                step = int(words[3]) if len(words) > 3 else 1
                names = [words[0] % i for i in range(first, last + 1, step or 1)]
            except (ValueError, TypeError):
                return []
        else:
            names = [value]
        return [path.parent / name for name in names]
    return []


def transform_spec(spec: str) -> tuple[str, bool]:
    """ANTs' ``-t`` syntax (here, not in :mod:`carctl.resample`: commands read it before
    loading torch): ``PATH``, or ``[PATH,1]`` for its inverse (``[PATH,0]``: PATH)."""
    text = spec.strip()
    if not (text.startswith("[") and text.endswith("]")):
        return spec, False
    path, comma, flag = text[1:-1].rpartition(",")
    if not comma or flag.strip() not in ("0", "1") or not path.strip():
        raise InputError(f"-t '{spec}': write a transform as PATH or [PATH,1] (its inverse)")
    return path.strip(), flag.strip() == "1"


def transform_paths(specs: Sequence[str]) -> list[str]:
    """The files ``-t`` specs read (inputs, never written over)."""
    return [transform_spec(spec)[0] for spec in specs]


# --- writing --------------------------------------------------------------------------------


def image_suffix(path: str | os.PathLike) -> str:
    name = os.fspath(path).lower()
    return ".nii.gz" if name.endswith(".nii.gz") else Path(name).suffix


def output_stem(spec: str | os.PathLike, default: str = "moving") -> str:
    """The name outputs derived from an input take: ``t1w.nii.gz:2`` -> ``t1w``."""
    path, _ = split_volume(spec)
    suffix = image_suffix(path)
    return (path.name[: -len(suffix)] if suffix else path.name) or default


def check_output(
    path: str | os.PathLike,
    *,
    force: bool = False,
    inputs: Iterable[str | os.PathLike] = (),
    extensions: Sequence[str] = IMAGE_EXTENSIONS,
    probe: bool = True,
) -> Path:
    """Refuse an output path before any work is done: bad extension, existing, an input, or
    (``probe``) a folder that takes no file."""
    path = Path(path)
    suffix = image_suffix(path)
    if suffix not in extensions:
        raise OutputError(
            f"cannot write '{path}': unknown extension; use one of {', '.join(extensions)}"
        )
    stem = path.name[: -len(suffix)] if suffix else path.name
    if suffix in _NIFTI_SUFFIXES and set(stem.lower().split(".")[1:]) & _NIFTI_WORDS:
        raise OutputError(
            f"cannot write '{path}': ITK's NIfTI writer would write another file name (it "
            f"treats '.nii', '.hdr' and '.img' inside the name as the extension); rename it"
        )
    target = over_input(path, input_paths(inputs))
    if target is not None:
        raise OutputError(f"refusing to write '{target}': it is one of the inputs")
    if path.is_dir():
        raise OutputError(f"cannot write '{path}': it is a directory")
    if path.exists() and not force:
        raise OutputError(f"'{path}' exists; use --force to overwrite it")
    if probe:
        _check_writable(path)
    return path


def input_paths(inputs: Iterable[str | os.PathLike]) -> set[str]:
    """The real paths of every file the ``inputs`` read (see :func:`input_files`)."""
    return {os.path.realpath(f) for spec in inputs for f in input_files(spec)}


def over_input(path: str | os.PathLike, protected: set[str]) -> Path | None:
    """The file writing ``path`` would write (it, or a data file its format writes) that is
    among ``protected`` (:func:`input_paths`), or None."""
    return next((t for t in input_files(path) if os.path.realpath(t) in protected), None)


def _check_writable(path: Path) -> None:
    """Refuse, before any work, an output whose folder cannot take it: the nearest existing
    folder on its way is probed with a staging folder as :func:`atomic_output` makes one (a
    read-only or immutable folder, or a file in the way, failed only when the results were
    written, as an internal error)."""
    folder = Path(os.path.abspath(path)).parent
    while not folder.exists():
        folder = folder.parent
    if not folder.is_dir():
        raise OutputError(f"cannot write '{path}': '{folder}' is a file, not a folder")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".carctl-", dir=folder))
    except OSError as error:
        raise _cannot_write(path, error) from error


def _cannot_write(path: str | os.PathLike, error: OSError) -> OutputError:
    """The one-line refusal of an output the system would not take (``error``'s reason)."""
    return OutputError(f"cannot write '{path}': {error.strerror or error}")


def check_distinct(outputs: dict[str, str | os.PathLike | None]) -> None:
    """Refuse two outputs (option name without ``--`` -> path) that name one file: the
    second would replace the first, or stop the run halfway for existing."""
    seen: dict[str, str] = {}
    for option, path in outputs.items():
        if path is None or os.fspath(path) == "-":
            continue
        where = os.path.realpath(path)
        if where in seen:
            first, second = (f"--{o.replace('_', '-')}" for o in (seen[where], option))
            raise OutputError(f"{first} and {second} name the same file '{path}'")
        seen[where] = option


# Outputs staged inside an output_group, moved into place when it ends: (staging, path).
_group: list[tuple[Path, Path]] | None = None


@contextlib.contextmanager
def output_group() -> Iterator[None]:
    """The outputs written inside (by :func:`atomic_output`) appear together when it ends
    without an error, or none of them: an interrupted ``register`` (Ctrl-C, an error while
    writing its third output) left the first two in place."""
    global _group
    if _group is not None:  # nested: the outer group moves everything
        yield
        return
    _group = []
    try:
        yield
        for staging, path in _group:  # every one written, before any is moved
            _require_written(staging, path)
        for staging, path in _group:
            _move_into_place(staging, path)
    finally:
        for staging, _ in _group:
            shutil.rmtree(staging, ignore_errors=True)
        _group = None


LOCK_NAME = ".carctl.lock"


@contextlib.contextmanager
def folder_lock(folder: Path, what: str) -> Iterator[None]:
    """Hold ``folder`` (made if missing) for one carctl process: another run into the same
    folder meanwhile is refused instead of writing over this one's record and outputs
    (``what``, e.g. "carctl batch", names this run in the refusal the other gets). The lock is
    the operating system's (``flock``), so a process that dies releases it; the lock file is
    removed on leaving. A lock file that is not a plain file (a link: it was followed, and
    an input it pointed to overwritten) is refused."""
    try:
        import fcntl
    except ImportError:  # Windows: no advisory locks here; runs are not guarded
        yield
        return
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise _cannot_write(folder, error) from error
    path = folder / LOCK_NAME
    flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0)
    while True:
        try:
            descriptor = os.open(path, flags, 0o644)
        except OSError as error:
            if os.path.islink(path) or path.is_dir():
                raise OutputError(
                    f"'{path}' is not a plain file: remove it if no carctl run is writing into "
                    f"'{folder}'"
                ) from None
            raise _cannot_write(path, error) from error
        handle = os.fdopen(descriptor, "r+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = handle.read().strip()
            handle.close()
            raise OutputError(
                f"{holder or 'another carctl run'} is writing into '{folder}'; wait for it to "
                "end or give another folder"
            ) from None
        try:  # the file locked is still the one at the path (a leaving run removes it)
            same = os.path.samestat(os.fstat(handle.fileno()), os.lstat(path))
        except OSError:
            same = False
        if same:
            break
        handle.close()
    try:
        handle.seek(0)
        handle.truncate()
        handle.write(f"{what} (process {os.getpid()})\n")
        handle.flush()
        yield
    finally:
        with contextlib.suppress(OSError):
            path.unlink()
        handle.close()


def _require_written(staging: Path, path: Path) -> None:
    if not (staging / path.name).exists():
        raise OutputError(f"nothing was written to '{path}'")


def _move_into_place(staging: Path, path: Path) -> None:
    """What was written in ``staging`` moved next to ``path`` (its companions first, the
    file named ``path`` last)."""
    _require_written(staging, path)
    written = sorted(staging.iterdir(), key=lambda p: p.name == path.name)
    try:
        for produced in written:
            os.replace(produced, path.parent / produced.name)
    except OSError as error:
        raise _cannot_write(path, error) from error


@contextlib.contextmanager
def atomic_output(
    path: str | os.PathLike,
    *,
    force: bool = False,
    inputs: Iterable[str | os.PathLike] = (),
    extensions: Sequence[str] = IMAGE_EXTENSIONS,
) -> Iterator[Path]:
    """Yield a temporary path with ``path``'s name; on success move what was written into place
    (inside an :func:`output_group`, when the group ends).

    Multi-file formats (``.mhd`` + ``.raw``, ``.hdr`` + ``.img``) move as a whole, the header
    last. On any error nothing is left behind.
    """
    # no probe: the staging folder made next is one, and its failure says the same
    path = check_output(path, force=force, inputs=inputs, extensions=extensions, probe=False)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".carctl-", dir=path.parent))
    except OSError as error:
        raise _cannot_write(path, error) from error
    grouped = False
    try:
        yield staging / path.name
        if _group is not None:
            _group.append((staging, path))
            grouped = True
        else:
            _move_into_place(staging, path)
    except OSError as error:  # a full disk, a folder gone read-only meanwhile
        raise _cannot_write(path, error) from error
    finally:
        if not grouped:
            shutil.rmtree(staging, ignore_errors=True)


def unfit_for(path: str | os.PathLike, grid: Grid) -> str | None:
    """Why an image on ``grid`` written to ``path`` would not read back on ``grid`` (None
    when it would): NIfTI (and the Analyze pair ITK writes as NIfTI) cannot hold a sheared
    grid; ITK writes its axes made orthogonal ("Non-orthogonal direction matrix coerced to
    orthogonal", off its grid by 6.8 mm on a gantry-tilt-like shear) without an error."""
    if grid.is_sheared and image_suffix(path) in _NIFTI_SUFFIXES:
        return (
            "its grid is sheared (the axes are not orthogonal, as a tilted gantry gives), "
            "which NIfTI cannot hold; write it as .mha or .nrrd"
        )
    return None


def require_fit(path: str | os.PathLike, grid: Grid) -> None:
    """Refuse (:class:`OutputError`) an output that would not read back (:func:`unfit_for`)."""
    reason = unfit_for(path, grid)
    if reason:
        raise OutputError(f"cannot write '{path}': {reason}")


def write_sitk(
    image: sitk.Image,
    path: str | os.PathLike,
    *,
    force: bool = False,
    inputs: Iterable[str | os.PathLike] = (),
    grid: Grid | None = None,
) -> Path:
    """Write a SimpleITK image atomically (compressed where the format allows); ``grid``:
    the spatial grid of a 4-D image, whose fit to the format is checked (see
    :func:`require_fit`)."""
    sitk = load_sitk()
    require_fit(path, grid or Grid.from_sitk(image))
    with atomic_output(path, force=force, inputs=inputs) as temporary:
        try:
            with native_output_silenced():  # ITK's own line for a failed write ("NWAD: ...")
                sitk.WriteImage(image, os.fspath(temporary), useCompression=True)
        except RuntimeError as error:
            raise OutputError(f"cannot write '{path}': {one_line_reason(error)}") from error
        # ITK's NIfTI writer does not fail on a full disk: the file, cut short, was moved into
        # place and the command exited 0
        reason = _incomplete(temporary)
        if reason:
            raise OutputError(
                f"cannot write '{path}': it came out incomplete ({reason}; is the disk full?)"
            )
    return Path(path)


def write_volumes(
    volumes: Volumes,
    path: str | os.PathLike,
    *,
    force: bool = False,
    inputs: Iterable[str | os.PathLike] = (),
) -> Path:
    """Write ``volumes`` as one 4-D image, as :func:`write_image` writes an image (a
    200-volume 2 mm series, 722 MB of float32, took 16.5 s through ITK's one-thread gzip)."""
    return _write_voxels(volumes, path, force, inputs)


def write_image(
    image: Image,
    path: str | os.PathLike,
    *,
    force: bool = False,
    inputs: Iterable[str | os.PathLike] = (),
) -> Path:
    """Write ``image`` with its geometry, atomically; see :func:`atomic_output`. A large
    ``.nii.gz`` image is compressed on every thread (see :data:`PARALLEL_GZIP_BYTES`)."""
    return _write_voxels(image, path, force, inputs)


def _write_voxels(
    data: Image | Volumes, path: str | os.PathLike, force: bool, inputs: Iterable
) -> Path:
    """:func:`write_image` and :func:`write_volumes`: a large ``.nii.gz`` by carctl itself
    (:func:`_write_nifti_gz`), anything else through :func:`write_sitk`."""
    array = data.array
    if (
        image_suffix(path) == ".nii.gz"
        and array.nbytes > PARALLEL_GZIP_BYTES
        and max(array.shape) <= NIFTI1_MAX_SIZE
    ):
        require_fit(path, data.grid)  # as write_sitk does
        with atomic_output(path, force=force, inputs=inputs) as temporary:
            _write_nifti_gz(data, temporary, path)
        return Path(path)
    return write_sitk(data.to_sitk(), path, force=force, inputs=inputs, grid=data.grid)


# A .nii.gz image of more voxel bytes than this is written by carctl: the header ITK writes
# for its geometry and pixel type, then the voxels as gzip members compressed side by side on
# every thread (level 1). ITK's writer compresses on one thread: a 0.7 mm thorax CT's
# 360 MB float32 warped image took 8.0 s, Python's zlib at level 1 / 6 8.2 / 12.2 s for
# 258 / 251 MB (floats barely compress). Readers take the members as one stream (zlib's
# gzread, Python's gzip).
PARALLEL_GZIP_BYTES = 1 << 26
_GZIP_PIECE = 1 << 24
# NIfTI-1: dim[] (int16) from byte 40, a single file's voxels from byte 352, sizes < 2^15.
NIFTI_DIM, NIFTI_DATA, NIFTI1_MAX_SIZE = 40, 352, 32767


def nifti_header(
    grid: Grid,
    dtype: np.dtype,
    folder: Path,
    components: int = 1,
    volumes: Volumes | None = None,
) -> bytes:
    """The 352-byte NIfTI-1 header SimpleITK writes for an image on ``grid`` of ``dtype``
    voxels (``components`` per voxel; or for ``volumes``' 4-D image, ``grid`` theirs): ITK's
    own, written for two voxels across into ``folder`` (then removed), with its sizes set to
    ``grid``'s (no other entry depends on them), so that qform, sform, units and intent are
    what SimpleITK would write."""
    sitk = load_sitk()
    d = grid.ndim
    two = Grid((2,) * d, grid.spacing, grid.origin, grid.direction)
    if volumes is not None:
        zeros = np.zeros((2, *two.shape), dtype)
        proxy = Volumes(zeros, two, volumes.step, volumes.start, volumes.sense)
        proxy, d, sizes = proxy.to_sitk(), 4, (*grid.size, len(volumes))
    else:
        shape = (2,) * d + ((components,) if components > 1 else ())
        array = np.zeros(shape, dtype)
        proxy = two.copy_to(sitk.GetImageFromArray(array, isVector=components > 1))
        sizes = grid.size
    where = folder / ".carctl-header.nii"
    try:
        sitk.WriteImage(proxy, os.fspath(where), useCompression=False)
        header = bytearray(where.read_bytes()[:NIFTI_DATA])
    finally:
        where.unlink(missing_ok=True)
    dims = struct.unpack_from("=8h", header, NIFTI_DIM)  # ITK writes native byte order
    expected = (d if components == 1 else 5, *(2,) * d)
    if dims[: 1 + d] != expected or (components > 1 and dims[5] != components):
        raise OutputError(f"unexpected NIfTI header from ITK: dim {dims}")
    struct.pack_into(f"={d}h", header, NIFTI_DIM + 2, *sizes)
    return bytes(header)


def _write_nifti_gz(image: Image | Volumes, temporary: Path, path: str | os.PathLike) -> None:
    """``image`` (or 4-D ``volumes``) as ``.nii.gz`` at ``temporary``: :func:`nifti_header`,
    then the voxels in pieces of :data:`_GZIP_PIECE` bytes, each a gzip member, compressed
    in parallel."""
    from concurrent.futures import ThreadPoolExecutor

    sitk = load_sitk()
    array = np.ascontiguousarray(image.array, dtype=image.array.dtype.newbyteorder("="))
    four = image if isinstance(image, Volumes) else None
    try:
        header = nifti_header(image.grid, array.dtype, temporary.parent, volumes=four)
    except RuntimeError as error:
        raise OutputError(f"cannot write '{path}': {one_line_reason(error)}") from error
    voxels = memoryview(array).cast("B")
    pieces = [header] + [voxels[i : i + _GZIP_PIECE] for i in range(0, len(voxels), _GZIP_PIECE)]

    def member(piece) -> bytes:  # zlib releases the interpreter lock while it compresses
        packer = zlib.compressobj(1, zlib.DEFLATED, 31)  # wbits 31: a gzip member
        return packer.compress(piece) + packer.flush()

    threads = max(1, sitk.ProcessObject.GetGlobalDefaultNumberOfThreads())
    with ThreadPoolExecutor(max_workers=threads) as pool, open(temporary, "wb") as out:
        for compressed in pool.map(member, pieces):
            out.write(compressed)


def write_text(
    text: str,
    path: str | os.PathLike,
    *,
    force: bool = False,
    inputs: Iterable[str | os.PathLike] = (),
    extensions: Sequence[str] = (".json", ".csv", ".txt"),
) -> Path:
    with atomic_output(path, force=force, inputs=inputs, extensions=extensions) as temporary:
        temporary.write_text(text)
    return Path(path)


# --- point sets ----------------------------------------------------------------------------


# A points CSV as read: its header row (in a list, empty without one), its other rows, and
# the columns holding the coordinates.
CsvTable = tuple[list[list[str]], list[list[str]], list[int]]


def read_points(path: str | os.PathLike, ndim: int = 3, grid: Grid | None = None) -> np.ndarray:
    """Read landmarks as physical LPS points ``(P, D)``.

    Formats: CSV with columns ``x,y,z`` (header optional; ANTs' ``antsApplyTransformsToPoints``
    convention: physical LPS mm), or the elastix/ITK point-set text (``point`` or ``index``
    on the first line, the count on the second, then one point per line), or a 3D Slicer
    markups file (``.fcsv``, RAS or LPS as its header says). ``index`` points need the
    ``grid`` they index.
    """
    return load_points(path, ndim, grid)[0]


def load_points(
    path: str | os.PathLike, ndim: int = 3, grid: Grid | None = None
) -> tuple[np.ndarray, CsvTable | FcsvTable | None]:
    """:func:`read_points`, and for a CSV or Slicer file its table (for :func:`write_points`
    to keep its other columns); None for a point set."""
    path = Path(path)
    require_file(path)
    try:
        text = path.read_text(encoding="utf-8-sig")  # a byte-order mark from spreadsheets
    except (OSError, UnicodeDecodeError) as error:
        raise InputError(f"cannot read points '{path}': {error}") from error
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if not lines:
        raise InputError(f"'{path}' holds no points")
    kind = lines[0].split()[0].lower()
    table = None
    try:
        if path.suffix.lower() == ".fcsv":
            if ndim != 3:
                raise ValueError("a Slicer .fcsv file holds 3-D points")
            table = _fcsv_table(lines)
            rows = _csv_rows(([], table.rows, table.columns), ndim)
            if table.ras:  # Slicer's RAS: x and y point the other way
                rows = [[-row[0], -row[1], row[2]] for row in rows]
        elif kind in ("point", "index"):
            count = int(lines[1].split()[0])
            rows = [[float(v) for v in ln.split()[:ndim]] for ln in lines[2 : 2 + count]]
            if len(rows) != count:
                raise ValueError(f"{count} points announced, {len(rows)} found")
        else:
            table = _csv_table(lines, ndim)
            rows = _csv_rows(table, ndim)
        points = np.asarray(rows, dtype=np.float64)
    except (ValueError, IndexError) as error:
        raise InputError(f"cannot read points '{path}': {error}") from error
    if points.size == 0:
        raise InputError(f"'{path}' holds no points")
    if points.ndim != 2 or points.shape[1] != ndim:
        raise InputError(f"cannot read points '{path}': expected {ndim} coordinates per point")
    if not np.isfinite(points).all():
        bad = int(np.flatnonzero(~np.isfinite(points).all(axis=1))[0]) + 1
        raise InputError(f"cannot read points '{path}': point {bad} is not finite")
    if kind == "index":
        if grid is None:
            raise InputError(f"'{path}' holds voxel indices: give the image they refer to")
        points = (
            points @ grid.index_to_physical[:ndim, :ndim].T + grid.index_to_physical[:ndim, ndim]
        )
    return points, table


@dataclass
class FcsvTable:
    """A 3D Slicer markups file (``.fcsv``) as read: its ``#`` lines, its rows, the columns
    holding x, y, z, and whether they are RAS (Slicer's default) rather than LPS."""

    comments: list[str]
    rows: list[list[str]]
    columns: list[int]
    ras: bool


# Slicer's markups columns, where a file does not list them (``# columns = ...``).
_FCSV_COLUMNS = "id,x,y,z,ow,ox,oy,oz,vis,sel,lock,label,desc,associatedNodeID"


def _fcsv_table(lines: list[str]) -> FcsvTable:
    """Parse a Slicer ``.fcsv``: ``# CoordinateSystem = LPS|RAS`` (or 1|0; RAS without the
    line, as Slicer 4 wrote), ``# columns = id,x,y,z,...``, then one row per point."""
    comments = [ln for ln in lines if ln.startswith("#")]
    names, ras = _FCSV_COLUMNS.lower().split(","), True
    for line in comments:
        key, _, value = line.lstrip("#").partition("=")
        key, value = key.strip().lower(), value.strip()
        if key == "coordinatesystem":
            systems = {"ras": True, "0": True, "lps": False, "1": False}
            if value.lower() not in systems:
                raise ValueError(f"unknown coordinate system '{value}' (LPS or RAS)")
            ras = systems[value.lower()]
        elif key == "columns":
            names = [n.strip().lower() for n in value.split(",")]
    if not all(a in names for a in ("x", "y", "z")):
        raise ValueError("its columns line names no x, y, z")
    rows = [row for row in csv.reader([ln for ln in lines if not ln.startswith("#")]) if row]
    return FcsvTable(comments, rows, [names.index(a) for a in ("x", "y", "z")], ras)


def _fcsv_text(points: np.ndarray, like: FcsvTable | None) -> str:
    """``points`` (LPS) as a Slicer ``.fcsv``: in ``like``'s lines and coordinate system,
    only the coordinates changed, or a new LPS file with Slicer's columns."""
    if like is None:
        like = FcsvTable(
            [
                "# Markups fiducial file version = 4.11",
                "# CoordinateSystem = LPS",
                f"# columns = {_FCSV_COLUMNS}",
            ],
            [
                [str(i), "", "", "", "0", "0", "0", "1", "1", "1", "0", f"F-{i + 1}", "", ""]
                for i in range(len(points))
            ],
            [1, 2, 3],
            False,
        )
    out = io.StringIO()
    out.write("".join(f"{line}\n" for line in like.comments))
    body = [list(row) for row in like.rows]
    for row, point in zip(body, points, strict=True):
        x, y, z = (-point[0], -point[1], point[2]) if like.ras else point
        for c, value in zip(like.columns, (x, y, z), strict=True):
            row[c] = f"{value + 0.0:.6f}"
    csv.writer(out, lineterminator="\n").writerows(body)
    return out.getvalue()


def points_dimension(path: str | os.PathLike) -> int | None:
    """2 or 3 where a points CSV's header says (``x,y`` without ``z``: 2), else None: for
    landmarks with nothing else (image, transform) to fix their dimension."""
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            header = {h.strip().lower() for h in next(csv.reader(f), [])}
    except (OSError, UnicodeDecodeError, csv.Error):
        return None
    if {"x", "y"} <= header:
        return 3 if "z" in header else 2
    return None


POINT_EXTENSIONS = (".csv", ".txt", ".fcsv")


def write_points(
    points: np.ndarray,
    path: str | os.PathLike,
    *,
    like: CsvTable | FcsvTable | None = None,
    force: bool = False,
    inputs: Iterable[str | os.PathLike] = (),
) -> Path:
    """Write physical LPS points ``(P, D)``, atomically: a ``.txt`` path as an elastix/ITK
    point set (``point``, the count, one point per line), any other as CSV with ``x,y[,z]``
    columns. With ``like`` (the table :func:`load_points` read them from, in its order), its
    header and other columns are kept and only the coordinates change, as
    ``antsApplyTransformsToPoints`` keeps ``t``, labels and comments."""
    points = np.asarray(points, dtype=np.float64)
    ndim = points.shape[1]
    numbers = [[f"{v:.6f}" for v in row] for row in points]
    fcsv = like if isinstance(like, FcsvTable) else None
    if Path(path).suffix.lower() == ".fcsv":
        if ndim != 3:
            raise OutputError(f"cannot write '{path}': a Slicer .fcsv file holds 3-D points")
        text = _fcsv_text(points, fcsv)
        return write_text(text, path, force=force, inputs=inputs, extensions=POINT_EXTENSIONS)
    if fcsv is not None:  # another format: its own columns, in LPS
        like = None
    if image_suffix(Path(path)) == ".txt":
        text = f"point\n{len(points)}\n" + "".join(" ".join(r) + "\n" for r in numbers)
    else:
        head, body = [["x", "y", "z"][:ndim]], [list(r) for r in numbers]
        if like is not None:
            head, rows, columns = like
            body = [list(row) for row in rows]
            for row, mapped in zip(body, numbers, strict=True):
                for c, value in zip(columns, mapped, strict=True):
                    row[c] = value
        out = io.StringIO()
        csv.writer(out, lineterminator="\n").writerows(head + body)
        text = out.getvalue()
    return write_text(text, path, force=force, inputs=inputs, extensions=POINT_EXTENSIONS)


def _csv_table(lines: list[str], ndim: int) -> CsvTable:
    """A points CSV's :data:`CsvTable`: the coordinates are ``x,y[,z]`` where the header
    names them, else the first ``ndim`` columns."""
    reader = [row for row in csv.reader(lines) if row]
    header = [h.strip().lower() for h in reader[0]]
    if ndim == 2 and {"x", "y", "z"} <= set(header):
        raise ValueError("its header names x, y and z: 3-D points, where 2-D ones are read")
    axes = ["x", "y", "z"][:ndim]
    if all(a in header for a in axes):
        return reader[:1], reader[1:], [header.index(a) for a in axes]
    return [], reader, list(range(ndim))


def _csv_rows(table: CsvTable, ndim: int) -> list[list[float]]:
    head, body, columns = table
    for number, row in enumerate(body, start=1 + len(head)):
        if len(row) <= max(columns):
            raise ValueError(f"row {number} has {len(row)} values, not {ndim} coordinates")
    return [[float(row[c]) for c in columns] for row in body]
