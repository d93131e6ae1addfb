"""Label-free quality control of an alignment with IMSE's evaluator.

Both images are brought onto one *working grid*: the fixed image's axes, cropped to its
foreground (with a margin), isotropic voxels of :func:`carctl.training.data.working_spacing`
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
from carctl.networks.evaluator import anatomy
from carctl.registration.levels import (
    fixed_level_grid,
    foreground_box,
    normalise,
    resample_band_limited,
)
from carctl.spatial.grid import Grid
from carctl.spatial.sample import warp
from carctl.spatial.transform import Transform
from carctl.training.data import working_spacing

WEIGHTS = "imse"
VERDICTS = ("ok", "suspect", "failed")


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
    """The fixed image's axes over its foreground box (widened), isotropic working voxels."""
    low, high = foreground_box(normalise(fixed.array), mask)
    spacing = np.asarray(fixed.grid.spacing)
    margin = np.maximum(4 * spacing, 0.05 * (high - low))
    upper = np.asarray(fixed.grid.size, float) - 1
    box = (np.clip(low - margin / spacing, 0, upper), np.clip(high + margin / spacing, 0, upper))
    extent = (box[1] - box[0] + 1) * spacing
    return fixed_level_grid(fixed.grid, working_spacing(spacing, extent / spacing), box)


def _normalised(values: torch.Tensor, select: torch.Tensor | None = None) -> torch.Tensor:
    """Robust ``[-1, 1]`` scaling; percentiles taken over ``select`` when given."""
    array = values[0, 0].cpu().numpy()
    if select is not None and bool(select.any()):
        sample = array[select[0, 0].cpu().numpy()]
        low, high = np.percentile(sample, (0.5, 99.5))
        high = high if high > low else low + 1
        scaled = np.clip((array - low) / (high - low), 0, 1)
    else:
        scaled = normalise(array)
    return torch.from_numpy(scaled.astype(np.float32) * 2 - 1)[None, None].to(values.device)


def prepare(
    fixed: Image,
    moving: Image,
    transforms: Sequence[Transform] = (),
    grid: Grid | None = None,
    device: str = "cpu",
) -> Pair:
    """Fixed and moving (through ``transforms``) on the working ``grid`` (default
    :func:`working_grid`), normalised to ``[-1, 1]``."""
    grid = grid or working_grid(fixed)
    reference = _normalised(resample_band_limited(fixed.array, fixed.grid, grid, device=device))
    moved = resample_band_limited(moving.array, moving.grid, grid, transforms, device=device)
    ones = torch.ones((1, 1, *moving.grid.shape), device=device)
    support = warp(ones, moving.grid, grid, transforms) > 0.5
    other = _normalised(moved, support)
    other = torch.where(support, other, torch.full_like(other, -1.0))
    mask = (anatomy(reference) | anatomy(other)) & support
    return Pair(grid, reference, other, mask)


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


def overlay(assessments: Sequence[Assessment], scale: float | None = None) -> np.ndarray:
    """Rows of three orthogonal slices (through the anatomy's centre) of the fixed image in
    grey with ``|E|`` blended as heat, one row per assessment: ``(H, W, 3)`` uint8."""
    first = assessments[0].pair
    mask = first.mask[0, 0].cpu().numpy()
    centre = [int(np.round(np.mean(w))) for w in np.nonzero(mask)] if mask.any() else None
    centre = centre or [n // 2 for n in mask.shape]
    errors = [a.error[0, 0].cpu().numpy() for a in assessments]
    top = scale or max(float(np.percentile(e[mask], 99)) if mask.any() else 1.0 for e in errors)
    rows = []
    for a, error in zip(assessments, errors, strict=True):
        grey = (a.pair.reference[0, 0].cpu().numpy() + 1) / 2
        panels = []
        for axis in range(grey.ndim):
            take = (
                (lambda x, axis=axis: np.take(x, centre[axis], axis=axis))
                if grey.ndim == 3
                else (lambda x: x)
            )
            g, e = take(grey), take(error) / max(top, 1e-6)
            alpha = np.clip(e, 0, 1)[..., None] * 0.8
            rgb = (1 - alpha) * g[..., None] + alpha * _heat(e)
            panels.append(_resize(np.flipud(rgb), a.pair.grid, axis))
            if grey.ndim == 2:
                break
        height = max(p.shape[0] for p in panels)
        panels = [np.pad(p, ((0, height - p.shape[0]), (0, 2), (0, 0))) for p in panels]
        rows.append(np.concatenate(panels, axis=1))
    width = max(r.shape[1] for r in rows)
    rows = [np.pad(r, ((0, 2), (0, width - r.shape[1]), (0, 0))) for r in rows]
    return (np.concatenate(rows, axis=0) * 255).round().astype(np.uint8)


def _resize(rgb: np.ndarray, grid: Grid, axis: int) -> np.ndarray:
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
