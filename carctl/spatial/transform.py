"""Spatial transforms in physical space, and what is computed from them.

All transforms here are *pull-back* maps from fixed to moving physical space (ITK's
convention): ``moving_point = T(fixed_point)``. A displacement field ``u`` on a grid gives
``T(x) = x + u(x)``; an affine gives ``T(x) = A (x - c) + t + c`` (ITK's
``AffineTransform`` with centre ``c``). A chain ``[T0, T1, ...]`` maps a point through ``T0``
first, like ``antsApplyTransforms -t T0 -t T1 ...``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch

from carctl.spatial.grid import Grid, slabs
from carctl.spatial.sample import sample


class Transform(Protocol):
    ndim: int

    def transform_points(self, points: torch.Tensor) -> torch.Tensor:
        """Map physical points ``(..., D)`` from fixed to moving space."""
        ...

    def to(self, device: torch.device | str | None) -> Transform:
        """The same transform, ready to map points on ``device``."""
        ...


@dataclass(eq=False)
class Affine:
    """``T(x) = matrix @ (x - center) + translation + center`` in physical LPS mm."""

    matrix: np.ndarray
    translation: np.ndarray
    center: np.ndarray = field(default=None)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        self.matrix = np.asarray(self.matrix, dtype=np.float64)
        d = self.matrix.shape[0]
        if self.matrix.shape != (d, d) or d not in (2, 3):
            raise ValueError(f"an affine matrix is 2x2 or 3x3, not {self.matrix.shape}")
        self.translation = np.asarray(self.translation, dtype=np.float64).reshape(d)
        center = np.zeros(d) if self.center is None else self.center
        self.center = np.asarray(center, dtype=np.float64).reshape(d)

    @classmethod
    def identity(cls, ndim: int) -> Affine:
        return cls(np.eye(ndim), np.zeros(ndim))

    @classmethod
    def from_homogeneous(cls, matrix: np.ndarray, center: np.ndarray | None = None) -> Affine:
        """Affine from a homogeneous matrix, re-expressed around ``center`` (ITK style)."""
        matrix = np.asarray(matrix, dtype=np.float64)
        d = matrix.shape[0] - 1
        c = np.zeros(d) if center is None else np.asarray(center, dtype=np.float64)
        linear, offset = matrix[:d, :d], matrix[:d, d]
        # A x + b = A (x - c) + t + c  =>  t = b + A c - c
        return cls(linear, offset + linear @ c - c, c)

    @property
    def ndim(self) -> int:
        return self.matrix.shape[0]

    @property
    def homogeneous(self) -> np.ndarray:
        d = self.ndim
        m = np.eye(d + 1)
        m[:d, :d] = self.matrix
        m[:d, d] = self.translation + self.center - self.matrix @ self.center
        return m

    def inverse(self) -> Affine:
        """The inverse map; a singular or non-finite matrix has none (:class:`InputError`)."""
        from carctl.errors import InputError

        d = self.ndim
        linear = self.homogeneous[:d, :d]
        if not np.isfinite(self.homogeneous).all() or np.linalg.cond(linear) > 1e12:
            raise InputError("the affine is singular or not finite: it has no inverse")
        return Affine.from_homogeneous(np.linalg.inv(self.homogeneous), self.center)

    def transform_points(self, points: torch.Tensor) -> torch.Tensor:
        from carctl.spatial.grid import apply_homogeneous

        return apply_homogeneous(self.homogeneous, points)

    def to(self, device: torch.device | str | None) -> Affine:
        return self  # a few numbers, converted where they are used


@dataclass(eq=False)
class DisplacementField:
    """Dense displacement ``u`` on ``grid``: ``T(x) = x + u(x)``.

    ``data`` is a ``(D, *grid.shape)`` tensor in physical mm, components ``(x, y, z)``.
    Between voxels ``u`` is linearly interpolated; outside the grid it is zero (as ITK's
    ``DisplacementFieldTransform``).
    """

    grid: Grid
    data: torch.Tensor

    def __post_init__(self) -> None:
        expected = (self.grid.ndim, *self.grid.shape)
        if tuple(self.data.shape) != expected:
            raise ValueError(f"field of shape {tuple(self.data.shape)}, expected {expected}")

    @property
    def ndim(self) -> int:
        return self.grid.ndim

    def displacement_at(self, points: torch.Tensor) -> torch.Tensor:
        """``u`` at physical points ``(..., D)`` -> ``(..., D)``, in the points' dtype.

        Interpolated in the field's own precision: a float32 field is not copied to float64.
        """
        values = sample(self.data[None], self.grid, points.to(self.data.dtype), mode="linear")
        return values[0].movedim(0, -1).to(points.dtype)

    def transform_points(self, points: torch.Tensor) -> torch.Tensor:
        return points + self.displacement_at(points)

    def to(self, device: torch.device | str | None) -> DisplacementField:
        return DisplacementField(self.grid, self.data.to(device=device))


def map_grid(
    grid: Grid,
    transforms: Sequence[Transform] = (),
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
    planes: tuple[int, int] | None = None,
) -> torch.Tensor:
    """Physical positions ``(*grid.shape, D)`` of ``grid``'s voxels mapped through the chain.

    ``planes=(start, stop)`` maps only those index planes along the last axis (a slab).
    """
    start, stop = (0, grid.size[-1]) if planes is None else planes
    points = grid.slab(start, stop).points(dtype=dtype, device=device)
    for i, transform in enumerate(transforms):
        if transform.ndim != grid.ndim:
            raise ValueError(f"a {transform.ndim}-D transform cannot map a {grid.ndim}-D grid")
        if i == 0 and isinstance(transform, DisplacementField) and transform.grid.same_as(grid):
            # The field is known exactly at these points: no interpolation.
            data = transform.data[:, start:stop]
            points = points + data.to(points).movedim(0, -1)
        else:
            points = transform.transform_points(points)
    return points


def to_displacement(grid: Grid, transforms: Sequence[Transform] = ()) -> DisplacementField:
    """The chain as one displacement field on ``grid``: ``u(x) = T(x) - x``.

    This is how an affine and a field are composed into the single field that carctl writes.
    """
    mapped = map_grid(grid, transforms)
    return DisplacementField(grid, (mapped - grid.points()).movedim(-1, 0).contiguous())


# Voxels per slab of :func:`jacobian_determinant` (whole slices of the slowest axis, at
# least one): 18 slices of a 1 mm brain (16 before, by count), 4 of a 512 x 512 CT, whose
# 16-slice slabs of two dozen 4 M-voxel temporaries were slower (1.6 against 1.2 s).
_SLAB_VOXELS = 1 << 20


def jacobian_determinant(field: DisplacementField) -> torch.Tensor:
    """Determinant of the Jacobian of ``x -> x + u(x)`` at every voxel, ``(*grid.shape)``.

    Derivatives are taken in physical space (spacing *and* direction accounted for): central
    differences inside the grid, one-sided on its border (so an affine field gets its exact
    determinant everywhere), zero along an axis of size one. Inside the grid this equals ITK's
    ``DisplacementFieldJacobianDeterminantFilter`` on grids with an identity direction (that
    filter ignores the direction and halves the derivative on the border).

    Computed by slabs of the slowest axis with the closed-form 2x2 / 3x3 determinant (a
    whole 1 mm brain field would otherwise need gigabytes of 3x3 matrices), in float64 for a
    float64 field and in float32 otherwise (a third of the time on a 1 mm brain; the
    determinant of a field of a few mm is then exact to about 1e-6).
    """
    grid = field.grid
    d = grid.ndim
    u = field.data
    to_physical = np.linalg.inv(grid.direction_matrix * np.asarray(grid.spacing))
    dtype = torch.float64 if u.dtype == torch.float64 else torch.float32
    out = torch.empty(u.shape[1:], dtype=dtype, device=u.device)
    n = u.shape[1]  # slowest axis (the last index axis)
    for start, stop in slabs(u.shape[1:], _SLAB_VOXELS):
        # one neighbour on each side so that central differences match the whole-grid ones
        low, high = max(start - 1, 0), min(stop + 1, n)
        part = u[:, low:high].to(dtype)
        # derivatives du/d(index b) for index axes i, j, k, cropped back to the slab
        keep = slice(start - low, start - low + stop - start)
        derivative = []
        for axis in range(d):
            dim = d - axis  # tensor dimension of index axis `axis` (after the channel)
            if part.shape[dim] > 1:
                derivative.append(_central_difference(part, dim)[:, keep])
            else:
                derivative.append(None)
        out[start:stop] = determinant_from_derivatives(derivative, to_physical)
    return out


def determinant_from_derivatives(
    derivative: list[torch.Tensor | None], to_index: np.ndarray
) -> torch.Tensor:
    """``det(I + du/dx)`` from the derivatives of a displacement (mm) along each index
    axis ``c`` (``(D, *spatial)`` each, None for zero) and ``to_index`` ``[c, b]`` = d index
    ``c`` / d physical ``b``: ``J[a][b] = delta_ab + sum_c du_a/d index_c to_index[c, b]``
    (terms with a zero factor skipped: on an axis-aligned grid two of every three)."""
    d = len(derivative)
    known = [(c, g) for c, g in enumerate(derivative) if g is not None]
    like = known[0][1][0] if known else None
    jacobian = [
        [
            _entry(
                [g[a] for _, g in known], [to_index[c, b] for c, _ in known], float(a == b), like
            )
            for b in range(d)
        ]
        for a in range(d)
    ]
    return determinant(jacobian)


def _central_difference(part: torch.Tensor, dim: int) -> torch.Tensor:
    """``torch.gradient(part, dim=dim)`` (central inside, one-sided on the two borders; the
    dimension has at least two entries) without its temporaries: a third of the time."""
    n = part.shape[dim]
    out = torch.empty_like(part)
    if n > 2:
        inside = out.narrow(dim, 1, n - 2)
        torch.sub(part.narrow(dim, 2, n - 2), part.narrow(dim, 0, n - 2), out=inside)
        inside.mul_(0.5)
    torch.sub(part.narrow(dim, 1, 1), part.narrow(dim, 0, 1), out=out.narrow(dim, 0, 1))
    torch.sub(part.narrow(dim, n - 1, 1), part.narrow(dim, n - 2, 1), out=out.narrow(dim, n - 1, 1))
    return out


def _entry(
    parts: list[torch.Tensor], factors: list[float], diagonal: float, like: torch.Tensor | None
) -> torch.Tensor | float:
    """``diagonal + sum(part * factor)`` over the non-zero factors (a new tensor), or the
    number ``diagonal`` when no factor is non-zero (``like``: None, no tensor at all)."""
    out = None
    for part, factor in zip(parts, factors, strict=True):
        if factor == 0:
            continue
        out = part * float(factor) if out is None else out.add_(part, alpha=float(factor))
    if out is None:
        return diagonal if like is None else torch.full_like(like, diagonal)
    return out.add_(diagonal) if diagonal else out


def determinant(m: list[list[torch.Tensor]]) -> torch.Tensor:
    """Closed-form determinant of a 1x1, 2x2 or 3x3 matrix of tensors."""
    if len(m) == 1:
        return m[0][0]
    if len(m) == 2:
        return m[0][0] * m[1][1] - m[0][1] * m[1][0]
    return (
        m[0][0] * (m[1][1] * m[2][2] - m[1][2] * m[2][1])
        - m[0][1] * (m[1][0] * m[2][2] - m[1][2] * m[2][0])
        + m[0][2] * (m[1][0] * m[2][1] - m[1][1] * m[2][0])
    )
