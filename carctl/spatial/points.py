"""Linear interpolation of a channels-last table at continuous indices, with fast gradients.

:func:`interpolate` reads a ``(*shape, C)`` voxel table at ``P`` continuous ITK indices and
differentiates with respect to both the table and the indices. It replaces
``grid_sample`` where an optimiser reads a few thousand points per step: torch's 3-D
``grid_sample`` backward is a serial loop on the CPU, several times slower than these
vectorised gathers. Points outside the table read zero (each of the ``2^D`` neighbours
outside contributes zero, like ``grid_sample(padding_mode="zeros", align_corners=True)``).
"""

from __future__ import annotations

import functools

import torch


@functools.lru_cache(maxsize=4)
def _bits(d: int) -> torch.Tensor:
    """The ``2^D`` corners of a unit cell as 0/1 offsets ``(2^D, D)`` (float)."""
    return torch.cartesian_prod(*[torch.tensor([0.0, 1.0])] * d).reshape(-1, d)


def _corners(index: torch.Tensor, shape: tuple[int, ...], derivative: bool):
    """The ``2^D`` neighbours of every point: flat voxel offsets ``(P, 2^D)``, weights
    ``(P, 2^D)`` (zero for neighbours outside the table) and, with ``derivative``, the
    weights' derivatives along each index axis ``(P, 2^D, D)``.

    Computed in the index's float type on ``(P, 2^D, D)`` arrays with few operations (the
    CPU cost of a step of the linear stages is mostly the count of small operations)."""
    d = index.shape[1]
    sizes = list(reversed(shape))  # index order (i, j, k)
    strides = [1]
    for n in sizes[:-1]:
        strides.append(strides[-1] * n)
    bits = _bits(d).to(index)
    low = index.floor()
    frac = index - low
    neighbour = low[:, None, :] + bits  # (P, 2^D, D)
    upper = torch.tensor(sizes, dtype=index.dtype, device=index.device) - 1
    clamped = torch.minimum(neighbour.clamp_min(0), upper)
    inside = (clamped == neighbour).to(index.dtype)
    # offsets in float64: exact for any table that fits in memory
    stride = torch.tensor(strides, dtype=torch.float64, device=index.device)
    flat = (clamped.to(torch.float64) @ stride).long()
    # per axis: 1 - f for the lower neighbour, f for the upper one (0 outside the table)
    factors = (((1 - frac)[:, None, :] + bits * (2 * frac - 1)[:, None, :]) * inside).unbind(-1)
    weight = functools.reduce(torch.mul, factors)
    slope = None
    if derivative:  # the factor of axis a differentiated: -1 (lower) or +1 (upper)
        signs = ((2 * bits - 1) * inside).unbind(-1)
        slope = torch.stack(
            [
                functools.reduce(torch.mul, factors[:a] + (signs[a],) + factors[a + 1 :])
                for a in range(d)
            ],
            dim=-1,
        )
    return flat, weight, slope


def _spread(grad: torch.Tensor, flat: torch.Tensor, weight: torch.Tensor, shape) -> torch.Tensor:
    """The gradient of a ``shape`` table from that of its interpolated values ``(P, C)``."""
    c = grad.shape[1]
    out = grad.new_zeros(int(torch.tensor(shape[:-1]).prod()), c)
    out.index_add_(0, flat.reshape(-1), (weight[:, :, None] * grad[:, None, :]).reshape(-1, c))
    return out.reshape(shape)


def _weighted(table: torch.Tensor, flat: torch.Tensor, weight: torch.Tensor):
    """The corners' rows ``(P, 2^D, C)`` and their weighted sum ``(P, C)``."""
    flat_table = table.reshape(-1, table.shape[-1])
    corners = flat_table.index_select(0, flat.reshape(-1)).reshape(*flat.shape, -1)
    return corners, (weight[:, :, None] * corners).sum(1)


class _Interpolate(torch.autograd.Function):
    # Weighted sums over the 2^D corners are products and sums along one axis: batched
    # matrix products of (1, 2^D) by (2^D, C) matrices ran 3-4x slower on the CPU.
    @staticmethod
    def forward(ctx, table: torch.Tensor, index: torch.Tensor, shape: tuple[int, ...]):
        need_index = ctx.needs_input_grad[1]
        flat, weight, slope = _corners(index.to(table.dtype), shape, need_index)
        corners, values = _weighted(table, flat, weight)
        ctx.shape = table.shape
        if need_index:  # d values / d index = sum over corners of corner value x slope
            ctx.save_for_backward(flat, weight, corners, slope)
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
            corners, slope = rest
            along = (corners * grad[:, None, :]).sum(-1)  # (P, 2^D)
            grad_index = (slope * along[:, :, None]).sum(1)  # (P, D)
        return grad_table, grad_index, None


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


def interpolate(table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``table`` ``(*shape, C)`` (array order ``(Z, Y, X)``) at continuous indices ``(P, D)``
    (components ``(i, j, k)``), linearly interpolated: ``(P, C)``."""
    return _Interpolate.apply(table, index, _check(table.shape[:-1], index))


def corners(shape: tuple[int, ...], index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Neighbours and weights of fixed points ``(P, D)`` in a table of ``shape`` (without
    its channels): flat offsets and weights ``(P, 2^D)``, for :func:`interpolate_at`. An
    optimiser that reads a changing table at points that do not move computes them once
    (their rows for a subset of points are then a gather)."""
    flat, weight, _ = _corners(index, _check(shape, index), False)
    return flat, weight


def interpolate_at(table: torch.Tensor, flat: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """:func:`interpolate` at points given by their :func:`corners` (differentiable with
    respect to ``table`` only)."""
    return _AtCorners.apply(table, flat, weight.to(table.dtype))
