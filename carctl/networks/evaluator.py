"""IMSE's spatial evaluator: a compact residual network that predicts, from a reference
image and another image of any contrast, the error map ``reference - other'`` where
``other'`` is the other image's content in the reference's contrast (the paper's
"absolute single-modal" error). Both inputs are on one grid, intensities in ``[-1, 1]``.

Encoder (full, 1/2, 1/4 resolution), residual blocks at 1/4, decoder with skip connections;
3-D or 2-D by ``ndim``; the other image looked up in the reference's contrast is a third
input. Any input size: the decoder resizes to the skip's shape.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class EvaluatorConfig:
    ndim: int = 3
    width: int = 8  # channels at full resolution; x2 and x4 below
    blocks: int = 4  # residual blocks at 1/4 resolution
    # the other image translated into the reference's contrast by a rank lookup over this
    # many groups (:func:`rank_lookup`) as a third input; 0: none
    lookup: int = 1024

    def to_dict(self) -> dict:
        return asdict(self)


# At most this many voxels on the grid the evaluator works on.
WORKING_VOXELS = 1 << 20


def working_spacing(spacing, size, voxels: int | None = None) -> float:
    """Isotropic spacing (mm) of the grid the evaluator works on, in training and inference:
    the image's finest ``spacing``, coarsened until ``size`` voxels of it (the field of
    view) fit in ``voxels`` (default :data:`WORKING_VOXELS`)."""
    extent = float(np.prod(np.asarray(size) * np.asarray(spacing)))
    return max(min(spacing), (extent / (voxels or WORKING_VOXELS)) ** (1 / 3))


# Intensity (in [-1, 1]) above which a voxel counts as anatomy: a tenth of the range.
ANATOMY = -0.8


def anatomy(image: torch.Tensor) -> torch.Tensor:
    """Where a ``[-1, 1]`` image ``(N, 1, *spatial)`` holds anatomy, dilated by one voxel."""
    pool = F.max_pool3d if image.dim() == 5 else F.max_pool2d
    return pool((image > ANATOMY).float(), 3, 1, 1) > 0


# Largest slope (reference intensity per other intensity) of the lookup's gradient.
LOOKUP_SLOPE = 10.0


def rank_lookup(reference: torch.Tensor, other: torch.Tensor, groups: int) -> torch.Tensor:
    """``other`` in ``reference``'s contrast, read off the images themselves: the voxels of
    each image ``(N, 1, *spatial)`` are ranked by their ``other`` intensity and cut into
    ``groups`` groups of equal count, and every voxel gets its group's mean ``reference``
    intensity.

    Shuffle Remap (and a real change of contrast) is one intensity mapping for the whole
    image, and a convolutional network cannot look it up: it would have to learn, from each
    image anew, which reference intensity every other intensity stands for. Equal counts
    rather than equal widths follow the ranges a remap squeezes.

    The value is piecewise constant in ``other``; its gradient (when ``other`` needs one, as
    in ``--loss imse``) is the slope of the lookup between neighbouring groups' mean
    intensities, bounded by :data:`LOOKUP_SLOPE`, with the groups held fixed."""
    n = other.shape[0]
    values = other.detach().reshape(n, -1)
    count = values.shape[1]
    size = max(count // groups, 1)
    total = count // size
    order = values.argsort(dim=1, stable=True)
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(count, device=order.device).expand(n, count))
    group = (ranks // size).clamp_max(total - 1)
    sizes = torch.bincount(group[0], minlength=total).to(values.dtype)

    def means(image: torch.Tensor) -> torch.Tensor:  # (n, total) group means of ``image``
        sums = torch.zeros(n, total, dtype=values.dtype, device=values.device)
        return sums.scatter_add_(1, group, image.detach().reshape(n, -1).to(values)) / sizes

    looked_up = means(reference)
    result = looked_up.gather(1, group)
    if other.requires_grad and total > 1:
        centres = means(other)  # non-decreasing along the groups
        upper = torch.searchsorted(centres, values.contiguous()).clamp(1, total - 1)
        rise = looked_up.gather(1, upper) - looked_up.gather(1, upper - 1)
        run = centres.gather(1, upper) - centres.gather(1, upper - 1)
        slope = (rise / run.clamp_min(1e-6)).clamp(-LOOKUP_SLOPE, LOOKUP_SLOPE)
        flat = other.reshape(n, -1)
        result = result + slope * (flat - flat.detach())
    return result.view_as(other).to(reference.dtype)


def _conv(ndim: int):
    return nn.Conv3d if ndim == 3 else nn.Conv2d


def _norm(ndim: int, channels: int) -> nn.Module:
    return (nn.InstanceNorm3d if ndim == 3 else nn.InstanceNorm2d)(channels, affine=True)


class _Residual(nn.Module):
    """``x + b(act(norm(a(x))))``, starting as the identity (``b`` is zero)."""

    def __init__(self, ndim: int, channels: int) -> None:
        super().__init__()
        conv = _conv(ndim)
        self.a = conv(channels, channels, 3, padding=1)
        self.norm = _norm(ndim, channels)
        self.b = conv(channels, channels, 3, padding=1)
        nn.init.zeros_(self.b.weight)
        nn.init.zeros_(self.b.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.b(F.leaky_relu(self.norm(self.a(x)), 0.2))


class Evaluator(nn.Module):
    """``forward(reference, other) -> error`` with inputs and output ``(N, 1, *spatial)``.

    Encoder (full, 1/2, 1/4 resolution), residual blocks at 1/4, decoder with skip
    connections; the inputs (with :attr:`EvaluatorConfig.lookup`, the other image looked up
    in the reference's contrast by :func:`rank_lookup` too) also reach the last layers. The
    last layer gives the error map ``reference - other'`` (``other'``: the other image's
    content in the reference's contrast) and starts at zero, the right answer for aligned
    images. The encoder's and decoder's 3x3 convolutions (and the first of each residual
    block) are followed by instance normalisation, whose statistics over the whole image also
    carry its global contrast, and every residual block starts as the identity.

    The design before 2026-12-06 had no normalisation, no lookup, and gave ``other'`` for the
    network to subtract: at learning rate 3e-3 its activations ran away within 60 steps, at
    5e-4 it did not learn the plain difference of two images of one contrast in 600, and
    across contrasts it never did better than predicting no error (docs/benchmarks.md, "An
    evaluator that learns"). Cards of that design are refused (:mod:`carctl.pretrained`).
    """

    def __init__(self, config: EvaluatorConfig = EvaluatorConfig()) -> None:
        super().__init__()
        self.config = config
        conv, w, d = _conv(config.ndim), config.width, config.ndim
        inputs = 3 if config.lookup else 2  # reference, other (and other looked up)
        self.enc0 = conv(inputs, w, 3, padding=1)
        self.norm0 = _norm(d, w)
        self.enc1 = conv(w, 2 * w, 3, stride=2, padding=1)
        self.norm1 = _norm(d, 2 * w)
        self.enc2 = conv(2 * w, 4 * w, 3, stride=2, padding=1)
        self.norm2 = _norm(d, 4 * w)
        self.blocks = nn.Sequential(*(_Residual(d, 4 * w) for _ in range(config.blocks)))
        self.dec1 = conv(6 * w, 2 * w, 3, padding=1)
        self.norm_dec1 = _norm(d, 2 * w)
        self.fuse0 = conv(3 * w + inputs, w, 1)
        self.dec0 = conv(w, w, 3, padding=1)
        self.norm_dec0 = _norm(d, w)
        self.head = conv(w + inputs, w, 1)
        self.out = conv(w, 1, 1)
        # no error until the network has learnt to see one
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def accepts(self, shape: tuple[int, ...]) -> bool:
        """Whether images of array ``shape`` (spatial) can go through: as many axes as the
        network has, and more than one voxel at its coarsest (1/4) resolution, which its
        instance normalisation needs (a 4 x 4 x 4 image has one)."""
        coarsest = [-(-n // 4) for n in shape]
        return len(shape) == self.config.ndim and int(np.prod(coarsest)) > 1

    def forward(self, reference: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
        mode = "trilinear" if self.config.ndim == 3 else "bilinear"
        act = lambda x: F.leaky_relu(x, 0.2)  # noqa: E731
        inputs = [reference, other]
        if self.config.lookup:
            inputs.append(rank_lookup(reference, other, self.config.lookup))
        inputs = torch.cat(inputs, dim=1)
        x0 = act(self.norm0(self.enc0(inputs)))
        x1 = act(self.norm1(self.enc1(x0)))
        x2 = self.blocks(act(self.norm2(self.enc2(x1))))
        up = F.interpolate(x2, size=x1.shape[2:], mode=mode, align_corners=False)
        y1 = act(self.norm_dec1(self.dec1(torch.cat([up, x1], dim=1))))
        up = F.interpolate(y1, size=x0.shape[2:], mode=mode, align_corners=False)
        y0 = act(self.fuse0(torch.cat([up, x0, inputs], dim=1)))
        y0 = act(self.norm_dec0(self.dec0(y0)))
        return self.out(act(self.head(torch.cat([y0, inputs], dim=1))))
