"""Known deformations for benchmarks and tests: a smooth random field plus a rigid motion.

A pair is built from two aligned images ``a`` and ``b`` (two contrasts of one subject): the
fixed image is ``a`` warped by a known mapping ``phi`` and the moving image is ``b`` as it
is, so that the correct answer of registering ``b`` to the warped ``a`` is ``phi`` itself
(a pull-back map from fixed to moving physical space, like every carctl transform).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from carctl.io import Image
from carctl.registration.affine import rotation_matrix
from carctl.registration.initialise import about
from carctl.spatial.grid import Grid, apply_homogeneous
from carctl.spatial.sample import warp
from carctl.spatial.transform import DisplacementField


def smooth_field(
    grid: Grid,
    rms_mm: float,
    control_mm: float = 40.0,
    seed: int = 0,
    mask: np.ndarray | None = None,
) -> torch.Tensor:
    """A random smooth displacement ``(D, *grid.shape)`` (mm, float64): Gaussian noise on
    control points ``control_mm`` apart, interpolated cubically, scaled to an RMS magnitude
    of ``rms_mm`` inside ``mask`` (everywhere when None)."""
    generator = torch.Generator().manual_seed(seed)
    extent = (np.asarray(grid.size) - 1) * np.asarray(grid.spacing)
    controls = [max(4, int(np.ceil(e / control_mm)) + 3) for e in extent]
    noise = torch.randn(
        (1, grid.ndim, *reversed(controls)), generator=generator, dtype=torch.float64
    )
    mode = "trilinear" if grid.ndim == 3 else "bilinear"
    # bicubic is 2-D only: smooth the coarse noise once, then interpolate linearly
    noise = F.avg_pool3d(noise, 3, 1, 1, count_include_pad=False) if grid.ndim == 3 else noise
    field = F.interpolate(noise, size=grid.shape, mode=mode, align_corners=True)[0]
    # the noise is isotropic, so its components serve as physical (x, y, z) ones as they are
    select = (
        torch.ones(grid.shape, dtype=torch.bool) if mask is None else torch.from_numpy(mask > 0)
    )
    rms = field[:, select].square().sum(dim=0).mean().sqrt()
    return field * (rms_mm / rms.clamp_min(1e-12))


def rigid_matrix(
    ndim: int, degrees: float, translation_mm: float, center: np.ndarray, seed: int = 0
) -> np.ndarray:
    """Homogeneous rotation by ``degrees`` about a random axis through ``center`` followed by
    a translation of ``translation_mm`` in a random direction."""
    rng = np.random.default_rng(seed)
    axis = rng.normal(size=3) if ndim == 3 else np.ones(1)
    vector = np.radians(degrees) * axis / np.linalg.norm(axis)  # rotation vector (2-D: angle)
    rotation = rotation_matrix(torch.as_tensor(vector), ndim).numpy()
    direction = rng.normal(size=ndim)
    shift = translation_mm * direction / np.linalg.norm(direction)
    return about(rotation, center, shift)


def known_mapping(
    grid: Grid,
    mask: np.ndarray,
    rms_mm: float,
    degrees: float,
    translation_mm: float,
    seed: int = 0,
    control_mm: float = 40.0,
    fade_mm: float | None = None,
) -> DisplacementField:
    """``phi(x) = R(x + u(x)) + t`` on ``grid``: ``u`` from :func:`smooth_field` (RMS
    ``rms_mm`` inside ``mask``), ``R, t`` from :func:`rigid_matrix` about the mask's centre.
    With ``fade_mm``, ``u`` fades to zero over that distance inside the mask's outline (the
    outline stays put, the inside moves)."""
    u = smooth_field(grid, rms_mm, control_mm, seed=seed, mask=mask)
    if fade_mm is not None:
        from carctl.registration.levels import gaussian_blur

        inner = torch.from_numpy(mask.astype(np.float64))[None, None]
        inner = gaussian_blur(inner, [fade_mm / s for s in grid.spacing])[0, 0]
        u = u * ((inner - 0.5) * 2).clamp(0, 1)
    points = grid.points()
    center = points[torch.from_numpy(mask > 0)].mean(dim=0).numpy()
    rigid = rigid_matrix(grid.ndim, degrees, translation_mm, center, seed)
    mapped = apply_homogeneous(rigid, points + u.movedim(0, -1))
    return DisplacementField(grid, (mapped - points).movedim(-1, 0).contiguous())


@dataclass(eq=False)
class KnownPair:
    fixed: Image  # ``a`` warped by ``truth``
    moving: Image  # ``b``
    truth: DisplacementField  # the mapping phi as a field on the fixed grid
    mask: np.ndarray  # fixed-grid region where errors are measured (``a``'s mask, warped)


def known_pair(
    a: Image,
    b: Image,
    mask: np.ndarray,
    rms_mm: float = 5.0,
    degrees: float = 4.0,
    translation_mm: float = 4.0,
    seed: int = 0,
) -> KnownPair:
    """Warp ``a`` by the mapping of :func:`known_mapping`."""
    grid = a.grid
    truth = known_mapping(grid, mask, rms_mm, degrees, translation_mm, seed)
    fixed = warp(a.tensor(torch.float32), grid, grid, [truth])[0, 0].numpy()
    warped_mask = warp(
        torch.from_numpy(mask.astype(np.uint8))[None, None], grid, grid, [truth], mode="nearest"
    )
    return KnownPair(Image(fixed, grid), b, truth, warped_mask[0, 0].numpy().astype(bool))


def end_point_error(
    estimate: DisplacementField, truth: DisplacementField, mask: np.ndarray
) -> float:
    """Mean distance (mm) between two mappings' images of the ``mask`` voxels."""
    diff = (
        (estimate.data.to(torch.float64) - truth.data.to(torch.float64)).square().sum(dim=0).sqrt()
    )
    return float(diff[torch.from_numpy(mask)].mean())
