"""Initial alignment that does not fail: candidates scored by the similarity at a coarse level.

Candidates are the scanner header (identity in physical space), the centres of the two image
grids matched, the intensity centres of mass matched, and for each of these a coarse grid of
rotations about the fixed centre. The best-scoring starts are refined with a short rigid
optimisation (a start turned far, with the moving features taken along its own rotation:
along the fixed axes it stopped short, and from 35 degrees on the header won); the header
wins unless another start ends clearly better, so a good header is never traded for a
worse guess (in 2-D the finalists are compared on a finer level: see :data:`REFINED_2D`). A
start that leaves the images (almost) apart is set aside
first: the losses compare the images where both are present, so such a start scores as
well as a perfect one.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from carctl.errors import InputError
from carctl.registration.affine import AffineParameters, level_loss, level_overlap, optimise
from carctl.registration.levels import Level
from carctl.spatial.grid import Grid, slabs

# Rotation angles (degrees) tried about each axis.
ANGLES = (-20.0, 0.0, 20.0)
# In 2-D, where a rotation has one angle and the levels are small: the whole circle, every
# start scored along its own rotation (see :func:`initialise`). BraTS contrast slices turned
# by 45 / 90 / 150 degrees (two contrasts, two seeds, 10 mm, 2 mm RMS; `--method affine`)
# were found in 0 of 4 cases each with the +-20 degrees of 3-D, 12 of 12 now (1.7-2.1 mm),
# for about 0.1 s; `bench_2d.py` (rotations within 5 degrees) unchanged.
PLANAR_ANGLES = tuple(float(a) for a in range(-160, 181, 20))
# ``--search wide`` (3-D): every 30 degrees up to 60 about each axis (125 rotations), each
# start scored along its own rotation (a level per rotation, built and dropped in turn: 6-9 s
# on a 2 mm template or a 1 mm brain, whose search takes 0.5 s by default). The SPM T2 and
# PD templates onto the T1 turned by 45 / 60 / 90 degrees about a random axis (seeds 0 and 1,
# `--method affine`) were found in 4 / 4 / 2 of 4 cases (1.4-1.6 mm; the other two 6-8 mm
# off; the default search: 2 / 0 / 0), at 0 and 20 degrees as by default (1.5-1.6 mm); not
# at 120 degrees. For images whose orientations may differ by up to about 90 degrees (a head
# scanned prone, a specimen); beyond, --initial-affine.
WIDE_ANGLES = (-60.0, -30.0, 0.0, 30.0, 60.0)
# Starts refined by a short rigid optimisation (besides the header).
REFINED = 3
# In 2-D, more of them, judged on a finer level (see :func:`initialise`): a slice's coarse
# level holds a few thousand pixels, too few to rank its 54 starts reliably. BraTS contrast
# slices (T2w 77 and T2-FLAIR 60 onto T1n, T1c 90 onto T2w) under a known rotation of 0 /
# +-5 / +-20 / 45 / +-90 / 150 degrees, 10 mm and 2 mm RMS, seeds 0-2, `--method affine`:
# 5 of 81 cases 7.6-105 mm off with three finalists chosen on the coarse level (among them
# T2-FLAIR at 20 degrees: the right start 0.131, a start 40 degrees off 0.132, the header
# 0.152 there and kept within HEADER_MARGIN; on the finer level 0.129 / 0.152 / 0.178), 2 of
# 81 with three judged on the finer level (the right start ranked 7th-8th on the coarse
# one), none with eight; the others within 0.2 mm, the search 0.2-0.3 s longer.
REFINED_2D = 8
# Another start must end this much (relative) below the header to replace it: the
# similarity of a coarse level is noisy, and a scanner header is usually right.
HEADER_MARGIN = 0.25
# Voxels (a fixed random subset) on which every start is scored, and starts scored in one
# read of the moving features (the starts to refine are refined side by side too).
SCORE_VOXELS, SCORED_TOGETHER = 1 << 13, 4
# A start under which the moving image covers less than this share of what the best-covering
# start covers (of the fixed voxels scored) is set aside, however low its loss: on the
# images apart (1000 mm, or one shared plane) the header's loss over next to no voxels was
# 0 and won, and `register` wrote an empty image. Starts on real pairs cover 0.2-1.0 of
# the fixed level, each within 0.3-1x of the best one.
MIN_OVERLAP = 0.05
# Under the best-covering start the images must share at least this many voxels of the level
# (weighted by the fixed mask): a moving image of 1e-6 mm voxels, 0.03 mm across, covered a
# fraction of one voxel, every loss read 0 and `register` wrote an empty image.
MIN_OVERLAP_VOXELS = 8
# Below this many times :data:`MIN_OVERLAP_VOXELS` (as the scored subset estimates it) the
# overlap is counted on every voxel of the level before the images are let through: a
# one-voxel moving mask read as 10-20 voxels on the subset that happened to touch it, and
# `register` optimised losses of 0 to a 28 degree turn.
WHOLE_COUNT_BELOW = 128
# Voxels per slab of :func:`centre_of_mass` (whole slices of the slowest axis, at least one).
_SLAB_VOXELS = 1 << 20


def least_overlap(scored: list[Start]) -> float:
    """The overlap under which a scored start is set aside (see :data:`MIN_OVERLAP`)."""
    return MIN_OVERLAP * max(s.overlap for s in scored)


@dataclass(frozen=True)
class Start:
    name: str
    matrix: np.ndarray  # homogeneous physical fixed -> moving
    score: float = float("nan")
    overlap: float = float("nan")  # share of the scored fixed voxels the moving image covers


def require_overlap(level: Level, overlap: float, under: str, masked: bool = False) -> None:
    """Refuse (:class:`InputError`) images that share fewer than :data:`MIN_OVERLAP_VOXELS`
    voxels of ``level`` when the moving image covers the share ``overlap`` of it (weighted by
    the fixed mask) ``under`` the start(s) said; ``masked``: masks were given."""
    if overlap * _fixed_voxels(level) < MIN_OVERLAP_VOXELS:
        inside = " inside the masks" if masked else ""
        raise InputError(
            f"the images do not overlap{inside} {under} (on fewer than {MIN_OVERLAP_VOXELS} "
            f"voxels of {max(level.spacing):g} mm): is one of them empty where it matters, or "
            "far smaller than the other?"
        )


def _fixed_voxels(level: Level) -> float:
    return level.voxels if level.weight is None else float(level.weight.sum())


def best_overlap(level: Level, matrices: list[np.ndarray], sampled: list[float]) -> float:
    """The largest share of ``level`` the moving image covers under any of ``matrices``:
    the ``sampled`` estimate (on a subset of the voxels), or, where that is near
    :data:`MIN_OVERLAP_VOXELS`, the largest count over every voxel under the
    :data:`SCORED_TOGETHER` starts estimated highest (a subset that touches a tiny overlap
    reads it as many times larger; counting all 81 starts on a 2 mm brain took 20 s)."""
    if max(sampled) * _fixed_voxels(level) >= WHOLE_COUNT_BELOW * MIN_OVERLAP_VOXELS:
        return max(sampled)
    highest = np.argsort(sampled)[::-1][:SCORED_TOGETHER]
    with torch.no_grad():
        chosen = torch.as_tensor(np.stack([matrices[i] for i in highest]))
        return float(level_overlap(level, chosen).max())


def grid_centre(grid: Grid) -> np.ndarray:
    middle = np.append((np.asarray(grid.size) - 1) / 2.0, 1.0)
    return (grid.index_to_physical @ middle)[:-1]


def centre_of_mass(image: np.ndarray, grid: Grid) -> np.ndarray:
    """Intensity-weighted centre (physical) of a normalised image; the grid centre if empty."""
    # summed in float64 by slabs of the slowest axis (each converted in the caches): the
    # profile along each axis, from one pass over the image (a whole-image pass per axis
    # with float64 accumulation took 0.05 s on a 1 mm brain, 0.7 s on a 512 x 512 x 400 CT)
    weights = torch.from_numpy(np.ascontiguousarray(image))
    d = weights.dim()
    profiles = [torch.zeros(n, dtype=torch.float64) for n in weights.shape]
    for start, stop in slabs(weights.shape, _SLAB_VOXELS):
        slab = weights[start:stop].to(torch.float64)
        profiles[-1] += slab.sum(dim=tuple(range(d - 1)))
        rows = slab.sum(dim=-1)  # (slab,) in 2-D, (slab, Y) in 3-D
        if d == 3:
            profiles[1] += rows.sum(dim=0)
            rows = rows.sum(dim=1)
        profiles[0][start:stop] = rows
    total = float(profiles[-1].sum())
    if total <= 0:
        return grid_centre(grid)
    index = [
        float((profiles[d - 1 - axis] * torch.arange(grid.size[axis])).sum() / total)
        for axis in range(d)
    ]
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
    wide: bool = False,
) -> list[Start]:
    """All starts: three translations, each with every rotation of :data:`ANGLES`
    (:data:`WIDE_ANGLES` with ``wide``; 2-D: :data:`PLANAR_ANGLES`, the whole circle)."""
    d = fixed_grid.ndim
    angles_3d = WIDE_ANGLES if wide else ANGLES
    translations = {
        "header": np.zeros(d),
        "image centres": grid_centre(moving_grid) - grid_centre(fixed_grid),
        "centres of mass": centre_of_mass(moving, moving_grid) - centre_of_mass(fixed, fixed_grid),
    }
    starts = []
    for name, t in translations.items():
        for angles in itertools.product(*([PLANAR_ANGLES] if d == 2 else [angles_3d] * 3)):
            label = name if not any(angles) else f"{name}, rotated {_angles(angles)}"
            starts.append(Start(label, about(euler_matrix(angles), center, t)))
    return starts


def _angles(angles: tuple[float, ...]) -> str:
    return "/".join(f"{a:+g}" for a in angles) + " deg"


def _by_level(first: Level, levels: list[Level]) -> list[tuple[Level, list[int]]]:
    """The indices into ``levels`` of each level in it, ``first``'s first (its random voxels
    drawn as before any other level came in)."""
    groups: dict[int, tuple[Level, list[int]]] = {id(first): (first, [])}
    for i, lv in enumerate(levels):
        groups.setdefault(id(lv), (lv, []))[1].append(i)
    return [group for group in groups.values() if group[1]]


def by_rotation(starts: list[Start]) -> list[list[int]]:
    """The indices of ``starts`` grouped by their rotation, in the order they first appear."""
    groups: dict[bytes, list[int]] = {}
    for i, s in enumerate(starts):
        groups.setdefault(np.round(s.matrix[:-1, :-1], 9).tobytes(), []).append(i)
    return list(groups.values())


def initialise(
    level: Level,
    starts: list[Start],
    function: Callable[..., torch.Tensor],
    center: np.ndarray,
    radius: float,
    iterations: int = 30,
    progress: Callable[[int], None] | None = None,
    budget: int | None = None,
    masked: bool = False,
    turned: Callable[[np.ndarray], Level | None] | None = None,
    own: bool = False,
    refined: int = REFINED,
    judge: Callable[[list[np.ndarray]], list[float]] | None = None,
) -> tuple[Start, list[Start]]:
    """Score every start at ``level``, refine the best ``refined`` and the header rigidly,
    and return the winner (its matrix refined) and all scored starts (best first; those set
    aside for too little overlap, see :data:`MIN_OVERLAP`, last). ``masked``: masks were
    given (said when the images are refused for too little overlap).

    The winner is the refined start of the lowest loss, or the header when its loss is
    within :data:`HEADER_MARGIN` of that; ``judge(matrices)`` gives the losses that decide
    (the refined matrices scored on a finer level) instead of the refinement's own. The
    winner's score stays its refined loss at ``level``.

    ``turned(matrix)``: for a start whose rotation turns far enough, the level (``level``'s
    grids) whose moving features are taken along that rotation, else None; the chosen
    starts it gives a level for are refined there. With ``own`` every start is scored there
    too, rotation by rotation (:func:`by_rotation`; ``progress`` advances by one for each),
    each level asked for once."""
    generator = torch.Generator().manual_seed(0)
    index = level.sample_index(SCORE_VOXELS, generator)  # the same voxels for every start
    scores, overlaps = [0.0] * len(starts), [0.0] * len(starts)

    def score(where: Level, members: list[int]) -> None:
        for group in range(0, len(members), SCORED_TOGETHER):
            some = members[group : group + SCORED_TOGETHER]
            matrices = torch.as_tensor(np.stack([starts[i].matrix for i in some]))
            found, overlap = level_loss(where, matrices, function, index, overlap=True)
            for i, sc, ov in zip(some, found.tolist(), overlap.tolist(), strict=True):
                scores[i], overlaps[i] = sc, ov

    with torch.no_grad():
        if own and turned is not None:
            for members in by_rotation(starts):
                score(turned(starts[members[0]].matrix) or level, members)
                if progress is not None:
                    progress(1)
        else:
            score(level, list(range(len(starts))))
    require_overlap(
        level,
        best_overlap(level, [s.matrix for s in starts], overlaps),
        "under their headers, with their centres matched or with their centres of mass matched",
        masked,
    )
    scored = [
        Start(s.name, s.matrix, score, overlap)
        for s, score, overlap in zip(starts, scores, overlaps, strict=True)
    ]
    least = least_overlap(scored)
    scored.sort(key=lambda s: (s.overlap < least, s.score))
    header = next(s for s in scored if s.name == "header")
    chosen: list[Start] = []
    for s in scored:
        if len(chosen) == refined:
            break
        if all(not np.allclose(s.matrix, c.matrix, atol=1e-3) for c in chosen):
            chosen.append(s)
    if all(c.name != "header" for c in chosen):
        chosen.append(header)
    # the starts turned far enough are refined on their own levels, the others side by side
    # on ``level``
    levels = [(turned(s.matrix) if turned else None) or level for s in chosen]
    ends: list[Start | None] = [None] * len(chosen)
    for where, members in _by_level(level, levels):
        params = [AffineParameters(chosen[i].matrix, center, affine=False) for i in members]
        losses = optimise(where, params, function, iterations, radius, progress, budget, generator)
        matrices = [p.homogeneous().detach() for p in params]
        with torch.no_grad():
            overlaps = level_overlap(where, torch.stack(matrices), index).tolist()
        for i, matrix, (_, last), overlap in zip(members, matrices, losses, overlaps, strict=True):
            ends[i] = Start(chosen[i].name, matrix.numpy(), last, overlap)
    usable = [s for s in ends if s.overlap >= least] or ends
    deciding = judge([s.matrix for s in usable]) if judge else [s.score for s in usable]
    lowest = min(range(len(usable)), key=deciding.__getitem__)
    best = usable[lowest]
    header_at = next((i for i, s in enumerate(usable) if s.name == "header"), None)
    margin = HEADER_MARGIN * abs(deciding[lowest])
    if header_at is not None and deciding[header_at] <= deciding[lowest] + margin:
        best = usable[header_at]
    return best, scored
