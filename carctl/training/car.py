"""Training CAR's registration network (``carctl train car``), as in the paper's Section 2.

Each sample is a crop of a single-contrast volume (or of a label map painted with random
intensities, as SynthMorph does) seen through two random spatial transforms that share a
base ``T0`` (affine jitter and a smooth field): ``moving = x o T0`` and
``fixed = x o T0 o (id + d)``, so the true displacement from fixed to moving voxels is
``d`` (smooth, graded from zero to several voxels, plus a small affine residual: the
network runs after affine alignment).

The network sees the pair twice, each time with *new* random contrasts for both images
(:class:`carctl.augment.RandomConvolution`). In a fraction ``same_contrast`` of the views
both images share one random contrast (not in the paper): with different contrasts only,
the network learned nothing in the first thousand CPU steps, while same-contrast pairs
teach it to match first and the contrast-invariance loss and the other views carry that
across contrasts. The losses are

* LNCC between the fixed and the warped moving image *before* augmentation (one contrast,
  so a mono-modal similarity is exact), and the diffusion regulariser of the displacement
  (voxel units), on the first pass;
* the contrast-invariance loss: mean squared difference between the two passes'
  projected latent features (1/16 scale), for the moving and the fixed encoder outputs;
  the projections are unit vectors per voxel (bias-free head), which keeps the head from
  satisfying the loss by shrinking to zero;
* an end-point-error term against the known ``d`` (weight ``supervision``; 0 turns it off):
  not in the paper, it makes the few thousand steps a CPU affords count.

With ``init`` and ``blend`` below 1 the weights returned are a weighted average of the
starting and the fine-tuned weights (weight-space ensembling, "WiSE-FT": Wortsman et al.,
CVPR 2022), validated again; the checkpoints keep the fine-tuned weights alone, so a
resumed run trains on and can be blended anew.

Resumable through :mod:`carctl.training.loop`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from carctl.augment import RandomConvolution, bias_field, random_blur, unpaired_blobs
from carctl.losses.regularisers import diffusion
from carctl.losses.similarity import lncc_loss
from carctl.networks import channels_last
from carctl.networks.car import CarConfig, CarNet, warp
from carctl.networks.evaluator import anatomy
from carctl.training import data, loop


@dataclass
class CarTraining:
    steps: int = 12000
    patch: int = 32
    learning_rate: float = 1e-3
    seed: int = 0
    validate_every: int = 250
    max_displacement: float = 6.0  # voxels, largest smooth displacement drawn
    regularization: float = 1.0  # diffusion weight (lambda_1)
    contrast: float = 0.1  # contrast-invariance weight (lambda_2)
    supervision: float = 0.05  # end-point-error weight (not in the paper)
    same_contrast: float = 0.5  # fraction of views whose two images share one contrast
    network: CarConfig = field(default_factory=CarConfig)
    init: str | None = None  # weights (.safetensors) to start from instead of random ones
    # spacings of the training views, in units of each volume's working spacing
    scales: tuple[float, ...] = data.SCALES
    # per network input: the largest log-amplitude of a smooth bias field (0: none), and the
    # probability of blobs that the other image does not show (0: none); see _view
    bias: float = 0.0
    unpaired: float = 0.0
    # per network input: the largest Gaussian sigma (voxels, drawn per axis) of a blur (0: none)
    blur: float = 0.0
    # weight of the fine-tuned weights in those written, the rest from ``init`` (WiSE-FT:
    # a fine-tuning run keeps part of what its starting weights did well; 1: as trained)
    blend: float = 1.0


def _points_field(points: torch.Tensor) -> torch.Tensor:
    """Centred voxel ``points`` ``(B, z, y, x, 3)`` as a channels-first image."""
    return points.permute(0, 4, 1, 2, 3)


def make_pair(
    volumes: list[data.Volume], settings: CarTraining, generator: torch.Generator
) -> dict[str, torch.Tensor]:
    """One training pair: ``moving``/``fixed`` (single contrast, ``[0, 1]``,
    ``(1, 1, P, P, P)``), ``truth`` (the displacement ``d``, voxels, x first,
    ``(1, 3, P, P, P)``) and ``mask`` (the fixed image's anatomy)."""
    size, margin = settings.patch, 8
    volume = volumes[int(torch.randint(0, len(volumes), (), generator=generator))]
    source = data.source_crop(volume, size + 2 * margin, generator)[None, None]
    base = data.identity_points(size)
    matrix, shift = data.random_affine(1, 10.0, 0.1, margin / 2, generator)
    first = torch.einsum("zyxj,bij->bzyxi", base, matrix) + shift[:, None, None, None]
    wobble = torch.rand(1, generator=generator) * 2
    first = first + data.smooth_noise(1, size, wobble, generator).permute(0, 2, 3, 4, 1)
    moving = data.sample_at(source, first)

    strength = torch.rand(1, generator=generator) * settings.max_displacement
    d = data.smooth_noise(1, size, strength, generator)
    tilt, move = data.random_affine(1, 3.0, 0.03, 2.0, generator)
    d = d + torch.einsum("zyxj,bij->bizyx", base, tilt - torch.eye(3)) + move[..., None, None, None]
    # fixed = moving o (id + d): read T0 (as an image of its points) at id + d
    displaced = base[None] + d.permute(0, 2, 3, 4, 1)
    composed = data.sample_at(_points_field(first), displaced).permute(0, 2, 3, 4, 1)
    fixed = data.sample_at(source, composed)

    flips = [2 + k for k in range(3) if float(torch.rand((), generator=generator)) < 0.5]
    if flips:
        moving, fixed, d = (t.flip(flips) for t in (moving, fixed, d))
        for k in flips:  # a flipped axis reverses its displacement component
            d[:, 4 - k] = -d[:, 4 - k]
    moving, fixed = (moving + 1) / 2, (fixed + 1) / 2
    return {"moving": moving, "fixed": fixed, "truth": d, "mask": anatomy(fixed * 2 - 1)}


def _view(image: torch.Tensor, settings: CarTraining, generator) -> torch.Tensor:
    """One network input in its random contrast, then (when asked) shaded by a bias field,
    given blobs the other image lacks and blurred (``settings.bias``, ``settings.unpaired``,
    ``settings.blur``). Only the network's inputs change: the similarity loss compares the
    clean images, so the network learns to look past shading, unpaired structure and a
    difference in sharpness."""
    if settings.bias > 0:
        image = bias_field(image, settings.bias, generator)
    if settings.unpaired > 0 and float(torch.rand((), generator=generator)) < settings.unpaired:
        image = unpaired_blobs(image, generator)
    if settings.blur > 0:
        image = random_blur(image, settings.blur, generator)
    return image


def end_point_error(u: torch.Tensor, truth: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean distance (voxels) between two displacements ``(N, D, *spatial)`` in ``mask``."""
    distance = (u - truth).square().sum(dim=1, keepdim=True).sqrt()
    return (distance * mask).sum() / mask.sum().clamp_min(1)


def _projected(model: CarNet, latent: torch.Tensor) -> torch.Tensor:
    return F.normalize(model.project(latent), dim=1)


def losses(
    model: CarNet, pair: dict[str, torch.Tensor], settings: CarTraining, generator
) -> dict[str, torch.Tensor]:
    """Every training loss of one pair (see the module docstring) and their weighted sum."""
    views = []
    for _ in range(2):
        moving = RandomConvolution.random(generator)
        same = float(torch.rand((), generator=generator)) < settings.same_contrast
        fixed = moving if same else RandomConvolution.random(generator)
        views.append(
            (
                _view(moving(pair["moving"]), settings, generator),
                _view(fixed(pair["fixed"]), settings, generator),
            )
        )
    u, f_m, f_f = model(*views[0], features=True)
    g_m = model.features(views[1][0])[-1]
    g_f = model.features(views[1][1])[-1]
    warped = warp(pair["moving"], u)
    out = {
        "similarity": lncc_loss(pair["fixed"], warped),
        "smoothness": diffusion(u, [1.0] * model.config.ndim),
        "contrast": (_projected(model, f_m[-1]) - _projected(model, g_m)).square().mean()
        + (_projected(model, f_f[-1]) - _projected(model, g_f)).square().mean(),
        "epe": end_point_error(u, pair["truth"], pair["mask"]),
    }
    out["total"] = (
        out["similarity"]
        + settings.regularization * out["smoothness"]
        + settings.contrast * out["contrast"]
        + settings.supervision * out["epe"]
    )
    return out


def validation_pairs(
    volumes: list[data.Volume], settings: CarTraining, count: int = 8
) -> list[dict[str, torch.Tensor]]:
    """Fixed known-deformation pairs, each with its two fixed random contrasts."""
    generator = torch.Generator().manual_seed(12345)
    pairs = []
    for _ in range(count):
        pair = make_pair(volumes, settings, generator)
        pair["moving_input"] = RandomConvolution.random(generator)(pair["moving"])
        pair["fixed_input"] = RandomConvolution.random(generator)(pair["fixed"])
        pairs.append(pair)
    return pairs


@torch.no_grad()
def validate(model: CarNet, pairs: list[dict[str, torch.Tensor]]) -> dict[str, float]:
    """Mean end-point error (voxels) of the network across random contrasts and of no
    registration at all, and their ratio (below 0.5: the error is more than halved)."""
    before, after = [], []
    for pair in pairs:
        u = model(pair["moving_input"], pair["fixed_input"])
        after.append(float(end_point_error(u, pair["truth"], pair["mask"])))
        before.append(float(end_point_error(torch.zeros_like(u), pair["truth"], pair["mask"])))
    mean_before, mean_after = sum(before) / len(before), sum(after) / len(after)
    return {
        "epe_before": mean_before,
        "epe": mean_after,
        "epe_ratio": mean_after / max(mean_before, 1e-9),
    }


def start_from(model: CarNet, path: Path) -> None:
    """Load the weights at ``path`` (a safetensors file; when its model card lies beside it,
    its sha256 is checked) into ``model``, whose architecture must match them."""
    from carctl import pretrained
    from carctl.errors import InputError

    if not path.is_file():
        raise InputError(f"--init {path}: no such file")
    card = path.with_suffix(pretrained.CARD_SUFFIX)
    if card.is_file():
        if (c := pretrained.read_card(card)) is None:
            raise InputError(f"--init: {card} is not a readable model card")
        pretrained.verify(c)
    pretrained.load_weights(model, path, f"--init {path}: not weights of this network")


def blend_into(model: CarNet, start: CarNet, weight: float) -> None:
    """``model``'s parameters and buffers become ``weight * model + (1 - weight) * start``
    (floating-point tensors; the two of one architecture)."""
    theirs = start.state_dict()
    with torch.no_grad():
        for key, tensor in model.state_dict().items():
            if tensor.is_floating_point():
                tensor.mul_(weight).add_(theirs[key].to(tensor), alpha=1 - weight)


def train(
    settings: CarTraining,
    volumes: list[data.Volume],
    validation: list[data.Volume],
    folder: Path,
    resume: bool = False,
    device: str = "cpu",
    progress: Callable[[int, dict], None] | None = None,
    stop: int | None = None,
) -> tuple[CarNet, dict]:
    """Train (or resume) in ``folder`` up to ``settings.steps`` (or until step ``stop``,
    keeping the schedule of the whole run); returns the model and its last validation."""
    torch.manual_seed(settings.seed)
    model = CarNet(settings.network)
    if settings.init and not loop.resumes(folder, resume):  # a checkpoint wins
        start_from(model, Path(settings.init))
    model = channels_last(model.to(device))
    checks = [loop.on(pair, device) for pair in validation_pairs(validation or volumes, settings)]

    def loss_of(generator: torch.Generator) -> tuple[torch.Tensor, dict]:
        pair = loop.on(make_pair(volumes, settings, generator), device)
        parts = losses(model, pair, settings, generator)
        return parts["total"], {k: v.item() for k, v in parts.items() if k != "total"}

    metrics = loop.fit(
        model, settings, loss_of, lambda: validate(model, checks), folder, resume, progress, stop
    )
    if settings.init and settings.blend < 1:
        start = CarNet(settings.network)
        start_from(start, Path(settings.init))
        blend_into(model, start, settings.blend)  # (their tensors moved to the model's)
        model.eval()
        with torch.no_grad():
            metrics = {**metrics, **validate(model, checks), "blend": settings.blend}
    return model, metrics
