"""Training IMSE's evaluator (``carctl train imse``), as in the paper's Section 3.2.

Each sample is a crop ``x`` of a single-contrast volume and two random spatial transforms:
``x1 = x o T1`` and ``x2 = x o T2`` with ``T2 = T1 + d`` for a smooth random displacement
``d`` (graded from zero to several voxels; sometimes confined to the inside of the anatomy
so that the outline stays put). The label is ``x2 - x1``, the inputs are ``x2`` (reference)
and ``x1`` with a random Shuffle Remap (a new contrast each sample); the loss is L1.

Resumable through :mod:`carctl.training.loop`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from carctl.augment import ShuffleRemap
from carctl.networks import channels_last
from carctl.networks.evaluator import Evaluator, EvaluatorConfig, anatomy
from carctl.registration.levels import gaussian_blur
from carctl.training import data, loop


@dataclass
class ImseTraining:
    steps: int = 20000
    batch: int = 2
    patch: int = 48
    learning_rate: float = 2e-3
    seed: int = 0
    validate_every: int = 500
    max_displacement: float = 8.0  # voxels, largest elastic misalignment drawn
    network: EvaluatorConfig = field(default_factory=EvaluatorConfig)


def make_batch(
    volumes: list[data.Volume],
    settings: ImseTraining,
    generator: torch.Generator,
) -> dict[str, torch.Tensor]:
    """One training batch: ``reference`` (x2), ``other`` (remapped x1), ``target``
    (x2 - x1), and per sample the true mean displacement (voxels) inside the foreground."""
    b, size, margin = settings.batch, settings.patch, 8
    index = torch.randint(0, len(volumes), (b,), generator=generator)
    sources = torch.stack(
        [data.source_crop(volumes[int(i)], size + 2 * margin, generator) for i in index]
    )[:, None]
    base = data.identity_points(size)
    matrix, shift = data.random_affine(b, 10.0, 0.1, margin / 2, generator)
    amplitude = torch.rand(b, generator=generator) * 3
    first = torch.einsum("zyxj,bij->bzyxi", base, matrix) + shift[:, None, None, None]
    first = first + data.smooth_noise(b, size, amplitude, generator).permute(0, 2, 3, 4, 1)
    x1 = data.sample_at(sources, first)

    # the misalignment d: elastic plus a small affine part, graded, sometimes zero
    strength = torch.rand(b, generator=generator) ** 1.5 * settings.max_displacement
    strength = strength * (torch.rand(b, generator=generator) > 0.15)
    d = data.smooth_noise(b, size, strength, generator)
    tilt, move = data.random_affine(b, 3.0, 0.03, 1.0, generator)
    linear = (
        torch.einsum("zyxj,bij->bizyx", base, tilt - torch.eye(3)) + move[..., None, None, None]
    )
    d = d + linear * (strength / settings.max_displacement).view(-1, 1, 1, 1, 1)
    inside = torch.rand(b, generator=generator) < 0.3
    if inside.any():
        # move the inside only: fade d out towards the anatomy's outline
        interior = gaussian_blur(anatomy(x1).float(), [3.0] * 3)
        interior = (interior - 0.5).clamp(0, 0.5) * 2
        d = torch.where(inside.view(-1, 1, 1, 1, 1), d * interior, d)
    x2 = data.sample_at(sources, first + d.permute(0, 2, 3, 4, 1))

    other = x1.clone()
    for i in range(b):
        if float(torch.rand((), generator=generator)) < 0.2:  # another resolution
            sigma = 0.5 + float(torch.rand((), generator=generator))
            other[i : i + 1] = gaussian_blur(other[i : i + 1], [sigma] * 3)
        # nothing after the remap: it squeezes some intensity ranges many times over, and
        # noise added there would wipe out what they hold (see docs/benchmarks.md)
        other[i] = ShuffleRemap.random(generator)(other[i])
    flips = [2 + k for k in range(3) if float(torch.rand((), generator=generator)) < 0.5]
    if flips:
        x1, x2, other, d = (t.flip(flips) for t in (x1, x2, other, d))
    mask = anatomy(x2)
    moved = d.square().sum(1, keepdim=True).sqrt()
    true = (moved * mask).sum(dim=(1, 2, 3, 4)) / mask.sum(dim=(1, 2, 3, 4)).clamp_min(1)
    return {"reference": x2, "other": other, "target": x2 - x1, "mask": mask, "displacement": true}


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation (ties broken by order; enough for continuous values)."""
    ra = np.argsort(np.argsort(a)).astype(float)
    rb = np.argsort(np.argsort(b)).astype(float)
    if ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


def validation_batches(
    volumes: list[data.Volume], settings: ImseTraining, count: int = 16
) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(12345)
    return [make_batch(volumes, settings, generator) for _ in range(count)]


@torch.no_grad()
def validate(model: Evaluator, batches: list[dict[str, torch.Tensor]]) -> dict[str, float]:
    """L1 of the error map, and the Spearman correlation between the predicted mean absolute
    error inside the foreground and the true mean displacement there."""
    l1, scores, truth = [], [], []
    for batch in batches:
        error = model(batch["reference"], batch["other"])
        l1.append(float((error - batch["target"]).abs().mean()))
        mask = batch["mask"]
        score = (error.abs() * mask).sum(dim=(1, 2, 3, 4)) / mask.sum(dim=(1, 2, 3, 4)).clamp_min(1)
        scores.extend(score.tolist())
        truth.extend(batch["displacement"].tolist())
    return {
        "l1": float(np.mean(l1)),
        "spearman": spearman(np.asarray(scores), np.asarray(truth)),
    }


def train(
    settings: ImseTraining,
    volumes: list[data.Volume],
    validation: list[data.Volume],
    folder: Path,
    resume: bool = False,
    device: str = "cpu",
    progress: Callable[[int, dict], None] | None = None,
    stop: int | None = None,
) -> tuple[Evaluator, dict]:
    """Train (or resume) in ``folder`` up to ``settings.steps`` (or until step ``stop``,
    keeping the schedule of the whole run); returns the model and its last validation."""
    torch.manual_seed(settings.seed)
    model = channels_last(Evaluator(settings.network).to(device))
    checks = [loop.on(b, device) for b in validation_batches(validation or volumes, settings)]

    def loss_of(generator: torch.Generator) -> tuple[torch.Tensor, dict]:
        batch = loop.on(make_batch(volumes, settings, generator), device)
        error = model(batch["reference"], batch["other"])
        return (error - batch["target"]).abs().mean(), {}

    metrics = loop.fit(
        model, settings, loss_of, lambda: validate(model, checks), folder, resume, progress, stop
    )
    return model, metrics
