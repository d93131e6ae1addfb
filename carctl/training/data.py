"""Training volumes: real scans and label maps from a data folder, resampled to isotropic
voxels and normalised to ``[-1, 1]``, and random smooth spatial transforms in voxel units.

Networks trained here work in voxel units on a working grid
(:func:`carctl.networks.evaluator.working_spacing`, as at inference), so each volume is kept
at its working spacing and at 1.5 times that, which teaches the network a range of
anatomical scales.
"""

from __future__ import annotations

import glob
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from carctl.io import Image, read_image
from carctl.networks.evaluator import working_spacing
from carctl.registration.levels import gaussian_blur, normalise

# Folders of ../shared/data used for training. The known-alignment sets that the QA and
# registration benchmarks score (BraTS, the SPM avg152 templates, the cardiac contrasts) are
# deliberately absent, and so is the CT/MR pair (its licence allows internal tests only; it
# is the validation set instead).
TRAINING_IMAGES = (
    "oasis-t1-a/t1.nii.gz",
    "brain-templates-2mm/single_subj_T1.nii",
    "brain-templates-2mm/EPI.nii",
    "brain-templates-2mm/PET.nii",
    "spine-t1-t2/t1w.nii.gz",
    "spine-t1-t2/t2.nii.gz",
    "prostate-mr-us/mr_images/*.nii.gz",
    "prostate-mr-us/us_images/*.nii.gz",
    "tcga-fg-6692-native/*.nii.gz",
    "dicom/mr-head-120",
    "dicom/ct-chest-40",
)
# Label maps turned into images with random intensities per label (as SynthMorph does).
TRAINING_LABELS = (
    "oasis-t1-a/labels.nii.gz",
    "brain-templates-2mm/labels_Neuromorphometrics.nii",
)
VALIDATION_IMAGES = ("ct-mr-pat002/pat002_ct.hdr", "ct-mr-pat002/pat002_mr_T2.hdr")


@dataclass(eq=False)
class Volume:
    """One training volume in ``(Z, Y, X)`` voxels: intensities in ``[-1, 1]``, or integer
    ``labels`` (then ``array`` is None and each sample paints random intensities)."""

    name: str
    array: np.ndarray | None = None
    labels: np.ndarray | None = None

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.array if self.array is not None else self.labels).shape


def isotropic(image: Image, spacing: float, label: bool = False) -> np.ndarray:
    """``image`` resampled to ``spacing`` mm isotropic voxels along its own axes (Gaussian
    anti-aliasing first; nearest neighbour for labels)."""
    import SimpleITK as sitk

    source = image.to_sitk()
    if not label:
        source = sitk.Cast(source, sitk.sitkFloat32)
        sigma = [0.5 * math.sqrt(max(spacing**2 - s**2, 0.0)) for s in source.GetSpacing()]
        if max(sigma) > 0.05:
            source = sitk.DiscreteGaussian(source, [v * v for v in sigma], 32, 0.01, True)
    size = [
        max(1, int(round(n * s / spacing)))
        for n, s in zip(source.GetSize(), source.GetSpacing(), strict=True)
    ]
    resampled = sitk.Resample(
        source,
        size,
        sitk.Transform(),
        sitk.sitkNearestNeighbor if label else sitk.sitkLinear,
        source.GetOrigin(),
        [spacing] * source.GetDimension(),
        source.GetDirection(),
        0,
        source.GetPixelID(),
    )
    return sitk.GetArrayFromImage(resampled)


def _paths(root: Path, patterns) -> list[Path]:
    out = []
    for pattern in patterns:
        out.extend(Path(p) for p in sorted(glob.glob(str(root / pattern))))
    return out


# Spacings of the training views of each volume, in units of its working spacing.
SCALES = (1.0, 1.5)


def load_volumes(
    root: str | Path, patterns, labels: bool = False, scales: tuple[float, ...] = SCALES
) -> list[Volume]:
    """Every file matching ``patterns`` under ``root`` (missing ones are skipped), each at
    its working spacing times each of ``scales``; views finer than the image's own finest
    spacing (that would only interpolate it) are left out."""
    out = []
    for path in _paths(Path(root), patterns):
        image = read_image(path)
        if image.grid.ndim != 3:
            continue
        base = working_spacing(image.grid.spacing, image.grid.size)
        for factor in scales:
            if base * factor < min(image.grid.spacing) * (1 - 1e-6):
                continue
            array = isotropic(image, base * factor, label=labels)
            if min(array.shape) < 4:
                continue
            name = f"{path.relative_to(root)}@{base * factor:.2f}mm"
            if labels:
                out.append(Volume(name, labels=array.astype(np.int64)))
            else:
                out.append(Volume(name, array=(normalise(array) * 2 - 1).astype(np.float32)))
    return out


