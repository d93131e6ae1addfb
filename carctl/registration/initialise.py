"""Initial alignment that does not fail: candidates scored by the similarity at a coarse level.

Candidates are the scanner header (identity in physical space), the centres of the two image
grids matched, the intensity centres of mass matched, and for each of these a coarse grid of
rotations about the fixed centre. The best-scoring starts are refined with a short rigid
optimisation; the header wins unless another start ends clearly better, so a good header is
never traded for a worse guess.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from carctl.registration.affine import AffineParameters, level_loss, optimise
from carctl.registration.levels import Level
from carctl.spatial.grid import Grid

# Rotation angles (degrees) tried about each axis.
ANGLES = (-20.0, 0.0, 20.0)
# Starts refined by a short rigid optimisation (besides the header).
REFINED = 3
# Another start must end this much (relative) below the header to replace it: the
# similarity of a coarse level is noisy, and a scanner header is usually right.
HEADER_MARGIN = 0.25
# Voxels (a fixed random subset) on which every start is scored, and starts scored in one
# read of the moving features (the starts to refine are refined side by side too).
SCORE_VOXELS, SCORED_TOGETHER = 1 << 13, 4


@dataclass(frozen=True)
class Start:
    name: str
    matrix: np.ndarray  # homogeneous physical fixed -> moving
    score: float = float("nan")


def grid_centre(grid: Grid) -> np.ndarray:
    middle = np.append((np.asarray(grid.size) - 1) / 2.0, 1.0)
    return (grid.index_to_physical @ middle)[:-1]


def centre_of_mass(image: np.ndarray, grid: Grid) -> np.ndarray:
    """Intensity-weighted centre (physical) of a normalised image; the grid centre if empty."""
    # two passes over the image, summed in float64 on every thread: the fastest axis'
    # profile, and the sums along it, from which the other profiles come
    weights = torch.from_numpy(np.ascontiguousarray(image))
    n = weights.shape[-1]
    fastest = weights.reshape(-1, n).sum(0, dtype=torch.float64).numpy()
    rest = weights.sum(dim=-1, dtype=torch.float64).numpy()
    total = float(rest.sum())
    if total <= 0:
        return grid_centre(grid)
    index = []
    for axis in range(grid.ndim):
        dim = grid.ndim - 1 - axis
        if dim == grid.ndim - 1:
            profile = fastest
        else:
            profile = rest.sum(axis=tuple(a for a in range(rest.ndim) if a != dim))
        index.append(float((profile * np.arange(profile.size)).sum() / total))
    return (grid.index_to_physical @ np.append(index, 1.0))[:-1]


def euler_matrix(angles_deg: tuple[float, ...]) -> np.ndarray:
    """Rotation about the physical axes x, then y, then z (degrees); 2-D: one angle."""
    a = np.radians(angles_deg)
    if len(a) == 1:
        c, s = np.cos(a[0]), np.sin(a[0])
        return np.array([[c, -s], [s, c]])
    cx, cy, cz = np.cos(a)
    sx, sy, sz = np.sin(a)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


def about(rotation: np.ndarray, center: np.ndarray, translation: np.ndarray) -> np.ndarray:
    """Homogeneous ``x -> R (x - c) + c + t``."""
    d = rotation.shape[0]
    m = np.eye(d + 1)
    m[:d, :d] = rotation
    m[:d, d] = center + translation - rotation @ center
    return m


def candidates(
    fixed: np.ndarray,
    fixed_grid: Grid,
    moving: np.ndarray,
    moving_grid: Grid,
    center: np.ndarray,
) -> list[Start]:
    """All starts: three translations, each with every rotation of :data:`ANGLES`."""
    d = fixed_grid.ndim
    translations = {
        "header": np.zeros(d),
        "image centres": grid_centre(moving_grid) - grid_centre(fixed_grid),
        "centres of mass": centre_of_mass(moving, moving_grid) - centre_of_mass(fixed, fixed_grid),
    }
    starts = []
    for name, t in translations.items():
        for angles in itertools.product(ANGLES, repeat=1 if d == 2 else 3):
            label = name if not any(angles) else f"{name}, rotated {_angles(angles)}"
            starts.append(Start(label, about(euler_matrix(angles), center, t)))
    return starts


def _angles(angles: tuple[float, ...]) -> str:
    return "/".join(f"{a:+g}" for a in angles) + " deg"


def initialise(
    level: Level,
    starts: list[Start],
    function: Callable[..., torch.Tensor],
    center: np.ndarray,
    radius: float,
    iterations: int = 30,
    progress: Callable[[int], None] | None = None,
    budget: int | None = None,
) -> tuple[Start, list[Start]]:
    """Score every start at ``level``, refine the best few and the header rigidly, and return
    the winner (its matrix refined) and all scored starts (best first)."""
    generator = torch.Generator().manual_seed(0)
    index = level.sample_index(SCORE_VOXELS, generator)  # the same voxels for every start
    with torch.no_grad():
        scores = []
        for group in range(0, len(starts), SCORED_TOGETHER):
            matrices = np.stack([s.matrix for s in starts[group : group + SCORED_TOGETHER]])
            scores += level_loss(level, torch.as_tensor(matrices), function, index).tolist()
    scored = [Start(s.name, s.matrix, score) for s, score in zip(starts, scores, strict=True)]
    scored.sort(key=lambda s: s.score)
    header = next(s for s in scored if s.name == "header")
    chosen: list[Start] = []
    for s in scored:
        if len(chosen) == REFINED:
            break
        if all(not np.allclose(s.matrix, c.matrix, atol=1e-3) for c in chosen):
            chosen.append(s)
    if all(c.name != "header" for c in chosen):
        chosen.append(header)
    params = [AffineParameters(start.matrix, center, affine=False) for start in chosen]
    losses = optimise(level, params, function, iterations, radius, progress, budget, generator)
    refined = [
        Start(start.name, p.homogeneous().detach().numpy(), last)
        for start, p, (_, last) in zip(chosen, params, losses, strict=True)
    ]
    best = min(refined, key=lambda s: s.score)
    header_refined = next(s for s in refined if s.name == "header")
    if header_refined.score <= best.score + HEADER_MARGIN * abs(best.score):
        best = header_refined
    return best, scored
