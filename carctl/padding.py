"""Scanner padding: voxels that hold no measurement, told apart from intensities (numpy only,
so that ``carctl info`` reports it without importing torch)."""

from __future__ import annotations

import numpy as np

# CT scanners (and the tools after them) store the voxels outside the reconstruction circle,
# or beyond a scan, as one value far below air (-1024 HU): -2000, -2048, -3024. Such a value
# is a lack of data, not an intensity: the normalised range stretched down to it made air
# mid-grey, and the circle's edge, where the scanner put it in both images of a breathing pair,
# held the field there (chest CT with a known deformation of 8 mm RMS, both images padded with
# -3024 outside a circle of 251 mm, seeds 0-2: 1.24 / 0.86 / 0.97 mm unpadded, 1.45 / 0.96 /
# 1.05 padded, 1.20 / 0.87 / 0.91 with the padding left out as below). Every voxel at or below
# PADDING_BELOW (no tissue, nor air, lies there) counts as padding when they are at least
# PADDING_FRACTION of the image, and so do the voxels next to them (one voxel in every
# direction): a resampled padded CT holds, around its padding, values a B-spline took below
# it and values interpolated between it and air, which an exact value missed (a padded head
# CT moved by a known rigid motion, resampled by SimpleITK's B-spline: 1.89 mm left by the
# rigid stage, 0.22 unpadded; a single voxel below the padding value had the same effect).
PADDING_BELOW = -1500.0
PADDING_FRACTION = 1e-3


def padding(array: np.ndarray) -> tuple[float, np.ndarray] | None:
    """The scanner padding of ``array`` (see :data:`PADDING_BELOW`): its value (the median of
    the voxels at or below PADDING_BELOW) and where it is with the voxels next to it
    (boolean, ``array``'s shape), or None when there is none."""
    if array.dtype.kind not in "iuf" or array.size == 0 or array.ndim not in (2, 3):
        return None
    if array.dtype.kind == "u" or (array.dtype.kind == "i" and array.dtype.itemsize == 1):
        return None  # these types hold nothing below -1500
    least = np.fmin.reduce(array, axis=None)  # NaN aside
    if not least <= PADDING_BELOW:
        return None
    below = array <= PADDING_BELOW
    if int(np.count_nonzero(below)) < PADDING_FRACTION * array.size:
        return None
    sample = array.ravel()[:: max(1, array.size >> 20)]  # about a million voxels
    value = float(np.median(sample[sample <= PADDING_BELOW]))
    return value, _grown(below)


def summarised(found: tuple[float, np.ndarray]) -> dict:
    """:func:`padding`'s answer for a summary, JSON-ready (-inf as the string "-inf": JSON has
    no infinities)."""
    value, where = found
    return {
        "value": value if np.isfinite(value) else str(value),
        "voxels": int(np.count_nonzero(where)),
    }


def described(reported: dict) -> str:
    """A :func:`summarised` padding in words: ``-3024 (2188480 voxels)``."""
    value = reported["value"]
    shown = f"{value:g}" if isinstance(value, float) else value
    return f"{shown} ({reported['voxels']} voxels)"


def _grown(where: np.ndarray) -> np.ndarray:
    """``where`` with every voxel next to it (its 3 x 3 (x 3) neighbourhood), one axis at a
    time."""
    grown = where.copy()
    for axis in range(where.ndim):
        before = [slice(None)] * where.ndim
        after = [slice(None)] * where.ndim
        before[axis], after[axis] = slice(None, -1), slice(1, None)
        step = grown.copy()
        step[tuple(before)] |= grown[tuple(after)]
        step[tuple(after)] |= grown[tuple(before)]
        grown = step
    return grown


def as_air(array: np.ndarray) -> tuple[np.ndarray, tuple[float, np.ndarray] | None]:
    """``array`` as the registration reads it: its :func:`padding` (also returned, or None)
    filled by :func:`without_padding`; ``array`` itself when it has none."""
    found = padding(array)
    return (array if found is None else without_padding(array, found[1])), found


def without_padding(array: np.ndarray, where: np.ndarray) -> np.ndarray:
    """``array`` (float32) with the padding at ``where`` replaced by the least value of the
    rest (air on a CT), so that no descriptor sees an edge where the data ends."""
    out = np.array(array, dtype=np.float32)
    rest = np.fmin.reduce(out, axis=None, where=~where, initial=np.inf)  # NaN aside
    np.putmask(out, where, rest if np.isfinite(rest) else 0.0)
    return out
