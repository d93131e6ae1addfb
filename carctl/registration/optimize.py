"""Deformable instance optimisation: Adam on a dense displacement (or velocity) field.

The field ``u`` is a dense grid of displacements in physical mm on a *control grid*: the
level's working grid with ``CONTROL_FACTOR`` times its spacing (a smooth parametrisation;
between control points ``u`` is linearly interpolated). The full mapping is
``T(x) = A(x + u(x))`` with the affine ``A`` fixed. With ``diffeomorphic`` the control grid
holds a stationary velocity, integrated by scaling and squaring. Levels run coarse to fine;
each starts from the previous level's field. Every step reads the moving features at a
fresh random subset of the working grid's voxels (for losses that compare voxel by voxel).
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from carctl.registration.adam import Adam
from carctl.registration.levels import Level
from carctl.spatial.grid import Grid, apply_homogeneous
from carctl.spatial.points import corners, interpolate, interpolate_at
from carctl.spatial.sample import grid_sample
from carctl.spatial.transform import determinant_from_derivatives

# Scaling and squaring steps of the velocity integration.
SQUARINGS = 6
# Control grid spacing in units of the level's spacing.
CONTROL_FACTOR = 2.0
# :func:`unfold`: smallest Jacobian determinant left in a control cell, and most passes.
UNFOLD_BELOW, UNFOLD_PASSES = 0.05, 200


def control_grid(grid: Grid, factor: float | Sequence[float] = CONTROL_FACTOR) -> Grid:
    """``grid``'s box and direction with about ``factor`` times its spacing (one factor per
    axis when a sequence): points on its first and last voxels, at least 2 along every
    axis longer than one voxel."""
    size = np.asarray(grid.size)
    spacing = np.asarray(grid.spacing)
    extent = (size - 1) * spacing
    n = np.maximum(2, np.ceil(extent / (spacing * np.asarray(factor)) - 1e-6).astype(int) + 1)
    n = np.where(size == 1, 1, n)
    step = np.where(n > 1, extent / np.maximum(n - 1, 1), spacing)
    return Grid(
        tuple(int(v) for v in n), tuple(float(v) for v in step), grid.origin, grid.direction
    )


def field_at(field: torch.Tensor, source: Grid, points: torch.Tensor) -> torch.Tensor:
    """A displacement field ``(1, D, *source.shape)`` (mm) at physical ``points`` ``(..., D)``
    -> ``(D, ...)``; outside ``source`` the border value continues (working grids are crops)."""
    return sample_field(field, source, source.to_index(points.to(field.dtype)))


def sample_field(field: torch.Tensor, source: Grid, index: torch.Tensor) -> torch.Tensor:
    """A displacement field ``(1, D, *source.shape)`` at continuous indices of ``source``
    ``(..., D)`` -> ``(D, ...)`` (linear; the border value continues beyond the grid)."""
    d = source.ndim
    values = grid_sample(
        field,
        source.index_to_normalised(index).reshape(1, -1, *([1] * (d - 1)), d),
        mode="bilinear",
        padding_mode="border",
        align_corners=True,
    )
    return values.reshape(d, *index.shape[:-1])


def field_on_grid(field: torch.Tensor, source: Grid, target: Grid) -> torch.Tensor:
    """A displacement field ``(1, D, *source.shape)`` on every voxel of ``target``:
    ``(D, *target.shape)`` (linear; the border value continues beyond ``source``).

    When the two grids' axes are parallel (target index -> source index is a scaling and a
    shift per axis, as for working grids cut from the fixed grid) it interpolates one axis
    at a time, each as a product with that axis' interpolation matrix (two weights a row),
    the axis that grows least first; otherwise it samples at every voxel's mapped index.
    On a 1 mm brain from a 96 x 128 x 96 field: ``grid_sample`` about 4x slower than one axis
    at a time by gathers and ``lerp``, which took 0.34-0.43 s, the products 0.14-0.15 s."""
    d = source.ndim
    matrix = source.physical_to_index @ target.index_to_physical
    linear = matrix[:d, :d]
    if np.abs(linear - np.diag(np.diag(linear))).max() > 1e-9 * np.abs(linear).max():
        index = target.map_indices(matrix, field.dtype, field.device)
        return sample_field(field, source, index)
    out = field[0]
    # index axis i, j, k is tensor dimension D, D-1, ... (after the channels)
    growth = [target.size[axis] / source.size[axis] for axis in range(d)]
    for axis in sorted(range(d), key=lambda a: growth[a]):
        dim = d - axis
        n = out.shape[dim]
        steps = torch.arange(target.size[axis], dtype=torch.float64)
        where = (steps * linear[axis, axis] + matrix[axis, d]).clamp(0, n - 1)
        low = where.floor().clamp(max=max(n - 2, 0))
        fraction = where - low
        low = low.long()
        weights = torch.zeros(len(steps), n, dtype=torch.float64)
        weights[steps.long(), low] = 1 - fraction
        weights[steps.long(), (low + 1).clamp(max=n - 1)] += fraction  # n == 1: one column
        weights = weights.to(out.dtype).to(out.device)
        shape = list(out.shape)
        if dim == out.dim() - 1:  # the last dimension: (rows, n) x (n, m)
            out = (out.reshape(-1, n) @ weights.T).reshape(*shape[:-1], -1)
        else:  # (m, n) x (batch, n, rest)
            rows = out.reshape(int(np.prod(shape[:dim])), n, -1)
            out = torch.matmul(weights, rows).reshape(*shape[:dim], -1, *shape[dim + 1 :])
    return out


@functools.lru_cache(maxsize=8)
def voxel_indices(size: tuple[int, ...]) -> torch.Tensor:
    """Index ``(i, j, k)`` of every voxel, in array (``(Z, Y, X)``) order: ``(voxels, D)``."""
    axes = [torch.arange(n, dtype=torch.float32) for n in reversed(size)]
    return torch.stack(torch.meshgrid(*axes, indexing="ij")[::-1], dim=-1).reshape(-1, len(size))


def integrate(velocity: torch.Tensor, grid: Grid, steps: int | None = None) -> torch.Tensor:
    """Scaling and squaring on ``grid``: ``exp(v)``'s displacement ``(*shape, D)`` (mm) for a
    velocity ``(*shape, D)`` in mm (channels last)."""
    steps = SQUARINGS if steps is None else steps
    d = grid.ndim
    to_index = torch.as_tensor(grid.physical_to_index[:d, :d]).to(velocity)
    upper = torch.as_tensor([n - 1 for n in grid.size]).to(velocity)
    identity = voxel_indices(grid.size).to(velocity)
    u = velocity.reshape(-1, d) / (2**steps)
    for _ in range(steps):
        where = (identity + u @ to_index.T).clamp(torch.zeros_like(upper), upper)
        u = u + interpolate(u.reshape(velocity.shape), where)
    return u.reshape(velocity.shape)


def similarity(
    level: Level,
    affine: np.ndarray,
    displacement: tuple[Grid, torch.Tensor] | None,
    function: Callable[..., torch.Tensor],
    budget: int | None = None,
) -> float:
    """The similarity loss at ``level`` for the mapping ``A(x + u(x))`` (``displacement`` =
    ``(grid, u)`` with ``u`` ``(1, D, *grid.shape)`` mm, or None), on the voxels of
    :meth:`Level.report_index` (``budget`` None: every voxel)."""
    d = level.ndim
    index = level.report_index(budget)
    points = level.points.reshape(-1, d)
    points = points if index is None else points.index_select(0, index)
    with torch.no_grad():
        if displacement is not None:
            grid, u = displacement
            points = points + field_at(u.to(points), grid, points).T
        to_moving = level.moving_grid.physical_to_index @ affine
        return float(level.loss(function, apply_homogeneous(to_moving, points), index))


def optimise_level(
    level: Level,
    affine: np.ndarray,
    initial: torch.Tensor,
    control: Grid,
    function: Callable[..., torch.Tensor],
    regulariser: Callable[..., torch.Tensor],
    weight: float,
    iterations: int,
    diffeomorphic: bool,
    step: float,
    progress: Callable[[int], None] | None = None,
    budget: int | None = None,
    generator: torch.Generator | None = None,
    offset: torch.Tensor | None = None,
) -> tuple[torch.Tensor, float, float]:
    """Adam from ``initial`` ``(*control.shape, D)`` (mm, channels last, a displacement or a
    velocity); returns the optimised field and the loss before and after (similarity +
    ``weight`` x regulariser of the displacement on the control grid). Above ``budget``
    voxels each step reads a fresh random subset of them. With ``offset`` ``(voxels, D)``
    (mm, at the level's points, fixed) the field is a correction: the points move by
    ``offset`` plus the field, and only the field is regularised."""
    generator = generator or torch.Generator().manual_seed(0)
    d = level.ndim
    to_moving = level.moving_grid.physical_to_index @ affine
    points = level.points.reshape(-1, d)
    base = apply_homogeneous(to_moving, points)  # moving index of x under A
    linear = torch.as_tensor(to_moving[:d, :d]).to(points)  # mm of displacement -> index
    # where the working grid's voxels sit in the control grid
    control_index = control.to_index(points)
    upper = torch.as_tensor([n - 1 for n in control.size]).to(points)
    control_index = control_index.clamp(torch.zeros_like(upper), upper)
    # the voxels do not move in the control grid: a step's sample computes its neighbours
    # and weights (gathering them from tables of every voxel took twice as long); those of
    # every voxel are built once, when a step reads every voxel
    everywhere: list = []

    def neighbours(index: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        if index is not None:
            return corners(control.shape, control_index.index_select(0, index))
        if not everywhere:
            everywhere.extend(corners(control.shape, control_index))
        return everywhere[0], everywhere[1]

    parameter = initial.detach().clone().requires_grad_(True)
    optimiser = Adam([parameter], [step])
    spacing = control.spacing

    def field() -> torch.Tensor:
        return integrate(parameter, control) if diffeomorphic else parameter

    def objective(index: torch.Tensor | None) -> torch.Tensor:
        u = field()
        rows, weights = neighbours(index)
        start = base if index is None else base.index_select(0, index)
        shift = interpolate_at(u, rows, weights)
        if offset is not None:
            shift = shift + (offset if index is None else offset.index_select(0, index))
        moved = start + shift @ linear.T
        penalty = regulariser(u.movedim(-1, 0)[None], spacing)
        return level.loss(function, moved, index) + weight * penalty

    report = level.report_index(budget)
    with torch.no_grad():
        first = float(objective(report))
    for i in range(iterations):
        optimiser.zero_grad()
        loss = objective(level.sample_index(budget, generator))
        loss.backward()
        optimiser.step(0.2 + 0.8 * (1 - i / max(iterations, 1)))
        if progress is not None:
            progress(1)
    with torch.no_grad():
        last = float(objective(report))
    return parameter.detach(), first, last


def cell_determinants(u: torch.Tensor, grid: Grid) -> torch.Tensor:
    """The smallest Jacobian determinant of ``x -> x + u(x)`` (``u`` ``(*grid.shape, D)``
    mm, channels last) in every cell of ``grid`` ``(*cells)``: at each of a cell's ``2^D``
    corners, from the differences along the cell's edges that meet there (where linear
    interpolation between the grid's points folds, one of them is negative). An axis of one
    point has one cell and no derivative."""
    d = grid.ndim
    field = u.movedim(-1, 0)  # (D, *shape): index axis c is tensor dimension d - c
    to_index = np.linalg.inv(grid.direction_matrix * np.asarray(grid.spacing))  # d index / d x
    cells = [max(n - 1, 1) for n in grid.size]

    def crop(t: torch.Tensor, start: Sequence[int]) -> torch.Tensor:
        for axis in range(d):
            dim = d - axis
            t = t.narrow(dim, min(start[axis], t.shape[dim] - cells[axis]), cells[axis])
        return t

    edges = []
    for c in range(d):
        dim, n = d - c, field.shape[d - c]
        edges.append(field.narrow(dim, 1, n - 1) - field.narrow(dim, 0, n - 1) if n > 1 else None)
    worst = None
    for corner in itertools.product((0, 1), repeat=d):
        # derivative of u along index axis c at this corner: (D, *cells)
        slopes = [
            None if e is None else crop(e, corner[:c] + (0,) + corner[c + 1 :])
            for c, e in enumerate(edges)
        ]
        value = determinant_from_derivatives(slopes, to_index)
        if not torch.is_tensor(value):  # no axis with a derivative: the identity
            value = torch.full(cells[::-1], value, dtype=u.dtype, device=u.device)
        worst = value if worst is None else torch.minimum(worst, value)
    return worst


def unfold(
    u: torch.Tensor, grid: Grid, below: float = UNFOLD_BELOW, passes: int = UNFOLD_PASSES
) -> tuple[torch.Tensor, int]:
    """``u`` (``(*grid.shape, D)`` mm) smoothed where it folds: while a cell's
    :func:`cell_determinants` is under ``below``, its corner points take the mean of their
    neighbours (3 per axis, the border repeated), at most ``passes`` times. Elsewhere ``u``
    is unchanged. Returns the field and the number of cells that folded at first."""
    d = grid.ndim
    one = [n == 1 for n in reversed(grid.size)]  # tensor order
    pad = [p for o in reversed(one) for p in ((0, 0) if o else (1, 1))]  # F.pad: last dim first
    max_pool = F.max_pool3d if d == 3 else F.max_pool2d
    avg_pool = F.avg_pool3d if d == 3 else F.avg_pool2d
    reach = tuple(1 if o else 2 for o in one)  # the cells around a point
    neighbours = tuple(1 if o else 3 for o in one)  # a point and its neighbours
    bad = cell_determinants(u, grid) < below
    folded = int(bad.sum())
    for _ in range(passes):
        if not bool(bad.any()):
            break
        touching = F.pad(bad[None, None].to(u.dtype), pad)
        points = max_pool(touching, reach, stride=1)[0, 0] > 0
        edges = F.pad(u.movedim(-1, 0)[None], pad, mode="replicate")
        mean = avg_pool(edges, neighbours, stride=1)[0].movedim(0, -1)
        u = torch.where(points[..., None], mean, u)
        bad = cell_determinants(u, grid) < below
    return u, folded
