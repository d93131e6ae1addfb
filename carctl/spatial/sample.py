"""Sampling an image at physical points, and warping it onto another grid.

Every sampler follows ITK's rules (see :mod:`carctl.spatial.grid`), so that carctl, SimpleITK
and antsApplyTransforms read the same values: a point outside the image gets ``fill``; a point
within half a voxel of the border reads the border voxels.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from carctl.spatial.grid import Grid, slabs

if TYPE_CHECKING:
    from carctl.spatial.transform import DisplacementField, Transform

# Points are processed in chunks of this many by the samplers that gather voxels explicitly,
# so that memory stays bounded on large grids.
_CHUNK = 1 << 20
# warp() maps and samples the fixed grid in slabs of about this many voxels.
_SLAB_VOXELS = 1 << 22

# grid_sample() splits a single image's points over the CPU threads from this many points.
_THREADED_POINTS = 1 << 16

# Cubic B-spline prefilter: pole of the recursive filter, and the number of terms of its
# truncated initial sum (|pole|**16 < 1e-9).
_BSPLINE_POLE = float(np.sqrt(3.0) - 2.0)
_BSPLINE_TAPS = 16


@dataclass(frozen=True)
class Interpolator:
    """One interpolation: ``prepare`` runs once per image (a type change, the B-spline
    prefilter), ``read`` for every batch of points: (prepared, grid, index (P, D)) -> (N, C, P).
    """

    prepare: Callable[[torch.Tensor], torch.Tensor]
    read: Callable[[torch.Tensor, Grid, torch.Tensor], torch.Tensor]
    keeps_type: bool = False  # returns voxels of the image: give them the image's type back

    def finish(self, values: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        return values.to(image.dtype) if self.keeps_type else values


def _interpolator(mode: str) -> Interpolator:
    try:
        return INTERPOLATORS[mode]
    except KeyError:
        choices = sorted(INTERPOLATORS)
        raise ValueError(f"unknown interpolation {mode!r}; choose from {choices}") from None


def sample(
    image: torch.Tensor,
    grid: Grid,
    points: torch.Tensor,
    mode: str = "linear",
    fill: float = 0.0,
) -> torch.Tensor:
    """Values of ``image`` at physical ``points``.

    Args:
        image: ``(N, C, *grid.shape)`` tensor.
        grid: where ``image`` lies in physical space.
        points: ``(..., D)`` physical points (LPS mm).
        mode: one of :data:`INTERPOLATORS`.
        fill: value of points outside the image.

    Returns:
        ``(N, C, ...)`` tensor: ``float`` for ``linear`` and ``bspline``, the image's dtype for
        ``nearest`` and ``label``.
    """
    interpolator = _interpolator(mode)
    _check_image(image, grid)
    values = _read(interpolator.prepare(image), grid, points, interpolator.read, fill)
    return interpolator.finish(values, image)


def _check_image(image: torch.Tensor, grid: Grid) -> None:
    if image.dim() != grid.ndim + 2 or tuple(image.shape[2:]) != grid.shape:
        raise ValueError(
            f"image of shape {tuple(image.shape)} does not match a (N, C, {grid.shape}) grid"
        )


def _read(
    prepared: torch.Tensor,
    grid: Grid,
    points: torch.Tensor,
    read: Callable[[torch.Tensor, Grid, torch.Tensor], torch.Tensor],
    fill: float,
) -> torch.Tensor:
    if points.shape[-1] != grid.ndim:
        raise ValueError(f"points have {points.shape[-1]} components, the grid {grid.ndim}")
    out_shape = points.shape[:-1]
    index = grid.to_index(points.reshape(-1, grid.ndim))
    values = read(prepared, grid, index)
    inside = grid.contains_index(index)
    fill_value = torch.tensor(fill, dtype=torch.float64, device=values.device).to(values.dtype)
    values = torch.where(inside, values, fill_value)
    return values.reshape(*values.shape[:2], *out_shape)


def warp(
    image: torch.Tensor,
    moving_grid: Grid,
    fixed_grid: Grid,
    transforms: Sequence[Transform] = (),
    mode: str = "linear",
    fill: float = 0.0,
    slab_voxels: int = _SLAB_VOXELS,
) -> torch.Tensor:
    """Resample ``image`` (on ``moving_grid``) onto ``fixed_grid`` through ``transforms``.

    Each fixed-grid point ``x`` is mapped through the pull-back chain (``transforms[0]``
    first, as ``antsApplyTransforms -t T0 -t T1 ...``) into physical moving space, where the
    image is sampled. With no transforms this resamples through the scanner headers. The fixed
    grid is processed in slabs of about ``slab_voxels`` voxels, which bounds memory.
    """
    from carctl.spatial.transform import map_grid

    if mode == "bspline" and image.is_floating_point() and not bool(image.isfinite().all()):
        # the B-spline prefilter spreads one NaN over the whole image (as ITK's does): read
        # the finite voxels (the others as 0), and NaN only where linear reading would
        holes = (~image.isfinite()).to(torch.float32)
        values = warp(
            image.nan_to_num(0.0, 0.0, 0.0),
            moving_grid,
            fixed_grid,
            transforms,
            mode,
            fill,
            slab_voxels,
        )
        touched = warp(holes, moving_grid, fixed_grid, transforms, "linear", 0.0, slab_voxels)
        return values.masked_fill(touched > 0, float("nan"))
    interpolator = _interpolator(mode)
    _check_image(image, moving_grid)
    prepared = interpolator.prepare(image)
    # Single precision is ample for linear interpolation (3e-5 mm at 500 mm from the origin);
    # the other modes round or weigh indices, where ties must break as in ITK's double maths.
    linear = mode == "linear" and prepared.dtype == torch.float32
    dtype = torch.float32 if linear else torch.float64
    chain = [transform.to(image.device) for transform in transforms]  # once, not per slab
    direct = linear and (not chain or _one_field_on(chain, fixed_grid))
    out = None  # each slab is copied into the output as soon as it is read (no list of
    # slabs and their concatenation: half the peak memory of a large image's resampling)
    for planes in slabs(fixed_grid.shape, slab_voxels):
        if direct:
            field = chain[0] if chain else None
            values = _linear_direct(prepared, moving_grid, fixed_grid, field, planes, fill)
        else:
            points = map_grid(fixed_grid, chain, dtype=dtype, device=image.device, planes=planes)
            values = _read(prepared, moving_grid, points, interpolator.read, fill)
        if out is None:
            shape = (*values.shape[:2], *fixed_grid.shape)
            out = torch.empty(shape, dtype=values.dtype, device=values.device)
        out[:, :, planes[0] : planes[1]] = values
    return interpolator.finish(out, image)


def _one_field_on(chain: Sequence[Transform], grid: Grid) -> bool:
    from carctl.spatial.transform import DisplacementField

    return (
        len(chain) == 1
        and isinstance(chain[0], DisplacementField)
        and chain[0].data.dtype == torch.float32
        and chain[0].grid.same_as(grid)
    )


def _linear_direct(
    image: torch.Tensor,
    moving_grid: Grid,
    fixed_grid: Grid,
    field: DisplacementField | None,
    planes: tuple[int, int],
    fill: float,
) -> torch.Tensor:
    """:func:`warp`'s linear case through the headers alone or one float32 displacement field
    on the fixed grid, for the index planes ``planes``: the same values (to float32 rounding),
    with ``grid_sample``'s coordinates made in two steps instead of four (the fixed voxels'
    own coordinates in one broadcast sum of rows, the field's vectors through one D x N
    matrix product) and the inside test done on them (a 1 mm brain: 0.43 -> 0.31 s). A zero
    field reads exactly what the headers alone read."""
    d = moving_grid.ndim
    start, stop = planes
    slab = fixed_grid.slab(start, stop)
    # physical -> grid_sample's coordinates of the moving grid
    to_normalised = moving_grid.index_to_normalised_matrix @ moving_grid.physical_to_index
    coords = slab.map_indices(to_normalised @ slab.index_to_physical, torch.float32, image.device)
    coords = coords.reshape(-1, d)
    if field is not None:
        vectors = field.data[:, start:stop].reshape(d, -1)
        linear = torch.as_tensor(to_normalised[:d, :d], dtype=torch.float32, device=image.device)
        coords.add_((linear @ vectors).T)
    inside = moving_grid.contains_normalised(coords)
    values = _at_normalised(image, coords)
    fill_value = torch.tensor(fill, dtype=values.dtype, device=values.device)
    return torch.where(inside, values, fill_value).reshape(*image.shape[:2], *slab.shape)


# --- interpolations: prepare(image) once, then read(prepared, grid, index (P, D)) -> (N, C, P)


def _as_float(image: torch.Tensor) -> torch.Tensor:
    return image if image.is_floating_point() else image.to(torch.float32)


# Label types voted on as they are; the others are widened (exactly) to the type given, which
# torch's CPU gathers and comparisons all support. An int64 copy of a 512 x 512 x 400 uint8
# label map was 840 MB and made its gathers four times slower.
_LABEL_TYPES = {
    torch.uint16: torch.int32,
    torch.uint32: torch.int64,
    torch.uint64: torch.int64,
    torch.float16: torch.float32,
    torch.bfloat16: torch.float32,
}


def _as_label(image: torch.Tensor) -> torch.Tensor:
    return image.to(_LABEL_TYPES.get(image.dtype, image.dtype))


def _unchanged(image: torch.Tensor) -> torch.Tensor:
    return image


def grid_sample(image: torch.Tensor, coords: torch.Tensor, **options) -> torch.Tensor:
    """``F.grid_sample(image, coords, **options)``, the points of a single image spread over
    the CPU threads: torch's CPU kernel runs one thread per batch entry, so a one-image call
    used one core. The points are split into one batch entry per thread (the image is
    expanded, not copied); the values are the same (a 1 mm brain: 0.53 -> 0.28 s on 2 cores)."""
    threads = torch.get_num_threads()
    shape = coords.shape[1:-1]
    points = shape.numel()
    single = image.shape[0] == 1 and image.device.type == "cpu"
    if not single or threads < 2 or points < _THREADED_POINTS:
        return F.grid_sample(image, coords, **options)
    d, c = coords.shape[-1], image.shape[1]
    per = -(-points // threads)
    flat = F.pad(coords.reshape(points, d), (0, 0, 0, per * threads - points))
    view = (threads, *([1] * (d - 1)), per, d)
    out = F.grid_sample(image.expand(threads, *image.shape[1:]), flat.reshape(view), **options)
    out = out.reshape(threads, c, per).transpose(0, 1).reshape(c, -1)[:, :points]
    return out.reshape(1, c, *shape)


def _sample_linear(image: torch.Tensor, grid: Grid, index: torch.Tensor) -> torch.Tensor:
    return _at_normalised(image, grid.index_to_normalised(index.to(image.dtype)))


def _at_normalised(image: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
    """``image`` ``(N, C, *shape)`` linearly interpolated at ``grid_sample`` coordinates
    ``(P, D)``, the border repeated: ``(N, C, P)``."""
    n, c = image.shape[:2]
    d = coords.shape[-1]
    view = (1,) * (d - 1) + (-1, d)
    coords = coords.reshape(1, *view).expand(n, *view)
    out = grid_sample(image, coords, mode="bilinear", padding_mode="border", align_corners=True)
    return out.reshape(n, c, -1)


def _strides(grid: Grid) -> list[int]:
    """Flat-array stride of each index component (i, j, k)."""
    return [int(np.prod(grid.size[:d])) for d in range(grid.ndim)]


def _gather(image: torch.Tensor, flat: torch.Tensor) -> torch.Tensor:
    """``image`` (N, C, *shape) at flat voxel indices ``flat`` (...) -> (N, C, ...)."""
    n, c = image.shape[:2]
    # index_select, not advanced indexing: three times faster on a large label map
    values = image.reshape(n * c, -1).index_select(1, flat.reshape(-1))
    return values.reshape(n, c, *flat.shape)


def _sample_nearest(image: torch.Tensor, grid: Grid, index: torch.Tensor) -> torch.Tensor:
    # ITK rounds half-way cases up (floor(x + 0.5)); torch's nearest mode rounds them to even.
    flat = torch.zeros(index.shape[0], dtype=torch.long, device=index.device)
    for d, stride in enumerate(_strides(grid)):
        i = torch.floor(index[:, d] + 0.5).long().clamp_(0, grid.size[d] - 1)
        flat += i * stride
    return _gather(image, flat)


def _chunked(fn: Callable[[torch.Tensor], torch.Tensor], index: torch.Tensor) -> torch.Tensor:
    return torch.cat([fn(part) for part in torch.split(index, _CHUNK)], dim=-1)


def _sample_label(image: torch.Tensor, grid: Grid, index: torch.Tensor) -> torch.Tensor:
    """Label-aware interpolation: the label with the largest summed linear weight.

    Equivalent to linearly interpolating each label's indicator and taking the arg-max (ANTs'
    ``GenericLabel``), computed from the 2**D neighbours only, so the cost does not grow with
    the number of labels.
    """
    strides = _strides(grid)

    def one_chunk(idx: torch.Tensor) -> torch.Tensor:
        base = torch.floor(idx)
        frac = (idx - base).to(torch.float32)
        base = base.long()
        # Per axis: strided voxel offsets and weights of the lower (0) and upper (1) neighbour.
        offsets, axis_weights = [], []
        for d in range(grid.ndim):
            lower = base[:, d].clamp(0, grid.size[d] - 1) * strides[d]
            upper = (base[:, d] + 1).clamp(0, grid.size[d] - 1) * strides[d]
            offsets.append((lower, upper))
            axis_weights.append((1.0 - frac[:, d], frac[:, d]))
        labels, weights = [], []
        for corner in range(2**grid.ndim):
            bits = [(corner >> d) & 1 for d in range(grid.ndim)]
            flat = offsets[0][bits[0]]
            weight = axis_weights[0][bits[0]]
            for d in range(1, grid.ndim):
                flat = flat + offsets[d][bits[d]]
                weight = weight * axis_weights[d][bits[d]]
            labels.append(_gather(image, flat))
            weights.append(weight)
        labels_t = torch.stack(labels)  # (K, N, C, P)
        n, c = labels_t.shape[1:3]
        weights_t = torch.stack(weights)[:, None, None, :].expand(-1, n, c, -1)
        flat_labels = labels_t.reshape(len(labels), -1)  # (K, M)
        result = flat_labels[0].clone()
        # Most points lie inside one label: only those whose neighbours differ need a vote.
        mixed = (flat_labels != flat_labels[0]).any(dim=0).nonzero().squeeze(1)
        if mixed.numel():
            lab = flat_labels[:, mixed]
            w = weights_t.reshape(len(weights), -1)[:, mixed]
            votes = ((lab[:, None] == lab[None, :]) * w[None, :]).sum(dim=1)  # (K, m)
            # a tie goes to the smallest label, as in ANTs (whose labels vote in ascending
            # order, a later one winning only with more): the first corner's won before, so
            # the answer depended on the file's axis order (5 % of voxels off a half-voxel
            # shift)
            best = votes.max(dim=0, keepdim=True).values
            result[mixed] = torch.where(votes == best, lab, lab.max()).min(dim=0).values
        return result.reshape(n, c, -1)

    return _chunked(one_chunk, index)


def bspline_coefficients(image: torch.Tensor) -> torch.Tensor:
    """Cubic B-spline coefficients of ``image`` (N, C, *shape), mirror boundary (as ITK).

    The exact recursive filter (Unser's causal + anti-causal pair), run along each axis in
    double precision.
    """
    z = _BSPLINE_POLE
    coefficients = image.to(torch.float64)
    for axis in range(2, image.dim()):
        n = coefficients.shape[axis]
        if n == 1:
            continue
        s = coefficients.movedim(axis, 0)
        causal = torch.empty_like(s)
        if n > _BSPLINE_TAPS:  # truncated sum; |z|**16 < 1e-9
            powers = z ** torch.arange(_BSPLINE_TAPS, dtype=torch.float64, device=s.device)
            causal[0] = torch.tensordot(powers, s[:_BSPLINE_TAPS], dims=1)
        else:  # exact sum over the mirrored signal
            k = torch.arange(n, dtype=torch.float64, device=s.device)
            powers = z**k + torch.where((k > 0) & (k < n - 1), z ** (2 * n - 2 - k), 0.0)
            causal[0] = torch.tensordot(powers, s, dims=1) / (1.0 - z ** (2 * n - 2))
        # each step written in place (the same operations, without a temporary and a copy
        # per slice: a third less memory traffic)
        for k in range(1, n):
            torch.mul(causal[k - 1], z, out=causal[k]).add_(s[k])
        anti = torch.empty_like(s)
        anti[n - 1] = (z / (z * z - 1.0)) * (causal[n - 1] + z * causal[n - 2])
        for k in range(n - 2, -1, -1):
            torch.sub(anti[k + 1], causal[k], out=anti[k]).mul_(z)
        del causal
        coefficients = anti.mul_(6.0).movedim(0, axis)
    return coefficients


def _mirror(i: torch.Tensor, n: int) -> torch.Tensor:
    """Whole-sample mirror of indices into ``[0, n)``: ..., 2, 1, 0, 1, 2, ..., n-1, n-2, ..."""
    if n == 1:
        return torch.zeros_like(i)
    period = 2 * (n - 1)
    i = torch.remainder(i, period)
    return torch.where(i >= n, period - i, i)


def _padded_bspline_coefficients(image: torch.Tensor) -> torch.Tensor:
    """B-spline coefficients mirror-padded by two voxels: every tap of an inside point."""
    dtype = torch.float64 if image.dtype == torch.float64 else torch.float32
    coefficients = bspline_coefficients(image).to(dtype)
    for axis in range(2, image.dim()):
        n = coefficients.shape[axis]
        taps = torch.arange(-2, n + 2, device=coefficients.device)
        coefficients = coefficients.index_select(axis, _mirror(taps, n))
    return coefficients


def _sample_bspline(coefficients: torch.Tensor, grid: Grid, index: torch.Tensor) -> torch.Tensor:
    """Cubic B-spline interpolation from 2**D linear fetches of padded coefficients.

    Along each axis the four cubic weights ``w0..w3`` at taps ``i-1..i+2`` are regrouped as
    ``(w0 + w1)`` times a linear fetch between taps ``i-1`` and ``i`` plus ``(w2 + w3)`` times
    one between ``i+1`` and ``i+2`` (the "fast third-order texture filtering" identity), so
    ``grid_sample`` does the gathering.
    """
    dtype = coefficients.dtype
    padded = Grid(
        tuple(s + 4 for s in grid.size),
        (1.0,) * grid.ndim,
        (0.0,) * grid.ndim,
        tuple(np.eye(grid.ndim).ravel()),
    )
    idx = index.to(dtype)
    base = torch.floor(idx)
    t = idx - base
    w0, w1, w3 = (1 - t) ** 3 / 6, (3 * t**3 - 6 * t**2 + 4) / 6, t**3 / 6
    w2 = 1 - w0 - w1 - w3
    groups = ((w0 + w1, base - 1 + w1 / (w0 + w1)), (w2 + w3, base + 1 + w3 / (w2 + w3)))
    out = torch.zeros(*coefficients.shape[:2], idx.shape[0], dtype=dtype, device=idx.device)
    for corner in range(2**grid.ndim):
        bits = [(corner >> d) & 1 for d in range(grid.ndim)]
        weight = torch.ones(idx.shape[0], dtype=dtype, device=idx.device)
        position = torch.empty_like(idx)
        for d, bit in enumerate(bits):
            g, h = groups[bit]
            weight = weight * g[:, d]
            position[:, d] = h[:, d] + 2.0  # index in the padded coefficients
        out += weight * _sample_linear(coefficients, padded, position)
    return out


#: Interpolation name -> how it reads an image. ``label`` is for label maps (never invents a
#: label); ``nearest`` and ``label`` keep the image's type, the others return floats.
INTERPOLATORS: dict[str, Interpolator] = {
    "linear": Interpolator(_as_float, _sample_linear),
    "nearest": Interpolator(_unchanged, _sample_nearest, keeps_type=True),
    "label": Interpolator(_as_label, _sample_label, keeps_type=True),
    "bspline": Interpolator(_padded_bspline_coefficients, _sample_bspline),
}
