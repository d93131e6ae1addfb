"""Linear interpolation of a channels-last table at continuous indices, with fast gradients.

:func:`interpolate` reads a ``(*shape, C)`` voxel table at ``P`` continuous ITK indices and
differentiates with respect to both the table and the indices. It replaces
``grid_sample`` where an optimiser reads a few thousand points per step: torch's 3-D
``grid_sample`` backward is a serial loop on the CPU, several times slower than these
vectorised gathers. Points outside the table read zero (each of the ``2^D`` neighbours
outside contributes zero, like ``grid_sample(padding_mode="zeros", align_corners=True)``).

On a lattice plane (a whole index along an axis) linear interpolation has a kink; with
``both_sides`` the derivative along that axis is the mean of the two sides': a one-sided
derivative follows the storage order (the cell above in index order), so an image stored
flipped started an optimiser that sits on the lattice (voxels of two images that coincide)
the other way. (``carctl qa``'s check keeps the one-sided derivative its thresholds were set
with.)
"""

from __future__ import annotations

import torch

# A point within this many voxels of a whole index lies on the lattice plane (float32 indices
# of a few hundred voxels carry errors of about 3e-5).
ON_LATTICE = 1e-4
# ... and where more than one point in this many lies on the lattice along an axis, it is no
# chance (two images' voxels lined up): then the derivatives take both sides there.
ON_LATTICE_SHARE = 100


def _outer(parts: list[torch.Tensor], op) -> torch.Tensor:
    """``op`` of one row of each axis' ``(2, P)`` pair (lower and upper neighbour) for all
    ``2^D`` corners: ``(2^D, P)``, the last axis varying fastest."""
    out = parts[0]
    for part in parts[1:]:
        out = op(out[:, None, :], part[None, :, :]).reshape(-1, out.shape[-1])
    return out


def _corners(
    index: torch.Tensor, shape: tuple[int, ...], derivative: bool, inside_edges: bool = False
):
    """The ``2^D`` neighbours of every point: flat voxel offsets ``(2^D, P)``, weights
    ``(2^D, P)`` (zero for neighbours outside the table) and, with ``derivative``, the
    weights' derivatives along each index axis ``(D, 2^D, P)`` (with ``inside_edges``, on the
    table's first and last planes those of the cell inside it).

    Built one axis at a time on ``(2, P)`` pairs, then combined by outer sums and products.
    The points are the last, contiguous dimension of every array: elementwise operations
    whose innermost dimension is a handful of corners or axes ran 5-10x slower on the CPU,
    and the cost of an optimiser's step is mostly these small operations."""
    sizes = list(reversed(shape))  # index order (i, j, k)
    points = index.T
    low = points.floor()
    if derivative and inside_edges:  # on the first or last plane, the cell inside the table
        last = index.new_tensor(sizes)[:, None] - 1
        low = torch.where((low == last) & (last > 0) & (points - low < ON_LATTICE), low - 1, low)
        low = torch.where((low == -1) & (points - low > 1 - ON_LATTICE), low + 1, low)
    frac = points - low
    low = low.long()
    offsets, factors, signs = [], [], []
    stride = 1
    for axis, n in enumerate(sizes):
        pair = torch.stack([low[axis], low[axis] + 1])  # (2, P)
        inside = ((pair >= 0) & (pair < n)).to(index.dtype)
        f = frac[axis]
        factors.append(torch.stack([1 - f, f]) * inside)
        signs.append(inside * inside.new_tensor([[-1.0], [1.0]]))
        offsets.append(pair.clamp(0, n - 1) * stride)
        stride *= n
    flat = _outer(offsets, torch.add)
    weight = _outer(factors, torch.mul)
    slope = None
    if derivative:  # the factor of axis a differentiated: -1 (lower) or +1 (upper)
        slope = torch.stack(
            [
                _outer(factors[:a] + [signs[a]] + factors[a + 1 :], torch.mul)
                for a in range(len(sizes))
            ]
        )
    return flat, weight, slope


def _spread(grad: torch.Tensor, flat: torch.Tensor, weight: torch.Tensor, shape) -> torch.Tensor:
    """The gradient of a ``shape`` table from that of its interpolated values ``(P, C)``."""
    c = grad.shape[1]
    out = grad.new_zeros(int(torch.tensor(shape[:-1]).prod()), c)
    out.index_add_(0, flat.reshape(-1), (weight[:, :, None] * grad).reshape(-1, c))
    return out.reshape(shape)


def _weighted(table: torch.Tensor, flat: torch.Tensor, weight: torch.Tensor):
    """The corners' rows ``(2^D, P, C)`` and their weighted sum ``(P, C)``."""
    flat_table = table.reshape(-1, table.shape[-1])
    corners = flat_table.index_select(0, flat.reshape(-1)).reshape(*flat.shape, -1)
    values = corners[0] * weight[0, :, None]
    for row, w in zip(corners[1:], weight[1:], strict=True):  # no (2^D, P, C) products
        values.addcmul_(row, w[:, None])
    return corners, values


