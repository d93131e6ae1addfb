"""Sampling an image at physical points, and warping it onto another grid.

Every sampler follows ITK's rules (see :mod:`carctl.spatial.grid`), so that carctl, SimpleITK
and antsApplyTransforms read the same values: a point outside the image gets ``fill``; a point
within half a voxel of the border reads the border voxels.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from carctl.spatial.grid import Grid

if TYPE_CHECKING:
    from carctl.spatial.transform import Transform

# Points are processed in chunks of this many by the samplers that gather voxels explicitly,
# so that memory stays bounded on large grids.
_CHUNK = 1 << 18

# Cubic B-spline prefilter: pole of the inverse filter and the number of taps on each side
# of its truncated impulse response (|pole|**16 < 1e-9).
_BSPLINE_POLE = float(np.sqrt(3.0) - 2.0)
_BSPLINE_TAPS = 16


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
    try:
        sampler = INTERPOLATORS[mode]
    except KeyError:
        raise ValueError(f"unknown interpolation {mode!r}; choose from {sorted(INTERPOLATORS)}")
    if image.dim() != grid.ndim + 2 or tuple(image.shape[2:]) != grid.shape:
        raise ValueError(
            f"image of shape {tuple(image.shape)} does not match a (N, C, {grid.shape}) grid"
        )
    if points.shape[-1] != grid.ndim:
        raise ValueError(f"points have {points.shape[-1]} components, the grid {grid.ndim}")
    out_shape = points.shape[:-1]
    index = grid.to_index(points.reshape(-1, grid.ndim))
    values = sampler(image, grid, index)
    inside = grid.contains_index(index)
    values = torch.where(inside, values, torch.as_tensor(fill, dtype=values.dtype))
    return values.reshape(*image.shape[:2], *out_shape)


def warp(
    image: torch.Tensor,
    moving_grid: Grid,
    fixed_grid: Grid,
    transforms: Sequence[Transform] = (),
    mode: str = "linear",
    fill: float = 0.0,
) -> torch.Tensor:
    """Resample ``image`` (on ``moving_grid``) onto ``fixed_grid`` through ``transforms``.

    Each fixed-grid point ``x`` is mapped through the pull-back chain (``transforms[0]``
    first, as ``antsApplyTransforms -t T0 -t T1 ...``) into physical moving space, where the
    image is sampled. With no transforms this resamples through the scanner headers.
    """
    from carctl.spatial.transform import map_grid

    points = map_grid(fixed_grid, transforms)
    return sample(image, moving_grid, points, mode=mode, fill=fill)


# --- samplers: (image (N, C, *shape), grid, index (P, D)) -> values (N, C, P) ----------------


def _sample_linear(image: torch.Tensor, grid: Grid, index: torch.Tensor) -> torch.Tensor:
    if not image.is_floating_point():
        image = image.to(torch.float32)
    coords = grid.index_to_normalised(index).to(image.dtype)
    n, c = image.shape[:2]
    view = (1,) * (grid.ndim - 1) + (-1, grid.ndim)
    coords = coords.reshape(1, *view).expand(n, *view)
    out = F.grid_sample(image, coords, mode="bilinear", padding_mode="border", align_corners=True)
    return out.reshape(n, c, -1)


def _strides(grid: Grid) -> list[int]:
    """Flat-array stride of each index component (i, j, k)."""
    return [int(np.prod(grid.size[:d])) for d in range(grid.ndim)]


def _gather(image: torch.Tensor, flat: torch.Tensor) -> torch.Tensor:
    """``image`` (N, C, *shape) at flat voxel indices ``flat`` (...) -> (N, C, ...)."""
    n, c = image.shape[:2]
    return image.reshape(n, c, -1)[:, :, flat.reshape(-1)].reshape(n, c, *flat.shape)


def _sample_nearest(image: torch.Tensor, grid: Grid, index: torch.Tensor) -> torch.Tensor:
    # ITK rounds half-way cases up (floor(x + 0.5)); torch's nearest mode rounds them to even.
    flat = torch.zeros(index.shape[0], dtype=torch.long, device=index.device)
    for d, stride in enumerate(_strides(grid)):
        i = torch.floor(index[:, d] + 0.5).long().clamp_(0, grid.size[d] - 1)
        flat += i * stride
    return _gather(image, flat)


def _chunked(
    fn: Callable[[torch.Tensor], torch.Tensor], index: torch.Tensor
) -> torch.Tensor:
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
        labels, weights = [], []
        for corner in range(2**grid.ndim):
            flat = torch.zeros(idx.shape[0], dtype=torch.long, device=idx.device)
            weight = torch.ones(idx.shape[0], dtype=torch.float32, device=idx.device)
            for d in range(grid.ndim):
                offset = (corner >> d) & 1
                i = (base[:, d] + offset).clamp(0, grid.size[d] - 1)
                flat += i * strides[d]
                weight = weight * (frac[:, d] if offset else 1.0 - frac[:, d])
            labels.append(_gather(image, flat))
            weights.append(weight)
        labels_t = torch.stack(labels)  # (K, N, C, P)
        weights_t = torch.stack(weights)[:, None, None, :]  # (K, 1, 1, P)
        same = labels_t[:, None] == labels_t[None, :]  # (K, K, N, C, P)
        votes = (same * weights_t[None, :]).sum(dim=1)  # (K, N, C, P)
        best = votes.argmax(dim=0, keepdim=True)
        return torch.take_along_dim(labels_t, best, dim=0)[0]

    return _chunked(one_chunk, index)


def bspline_coefficients(image: torch.Tensor) -> torch.Tensor:
    """Cubic B-spline coefficients of ``image`` (N, C, *shape), mirror boundary (as ITK)."""
    z = _BSPLINE_POLE
    k = torch.arange(-_BSPLINE_TAPS, _BSPLINE_TAPS + 1, dtype=torch.float64)
    kernel = (-6.0 * z / (1.0 - z * z)) * z ** k.abs()
    coefficients = image.to(torch.float64)
    for axis in range(2, image.dim()):
        n = coefficients.shape[axis]
        if n == 1:
            continue
        extended = _mirror(torch.arange(-_BSPLINE_TAPS, n + _BSPLINE_TAPS), n)
        moved = coefficients.movedim(axis, -1)
        rows = moved[..., extended].reshape(-1, 1, n + 2 * _BSPLINE_TAPS)
        filtered = F.conv1d(rows, kernel.view(1, 1, -1)).reshape(moved.shape)
        coefficients = filtered.movedim(-1, axis)
    return coefficients


def _mirror(i: torch.Tensor, n: int) -> torch.Tensor:
    """Whole-sample mirror of indices into ``[0, n)``: ..., 2, 1, 0, 1, 2, ..., n-1, n-2, ..."""
    if n == 1:
        return torch.zeros_like(i)
    period = 2 * (n - 1)
    i = torch.remainder(i, period)
    return torch.where(i >= n, period - i, i)


def _cubic_bspline(t: torch.Tensor) -> torch.Tensor:
    t = t.abs()
    inner = (4.0 - 6.0 * t**2 + 3.0 * t**3) / 6.0
    outer = (2.0 - t).clamp(min=0.0) ** 3 / 6.0
    return torch.where(t < 1.0, inner, outer)


def _sample_bspline(image: torch.Tensor, grid: Grid, index: torch.Tensor) -> torch.Tensor:
    coefficients = bspline_coefficients(image)
    strides = _strides(grid)
    taps = torch.arange(4, device=index.device)

    def one_chunk(idx: torch.Tensor) -> torch.Tensor:
        idx = idx.to(torch.float64)
        flat = torch.zeros((1,) * grid.ndim + (idx.shape[0],), dtype=torch.long)
        weight = torch.ones((1,) * grid.ndim + (idx.shape[0],), dtype=torch.float64)
        for d in range(grid.ndim):
            first = torch.floor(idx[:, d]).long() - 1
            positions = first[None, :] + taps[:, None]  # (4, P)
            w = _cubic_bspline(idx[:, d][None, :] - positions)
            shape = [1] * grid.ndim + [idx.shape[0]]
            shape[d] = 4
            flat = flat + (_mirror(positions, grid.size[d]) * strides[d]).reshape(shape)
            weight = weight * w.reshape(shape)
        values = _gather(coefficients, flat.reshape(-1, idx.shape[0]))  # (N, C, 4**D, P)
        return (values * weight.reshape(-1, idx.shape[0])).sum(dim=2)

    out = _chunked(one_chunk, index)
    return out.to(image.dtype if image.is_floating_point() else torch.float32)


#: Interpolation name -> sampler. ``label`` is for label maps (never invents a label).
INTERPOLATORS: dict[str, Callable[[torch.Tensor, Grid, torch.Tensor], torch.Tensor]] = {
    "linear": _sample_linear,
    "nearest": _sample_nearest,
    "label": _sample_label,
    "bspline": _sample_bspline,
}
