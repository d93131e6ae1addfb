"""Label-free quality control of an alignment.

Both images are brought onto one *working grid*: the fixed image's axes, cropped to its
foreground (with a margin), voxels of :func:`carctl.networks.evaluator.working_spacing`. The
moving image is resampled there through the transforms under test (through the scanner headers
alone for "before"), and both are scaled to ``[-1, 1]``.

The *score* is an estimate of the remaining misalignment in mm: quick, independent
re-registrations of the two (MIND-SSC, a smooth field on control points, two coarse levels
scaled to the field of view; see :func:`correction`) measure how far they would still move
the moving image. There are two of them, with MIND's neighbours one and two voxels away
(:attr:`Check.dilations`), and at every voxel only the part of the correction they agree on
counts: the length of their mean minus their mean distance from it (at most the shorter of
the two; zero where they disagree more than they agree, see :func:`agreed_length`). Where the
images do not determine the correction (thick slices, contrasts that share few structures)
the two checks wander apart, and that wandering is not misalignment: it put thick-slice
cardiac MR 4.4-5.9 mm "off" at the dataset's own alignment with one check. The score is the
mean of that length over the anatomy of either image where the moving image is present, and
its map is the *misalignment map*. It is an estimate, not a measurement: at the true
alignment of two different contrasts it still reads about 1-2 mm on brain MR and 2-4 mm on
thick-slice cardiac MR (see ``docs/benchmarks.md``). Higher is worse; the verdict thresholds
:data:`THRESHOLDS` are calibrated by ``benchmarks/bench_qa.py``.

IMSE's evaluator is run too: its predicted error map ``E(fixed, moved)`` and its mean
``|E|`` are reported alongside. The mean rises with the misalignment within a pair
(Spearman 0.78-0.99 on each pair of the QA benchmark) but starts at 0.09-0.23 at the true
alignment depending on the pair (pooled 0.59), so it does not decide the verdict.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from carctl.io import Image
from carctl.losses.regularisers import diffusion
from carctl.losses.similarity import mind_ssc
from carctl.networks.evaluator import anatomy, working_spacing
from carctl.padding import as_air
from carctl.registration.adam import Adam
from carctl.registration.levels import (
    fixed_level_grid,
    foreground_box,
    intensity_range,
    normalise,
    pool,
    resample_band_limited,
    widened,
)
from carctl.registration.optimize import control_grid, field_on_grid, voxel_indices
from carctl.spatial.grid import Grid
from carctl.spatial.points import interpolate
from carctl.spatial.sample import warp
from carctl.spatial.transform import Transform

WEIGHTS = "imse"
VERDICTS = ("ok", "suspect", "failed")
# Score (mm) from which an alignment is ``suspect`` and ``failed``: calibrated on the shared
# data by ``python benchmarks/bench_qa.py --calibrate`` (see its ``calibrate``), rounded.
THRESHOLDS = {"suspect": 2.0, "failed": 4.0}


@dataclass(frozen=True)
class Check:
    """The quick re-registration behind the score (:func:`correction`)."""

    # voxel size of each level, coarse to fine, and the control-point spacing (mm); on a
    # small field of view at most the grid's largest extent over ``across`` (voxels or
    # control intervals), so that a level still resolves it
    levels_mm: tuple[float, ...] = (8.0, 4.0)
    levels_across: tuple[float, ...] = (16.0, 32.0)
    control_mm: float = 20.0
    controls_across: float = 6.5
    iterations: int = 40  # Adam steps per level
    regularization: float = 1.0  # weight of the diffusion penalty (MIND summed over channels)
    step_mm: float = 0.5  # Adam's step, decaying linearly to a fifth over each level
    # MIND-SSC's neighbour distance (voxels of a level) of each independent re-registration;
    # the score counts what they agree on (:func:`agreed_length`)
    dilations: tuple[int, ...] = (1, 2)


CHECK = Check()
# A level keeps at least this many voxels along every axis (MIND needs a neighbourhood).
_MIN_LEVEL_VOXELS = 5


@dataclass(eq=False)
class Reference:
    """The fixed image on the working grid, in ``[-1, 1]``; ``range`` is the pair of fixed
    intensities mapped to -1 and 1."""

    grid: Grid
    image: torch.Tensor  # (1, 1, *grid.shape)
    range: tuple[float, float]


@dataclass(eq=False)
class Pair:
    """A fixed image and a moved moving image on the working grid, in ``[-1, 1]``."""

    grid: Grid
    reference: torch.Tensor  # (1, 1, *grid.shape)
    other: torch.Tensor
    mask: torch.Tensor  # bool: anatomy of either, where the moving image is present


@dataclass(eq=False)
class Assessment:
    score: float  # mean length of the correction over the mask (mm)
    misalignment: torch.Tensor  # length of the correction on the working grid (mm), (1, 1, *shape)
    pair: Pair
    error: torch.Tensor | None = None  # IMSE's |E| on the working grid, (1, 1, *shape)
    mean_error: float = float("nan")  # IMSE's mean |E| over the mask (normalised intensity)


def working_grid(fixed: Image, mask: np.ndarray | None = None) -> Grid:
    """The fixed image's axes over its foreground box (with the registration levels' margin),
    isotropic voxels of :func:`working_spacing`."""
    box = widened(foreground_box(normalise(finite(fixed.array)), mask), fixed.grid)
    size = box[1] - box[0] + 1
    return fixed_level_grid(fixed.grid, working_spacing(fixed.grid.spacing, size), box)


def finite(array: np.ndarray) -> np.ndarray:
    """``array`` as the registration reads it: scanner padding as air
    (:func:`~carctl.padding.padding`: its edge, where the scanner put it in both
    images, read as alignment) and non-finite voxels as its least finite value
    (:func:`~carctl.registration.levels.normalise`: resampling with a band limit spread one
    NaN voxel over its neighbours, and a NaN block made the score NaN)."""
    array, _ = as_air(array)
    numbers = np.isfinite(array)
    if numbers.all():
        return array
    # the darkest value where there is one (a CT's air: at 0 it read as water)
    least = float(array[numbers].min()) if numbers.any() else 0.0
    return np.nan_to_num(array, nan=least, posinf=least, neginf=least)


def content(image: Image) -> Image:
    """An already-warped image cut to the box of its content: the index planes at its grid's
    ends that hold one value only, its corner's (what the resampling filled in beyond the
    image it came from: 0 for ``carctl apply``, ANTs and elastix), are left out, so that
    they count as absent, as the moving image's outside does when the transforms are given.
    Scored as present, the fill beyond a moving image shorter than the fixed one read as
    misalignment: a CT onto an MR of 22 slices, registered by carctl, scored 2.0 mm through
    its field and 4.1 mm through its warped image (3.0 cut to its content; the rest is the
    warped image's second interpolation)."""
    array = finite(image.array)
    same = array == array.flat[0]
    if same.all():
        return image
    start, stop = [], []
    for axis in range(array.ndim):  # array order: the grid's axes reversed
        full = same.all(axis=tuple(a for a in range(array.ndim) if a != axis))
        kept = np.flatnonzero(~full)
        start.append(int(kept[0]))
        stop.append(int(kept[-1]) + 1)
    if start == [0] * array.ndim and stop == list(array.shape):
        return image
    box = tuple(slice(a, b) for a, b in zip(start, stop, strict=True))
    return Image(image.array[box], image.grid.crop(start[::-1], stop[::-1]))


def _scaled(
    values: torch.Tensor, select: torch.Tensor | None = None
) -> tuple[torch.Tensor, tuple[float, float]]:
    """``values`` mapped to ``[-1, 1]`` by :func:`intensity_range` (over ``select``), and
    that range."""
    array = values[0, 0].cpu().numpy()
    bounds = intensity_range(array, None if select is None else select[0, 0].cpu().numpy())
    low, high = bounds or (0.0, 1.0)
    scaled = np.clip((array - low) / (high - low), 0, 1) * 2 - 1
    return torch.from_numpy(scaled.astype(np.float32))[None, None].to(values.device), (low, high)


def reference_of(fixed: Image, grid: Grid | None = None, device: str = "cpu") -> Reference:
    """``fixed`` on the working ``grid`` (default :func:`working_grid`), in ``[-1, 1]``."""
    array = finite(fixed.array)  # once: the padding search reads the whole image
    grid = grid or working_grid(Image(array, fixed.grid))
    image, bounds = _scaled(resample_band_limited(array, fixed.grid, grid, device=device))
    return Reference(grid, image, bounds)


def pair_with(
    reference: Reference, moving: Image, transforms: Sequence[Transform] = (), device="cpu"
) -> Pair:
    """``moving`` through ``transforms`` on the reference's grid, in ``[-1, 1]`` (scaled over
    where it is present; -1 elsewhere)."""
    grid = reference.grid
    moved = resample_band_limited(
        finite(moving.array), moving.grid, grid, transforms, device=device
    )
    # where the moving image is: its ones as a broadcast view (the same values; a whole-size
    # tensor of ones was 420 MB for a 512 x 512 x 400 CT)
    ones = torch.ones((1,) * (moving.grid.ndim + 2), device=device)
    ones = ones.expand(1, 1, *moving.grid.shape)
    support = warp(ones, moving.grid, grid, transforms) > 0.5
    other, _ = _scaled(moved, support)
    other = torch.where(support, other, torch.full_like(other, -1.0))
    mask = (anatomy(reference.image) | anatomy(other)) & support
    return Pair(grid, reference.image, other, mask)


def prepare(
    fixed: Image,
    moving: Image,
    transforms: Sequence[Transform] = (),
    grid: Grid | None = None,
    device: str = "cpu",
) -> Pair:
    """Fixed and moving (through ``transforms``) on the working ``grid``, in ``[-1, 1]``."""
    return pair_with(reference_of(fixed, grid, device), moving, transforms, device)


def assess_alignments(
    model: torch.nn.Module | None,
    fixed: Image,
    alignments: Sequence[tuple[Image, Sequence[Transform]]],
    device: str = "cpu",
) -> list[Assessment]:
    """One :class:`Assessment` per ``(moving image, transforms)``, all on one working grid
    with the fixed image resampled once (IMSE's error maps too when ``model`` is given)."""
    reference = reference_of(fixed, device=device)
    # each moving image read as the registration reads it once, however many alignments
    ready = {id(m): Image(finite(m.array), m.grid) for m, _ in alignments}
    return [
        assess(model, pair_with(reference, ready[id(m)], chain, device)) for m, chain in alignments
    ]


def assess(model: torch.nn.Module | None, pair: Pair, check: Check = CHECK) -> Assessment:
    """The score and misalignment map of ``pair`` (:func:`agreed_length` of the corrections
    of :func:`correction` with each of ``check.dilations``), and IMSE's error map when
    ``model`` is given and accepts the pair (3-D weights; not on 2-D or 4-voxel images: their
    ``mean_error`` stays NaN, null in JSON) (no gradients through the evaluator)."""
    length = agreed_length([correction(pair, check, d) for d in check.dilations])
    assessment = Assessment(masked_mean(length, pair.mask), length, pair)
    if model is not None and model.accepts(tuple(pair.reference.shape[2:])):
        with torch.no_grad():
            assessment.error = model(pair.reference, pair.other).abs()
        assessment.mean_error = masked_mean(assessment.error, pair.mask)
    return assessment


def agreed_length(corrections: Sequence[torch.Tensor]) -> torch.Tensor:
    """The length (mm) of what displacements ``(1, D, *shape)`` agree on, at every voxel:
    ``|mean| - mean |u_i - mean|``, at least zero; ``|u|`` for one. For two, the length of
    their mean less half their distance: at most the shorter one, and zero where they point
    apart. ``(1, 1, *shape)``."""
    mean = torch.stack(list(corrections)).mean(dim=0)
    length = mean.square().sum(dim=1, keepdim=True).sqrt()
    spread = torch.stack([(u - mean).square().sum(dim=1, keepdim=True).sqrt() for u in corrections])
    return (length - spread.mean(dim=0)).clamp_min(0)


def correction(pair: Pair, check: Check = CHECK, dilation: int = 1) -> torch.Tensor:
    """The displacement (mm) a quick re-registration of ``pair`` applies to its moving image,
    on the working grid: ``(1, D, *shape)``, components along the grid's index axes
    (``i, j, k``; only its length is used).

    At each level of ``check.levels_mm`` (finer on a small field of view, see :class:`Check`)
    both images are average-pooled to about that voxel size (per axis, never finer than the
    grid, at least five voxels across) and described by MIND-SSC (neighbours ``dilation``
    voxels away); one displacement on a control grid ``check.control_mm`` apart (or finer)
    spanning the working grid (linear interpolation) is optimised by Adam for the squared
    MIND difference over the pair's mask plus ``check.regularization`` x the diffusion
    energy, coarse level first. Deterministic; no gradients leave it."""
    grid, d = pair.grid, pair.grid.ndim
    extent = max((n - 1) * s for n, s in zip(grid.size, grid.spacing, strict=True))
    control_mm = min(check.control_mm, extent / check.controls_across)
    control = control_grid(grid, control_mm / np.asarray(grid.spacing))
    field = torch.zeros((1, d, *control.shape), device=pair.reference.device, requires_grad=True)
    for level_mm, across in zip(check.levels_mm, check.levels_across, strict=True):
        level_mm = min(level_mm, extent / across)
        factors = [
            max(1, min(round(level_mm / s), n // _MIN_LEVEL_VOXELS))
            for n, s in zip(grid.size, grid.spacing, strict=True)
        ]
        reference, level = pool(pair.reference, grid, factors)
        select = pool(pair.mask.float(), grid, factors)[0][0, 0] > 0.5
        if not bool(select.any()):
            continue
        fixed = mind_ssc(reference, dilation=dilation)[0].movedim(0, -1)[select]  # (K, C)
        moving = mind_ssc(pool(pair.other, grid, factors)[0], dilation=dilation)
        moving = moving[0].movedim(0, -1).contiguous()
        index = voxel_indices(level.size).to(field.device)[select.flatten()]  # (K, D)
        step = torch.tensor(level.spacing, dtype=torch.float32, device=field.device)
        upper = torch.tensor([n - 1 for n in level.size], dtype=torch.float32, device=field.device)
        optimiser = Adam([field], [check.step_mm])
        for i in range(check.iterations):
            optimiser.zero_grad()
            u = field_on_grid(field, control, level).movedim(0, -1)[select]  # (K, D) mm
            # clamped to the level: beyond it the border's features continue
            at = torch.minimum((index + u / step).clamp_min(0), upper)
            similarity = (fixed - interpolate(moving, at)).square().sum(dim=1).mean()
            penalty = diffusion(field, control.spacing)
            (similarity + check.regularization * penalty).backward()
            optimiser.step(1 - 0.8 * i / check.iterations)
    with torch.no_grad():
        return field_on_grid(field, control, grid)[None]


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> float:
    if not bool(mask.any()):
        return float("nan")
    return float(values[mask].mean())


def describe(score: float, digits: int = 2) -> str:
    """A score for people: mm with ``digits`` decimals, or why there is none (no voxel of
    the anatomy where both images are present)."""
    return f"{score:.{digits}f}" if np.isfinite(score) else "none (the images do not overlap)"


def verdict(score: float, thresholds: dict | None = None) -> str:
    """``ok`` below ``thresholds['suspect']`` (default :data:`THRESHOLDS`), ``failed`` from
    ``thresholds['failed']`` on, ``suspect`` between; ``failed`` when there is no score."""
    thresholds = thresholds or THRESHOLDS
    if not np.isfinite(score) or score >= thresholds["failed"]:
        return "failed"
    return "suspect" if score >= thresholds["suspect"] else "ok"


def misalignment_image(assessment: Assessment) -> Image:
    """The misalignment map (mm) as an image on the working grid (float32)."""
    values = assessment.misalignment[0, 0].cpu().numpy().astype(np.float32)
    return Image(values, assessment.pair.grid)


# --- a picture for people: the fixed image with the misalignment map as heat -------------------


def _heat(values: np.ndarray) -> np.ndarray:
    """Black-red-yellow-white colours for ``values`` in ``[0, 1]``: ``(*shape, 3)`` floats."""
    v = np.clip(values, 0, 1)[..., None]
    return np.clip(np.concatenate([3 * v, 3 * v - 1, 3 * v - 2], axis=-1), 0, 1)


def overlay(assessments: Sequence[Assessment]) -> np.ndarray:
    """Rows of three orthogonal slices (through the anatomy's centre; a 2-D image whole) of
    the fixed image in grey with the misalignment map blended as heat, one row per
    assessment, one colour scale for all (white at twice the ``failed`` threshold):
    ``(H, W, 3)`` uint8."""
    mask = assessments[0].pair.mask[0, 0].cpu().numpy()
    centre = [int(np.round(w.mean())) for w in np.nonzero(mask)] if mask.any() else None
    centre = centre or [n // 2 for n in mask.shape]

    def slices(volume: np.ndarray) -> list[np.ndarray]:
        if volume.ndim == 2:
            return [volume]
        return [np.take(volume, c, axis=axis) for axis, c in enumerate(centre)]

    errors = [a.misalignment[0, 0].cpu().numpy() for a in assessments]
    top = 2 * THRESHOLDS["failed"]
    rows = []
    for a, error in zip(assessments, errors, strict=True):
        grey = (a.pair.reference[0, 0].cpu().numpy() + 1) / 2
        panels = []
        for g, e in zip(slices(grey), slices(error / max(top, 1e-6)), strict=True):
            alpha = np.clip(e, 0, 1)[..., None] * 0.8
            panels.append(_enlarged(np.flipud((1 - alpha) * g[..., None] + alpha * _heat(e))))
        height = max(p.shape[0] for p in panels)
        panels = [np.pad(p, ((0, height - p.shape[0]), (0, 2), (0, 0))) for p in panels]
        rows.append(np.concatenate(panels, axis=1))
    width = max(r.shape[1] for r in rows)
    rows = [np.pad(r, ((0, 2), (0, width - r.shape[1]), (0, 0))) for r in rows]
    return (np.concatenate(rows, axis=0) * 255).round().astype(np.uint8)


def _enlarged(rgb: np.ndarray) -> np.ndarray:
    """Nearest-neighbour upscaling so that the panel is at least 192 pixels high."""
    factor = max(1, int(np.ceil(192 / rgb.shape[0])))
    return rgb.repeat(factor, axis=0).repeat(factor, axis=1)


def png_bytes(rgb: np.ndarray) -> bytes:
    """An 8-bit RGB PNG of ``(H, W, 3)`` uint8 pixels."""
    height, width, _ = rgb.shape
    raw = b"".join(b"\x00" + rgb[row].tobytes() for row in range(height))

    def chunk(kind: bytes, payload: bytes) -> bytes:
        body = kind + payload
        return struct.pack(">I", len(payload)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(raw, 6))
        + chunk(b"IEND", b"")
    )
