"""The network stage of ``carctl register``: CAR's pretrained network on the affinely aligned
pair, its displacement returned in physical mm.

Coordinates: the network works on a *working grid* of the fixed image's direction, covering
the fixed foreground box (with the levels' margin), isotropic voxels of
:func:`carctl.networks.evaluator.working_spacing` (as in training), its size padded to a
multiple of 16 (the voxels coarser where the padded grid would exceed its budget:
:data:`BUDGET_STEP`). The moving image is resampled onto it through the affine ``A`` (fixed ->
moving physical), so the network's voxel displacement ``u`` (index axes, x first) says that
``moving(A(x + u_mm(x)))`` matches ``fixed(x)`` with ``u_mm = direction @ (spacing * u)``:
exactly the deformable part of the pipeline's ``T(x) = A(x + u(x))``.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from carctl.registration.levels import normalise, resample_band_limited, widened
from carctl.spatial.grid import Grid
from carctl.spatial.transform import Affine

# The network's grid is padded to a multiple of this many voxels (its encoder halves it 4 x).
MULTIPLE = 16
# The name of the shipped weights.
WEIGHTS = "car"
# Passes of the network: each one registers the moving image warped by the previous passes
# (a cascade; the fields compose).
PASSES = 1
# Index axes along which the network also reads the pair mirrored when its field is the
# answer (``--method net``): test-time augmentation (training mirrored samples at random, so a
# mirrored pair is as valid an input); each adds one forward pass (0.3-0.4 s on a 1 mm brain),
# and the answers are averaged. Measured on the five known contrast pairs: the end-point error
# 0.08-0.15 mm lower with the third index axis mirrored, 0.02-0.08 mm lower again with all
# three; as the start of ``auto``'s deformable stage it changed nothing (within 0.006 mm), so
# ``auto`` runs the network once.
MIRRORS: tuple[int, ...] = (2,)
# Voxels in the image's field of view on the network's grid when its field is the answer
# (with the mirrored passes): finer than the training's (:data:`WORKING_VOXELS`, 2.04 mm on a
# 240 x 240 x 155 mm brain, 1.81 mm with this). Measured on the known brain pairs, the finer
# the grid the lower the error on most of them (every one of the three BraTS pairs, OASIS,
# the atlas pair and the chest CT at 1.5 M), at the cost of the voxels; the deformable stage
# starts as well from the training's grid, so ``auto`` keeps that.
ANSWER_VOXELS = 1_500_000
# Where the network's grid, padded to :data:`MULTIPLE`, holds more voxels than its budget
# (the answer's, or the training's), its spacing grows by this factor until it fits. OASIS
# (a brain that fills its field of view; the answer grid 112 x 128 x 144 at 1.66 mm -> 96 x
# 112 x 128 at 1.73 mm): `net` 3.1 -> 2.5 s, its end-point error 0.92 -> 0.94 mm (Dice 0.837
# -> 0.830); the chest CT (224 x 224 x 48 -> 208 x 208 x 32, most of the 48 slices padding):
# 3.6 -> 2.6 s, 3.63 -> 3.55 mm; `auto` within 0.001 Dice on both and the atlas pair; the
# BraTS, SPM, spine and prostate grids were within their budgets (unchanged).
BUDGET_STEP = 1.01


def working_grid(
    fixed: Grid, box: tuple[np.ndarray, np.ndarray], voxels: int | None = None
) -> Grid:
    """The network's grid for ``fixed`` and its foreground index ``box`` (inclusive corners),
    ``voxels`` as in :func:`~carctl.networks.evaluator.working_spacing`: see the module
    docstring."""
    from carctl.networks.evaluator import WORKING_VOXELS, working_spacing

    spacing = working_spacing(fixed.spacing, fixed.size, voxels)
    low, high = widened(box, fixed)
    base = fixed.direction_matrix.T @ np.asarray(fixed.origin)
    low = base + low * np.asarray(fixed.spacing)
    high = base + high * np.asarray(fixed.spacing)

    def sized(spacing: float) -> np.ndarray:  # voxels across, padded up to the multiple
        count = np.ceil((high - low) / spacing - 1e-6).astype(int) + 1
        return np.ceil(count / MULTIPLE).astype(int) * MULTIPLE

    # the budget holds for the grid the network computes on, padding included: where the box
    # fills the field of view, the padding to the multiple took OASIS's 1.5 M voxels to 2.06 M
    # and a 40-slice chest CT's to 2.41 M (BUDGET_STEP)
    budget = voxels or WORKING_VOXELS
    size = sized(spacing)
    while math.prod(size) > budget and max(size) > MULTIPLE:
        spacing *= BUDGET_STEP
        size = sized(spacing)
    origin = fixed.direction_matrix @ ((low + high) / 2 - spacing * (size - 1) / 2)
    return Grid(
        tuple(int(n) for n in size),
        (float(spacing),) * fixed.ndim,
        tuple(float(o) for o in origin),
        fixed.direction,
    )


def inputs(
    fixed: np.ndarray,
    fixed_grid: Grid,
    moving: np.ndarray,
    moving_grid: Grid,
    affine: np.ndarray,
    grid: Grid,
    device: torch.device | str = "cpu",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Both images on the network's ``grid`` (the moving one through ``affine``),
    band-limited and normalised to ``[0, 1]``: ``(1, 1, *grid.shape)`` each."""
    f = resample_band_limited(fixed, fixed_grid, grid, device=device)
    through = [Affine.from_homogeneous(affine)]
    m = resample_band_limited(moving, moving_grid, grid, through, device=device)
    return (
        torch.from_numpy(normalise(f[0, 0].cpu().numpy()))[None, None].to(device),
        torch.from_numpy(normalise(m[0, 0].cpu().numpy()))[None, None].to(device),
    )


