"""Single-slice volumes registered in their plane.

A 3-D image one voxel thick (a 2-D acquisition, or a slice, saved as a volume) holds nothing
about what lies off its plane: registered as a volume, the linear stages turned and shifted
it out of the plane freely (a T2w slice onto the T1n one came out tilted by 4-5 degrees about
the in-plane axes, its warped image empty beyond a band along the tilt's axis). When both
images are single slices on parallel planes, they are registered as 2-D images in the fixed
plane's frame, and the answer is lifted back: in-plane, the 2-D mapping; along the normal,
the step from the fixed plane onto the moving one.

Coordinates: the fixed plane's frame has origin ``o`` (the fixed grid's origin), in-plane
axes ``E`` (``(3, 2)``: the fixed grid's two in-plane direction columns) and normal ``n``; a
physical point ``x`` has plane coordinates ``p = E^T (x - o)`` (mm).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from carctl.io import Image
from carctl.spatial.grid import Grid
from carctl.spatial.transform import Affine, DisplacementField

# Planes this close to parallel (the cosine between their normals, about 0.8 degrees) are one
# orientation; a tilt beyond it is a 3-D problem.
PARALLEL = 1 - 1e-4


def thin_axis(grid: Grid) -> int | None:
    """The index axis of a 3-D ``grid`` that is one voxel thick (when exactly one is)."""
    if grid.ndim != 3:
        return None
    thin = [axis for axis, n in enumerate(grid.size) if n == 1]
    return thin[0] if len(thin) == 1 else None


@dataclass(frozen=True)
class Plane:
    """The fixed plane's frame: origin ``o``, in-plane axes ``E`` ``(3, 2)``, normal ``n``,
    the fixed grid's thin index axis, and ``offset``: how far the moving plane lies along
    ``n`` (mm)."""

    origin: np.ndarray
    axes: np.ndarray
    normal: np.ndarray
    thin: int
    offset: float

    def grid(self, grid: Grid) -> Grid:
        """A single-slice 3-D ``grid`` in plane coordinates (its thin axis dropped)."""
        thin = thin_axis(grid)
        keep = [a for a in range(3) if a != thin]
        direction = self.axes.T @ grid.direction_matrix[:, keep]
        return Grid(
            tuple(grid.size[a] for a in keep),
            tuple(grid.spacing[a] for a in keep),
            tuple(self.axes.T @ (np.asarray(grid.origin) - self.origin)),
            tuple(direction.ravel()),
        )

    def image(self, image: Image) -> Image:
        """``image`` (a single slice) as a 2-D image in plane coordinates."""
        thin = thin_axis(image.grid)
        return Image(np.squeeze(image.array, axis=2 - thin), self.grid(image.grid))

    def lift_matrix(self, matrix: np.ndarray) -> np.ndarray:
        """A 2-D homogeneous map of plane coordinates as the 3-D physical one: in the plane
        as given, along the normal a step of :attr:`offset`."""
        frame = np.column_stack([self.axes, self.normal])  # (p, s) -> physical offset
        inner = np.eye(4)
        inner[:2, :2] = matrix[:2, :2]
        inner[:2, 3] = matrix[:2, 2]
        inner[2, 3] = self.offset
        to_frame = np.eye(4)
        to_frame[:3, :3] = frame.T
        to_frame[:3, 3] = -frame.T @ self.origin
        back = np.linalg.inv(to_frame)
        return back @ inner @ to_frame

    def lift_grid(self, grid: Grid, thickness: float) -> Grid:
        """A 2-D grid of plane coordinates as a single-slice 3-D grid (thin along ``n``)."""
        columns = self.axes @ grid.direction_matrix  # (3, 2)
        size, spacing, direction = [], [], []
        inplane = iter(range(2))
        for axis in range(3):
            if axis == self.thin:
                size.append(1)
                spacing.append(thickness)
                direction.append(self.normal)
            else:
                k = next(inplane)
                size.append(grid.size[k])
                spacing.append(grid.spacing[k])
                direction.append(columns[:, k])
        origin = self.origin + self.axes @ np.asarray(grid.origin)
        return Grid(
            tuple(size),
            tuple(spacing),
            tuple(origin),
            tuple(np.column_stack(direction).ravel()),
        )

    def lift_displacement(self, u: torch.Tensor) -> torch.Tensor:
        """In-plane displacements ``(..., 2, *shape2)`` of plane coordinates as physical ones
        ``(..., 3, *shape3)`` on the lifted grid (no step along the normal: the deformable
        part lies in the plane)."""
        axes = torch.as_tensor(self.axes, dtype=u.dtype, device=u.device)
        lifted = torch.einsum("ij,...j->...i", axes, u.movedim(-3, -1)).movedim(-1, -3)
        return lifted.unsqueeze(-1 - self.thin)  # the thin axis's tensor dimension


def plane_of(moving: Grid, fixed: Grid) -> Plane | None:
    """The fixed plane's frame when both grids are single slices on parallel planes, else
    None (volumes, or a slice tilted against the other: a 3-D problem)."""
    thin_f, thin_m = thin_axis(fixed), thin_axis(moving)
    if thin_f is None or thin_m is None:
        return None
    axes = fixed.direction_matrix[:, [a for a in range(3) if a != thin_f]]
    normal = _normal(fixed, thin_f)
    if abs(float(normal @ _normal(moving, thin_m))) < PARALLEL:
        return None
    origin = np.asarray(fixed.origin, dtype=np.float64)
    offset = float(normal @ (np.asarray(moving.origin) - origin))
    return Plane(origin, axes, normal, thin_f, offset)


def _normal(grid: Grid, thin: int) -> np.ndarray:
    """The unit normal of a single-slice ``grid``'s plane (``thin``: its thin index axis)."""
    normal = np.cross(*grid.direction_matrix[:, [a for a in range(3) if a != thin]].T)
    return normal / np.linalg.norm(normal)


def flatten(matrix: np.ndarray, plane: Plane) -> np.ndarray:
    """A 3-D homogeneous map (a given start) as the 2-D one of plane coordinates it induces:
    ``p -> E^T (A (o + E p) - o)``."""
    linear, offset = matrix[:3, :3], matrix[:3, 3]
    out = np.eye(3)
    out[:2, :2] = plane.axes.T @ linear @ plane.axes
    out[:2, 2] = plane.axes.T @ (linear @ plane.origin + offset - plane.origin)
    return out


def lift(result, plane: Plane, fixed: Grid):
    """A 2-D :class:`~carctl.registration.pipeline.Registration` in plane coordinates as the
    3-D one on ``fixed`` (single slice)."""
    from carctl.registration.pipeline import Registration

    thickness = fixed.spacing[plane.thin]
    matrix = plane.lift_matrix(result.affine.homogeneous)
    center = plane.origin + plane.axes @ result.affine.center
    field2 = result.field
    data = plane.lift_displacement(field2.data)
    step = torch.as_tensor(plane.normal * plane.offset, dtype=data.dtype).reshape(3, 1, 1, 1)
    data = data + step
    whole = DisplacementField(fixed, data.contiguous())
    displacement = None
    if result.displacement is not None:
        source, u = result.displacement
        displacement = (plane.lift_grid(source, thickness), plane.lift_displacement(u))
    affine = Affine.from_homogeneous(matrix, center)
    return Registration(affine, whole, result.stages, result.levels, displacement)
