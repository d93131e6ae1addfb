"""Training IMSE's evaluator (``carctl train imse``), as in the paper's Section 3.2.

Each sample is a crop ``x`` of a single-contrast volume and two random spatial transforms:
``x1 = x o T1`` and ``x2 = x o T2`` with ``T2 = T1 + d`` for a smooth random displacement
``d`` (graded from zero to several voxels; sometimes confined to the inside of the anatomy
so that the outline stays put). The label is ``x2 - x1``, the inputs are ``x2`` (reference)
and ``x1`` with a random Shuffle Remap (a new contrast each sample); the loss is L1.

Resumable: a checkpoint folder holds the model, the optimiser state and the step as
safetensors/JSON (no pickles); the random stream of step ``n`` depends only on the seed and
``n``, so a resumed run is the run that was never interrupted.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from carctl.augment import ShuffleRemap
from carctl.networks.evaluator import Evaluator, EvaluatorConfig, anatomy
from carctl.registration.levels import gaussian_blur
from carctl.training import data

# Gradient norm clip (the decoder's feature-wise modulation made plain Adam diverge).
CLIP = 1.0


@dataclass
class ImseTraining:
    steps: int = 20000
    batch: int = 2
    patch: int = 48
    learning_rate: float = 5e-4
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
        other[i] = ShuffleRemap.random(generator)(other[i])
        other[i] += (
            0.03
            * float(torch.rand((), generator=generator))
            * torch.randn(other[i].shape, generator=generator)
        )
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
    model.eval()
    l1, scores, truth = [], [], []
    for batch in batches:
        error = model(batch["reference"], batch["other"])
        l1.append(float((error - batch["target"]).abs().mean()))
        mask = batch["mask"]
        score = (error.abs() * mask).sum(dim=(1, 2, 3, 4)) / mask.sum(dim=(1, 2, 3, 4)).clamp_min(1)
        scores.extend(score.tolist())
        truth.extend(batch["displacement"].tolist())
    model.train()
    return {
        "l1": float(np.mean(l1)),
        "spearman": spearman(np.asarray(scores), np.asarray(truth)),
    }


# --- checkpoints ---------------------------------------------------------------------------


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    out = {}
    for i, state in optimizer.state_dict()["state"].items():
        for key, value in state.items():
            out[f"{i}.{key}"] = torch.as_tensor(value).clone()
    return out


def save_checkpoint(
    folder: Path, model: Evaluator, optimizer, step: int, settings: ImseTraining, log: list
) -> None:
    from carctl.pretrained import save_tensors

    folder.mkdir(parents=True, exist_ok=True)
    save_tensors(model.state_dict(), folder / "model.safetensors")
    save_tensors(_optimizer_tensors(optimizer), folder / "optimizer.safetensors")
    state = {"step": step, "settings": _settings_dict(settings), "log": log}
    tmp = folder / ".state.json.tmp"
    tmp.write_text(json.dumps(state, indent=1))
    tmp.replace(folder / "state.json")


def load_checkpoint(folder: Path, model: Evaluator, optimizer) -> tuple[int, list]:
    from safetensors.torch import load_file

    model.load_state_dict(load_file(str(folder / "model.safetensors")))
    tensors = load_file(str(folder / "optimizer.safetensors"))
    state_dict = optimizer.state_dict()
    for key, value in tensors.items():
        i, name = key.split(".", 1)
        state_dict["state"].setdefault(int(i), {})[name] = value
    optimizer.load_state_dict(state_dict)
    state = json.loads((folder / "state.json").read_text())
    return int(state["step"]), list(state["log"])


def _settings_dict(settings: ImseTraining) -> dict:
    out = asdict(settings)
    out["network"] = settings.network.to_dict()
    return out


def learning_rate(settings: ImseTraining, step: int) -> float:
    """Cosine decay from the initial rate to a tenth of it."""
    t = min(step / max(settings.steps, 1), 1.0)
    return settings.learning_rate * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


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
    model = Evaluator(settings.network).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=settings.learning_rate)
    step, log = 0, []
    if resume and (folder / "state.json").exists():
        step, log = load_checkpoint(folder, model, optimizer)
    checks = validation_batches(validation or volumes, settings)
    checks = [{k: v.to(device) for k, v in b.items()} for b in checks]
    metrics = log[-1] if log else {}
    started = time.perf_counter()
    while step < min(settings.steps, stop if stop is not None else settings.steps):
        generator = torch.Generator().manual_seed(settings.seed * 1_000_003 + step)
        batch = {k: v.to(device) for k, v in make_batch(volumes, settings, generator).items()}
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(settings, step)
        error = model(batch["reference"], batch["other"])
        loss = (error - batch["target"]).abs().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        optimizer.step()
        step += 1
        if step % settings.validate_every == 0 or step in (settings.steps, stop):
            metrics = {"step": step, "loss": loss.item(), **validate(model, checks)}
            metrics["seconds"] = round(time.perf_counter() - started, 1)
            log.append(metrics)
            save_checkpoint(folder, model, optimizer, step, settings, log)
        if progress is not None:
            progress(step, {"loss": loss.item(), **metrics})
    return model, {**metrics, "step": step}