def to_physical(u: torch.Tensor, grid: Grid) -> torch.Tensor:
    """A displacement ``(1, D, *grid.shape)`` in voxels of ``grid`` (index axes) in mm."""
    step = torch.as_tensor(grid.direction_matrix * np.asarray(grid.spacing)).to(u)
    return torch.einsum("ij,njzyx->nizyx" if grid.ndim == 3 else "ij,njyx->niyx", step, u)


@torch.no_grad()
def predict(
    model,
    fixed: np.ndarray,
    fixed_grid: Grid,
    moving: np.ndarray,
    moving_grid: Grid,
    affine: np.ndarray,
    box: tuple[np.ndarray, np.ndarray],
    device: torch.device | str = "cpu",
    passes: int = PASSES,
    mirrors: tuple[int, ...] = MIRRORS,
    voxels: int | None = None,
) -> tuple[Grid, torch.Tensor]:
    """The network's deformable part ``u`` for the mapping ``A(x + u(x))``: its grid and
    ``(1, D, *grid.shape)`` mm (normalised images in, see :func:`inputs`).

    Each pass registers the moving image warped by the field so far; with ``du`` the new
    pass's field, the whole is ``u(x) = du(x) + u_before(x + du(x))`` (voxels). Each pass
    averages the answers for the pair as it is and mirrored (:func:`averaged`)."""
    from carctl.networks.car import warp

    grid = working_grid(fixed_grid, box, voxels)
    f, m = inputs(fixed, fixed_grid, moving, moving_grid, affine, grid, device)
    u = averaged(model, m, f, mirrors)
    for _ in range(passes - 1):
        du = averaged(model, warp(m, u), f, mirrors)
        u = du + warp(u, du)
    return grid, to_physical(u, grid)


def averaged(
    model, moving: torch.Tensor, fixed: torch.Tensor, mirrors: tuple[int, ...] = MIRRORS
) -> torch.Tensor:
    """The network's displacement ``(1, D, *spatial)`` (voxels) for the pair as it is and
    mirrored along each index axis in ``mirrors`` (mirrored back: the axis's component
    changes sign), averaged."""
    ndim = fixed.dim() - 2
    u = model(moving, fixed).float()
    for axis in mirrors:
        dim = 2 + ndim - 1 - axis  # tensor dimension of index axis `axis`
        mirrored = model(moving.flip(dim), fixed.flip(dim)).float().flip(dim)
        mirrored[:, axis] = -mirrored[:, axis]
        u = u + mirrored
    return u / (1 + len(mirrors))
