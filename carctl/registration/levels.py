"""Resolution levels of a registration: the fixed working grid and both images' features.

A level is built once per spacing and then only *sampled* by the optimisers: the moving
features are read at ``T(x)`` for the fixed working grid's physical points ``x``, through
:meth:`Level.loss`, so the moving image is never resampled into fixed space.

Coordinates follow :mod:`carctl.spatial.grid`: grids live in physical LPS mm; a level's
fixed grid has the fixed image's direction, cropped to its foreground; the moving level grid
has the *same direction* as the fixed grid (so that directional descriptors such as MIND-SSC
mean the same thing in both images), covering the moving image's foreground. Both crops keep
a margin.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from carctl.spatial.grid import Grid
from carctl.spatial.points import interpolate
from carctl.spatial.sample import warp
from carctl.spatial.transform import Transform

# Moving support at or above 1 - this counts as whole (interpolated ones may round below 1).
_WHOLE = 1e-6
# Intensities are scaled so that these percentiles map to 0 and 1.
_PERCENTILES = (0.5, 99.5)
# Foreground: voxels above this fraction of the normalised range (cropping only).
_FOREGROUND = 0.05
# Margin kept around each image's foreground, in mm and as a fraction of its extent.
_MARGIN_MM, _MARGIN_FRACTION = 8.0, 0.1
# A level keeps at least this many voxels across its shortest extent (where the images have
# them): along a thin axis (a slab, a short stack) it stays finer than its spacing.
ACROSS = 8


# Voxel types that torch converts to float32 itself, on every thread.
_TORCH_TYPES = {
    np.dtype(t) for t in ("bool", "uint8", "int8", "int16", "int32", "int64", "float32", "float64")
}


def intensity_range(
    array: np.ndarray, select: np.ndarray | None = None
) -> tuple[float, float] | None:
    """The robust range (percentiles :data:`_PERCENTILES`) of ``array``'s finite values (only
    where ``select`` is true, when given and not empty); ``high > low``, or None when there
    is no finite value."""
    values = array.ravel() if select is None or not select.any() else array[select]
    if values.size > (1 << 20):  # subsampled before any conversion: a CT's int16 stays int16
        values = values[:: values.size // (1 << 20)]
    values = values.astype(np.float32)
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return None
    low, high = (float(v) for v in np.percentile(finite, _PERCENTILES))
    return low, (high if high > low else low + 1.0)


def normalise(
    array: np.ndarray,
    select: np.ndarray | None = None,
    bounds: tuple[float, float] | None = None,
) -> np.ndarray:
    """Robustly rescale intensities to ``[0, 1]`` (float32), with :func:`intensity_range`
    (or ``bounds``, its answer for ``array`` when already known)."""
    bounds = intensity_range(array, select) if bounds is None else bounds
    if bounds is None:
        return np.zeros(array.shape, np.float32)
    low, high = bounds
    # in torch, in place: the same float32 arithmetic on every CPU thread (numpy's passes ran
    # on one; 0.2 -> 0.05 s for a 1 mm brain), the conversion to float32 too where torch
    # holds the type (a 512 x 512 x 400 CT's int16: 1.2 -> 0.5 s)
    if array.dtype in _TORCH_TYPES:
        out = torch.from_numpy(np.ascontiguousarray(array)).to(torch.float32, copy=True)
    else:
        out = torch.from_numpy(np.array(array, dtype=np.float32, order="C"))
    if array.dtype.kind == "f":
        # NaN and infinities (no data) as the darkest value: NaN at 0 read as water on a CT,
        # +Inf as the brightest value (half an image of it moved a rigid result by 1.9 mm)
        out.nan_to_num_(low, posinf=low, neginf=low)
    return out.sub_(low).div_(high - low).clamp_(0.0, 1.0).numpy()


# A CT in Hounsfield units: air (-1000 HU) among its darkest voxels and bone (a few hundred
# to about 3000 HU) among its brightest, at the percentiles of intensity_range. An MR, PET or
# ultrasound image has no such values below zero.
HOUNSFIELD_AIR, HOUNSFIELD_TOP = -900.0, 4000.0


def hounsfield(bounds: tuple[float, float] | None) -> bool:
    """Whether an image whose :func:`intensity_range` is ``bounds`` looks like a CT in
    Hounsfield units (air at the bottom of its range, bone at the top)."""
    return bounds is not None and bounds[0] <= HOUNSFIELD_AIR and 0.0 < bounds[1] <= HOUNSFIELD_TOP


def require_contrast(
    name: str,
    array: np.ndarray,
    normalised: np.ndarray | None = None,
    padded: float | None = None,
) -> None:
    """Refuse (:class:`~carctl.errors.InputError`) an image that shows nothing to align:
    :func:`normalise` (``normalised``, when already computed) leaves it one value everywhere.
    Every loss is flat or undefined on such an image, and an optimiser would wander.
    ``padded``: the value of the scanner padding that ``array`` no longer holds."""
    from carctl.errors import InputError

    if array.dtype.kind == "f" and array.dtype.itemsize > 4:
        numbers = np.abs(array[np.isfinite(array)])
        if numbers.size and float(numbers.max()) > float(np.finfo(np.float32).max):
            raise InputError(
                f"the {name} image holds values beyond float32's range (up to "
                f"{float(numbers.max()):.3g}), which carctl computes in; rescale it first"
            )
    normalised = normalise(array) if normalised is None else normalised
    if normalised.size and normalised.max() > normalised.min():
        return
    finite = array[np.isfinite(array)]
    if finite.size == 0:
        raise InputError(f"the {name} image has no finite voxel (all NaN or infinite)")
    low, high = float(finite.min()), float(finite.max())
    if low == high:
        what = f"every finite voxel {low:g}"
    else:
        what = f"nearly every voxel alike in {low:g}..{high:g}"
    if padded is not None:
        what += f", apart from scanner padding ({padded:g})"
    raise InputError(f"the {name} image is constant ({what}): there is nothing to align")


# An image needs this many voxels along two of its axes (both, in 2-D) to be registered: a
# 2 x 2 x 2 fixed image gave a mirroring, nearly singular affine and a field folded everywhere
# (exit 0). 3 x 3 x 3 pairs still register (rigidly well; the affine stage may shrink them, and
# `register` warns of that).
LEAST_VOXELS_ACROSS = 3


def require_size(name: str, grid: Grid) -> None:
    """Refuse (:class:`~carctl.errors.InputError`) an image too small to register (see
    :data:`LEAST_VOXELS_ACROSS`); thin stacks (one or a few slices of a large plane) pass."""
    from carctl.errors import InputError

    if sorted(grid.size)[-2] < LEAST_VOXELS_ACROSS:
        size = "x".join(str(n) for n in grid.size)
        raise InputError(
            f"the {name} image ({size} voxels) is too small to register: it needs at least "
            f"{LEAST_VOXELS_ACROSS} voxels along two of its axes"
        )


def gaussian_blur(image: torch.Tensor, sigma: Sequence[float]) -> torch.Tensor:
    """Separable Gaussian blur of ``(N, C, *spatial)``; ``sigma`` in voxels, index order;
    borders repeated. Each axis is a weighted sum of shifted views (a kernel of a few taps:
    several times faster on the CPU than ``conv1d`` over one-channel rows)."""
    d = image.dim() - 2
    out = image
    for axis, s in enumerate(sigma):
        if s <= 0.1:
            continue
        dim = d + 1 - axis  # tensor dimension of index axis `axis`
        n = out.shape[dim]
        radius = min(int(math.ceil(3 * s)), n - 1)
        if radius < 1:
            continue
        x = torch.arange(-radius, radius + 1, dtype=torch.float64)
        kernel = torch.exp(-0.5 * (x / s) ** 2)
        kernel = (kernel / kernel.sum()).tolist()
        edge = [radius if k == dim else -1 for k in range(out.dim())]
        padded = torch.cat(
            [out.narrow(dim, 0, 1).expand(edge), out, out.narrow(dim, n - 1, 1).expand(edge)],
            dim=dim,
        )
        total = padded.narrow(dim, 0, n) * kernel[0]
        for k in range(1, 2 * radius + 1):
            total.add_(padded.narrow(dim, k, n), alpha=kernel[k])
        out = total
    return out


def _resampled_grid(
    direction: np.ndarray,
    low: np.ndarray,
    high: np.ndarray,
    spacing: np.ndarray,
) -> Grid:
    """Grid of ``direction`` covering the box ``[low, high]`` (coordinates along the
    direction's columns, mm) with ``spacing`` per axis, its first voxel on ``low``.

    Anchored, not centred: when ``low`` is a voxel of an image with that direction and
    spacing (a box of whole voxels, the finest level), the grid's voxels are the image's own
    and resampling it interpolates nothing. A grid shifted by a fraction of a voxel blurs
    one image and not the other, and MIND then prefers a slightly shrunk alignment."""
    extent = np.maximum(high - low, 0.0)
    size = np.maximum(1, np.ceil(extent / spacing - 1e-6).astype(int) + 1)
    origin = direction @ low
    return Grid(
        tuple(int(s) for s in size),
        tuple(float(s) for s in spacing),
        tuple(float(o) for o in origin),
        tuple(float(c) for c in direction.ravel()),
    )


def fixed_level_grid(
    grid: Grid, spacing: float | Sequence[float], box: tuple[np.ndarray, np.ndarray]
) -> Grid:
    """The fixed working grid: ``grid``'s direction, the index ``box`` (inclusive corners),
    voxels of ``spacing`` mm (one per axis when a sequence; never finer than the image's
    own)."""
    step = np.maximum(np.asarray(grid.spacing), np.asarray(spacing, float))
    low = np.asarray(box[0], float) * np.asarray(grid.spacing)
    high = np.asarray(box[1], float) * np.asarray(grid.spacing)
    # coordinates along the direction columns, relative to the origin
    base = grid.direction_matrix.T @ np.asarray(grid.origin)
    return _resampled_grid(grid.direction_matrix, base + low, base + high, step)


def own_if_near(spacing: np.ndarray, grid: Grid) -> np.ndarray:
    """``spacing`` (per axis of ``grid``), or ``grid``'s own spacing along the axes where that
    is at most :data:`NEAR_OWN` finer: a features' grid on the image's own voxels is a part
    of the image (:func:`_sublattice`: nothing interpolated), not a resampled copy of it. A
    chest CT of 0.98 mm voxels, its 2 mm level's features at 1 mm: 1.6-1.9 s to build ->
    1.1-1.2 s on its own voxels (a 1.95 mm level; the known pair's end-point error 0.874 ->
    0.863 mm)."""
    own = np.asarray(grid.spacing)
    spacing = np.array(np.broadcast_to(np.asarray(spacing, float), own.shape))
    near = (spacing >= own) & (spacing <= own * (1 + NEAR_OWN))
    return np.where(near, own, spacing)


def own_along(grid: Grid, direction: np.ndarray) -> np.ndarray:
    """``grid``'s own spacing along each axis of ``direction`` (that of its axis closest to
    it)."""
    cosines = np.abs(direction.T @ grid.direction_matrix)
    return np.asarray(grid.spacing)[cosines.argmax(axis=1)]


def moving_level_grid(
    moving: Grid,
    direction: np.ndarray,
    spacing: np.ndarray,
    box: tuple[np.ndarray, np.ndarray] | None = None,
) -> Grid:
    """A grid of ``direction`` covering ``moving`` (or only its index ``box``, inclusive
    corners), with voxels of about ``spacing`` (per axis of ``direction``; finer than the
    moving image's own along an axis, the image is interpolated there)."""
    low, high = _along(moving, box, direction)
    return _resampled_grid(direction, low, high, np.asarray(spacing, float))


def _along(
    grid: Grid, box: tuple[np.ndarray, np.ndarray] | None, direction: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """The lowest and highest coordinates along ``direction``'s columns (mm) of ``grid``'s
    index ``box`` (inclusive corners; the whole grid when None)."""
    low, high = box if box is not None else (np.zeros(grid.ndim), np.asarray(grid.size) - 1.0)
    along = _corners(grid, np.asarray(low, float), np.asarray(high, float)) @ direction
    return along.min(axis=0), along.max(axis=0)


def axis_spacing(
    spacing: float,
    fixed: Grid,
    box: tuple[np.ndarray, np.ndarray],
    moving: Grid,
    moving_box: tuple[np.ndarray, np.ndarray] | None = None,
) -> np.ndarray:
    """A level's spacing along each axis of the fixed grid: ``spacing``, or finer along an
    axis where the two images' overlap (the fixed index ``box``, the moving image or its
    ``moving_box``, measured along the fixed axes) is shorter than :data:`ACROSS` voxels of
    it, down to the fixed image's own spacing.

    A slab of a chest CT 16 slices of 2 mm thick (30 mm) had 4 voxels across on an 8 mm
    level: after MIND's reach from its edges nothing was left to compare, and a rigid
    registration to its whole CT ended 2-60 mm off."""
    own = np.asarray(fixed.spacing)
    extent = (np.asarray(box[1], float) - np.asarray(box[0], float)) * own
    low, high = _along(moving, moving_box, fixed.direction_matrix)
    extent = np.minimum(extent, high - low)
    return np.minimum(spacing, np.maximum(extent / ACROSS, own))


def _corners(grid: Grid, low: np.ndarray, high: np.ndarray) -> np.ndarray:
    """Physical points ``(2^D, D)`` of the corners of ``grid``'s index box ``[low, high]``."""
    corners = np.array(np.meshgrid(*zip(low, high, strict=True), indexing="ij"), dtype=float)
    corners = corners.reshape(grid.ndim, -1).T
    return corners @ grid.index_to_physical[:-1, :-1].T + grid.index_to_physical[:-1, -1]


def smoothing_sigma(native: Sequence[float], target: Sequence[float] | float) -> list[float]:
    """Gaussian sigma (voxels of ``native``) that band-limits an image before resampling it
    from ``native`` to ``target`` spacing (mm)."""
    target = np.broadcast_to(np.asarray(target, float), (len(native),))
    out = []
    for s, t in zip(native, target, strict=True):
        out.append(0.5 * math.sqrt(max(t * t - s * s, 0.0)) / s)
    return out


def reduce(
    image: torch.Tensor, grid: Grid, spacing: float | Sequence[float]
) -> tuple[torch.Tensor, Grid]:
    """Average blocks of voxels (integer factors per axis) towards ``spacing`` mm (one per
    axis of ``grid`` when a sequence): a cheap first anti-aliasing step before
    :func:`gaussian_blur`. Returns the image and its grid."""
    target = np.broadcast_to(np.asarray(spacing, float), (grid.ndim,))
    # keep 1.5x for the blur
    factors = [max(1, int(t / s / 1.5)) for s, t in zip(grid.spacing, target, strict=True)]
    return pool(image, grid, [min(f, n) for f, n in zip(factors, grid.size, strict=True)])


# Voxels read to report a pointwise loss on a large level (see :meth:`Level.report_index`).
REPORT_VOXELS = 1 << 15


@dataclass(frozen=True)
class Sample:
    """The voxels one stochastic step reads (see :meth:`Level.sample`): ``index`` into the
    flattened working grid (sorted) and ``at``, the continuous grid indices ``(P, D)``
    (components ``(i, j, k)``) where each is read, its voxel moved by up to half a voxel."""

    index: torch.Tensor
    at: torch.Tensor


# Where the fill pulls (the deformable pyramid's coarsest level: see EDGE_PULL_LEVELS in
# carctl.registration.pipeline), it pulls the points within this many level spacings of the
# fixed image's own field of view only: there the moving image's field of view ends where the
# fixed one's does (a short CT cut at the same planes) and the anatomy moved across the edge.
# A moving image of part of the anatomy (half a brain, a slab) ends inside the fixed one, and
# there the pull, and the moving support left whole up to the cut, dragged the points beyond
# the cut into it. On BraTS T2w halves onto a T1n moved by 20 degrees and 20 mm the network's
# check then read 10-13 mm of motion (about 2.5 mm left to find), discarded its field and
# lowered the regularisation: 2.56 / 3.06 mm, behind the affine stage's 1.94 / 2.35; now
# 1.39 / 1.82 (chest CT 0.87 -> 0.89 mm, the other benchmark pairs unchanged; 4 spacings:
# 1.63 / 1.99).
PULL_REACH = 2

# Features are computed at this many times the level's resolution, then averaged down.
OVERSAMPLE = 2
# ... but on the images' own voxels where those are at most NEAR_OWN finer than that and
# both images' spacings along the axis agree within _SAME_SPACING (see own_if_near).
NEAR_OWN, _SAME_SPACING = 0.05, 0.01
# Where the moving image's voxels are coarser than a level's features along an axis, both
# images' features are taken at the moving image's spacing there, when that is not coarser
# than the level's (a 2 mm template onto a 1 mm subject: the brain-atlas pair's Dice 0.744 ->
# 0.751 at the same time). Where it is coarser than the level's too (thick slices), the
# moving image is interpolated onto the fixed features' spacing and the fixed image blurred
# to its slices, so that both images' descriptors compare neighbours as far apart and
# equally sharp, and the level keeps its spacing. The interpolated moving grid may hold this
# many times the fixed features' voxels; beyond (a large moving field of view onto a small
# fixed one), both images' features are taken at the moving image's spacing there too.
# Before, the moving image's features compared neighbours a slice apart and the fixed
# image's 1 mm apart: a FLAIR in 5 mm slices onto a 1 mm T1n with a known deformation
# (bench_register.py's thick-t2f5-t1n) ended 2.46 mm off with the deformable stage, worse
# than the network alone (2.13); now 1.62 (io 2.55 -> 1.50).
MOVING_GROWTH = 4


def pool(image: torch.Tensor, grid: Grid, factors: Sequence[int]) -> tuple[torch.Tensor, Grid]:
    """Average blocks of ``factors`` voxels (index order; axes shorter than theirs are kept)."""
    factors = [f if n >= f else 1 for f, n in zip(factors, grid.size, strict=True)]
    if all(f == 1 for f in factors):
        return image, grid
    p = F.avg_pool3d if grid.ndim == 3 else F.avg_pool2d
    pooled = p(image, tuple(reversed(factors)))
    size = tuple(n // f for n, f in zip(grid.size, factors, strict=True))
    first = np.append((np.asarray(factors) - 1) / 2.0, 1.0)
    origin = (grid.index_to_physical @ first)[:-1]
    spacing_out = tuple(s * f for s, f in zip(grid.spacing, factors, strict=True))
    return pooled, Grid(size, spacing_out, tuple(float(o) for o in origin), grid.direction)


@dataclass(eq=False)
class Level:
    """Everything an optimiser needs at one spacing; see the module docstring."""

    grid: Grid  # fixed working grid
    fixed: torch.Tensor  # (1, C, *grid.shape) fixed features
    weight: torch.Tensor | None  # (1, 1, *grid.shape) fixed mask, or None
    moving_grid: Grid
    # (*moving_grid.shape, C + 1): features and support, channels last; where the fill
    # pulls (pull), C + 2: the support not eroded before the support
    moving: torch.Tensor
    fill: torch.Tensor | None  # (C,) features where the moving image is absent
    points: torch.Tensor  # (*grid.shape, D) physical points of the working grid
    # (voxels, 1): 1 where, reading beyond the moving image, the fill pulls the points (near
    # the fixed image's own edge, on the deformable pyramid's coarsest level; see :meth:`loss`)
    pull: torch.Tensor | None = None
    recipe: tuple = ()  # what the fixed side was made from (see build_level's ``like``)

    @property
    def ndim(self) -> int:
        return self.grid.ndim

    @property
    def spacing(self) -> tuple[float, ...]:
        return self.grid.spacing

    @property
    def voxels(self) -> int:
        return int(np.prod(self.grid.size))

    @functools.cached_property
    def _rows(self) -> torch.Tensor:
        """Fixed features and weight one voxel per row ``(voxels, C [+ 1])``: a subset of
        voxels is a gather of rows (gathering along the last axis of ``(1, C, voxels)`` took
        ten times longer)."""
        c = self.fixed.shape[1]
        parts = [self.fixed.reshape(c, -1)]
        if self.weight is not None:
            parts.append(self.weight.reshape(1, -1))
        return torch.cat(parts).T.contiguous()

    def sample_index(self, budget: int | None, generator: torch.Generator) -> torch.Tensor | None:
        """Random voxel indices for one stochastic step, or None (all) when the level has no
        more than ``budget`` voxels: stratified, one voxel drawn from each of ``budget``
        equal runs of the flattened grid. Every part of the image is read at every step
        (less gradient noise than independent draws), and the indices come sorted, so the
        gathers that follow read memory in order."""
        if budget is None or self.voxels <= budget:
            return None
        where = torch.rand(budget, generator=generator, dtype=torch.float64)
        where.add_(torch.arange(budget, dtype=torch.float64)).mul_(self.voxels / budget)
        return where.long().clamp_(max=self.voxels - 1).to(self.points.device)

    def sample(self, budget: int | None, generator: torch.Generator) -> Sample | None:
        """The voxels of :meth:`sample_index` (every voxel when the level has no more than
        ``budget``; None for losses that read images, ``budget`` None), each read at a random
        point of its own cell: a random offset of up to half a voxel along each axis (at the
        grid's edge, mirrored back in), the fixed features interpolated there too.

        Reading the fixed features at their voxels only makes a linear interpolation
        artefact: moving features read between voxels are blurred, and a blurred MIND
        descriptor lies closer to any other, so where the two images' voxels line up (one
        grid: a T1 and a T2 of one session) the loss is highest with the images aligned and
        the stages moved them up to half a level voxel apart (the affine stage the aligned
        BraTS contrasts by 0.8-1.1 mm; see docs/benchmarks.md). Read between voxels alike,
        each image is blurred alike wherever the other lies. (Twice the reads: the linear
        stages' last level only; see carctl.registration.pipeline.)"""
        if budget is None:
            return None
        index = self.sample_index(budget, generator)
        if index is None:
            index = torch.arange(self.voxels, device=self.points.device)
        cell = torch.rand(index.shape[0], self.ndim, generator=generator, dtype=torch.float64)
        voxel = self._voxel_indices(index)
        at = voxel + cell.to(self.points).sub_(0.5)
        # beyond the grid's edge the offset is mirrored back in (clamped, those points would
        # lie on the lattice, see carctl.spatial.points)
        outside = (at < 0) | (at > self._last_voxel)
        return Sample(index, torch.where(outside, 2 * voxel - at, at))

    @functools.cached_property
    def _last_voxel(self) -> torch.Tensor:
        return torch.as_tensor([n - 1 for n in self.grid.size]).to(self.points)

    @functools.cached_property
    def _strides(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The strides of (i, j, k) in the flattened grid, and the grid's size."""
        size = torch.as_tensor(self.grid.size, device=self.points.device)
        return torch.cumprod(torch.cat([size.new_ones(1), size[:-1]]), 0), size

    def _voxel_indices(self, index: torch.Tensor) -> torch.Tensor:
        """Whole grid indices ``(P, D)`` (components ``(i, j, k)``) of flat voxel numbers."""
        strides, size = self._strides
        return (index[:, None] // strides % size).to(self.points)

    @functools.cached_property
    def _index_to_physical(self) -> tuple[torch.Tensor, torch.Tensor]:
        matrix = torch.as_tensor(self.grid.index_to_physical).to(self.points)
        return matrix[: self.ndim, : self.ndim], matrix[: self.ndim, self.ndim]

    def points_of(self, index: torch.Tensor | Sample | None) -> torch.Tensor:
        """Physical points ``(P, D)`` where a step reads: every voxel (None), the voxels
        ``index``, or a :class:`Sample`'s points."""
        if isinstance(index, Sample):
            linear, offset = self._index_to_physical
            return index.at @ linear.T + offset
        points = self.points.reshape(-1, self.ndim)
        return points if index is None else points.index_select(0, index)

    def report_index(self, budget: int | None) -> torch.Tensor | None:
        """The voxels on which losses are *reported* (before and after an optimisation, the
        stages' summaries): every voxel for losses that need neighbourhoods (``budget``
        None) or small levels, else a fixed strided subset of about :data:`REPORT_VOXELS`
        (deterministic: it draws no random numbers, so the optimisation does not change)."""
        if budget is None or self.voxels <= REPORT_VOXELS:
            return None
        stride = -(-self.voxels // REPORT_VOXELS)
        return torch.arange(0, self.voxels, stride, device=self.points.device)

    def loss(
        self,
        function: Callable[..., torch.Tensor],
        moving_index: torch.Tensor,
        index: torch.Tensor | Sample | None = None,
        overlap: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """``function(fixed, moving, weight)`` with the moving features read at continuous
        indices of the moving level grid: ``moving_index`` is ``(voxels, D)`` for every voxel
        of the working grid (``index`` None) or ``(P, D)`` for the voxels ``index`` of the
        flattened working grid (or the points of a :class:`Sample`, where the fixed features
        are interpolated); ``(K, voxels | P, D)`` for K mappings at once gives ``(K,)``
        losses, their moving features read in one call (a small step's cost is mostly per
        call: 4 rigid starts read together took half the time of 4 reads).

        The weight of a voxel is the fixed mask times the moving support, or the fixed mask
        alone when the loss compares absent moving voxels with :attr:`fill`. Then, except
        where :attr:`pull` says so (the deformable pyramid's coarsest level, near the fixed
        image's edge), a voxel whose moving support is not whole compares the
        support-weighted mix of its features and the fill, detached: it adds to the loss but
        pulls no point. The edge of the moving field of view is no feature, and stretching
        it over the fixed image lowers nothing (it did: thick clinical stacks registered both
        ways disagreed by 1.2-3.8 mm on average, 1.1-1.5 mm since; see docs/benchmarks.md).

        With ``overlap``, also :meth:`overlap` of the same mappings, from the same reading.
        """
        values = interpolate(self.moving, moving_index.reshape(-1, self.ndim), both_sides=True)
        reference = self._reference(index)
        if moving_index.dim() == 2:
            loss = self._compare(function, values, reference)
        else:
            parts = values.chunk(moving_index.shape[0])
            loss = torch.stack([self._compare(function, v, reference) for v in parts])
        if not overlap:
            return loss
        count = moving_index.shape[0] if moving_index.dim() == 3 else 1
        return loss, _present(values[:, -1], count, reference[1])

    def overlap(
        self, moving_index: torch.Tensor, index: torch.Tensor | Sample | None = None
    ) -> torch.Tensor:
        """The share of the fixed voxels (``index``, or all; weighted by the fixed mask) at
        which the moving image is present, for the mapping(s) ``moving_index`` as in
        :meth:`loss`: ``(K,)``. The losses weigh voxels by this presence, so a mapping that
        leaves the images apart scores nothing: it needs this to tell."""
        count = moving_index.shape[0] if moving_index.dim() == 3 else 1
        support = interpolate(self.moving[..., -1:], moving_index.reshape(-1, self.ndim))
        return _present(support, count, self._reference(index)[1])

    def _reference(self, index: torch.Tensor | Sample | None) -> tuple:
        """The fixed features, weight and :attr:`pull` at ``index`` (None: as images; the
        pull one row per voxel; a :class:`Sample`'s features and weight interpolated at its
        points, the pull of their voxels)."""
        pull = self.pull
        if index is None:
            return self.fixed, self.weight, pull, True
        c = self.fixed.shape[1]
        if isinstance(index, Sample):
            rows = interpolate(self._rows.reshape(*self.grid.shape, -1), index.at).T[None]
            index = index.index  # the voxels, for the pull
        else:
            rows = self._rows.index_select(0, index).T[None]
        pull = None if pull is None else pull.index_select(0, index)
        return rows[:, :c], None if self.weight is None else rows[:, c:], pull, False

    def _compare(
        self, function: Callable[..., torch.Tensor], values: torch.Tensor, reference: tuple
    ) -> torch.Tensor:
        fixed, weight, pull, images = reference
        c = fixed.shape[1]
        features, support = values[:, :c], values[:, -1:]
        if self.fill is not None:
            # where the moving image is (partly) absent its features give way to the fill,
            # a constant that pulls nothing: voxels that read there count in the loss but
            # move no point, so an edge of the moving field of view is never a feature
            mixed = support * features + (1.0 - support) * self.fill
            held = torch.where(support >= 1.0 - _WHOLE, features, mixed.detach())
            if pull is not None:  # except where the fill pulls: up to the edge, a gradient
                whole = values[:, c : c + 1]  # the support not eroded (see build_level)
                held = torch.where(pull > 0, features + (1.0 - whole) * self.fill, held)
            features = held
        if images:  # back to images, for losses that look at neighbourhoods
            shape = self.grid.shape
            features = features.T.reshape(1, c, *shape)
            support = support.T.reshape(1, 1, *shape)
        else:
            features = features.T[None]
            support = support.T[None]
        if self.fill is None:
            weight = support if weight is None else support * weight
        return function(fixed, features, weight)


def foreground(image: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    """Boolean foreground of a normalised ``image``: ``mask`` when given, else bright voxels."""
    return mask > 0 if mask is not None else image > _FOREGROUND


def foreground_box(image: np.ndarray, mask: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """Inclusive index corners ``(i, j, k)`` of :func:`foreground` (the whole image when
    nothing stands out); :func:`build_level` widens it by a margin."""
    select = foreground(image, mask)
    shape = np.asarray(image.shape[::-1])
    if not select.any():
        return np.zeros(len(shape)), shape - 1.0
    low, high = [], []
    for dim in reversed(range(select.ndim)):  # index axis i, j, k: array dimension D-1, ...
        where = np.flatnonzero(select.any(axis=tuple(a for a in range(select.ndim) if a != dim)))
        low.append(float(where[0]))
        high.append(float(where[-1]))
    return np.array(low), np.array(high)


def build_level(
    fixed: np.ndarray,
    fixed_grid: Grid,
    moving: np.ndarray,
    moving_grid: Grid,
    spacing: float,
    features: Callable[[torch.Tensor], torch.Tensor],
    box: tuple[np.ndarray, np.ndarray],
    fixed_mask: np.ndarray | None = None,
    moving_mask: np.ndarray | None = None,
    fills_outside: bool = False,
    device: torch.device | str = "cpu",
    moving_box: tuple[np.ndarray, np.ndarray] | None = None,
    oversample: int = OVERSAMPLE,
    reach: int = 0,
    fill_pulls: bool = False,
    frame: np.ndarray | None = None,
    match_resolution: bool = True,
    like: Level | None = None,
    moving_memo: dict | None = None,
) -> Level:
    """Resample both (normalised) images to ``spacing / oversample`` mm (never finer than
    the fixed image's own voxels; the moving image at the fixed one's spacing, blurring the
    fixed image where the moving one's voxels are coarser, see :data:`MOVING_GROWTH`),
    compute their ``features`` there and average them down to ``spacing``: descriptors of
    the finer structure, compared at the level's spacing.

    The fixed working grid covers ``box`` and the moving one ``moving_box`` (index corners,
    the whole moving image when None), each widened by a margin; beyond them the moving
    image counts as absent. The moving image's support also excludes the voxels within
    ``reach`` voxels (of the features' grid) of its edge or of its working grid's: their
    features read beyond it. Where the support is incomplete, a loss that ``fills_outside``
    compares the constant :attr:`Level.fill` without a gradient (see :meth:`Level.loss`);
    the others compare only where it is whole. With ``fill_pulls`` the fill pulls the points
    near the fixed image's own edge (:data:`PULL_REACH`), which read the moving image up to
    its edge: the support not eroded is kept for them.

    The moving working grid's axes are the fixed grid's, turned by the rotation ``frame``
    (physical, fixed -> moving) when given: MIND-SSC compares neighbours along the grid's
    axes, so where the moving image shows the anatomy turned (by the affine's rotation),
    its descriptors must be taken along the turned axes to mean what the fixed image's do.

    ``like``: a level built from the same fixed image, mask and box (another ``frame``): its
    fixed side (features, grid, weights, points) is taken as it is where it was made the
    same way (grid, features, reach; otherwise built anew). ``moving_memo``: the moving
    image's ``memo`` for :func:`resample_band_limited` (levels of one spacing along many
    frames blur it once)."""
    f_box = widened(box, fixed_grid)
    m_box = None if moving_box is None else widened(moving_box, moving_grid)
    steps = axis_spacing(spacing, fixed_grid, f_box, moving_grid, m_box)
    direction = fixed_grid.direction_matrix
    if frame is not None:  # the fixed axes as the moving image shows them (see the docstring)
        direction = frame @ direction
    # on both images' own voxels where those are near (see own_if_near) and the same in both
    # (otherwise both are resampled, and their descriptors compare neighbours as far apart)
    want = steps / oversample
    m_own = own_along(moving_grid, direction)
    # axes along which the moving image's voxels are coarser than the features' spacing: up
    # to the level's spacing both images' features are taken at the moving image's; beyond
    # it (thick slices) see MOVING_GROWTH
    # (without ``match_resolution``, each image's features on its own voxels where coarser)
    coarser = (m_own > want * (1 + NEAR_OWN)) & match_resolution
    thick = coarser & (m_own > steps * (1 + NEAR_OWN))
    want = np.where(coarser & ~thick, m_own, want)
    same = np.isclose(fixed_grid.spacing, m_own, rtol=_SAME_SPACING)
    fine = fixed_level_grid(fixed_grid, np.where(same, own_if_near(want, fixed_grid), want), f_box)
    m_spacing = np.asarray(fine.spacing)
    m_spacing = m_spacing if match_resolution else np.maximum(m_spacing, m_own)
    m_fine = moving_level_grid(moving_grid, direction, m_spacing, m_box)
    resolution = np.where(thick, m_own, 0.0)
    if thick.any() and math.prod(m_fine.size) > MOVING_GROWTH * math.prod(fine.size):
        fine = fixed_level_grid(fixed_grid, np.maximum(want, m_own), f_box)
        m_fine = moving_level_grid(moving_grid, direction, np.asarray(fine.spacing), m_box)
        resolution = None

    def band_limited(
        array: np.ndarray, source: Grid, target: Grid, resolution: np.ndarray | None = None
    ) -> torch.Tensor:
        return resample_band_limited(
            array, source, target, device=device, per_axis=True, resolution=resolution
        )

    def factors(grid: Grid) -> list[int]:  # block sizes that bring `grid` to the level spacing
        return [max(1, round(max(s, t) / s)) for s, t in zip(grid.spacing, steps, strict=True)]

    f_factors, m_factors = factors(fine), factors(m_fine)
    fill_pulls = fills_outside and fill_pulls

    def fixed_side() -> tuple:
        """The fixed features and their grid, weight, pull and points."""
        f_features, grid = pool(
            features(band_limited(fixed, fixed_grid, fine, resolution)), fine, f_factors
        )
        weight = None
        if reach:
            # the fixed image's own edge: its descriptors there read beyond it too
            edge = interior(fixed_grid, fine, reach, beyond=1.0)
            if float(edge.min()) < 1.0:
                weight, _ = pool(edge.to(device), fine, f_factors)
        if fixed_mask is not None:
            mask, _ = pool(band_limited(fixed_mask > 0, fixed_grid, fine), fine, f_factors)
            weight = mask if weight is None else weight * mask
        pull = None
        if fill_pulls:
            band = PULL_REACH * float(np.max(grid.spacing))  # mm
            near = edge_distance(fixed_grid, grid) <= band
            pull = near.reshape(-1, 1).to(device, torch.float32)
        return f_features, grid, weight, pull, grid.points(dtype=torch.float32, device=device)

    # what the fixed side is made from (the moving image's voxels along a turned frame can
    # change its grid): ``like``'s is taken only where it is the same
    resolved = None if resolution is None else tuple(resolution)
    recipe = (fine, tuple(f_factors), resolved, features, reach, fill_pulls)
    if like is not None and like.recipe == recipe:
        f_features, grid, weight, pull, points = (
            like.fixed,
            like.grid,
            like.weight,
            like.pull,
            like.points,
        )
    else:
        f_features, grid, weight, pull, points = fixed_side()
    m_features = features(
        resample_band_limited(
            moving, moving_grid, m_fine, device=device, per_axis=True, memo=moving_memo
        )
    )
    m_features, m_grid = pool(m_features, m_fine, m_factors)
    # the support: eroded by the reach where there is one; where the fill pulls, the points
    # read the moving image up to its edge: the support not eroded is kept for them too
    whole = None  # how much of each voxel lies in the moving image
    if fill_pulls or not reach or fills_outside:
        whole = inside(moving_grid, m_grid).to(device)
    supports = []
    if fill_pulls or not reach:
        supports.append(whole)
    if reach:
        supports.append(pool(interior(moving_grid, m_fine, reach).to(device), m_fine, m_factors)[0])
    if moving_mask is not None:
        mask, _ = pool(band_limited(moving_mask > 0, moving_grid, m_fine), m_fine, m_factors)
        supports = [support * mask for support in supports]
    fill = None
    if fills_outside:
        # the moving image's mean descriptor: a turned working grid's corners lie beyond the
        # image (descriptors of nothing), and with a moving mask the fill stands for most of
        # the fixed image (SPM T2 onto T1 turned by 20 degrees, the brain as moving mask,
        # `auto`, seeds 0-2: 1.36 / 1.19 / 1.39 mm without them, about 2.5 with them, 1.67 /
        # 1.75 / 1.77 with the features unturned)
        axes = tuple(range(2, m_features.dim()))
        fill = ((m_features * whole).sum(dim=axes) / whole.sum().clamp_min(1e-6))[0]
    table = torch.cat([m_features, *supports], dim=1)[0].movedim(0, -1).contiguous()
    return Level(
        grid=grid,
        fixed=f_features,
        weight=weight,
        moving_grid=m_grid,
        moving=table,
        fill=fill,
        points=points,
        pull=pull,
        recipe=recipe,
    )


def _present(support: torch.Tensor, count: int, weight: torch.Tensor | None) -> torch.Tensor:
    """The mean moving ``support`` read for each of ``count`` mappings (its points in
    order), weighted by the fixed ``weight`` at those points (None: all alike): ``(count,)``."""
    support = support.reshape(count, -1)
    if weight is None:
        return support.mean(dim=1)
    weight = weight.reshape(1, -1)
    return (support * weight).sum(dim=1) / weight.sum().clamp_min(1e-8)


def edge_distance(image: Grid, grid: Grid) -> torch.Tensor:
    """The distance (mm) from each point of ``grid`` to the nearest face of ``image``'s field
    of view (its first and last voxels' planes; axes of one voxel have none): ``grid.shape``,
    inf where ``image`` has no face."""
    index = grid.map_indices(image.physical_to_index @ grid.index_to_physical, torch.float64)
    size = torch.as_tensor(image.size, dtype=torch.float64)
    spacing = torch.as_tensor(image.spacing, dtype=torch.float64)
    to_face = torch.minimum(index, size - 1 - index).abs() * spacing
    to_face = torch.where(size > 1, to_face, torch.full_like(to_face, float("inf")))
    return to_face.amin(dim=-1)


def eroded(weight: torch.Tensor, reach: int, beyond: float = 0.0) -> torch.Tensor:
    """``weight`` ``(1, 1, *spatial)`` eroded by ``reach`` voxels: the minimum over each
    voxel's ``2 reach + 1`` neighbourhood, ``beyond`` beyond the grid (0: the grid's own
    edge erodes too). Axes of at most ``4 reach`` voxels (thin stacks) are not eroded: that
    would leave little or nothing."""
    steps = [reach if n > 4 * reach else 0 for n in weight.shape[2:]]  # tensor order
    padded = F.pad(weight, [p for r in reversed(steps) for p in (r, r)], value=beyond)
    # one axis at a time, as the minimum of shifted views: a box's minimum is the minimum
    # along each axis in turn (torch's max pooling read the whole box per voxel, 125 values
    # for a reach of 2, and took 0.16 s on a 1 M-voxel grid; this 0.01 s)
    out = padded
    for axis, r in enumerate(steps):
        if r:
            dim, n = 2 + axis, out.shape[2 + axis] - 2 * r
            low = out.narrow(dim, 0, n).clone()
            for k in range(1, 2 * r + 1):
                torch.minimum(low, out.narrow(dim, k, n), out=low)
            out = low
    return out


def resample_band_limited(
    array: np.ndarray,
    source: Grid,
    target: Grid,
    transforms: Sequence[Transform] = (),
    device: torch.device | str = "cpu",
    per_axis: bool = False,
    resolution: np.ndarray | None = None,
    memo: dict | None = None,
) -> torch.Tensor:
    """``array`` (on ``source``) blurred for ``target``'s finest spacing (with ``per_axis``,
    without ``transforms``: for its spacing along each of the source's axes, or for
    ``resolution`` (mm, per source axis) where that is coarser), then resampled onto
    ``target`` through ``transforms`` (see :func:`warp`): ``(1, 1, *target.shape)``
    float32.

    ``memo``: a dict the caller keeps for this ``array`` and ``source`` alone, when it
    resamples them onto many targets of one spacing (``--search wide``'s turned levels): the
    image blurred for a spacing is kept there whole and each target crops it, instead of
    cropping first and blurring each crop (the same values where the target reads: the crop
    keeps the blur's reach)."""
    if per_axis and not transforms:
        step = _spacing_along(source, target)
        if resolution is not None:
            step = np.maximum(step, resolution)
    else:
        step = float(np.min(target.spacing))
    key = (tuple(np.broadcast_to(step, (source.ndim,)).tolist()), str(device))
    if memo is not None and key in memo:
        t, source, sigma = memo[key]
    else:
        t = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))[None, None]
        t, source = reduce(t.to(device), source, step)
        sigma = smoothing_sigma(source.spacing, step)
        if memo is not None:
            t = gaussian_blur(t, sigma)
            memo[key] = (t, source, sigma)
    t, source = _crop_to_target(t, source, target, transforms, math.ceil(3 * max(sigma)) + 2)
    if memo is None:
        t = gaussian_blur(t, sigma)
    lattice = None if transforms else _sublattice(source, target)
    return t[lattice].contiguous() if lattice is not None else warp(t, source, target, transforms)


def _spacing_along(source: Grid, target: Grid) -> np.ndarray:
    """``target``'s spacing along each axis of ``source`` (the one of its axes parallel to
    it; its finest where none is), the spacing to band-limit ``source`` for."""
    cosines = np.abs(source.direction_matrix.T @ target.direction_matrix)  # source x target
    nearest = cosines.argmax(axis=1)
    parallel = cosines.max(axis=1) > 1 - 1e-6
    spacing = np.asarray(target.spacing)
    return np.where(parallel, spacing[nearest], spacing.min())


def _sublattice(source: Grid, target: Grid) -> tuple[slice, ...] | None:
    """Slices of a ``(N, C, *source.shape)`` tensor that give ``target`` when every voxel of
    ``target`` is a voxel of ``source`` (same axes, whole-voxel steps and offset, inside it),
    else None. Resampling there interpolates nothing: slicing gives the same values (up to
    rounding) without computing a coordinate per voxel."""
    d = source.ndim
    matrix = source.physical_to_index @ target.index_to_physical  # target -> source index
    scale, shift = matrix[:d, :d], matrix[:d, d]
    step = np.rint(np.diag(scale))
    if np.abs(scale - np.diag(step)).max() > 1e-6 or np.abs(shift - np.rint(shift)).max() > 1e-4:
        return None
    first = np.rint(shift).astype(int)
    last = first + step.astype(int) * (np.asarray(target.size) - 1)
    if np.any(step < 1) or np.any(first < 0) or np.any(last > np.asarray(source.size) - 1):
        return None
    axes = [slice(int(a), int(b) + 1, int(k)) for a, b, k in zip(first, last, step, strict=True)]
    return (slice(None), slice(None), *reversed(axes))


def _crop_to_target(
    image: torch.Tensor,
    source: Grid,
    target: Grid,
    transforms: Sequence[Transform],
    margin: int,
) -> tuple[torch.Tensor, Grid]:
    """``image`` on ``source`` cropped to the voxels that resampling onto ``target`` through
    affine ``transforms`` can read, plus ``margin`` voxels (the blur's reach and linear
    interpolation's neighbour): what is blurred and sampled there is unchanged, and a brain's
    working grid no longer pays for blurring the whole field of view. Chains with a
    displacement field are not cropped (the box of the target's corners does not bound them).
    """
    from carctl.spatial.transform import Affine

    if any(not isinstance(t, Affine) for t in transforms):
        return image, source
    d = target.ndim
    points = torch.from_numpy(_corners(target, np.zeros(d), np.asarray(target.size) - 1.0))
    for transform in transforms:
        points = transform.to("cpu").transform_points(points)
    index = source.to_index(points).numpy()
    upper = np.asarray(source.size) - 1
    low = np.clip(np.floor(index.min(axis=0)) - margin, 0, upper).astype(int)
    high = np.clip(np.ceil(index.max(axis=0)) + margin, 0, upper).astype(int)
    if np.any(index.max(axis=0) < -margin) or np.any(index.min(axis=0) > upper + margin):
        return image, source  # the target lies beside the image: nothing to save
    if np.all(low == 0) and np.all(high == upper):
        return image, source
    slices = [slice(None), slice(None)] + [
        slice(int(a), int(b) + 1) for a, b in zip(reversed(low), reversed(high), strict=True)
    ]
    origin = (source.index_to_physical @ np.append(low, 1.0))[:d]
    cropped = Grid(
        tuple(int(n) for n in high - low + 1),
        source.spacing,
        tuple(float(o) for o in origin),
        source.direction,
    )
    return image[tuple(slices)].contiguous(), cropped


def inside(image: Grid, grid: Grid) -> torch.Tensor:
    """How much of each voxel of ``grid`` lies in ``image`` ``(1, 1, *grid.shape)``: 1 inside,
    falling linearly to 0 one voxel beyond the edge (what linear interpolation of ones with
    zeros outside gives)."""
    profiles = _inside_profiles(image, grid)
    if profiles is not None:
        return _outer(profiles)
    # turned axes: each index of ``image`` is an affine function of ``grid``'s index, a sum
    # of one term per axis broadcast (no point per voxel: a 1 mm brain's level turned by 20
    # degrees, 6.7 M voxels, 0.73 -> 0.25 s)
    d = grid.ndim
    matrix = image.physical_to_index @ grid.index_to_physical
    steps = [torch.arange(n, dtype=torch.float64) for n in grid.size]  # index order
    out = None
    for axis in range(d):
        index = torch.full((1,) * d, float(matrix[axis, d]), dtype=torch.float64)
        for along, step in enumerate(steps):
            view = [1] * d
            view[d - 1 - along] = -1  # index axis i, j, k is tensor dimension D-1, ...
            index = index + (matrix[axis, along] * step).view(view)
        beyond = torch.maximum(index.neg(), index.sub_(image.size[axis] - 1)).clamp_min_(0.0)
        factor = beyond.neg_().add_(1.0).clamp_min_(0.0)
        out = factor if out is None else out.mul_(factor)
    return out.float()[None, None]


def interior(image: Grid, grid: Grid, reach: int, beyond: float = 0.0) -> torch.Tensor:
    """``eroded(inside(image, grid), reach, beyond)``: with ``beyond`` 0 ``grid``'s own edge
    erodes too, with 1 only ``image``'s (see :func:`eroded`)."""
    profiles = _inside_profiles(image, grid)
    if profiles is None:
        return eroded(inside(image, grid), reach, beyond)
    # a product of non-negative factors, one per axis: its minimum over a box is the
    # product of theirs, so each axis erodes alone (a 1 mm brain's grid: 0.6 s -> 1 ms)
    return _outer([eroded(p.view(1, 1, -1), reach, beyond).view(-1) for p in profiles])


def _inside_profiles(image: Grid, grid: Grid) -> list[torch.Tensor] | None:
    """:func:`inside`'s factor along each index axis of ``grid`` (``(size,)`` float64) when
    ``grid``'s axes are ``image``'s (an index of one maps to the other along the same axis,
    as for working grids cut from an image), else None. Building ``inside`` from them
    avoids a point per voxel (a 1 mm brain's grid: 0.5 s)."""
    d = grid.ndim
    matrix = image.physical_to_index @ grid.index_to_physical
    linear = matrix[:d, :d]
    if np.abs(linear - np.diag(np.diag(linear))).max() > 1e-9 * np.abs(linear).max():
        return None
    profiles = []
    for axis in range(d):
        index = torch.arange(grid.size[axis], dtype=torch.float64) * linear[axis, axis]
        index = index + matrix[axis, d]
        beyond = torch.maximum(-index, index - (image.size[axis] - 1)).clamp_min(0.0)
        profiles.append((1.0 - beyond).clamp_min(0.0))
    return profiles


def _outer(profiles: list[torch.Tensor]) -> torch.Tensor:
    """The product of per-axis factors (index order) as ``(1, 1, *shape)`` float32."""
    d = len(profiles)
    out = torch.ones((1,) * d, dtype=torch.float64)
    for axis, p in enumerate(profiles):
        view = [1] * d
        view[d - 1 - axis] = -1  # index axis i, j, k is tensor dimension D-1, ...
        out = out * p.view(view)
    return out.float()[None, None]


def widened(box: tuple[np.ndarray, np.ndarray], grid: Grid) -> tuple[np.ndarray, np.ndarray]:
    """An index ``box`` of ``grid`` widened by the margin (mm or fraction) to whole voxels,
    kept inside."""
    low, high = (np.asarray(b, float) for b in box)
    spacing = np.asarray(grid.spacing)
    margin = np.maximum(_MARGIN_MM / spacing, _MARGIN_FRACTION * (high - low))
    upper = np.asarray(grid.size, float) - 1
    # whole voxels: at the image's own spacing a working grid anchored on the box's first
    # voxel is then a part of the image itself (see _resampled_grid)
    return np.clip(np.floor(low - margin), 0, upper), np.clip(np.ceil(high + margin), 0, upper)