def _crop(
    volume: torch.Tensor, size: int, generator: torch.Generator, background: float
) -> torch.Tensor:
    """A random ``size``-cube of ``(Z, Y, X)`` ``volume``, padded with its minimum where the
    volume is smaller; of a few random positions, the one with most voxels above
    ``background``."""
    pad = [max(0, size - n) for n in volume.shape]
    if any(pad):
        spec = []
        for p in reversed(pad):
            spec += [p // 2, p - p // 2]
        volume = F.pad(volume[None, None], spec, value=float(volume.min()))[0, 0]
    best, best_mean = None, -math.inf
    for _ in range(3):
        start = [int(torch.randint(0, n - size + 1, (), generator=generator)) for n in volume.shape]
        crop = volume[tuple(slice(s, s + size) for s in start)]
        mean = float((crop > background).float().mean())
        if mean > best_mean:
            best, best_mean = crop, mean
    return best


def painted(labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """An image from a label map: a random intensity per label, blurred, noisy, in [-1, 1]."""
    values = torch.rand(int(labels.max()) + 1, generator=generator) * 2 - 1
    image = values[labels][None, None]
    sigma = float(torch.rand((), generator=generator)) + 0.3
    image = gaussian_blur(image, [sigma] * 3)
    image = image + 0.05 * torch.rand((), generator=generator) * torch.randn(
        image.shape, generator=generator
    )
    low, high = image.amin(), image.amax()
    return ((image - low) / (high - low).clamp_min(1e-6) * 2 - 1)[0, 0]


def source_crop(volume: Volume, size: int, generator: torch.Generator) -> torch.Tensor:
    """A random crop of ``volume`` as intensities in ``[-1, 1]``, shape ``(size,) * 3``."""
    if volume.array is not None:
        return _crop(torch.from_numpy(volume.array), size, generator, -0.8)
    crop = _crop(torch.from_numpy(volume.labels), size, generator, 0)
    return painted(crop, generator)


def random_affine(
    batch: int, degrees: float, scale: float, shift: float, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B, 3, 3)`` matrices (rotations up to ``degrees`` about each axis, scaling by up to
    ``scale`` per axis) and ``(B, 3)`` translations up to ``shift`` voxels."""
    angles = (torch.rand(batch, 3, generator=generator) * 2 - 1) * math.radians(degrees)
    c, s = angles.cos(), angles.sin()
    one, zero = torch.ones(batch), torch.zeros(batch)
    rx = torch.stack([one, zero, zero, zero, c[:, 0], -s[:, 0], zero, s[:, 0], c[:, 0]], 1)
    ry = torch.stack([c[:, 1], zero, s[:, 1], zero, one, zero, -s[:, 1], zero, c[:, 1]], 1)
    rz = torch.stack([c[:, 2], -s[:, 2], zero, s[:, 2], c[:, 2], zero, zero, zero, one], 1)
    rotation = rx.view(-1, 3, 3) @ ry.view(-1, 3, 3) @ rz.view(-1, 3, 3)
    scaling = 1 + (torch.rand(batch, 3, generator=generator) * 2 - 1) * scale
    matrix = rotation * scaling[:, None, :]
    translation = (torch.rand(batch, 3, generator=generator) * 2 - 1) * shift
    return matrix, translation


def smooth_noise(
    batch: int, size: int, amplitude: torch.Tensor, generator: torch.Generator
) -> torch.Tensor:
    """A smooth random displacement ``(B, 3, size, size, size)`` (voxels): noise on a coarse
    lattice interpolated to full size, scaled so each sample's largest magnitude is its
    ``amplitude``."""
    coarse = int(torch.randint(3, 7, (), generator=generator))
    noise = torch.randn(batch, 3, coarse, coarse, coarse, generator=generator)
    field = F.interpolate(noise, size=(size,) * 3, mode="trilinear", align_corners=True)
    peak = field.square().sum(1).sqrt().amax(dim=(1, 2, 3)).clamp_min(1e-6)
    return field * (amplitude / peak).view(-1, 1, 1, 1, 1)


def identity_points(size: int) -> torch.Tensor:
    """Voxel coordinates ``(size, size, size, 3)`` in ``(x, y, z)`` order, centred on 0."""
    axis = torch.arange(size, dtype=torch.float32) - (size - 1) / 2
    z, y, x = torch.meshgrid(axis, axis, axis, indexing="ij")
    return torch.stack([x, y, z], dim=-1)


def sample_at(image: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """Trilinear samples of ``(B, 1, Z, Y, X)`` ``image`` at centred voxel ``points``
    ``(B, z, y, x, 3)`` (zero outside is replaced by the border value)."""
    shape = torch.tensor(image.shape[:1:-1], dtype=points.dtype)  # (X, Y, Z)
    normalised = points / ((shape - 1) / 2).clamp_min(1)
    return F.grid_sample(image, normalised, align_corners=True, padding_mode="border")
