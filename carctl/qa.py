"""Label-free quality control of an alignment with IMSE's evaluator.

Both images are brought onto one *working grid*: the fixed image's axes, cropped to its
foreground (with a margin), isotropic voxels of :func:`carctl.networks.evaluator.working_spacing`
(the spacing the evaluator was trained at). The moving image is resampled there through the
transforms under test (through the scanner headers alone for "before"). The evaluator
predicts the error map ``E(fixed, moved)`` in the fixed image's normalised intensities
(``[-1, 1]``). Over the anatomy of either image where the moving image is present, the mean
``|E|`` divided by the mean ``|grad fixed|`` (per mm) is the *score*: for small misalignments
``|E| ~ |grad fixed . d|``, so the score reads as a misalignment in mm, comparable between
sharp and blurry images (an estimate, not a measurement). Higher is worse; the verdict
thresholds come with the weights' model card (key ``qa``), calibrated by
``benchmarks/bench_qa.py``.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from carctl.io import Image
from carctl.networks.evaluator import anatomy, working_spacing
from carctl.registration.levels import (
    fixed_level_grid,
    foreground_box,
    intensity_range,
    normalise,
    resample_band_limited,
    widened,
)
from carctl.spatial.grid import Grid
from carctl.spatial.sample import warp
from carctl.spatial.transform import Transform

WEIGHTS = "imse"
VERDICTS = ("ok", "suspect", "failed")


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
    score: float  # mean |E| over the mask divided by the mean |grad reference| there (mm)
    error: torch.Tensor  # |E| on the working grid, (1, 1, *shape)
    pair: Pair
    mean_error: float  # mean |E| over the mask (normalised intensity)


def working_grid(fixed: Image, mask: np.ndarray | None = None) -> Grid:
    """The fixed image's axes over its foreground box (with the registration levels' margin),
    isotropic voxels of :func:`working_spacing`."""
    box = widened(foreground_box(normalise(fixed.array), mask), fixed.grid)
    size = box[1] - box[0] + 1
    return fixed_level_grid(fixed.grid, working_spacing(fixed.grid.spacing, size), box)


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
    grid = grid or working_grid(fixed)
    image, bounds = _scaled(resample_band_limited(fixed.array, fixed.grid, grid, device=device))
    return Reference(grid, image, bounds)


def pair_with(
    reference: Reference, moving: Image, transforms: Sequence[Transform] = (), device="cpu"
) -> Pair:
    """``moving`` through ``transforms`` on the reference's grid, in ``[-1, 1]`` (scaled over
    where it is present; -1 elsewhere)."""
    grid = reference.grid
    moved = resample_band_limited(moving.array, moving.grid, grid, transforms, device=device)
    ones = torch.ones((1, 1, *moving.grid.shape), device=device)
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
    model: torch.nn.Module,
    fixed: Image,
    alignments: Sequence[tuple[Image, Sequence[Transform]]],
    device: str = "cpu",
) -> list[Assessment]:
    """One :class:`Assessment` per ``(moving image, transforms)``, all on one working grid
    with the fixed image resampled once."""
    reference = reference_of(fixed, device=device)
    return [assess(model, pair_with(reference, m, chain, device)) for m, chain in alignments]


def assess(model: torch.nn.Module, pair: Pair) -> Assessment:
    """The evaluator's error map and score for ``pair`` (no gradients)."""
    with torch.no_grad():
        error = model(pair.reference, pair.other).abs()
    mean_error = masked_mean(error, pair.mask)
    sharpness = masked_mean(gradient_magnitude(pair.reference, pair.grid), pair.mask)
    return Assessment(mean_error / max(sharpness, 1e-6), error, pair, mean_error)


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> float:
    if not bool(mask.any()):
        return float("nan")
    return float(values[mask].mean())


def gradient_magnitude(image: torch.Tensor, grid: Grid) -> torch.Tensor:
    """``|grad image|`` per mm (central differences), same shape as ``image``."""
    spacing = list(reversed(grid.spacing))  # array axes are (z, y, x)
    axes = [d for d in range(2, image.dim()) if image.shape[d] > 1]
    if not axes:
        return torch.zeros_like(image)
    parts = torch.gradient(image, spacing=[spacing[d - 2] for d in axes], dim=axes)
    return torch.stack(parts).square().sum(dim=0).sqrt()


UNCALIBRATED = "uncalibrated"


def thresholds_of(card_data: dict) -> dict | None:
    """The verdict thresholds in a model card, or None when the weights were not calibrated
    (``benchmarks/bench_qa.py --calibrate`` found no trustworthy thresholds)."""
    return (card_data.get("qa") or {}).get("thresholds")


def verdict(score: float, thresholds: dict | None) -> str:
    """``ok`` below ``thresholds['suspect']``, ``failed`` from ``thresholds['failed']`` on;
    ``uncalibrated`` without thresholds."""
    if thresholds is None:
        return UNCALIBRATED
    if not np.isfinite(score) or score >= thresholds["failed"]:
        return "failed"
    return "suspect" if score >= thresholds["suspect"] else "ok"


def error_image(assessment: Assessment) -> Image:
    """``|E|`` as an image on the working grid (float32)."""
    return Image(assessment.error[0, 0].cpu().numpy().astype(np.float32), assessment.pair.grid)


# --- a picture for people: fixed image with the error map as a heat overlay ------------------


def _heat(values: np.ndarray) -> np.ndarray:
    """Black-red-yellow-white colours for ``values`` in ``[0, 1]``: ``(*shape, 3)`` floats."""
    v = np.clip(values, 0, 1)[..., None]
    return np.clip(np.concatenate([3 * v, 3 * v - 1, 3 * v - 2], axis=-1), 0, 1)


def overlay(assessments: Sequence[Assessment]) -> np.ndarray:
    """Rows of three orthogonal slices (through the anatomy's centre; a 2-D image whole) of
    the fixed image in grey with ``|E|`` blended as heat, one row per assessment, one colour
    scale for all: ``(H, W, 3)`` uint8."""
    mask = assessments[0].pair.mask[0, 0].cpu().numpy()
    centre = [int(np.round(w.mean())) for w in np.nonzero(mask)] if mask.any() else None
    centre = centre or [n // 2 for n in mask.shape]

    def slices(volume: np.ndarray) -> list[np.ndarray]:
        if volume.ndim == 2:
            return [volume]
        return [np.take(volume, c, axis=axis) for axis, c in enumerate(centre)]

    errors = [a.error[0, 0].cpu().numpy() for a in assessments]
    top = max(float(np.percentile(e[mask], 99)) if mask.any() else 1.0 for e in errors)
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
