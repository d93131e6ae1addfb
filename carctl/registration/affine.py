"""Rigid and affine registration: parameters, their homogeneous matrix, and the optimiser.

The transform maps fixed to moving physical points (LPS mm, ITK's pull-back sense):
``A(x) = R(r) M0 (I + S) (x - c) + c + t0 + t``, where ``M0, t0`` is the starting point
(from :mod:`carctl.registration.initialise`), ``c`` the fixed foreground centre, ``r`` a
rotation vector, ``t`` a translation (mm) and ``S`` a free linear part (affine only).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from carctl.registration.adam import Adam
from carctl.registration.levels import Level, Sample

Progress = Callable[[int], None]


def rotation_matrix(vector: torch.Tensor, ndim: int) -> torch.Tensor:
    """Rotation from a rotation vector (3-D, radians) or an angle (2-D), differentiably:
    the matrix exponential of the skew-symmetric matrix the vector stands for."""
    pairs = [(0, 1)] if ndim == 2 else [(1, 2), (2, 0), (0, 1)]  # about x, y, z
    skew = vector.new_zeros(ndim, ndim)
    for value, (row, column) in zip(vector, pairs, strict=True):
        skew = skew.index_put(
            (torch.tensor([row, column]), torch.tensor([column, row])), torch.stack([-value, value])
        )
    return torch.linalg.matrix_exp(skew)


def rotation_count(ndim: int) -> int:
    return ndim * (ndim - 1) // 2


class AffineParameters(nn.Module):
    """Rigid (``affine=False``) or affine parameters around a start ``(M0, t0)``, centre ``c``."""

    def __init__(self, start: np.ndarray, center: np.ndarray, affine: bool) -> None:
        super().__init__()
        d = start.shape[0] - 1
        self.ndim = d
        self.affine = affine
        self.register_buffer("start", torch.as_tensor(start, dtype=torch.float64))
        self.register_buffer("center", torch.as_tensor(center, dtype=torch.float64))
        self.rotation = nn.Parameter(torch.zeros(rotation_count(d), dtype=torch.float64))
        self.translation = nn.Parameter(torch.zeros(d, dtype=torch.float64))
        self.linear = nn.Parameter(torch.zeros(d, d, dtype=torch.float64), requires_grad=affine)

    def homogeneous(self) -> torch.Tensor:
        """The ``(D+1, D+1)`` physical-to-physical matrix (float64)."""
        d = self.ndim
        m0 = self.start[:d, :d]
        # start offset re-expressed around the centre: M0 (x - c) + c + t0
        t0 = self.start[:d, d] + m0 @ self.center - self.center
        eye = torch.eye(d, dtype=torch.float64, device=m0.device)
        linear = rotation_matrix(self.rotation, d) @ m0 @ (eye + self.linear)
        offset = self.center + t0 + self.translation - linear @ self.center
        top = torch.cat([linear, offset[:, None]], dim=1)
        bottom = torch.zeros(1, d + 1, dtype=torch.float64, device=m0.device)
        bottom[0, d] = 1.0
        return torch.cat([top, bottom], dim=0)


def mapped(
    level: Level, homogeneous: torch.Tensor, index: torch.Tensor | Sample | None = None
) -> torch.Tensor:
    """Continuous indices in the moving level grid of the working grid's voxels (all, the
    flattened ``index``, or a sample's points) under an affine (physical ``(D+1, D+1)``
    matrix, or ``(K, D+1, D+1)`` for K of them: ``(K, P, D)``)."""
    to_index = torch.as_tensor(level.moving_grid.physical_to_index, device=homogeneous.device)
    # the parameters live on the CPU (float64), the level on its device (a GPU's, or the CPU)
    total = (to_index @ homogeneous).to(level.points)
    d = level.ndim
    return level.points_of(index) @ total[..., :d, :d].mT + total[..., None, :d, d]


def level_loss(
    level: Level,
    homogeneous: torch.Tensor,
    function: Callable[..., torch.Tensor],
    index: torch.Tensor | Sample | None = None,
    overlap: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """The loss under one affine ``(D+1, D+1)``, or under each of ``(K, D+1, D+1)``: ``(K,)``
    (with ``overlap``, and :func:`level_overlap`'s, from one reading)."""
    return level.loss(function, mapped(level, homogeneous, index), index, overlap)


def level_overlap(
    level: Level, homogeneous: torch.Tensor, index: torch.Tensor | Sample | None = None
) -> torch.Tensor:
    """:meth:`Level.overlap` under one affine, or under each of ``(K, D+1, D+1)``: ``(K,)``."""
    return level.overlap(mapped(level, homogeneous, index), index)


def optimise(
    level: Level,
    params: AffineParameters | list[AffineParameters],
    function: Callable[..., torch.Tensor],
    iterations: int,
    radius: float,
    progress: Progress | None = None,
    budget: int | None = None,
    generator: torch.Generator | None = None,
    between: bool = False,
) -> tuple[float, float] | list[tuple[float, float]]:
    """Adam on ``params`` at one level; returns the loss before and after.

    Step sizes follow the level: translations move about a fifth of a voxel per step, and
    rotations and linear terms move points at ``radius`` mm from the centre as much. Above
    ``budget`` voxels, each step reads a fresh random subset of that many; with ``between``
    each voxel somewhere in its cell (:meth:`Level.sample`; ``budget`` None: every voxel, at
    the voxels). A list of parameters (starts to refine) is optimised side by side, each on
    its own loss, every step reading the same voxels for all; the losses come back as a list.
    """
    many = isinstance(params, list)
    members = params if many else [params]
    generator = generator or torch.Generator().manual_seed(0)
    step = 0.2 * float(np.mean(level.spacing))
    groups = []
    for p in members:
        groups += [(p.translation, step), (p.rotation, step / radius)]
        if p.affine:
            groups.append((p.linear, 0.5 * step / radius))
    optimiser = Adam([p for p, _ in groups], [lr for _, lr in groups])

    def loss(index: torch.Tensor | Sample | None) -> torch.Tensor:
        if not many:
            return level_loss(level, params.homogeneous(), function, index)
        return level_loss(level, torch.stack([p.homogeneous() for p in members]), function, index)

    report = level.report_index(budget)
    with torch.no_grad():
        first = loss(report).tolist()
    for i in range(iterations):
        decay = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * i / max(iterations, 1)))
        optimiser.zero_grad()
        if between:
            index = level.sample(budget, generator)
        else:
            index = level.sample_index(budget, generator)
        loss(index).sum().backward()  # the members' losses share no parameter
        optimiser.step(decay)
        if progress is not None:
            progress(len(members))
    with torch.no_grad():
        last = loss(report).tolist()
    if many:
        return list(zip(first, last, strict=True))
    return first, last