class _Interpolate(torch.autograd.Function):
    # Weighted sums over the 2^D corners accumulate one corner at a time (half the time of
    # a product of all corners and a sum, or of batched (1, 2^D) by (2^D, C) matrix products).
    @staticmethod
    def forward(
        ctx, table: torch.Tensor, index: torch.Tensor, shape: tuple[int, ...], both_sides: bool
    ):
        need_index = ctx.needs_input_grad[1]
        flat, weight, slope = _corners(index.to(table.dtype), shape, need_index, both_sides)
        ctx.both_sides = both_sides
        corners, values = _weighted(table, flat, weight)
        ctx.shape = table.shape
        if need_index:  # d values / d index = sum over corners of corner value x slope
            ctx.save_for_backward(flat, weight, corners, slope, table, index)
        else:
            ctx.save_for_backward(flat, weight)
        return values

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        flat, weight, *rest = ctx.saved_tensors
        grad_table = grad_index = None
        if ctx.needs_input_grad[0]:
            grad_table = _spread(grad, flat, weight, ctx.shape)
        if ctx.needs_input_grad[1]:
            corners, slope, table, index = rest
            grad_index = _index_gradient(corners, slope, grad)
            if ctx.both_sides:
                _mean_of_both_sides(grad_index, table, index.to(table.dtype), grad)
        return grad_table, grad_index, None, None


def _index_gradient(corners: torch.Tensor, slope: torch.Tensor, grad: torch.Tensor):
    """``(P, D)``: the values' derivatives along each index axis (``slope``) against their
    gradient, from the corners' rows ``(2^D, P, C)``."""
    # (2^D, P): one small product per point, batched over the points (einsum's own plan for
    # this took 1.5 ms for 32 768 points of 13 channels, this 0.8)
    along = torch.bmm(corners.transpose(0, 1), grad[:, :, None])[:, :, 0].T
    return (slope * along).sum(1).T


def _mean_of_both_sides(
    grad_index: torch.Tensor, table: torch.Tensor, index: torch.Tensor, grad: torch.Tensor
) -> None:
    """Along each axis, the points on a lattice plane inside the table take the mean of the
    derivatives in the cells below and above it (in place): the other cell's is read half a
    voxel away. (On its first and last planes the cell inside it counts alone: _corners.)"""
    whole = index.round()
    last = index.new_tensor(list(reversed(table.shape[:-1]))) - 1
    on = ((index - whole).abs() < ON_LATTICE) & (whole > 0) & (whole < last)
    counts = on.sum(0).tolist()
    shape = tuple(table.shape[:-1])
    for axis in range(index.shape[1]):
        if counts[axis] * ON_LATTICE_SHARE < index.shape[0] or counts[axis] == 0:
            continue  # a few points by chance: their one-sided derivatives are noise
        rows = on[:, axis].nonzero()[:, 0]
        other = index.index_select(0, rows)
        here = other[:, axis]
        # floor() put a point at or just above the plane in the cell above it, else below
        other[:, axis] = whole[rows, axis] + torch.where(here >= whole[rows, axis], -0.5, 0.5)
        flat, weight, slope = _corners(other, shape, True)
        corners = _weighted(table, flat, weight)[0]
        side = _index_gradient(corners, slope, grad.index_select(0, rows))[:, axis]
        grad_index[rows, axis] = 0.5 * (grad_index[rows, axis] + side)


class _AtCorners(torch.autograd.Function):
    @staticmethod
    def forward(ctx, table: torch.Tensor, flat: torch.Tensor, weight: torch.Tensor):
        ctx.shape = table.shape
        ctx.save_for_backward(flat, weight)
        return _weighted(table, flat, weight)[1]

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        flat, weight = ctx.saved_tensors
        return _spread(grad, flat, weight, ctx.shape), None, None


def _check(shape: tuple[int, ...], index: torch.Tensor) -> tuple[int, ...]:
    if index.shape[-1] != len(shape):
        raise ValueError(f"{index.shape[-1]}-D indices for a {len(shape)}-D table")
    return tuple(shape)


def interpolate(table: torch.Tensor, index: torch.Tensor, both_sides: bool = False) -> torch.Tensor:
    """``table`` ``(*shape, C)`` (array order ``(Z, Y, X)``) at continuous indices ``(P, D)``
    (components ``(i, j, k)``), linearly interpolated: ``(P, C)``. With ``both_sides`` the
    derivative with respect to the indices on a lattice plane is the mean of both sides' (see
    the module docstring; the registration's levels), on the table's first and last planes
    the inside cell's."""
    return _Interpolate.apply(table, index, _check(table.shape[:-1], index), both_sides)


def corners(shape: tuple[int, ...], index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Neighbours and weights of fixed points ``(P, D)`` in a table of ``shape`` (without
    its channels): flat offsets and weights ``(2^D, P)``, for :func:`interpolate_at` (an
    optimiser that reads a changing table at points that do not move)."""
    flat, weight, _ = _corners(index, _check(shape, index), False)
    return flat, weight


def interpolate_at(table: torch.Tensor, flat: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """:func:`interpolate` at points given by their :func:`corners` (differentiable with
    respect to ``table`` only)."""
    return _AtCorners.apply(table, flat, weight.to(table.dtype))
