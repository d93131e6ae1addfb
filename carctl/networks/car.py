"""CAR's registration network: Siamese encoders, one decoder, a stationary velocity field.

The moving and the fixed image go through the *same* encoder (shared weights) to 1/16 of
the input size; their features at every scale are concatenated and decoded (U-Net skip
connections) into a stationary velocity at 1/2 of the input size, integrated by scaling and
squaring there and upsampled to the input grid. 3-D or 2-D by ``ndim``; any input size
(odd sizes are padded to a multiple of 16 and the result is cropped back).

Coordinates: both inputs are on one grid (the fixed working grid), intensities in
``[0, 1]``. The output is a displacement ``(N, D, *spatial)`` in *voxels of that grid*,
component ``c`` along index axis ``c`` (``x`` first, as :mod:`carctl.spatial.grid`): the
moving image read at ``index + u(index)`` matches the fixed image at ``index``.
:func:`carctl.registration.network` converts it to physical mm.

Besides CAR's skip connections, the decoder gets at 1/8, 1/4 and 1/2 of the input size a
local correlation (cosine similarity of the two encoders' features over a small search
window, as optical-flow networks use): the network then reads correspondences instead of
having to discover matching from concatenated features, which learned nothing in a few
hundred CPU steps here.

Sized for CPU inference: few channels at full and half resolution, the decoder stops at 1/2.
"""

from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from carctl.spatial.sample import grid_sample

# The encoder halves the grid this many times (1/16 of the input).
DEPTH = 4


@dataclass(frozen=True)
class CarConfig:
    ndim: int = 3
    width: int = 16  # encoder channels at 1/2 (1/2 that at full size, twice that below)
    projection: int = 32  # channels of the contrast-invariance projection head
    squarings: int = 7  # scaling and squaring steps of the velocity integration
    # search radius (voxels of that scale) of the local correlation fed to the decoder at
    # 1/8, 1/4 and 1/2 of the input size (0: none)
    correlation: tuple[int, ...] = (2, 2, 1)

    def __post_init__(self) -> None:
        object.__setattr__(self, "correlation", tuple(self.correlation))  # from JSON lists

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def encoder(self) -> tuple[int, ...]:
        """Channels at 1, 1/2, 1/4, 1/8 and 1/16 of the input size."""
        w = self.width
        return (max(w // 2, 1), w, 2 * w, 2 * w, 2 * w)

    @property
    def decoder(self) -> tuple[int, ...]:
        """Channels at 1/16, 1/8, 1/4 and 1/2 of the input size."""
        w = self.width
        return (2 * w, 2 * w, 2 * w, w)


def _conv(ndim: int):
    return nn.Conv3d if ndim == 3 else nn.Conv2d


def _act(x: torch.Tensor) -> torch.Tensor:
    return F.leaky_relu(x, 0.2)


class Encoder(nn.Module):
    """One image ``(N, 1, *spatial)`` to its features at 1, 1/2, ..., 1/16 of its size."""

    def __init__(self, config: CarConfig) -> None:
        super().__init__()
        conv, channels = _conv(config.ndim), config.encoder
        self.first = conv(1, channels[0], 3, padding=1)
        pairs = zip(channels[:-1], channels[1:], strict=True)
        self.down = nn.ModuleList(conv(a, b, 3, stride=2, padding=1) for a, b in pairs)
        self.refine = nn.ModuleList(conv(b, b, 3, padding=1) for b in channels[1:])

    def forward(self, image: torch.Tensor) -> list[torch.Tensor]:
        x = _act(self.first(image))
        out = [x]
        for down, refine in zip(self.down, self.refine, strict=True):
            x = _act(down(x))
            x = _act(refine(x))
            out.append(x)
        return out


class CarNet(nn.Module):
    """``forward(moving, fixed) -> displacement`` (voxels; see the module docstring).

    :meth:`features` exposes the encoder's latent features (1/16) and :meth:`project`
    the projection head used by the contrast-invariance loss in training.
    """

    def __init__(self, config: CarConfig = CarConfig()) -> None:
        super().__init__()
        self.config = config
        conv, enc, dec = _conv(config.ndim), config.encoder, config.decoder
        self.encoder = Encoder(config)
        self.projection = conv(enc[-1], config.projection, 1, bias=False)
        self.bottom = conv(2 * enc[-1], dec[0], 3, padding=1)
        # decoder level k: upsampled previous level + both encoders' skips at that scale +
        # the local correlation of the two encoders' features there
        self.up = nn.ModuleList(
            conv(
                dec[k - 1] + 2 * enc[DEPTH - k] + _offsets(config, k),
                dec[k],
                3,
                padding=1,
            )
            for k in range(1, DEPTH)
        )
        self.velocity = conv(dec[-1], config.ndim, 3, padding=1)
        # He initialisation for LeakyReLU(0.2): torch's default shrinks the signal by about
        # a third per layer, so the 1/16-scale features hardly depended on the input
        for module in self.modules():
            if isinstance(module, nn.Conv3d | nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, a=0.2, nonlinearity="leaky_relu")
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        # start near the identity (as VoxelMorph does)
        nn.init.normal_(self.velocity.weight, std=1e-5)
        nn.init.zeros_(self.velocity.bias)

    def features(self, image: torch.Tensor) -> list[torch.Tensor]:
        return self.encoder(image)

    def project(self, latent: torch.Tensor) -> torch.Tensor:
        return self.projection(latent)

    def decode(self, moving: list[torch.Tensor], fixed: list[torch.Tensor]) -> torch.Tensor:
        """The velocity ``(N, D, *half)`` in voxels of the input grid, from both feature
        pyramids."""
        mode = "trilinear" if self.config.ndim == 3 else "bilinear"
        x = _act(self.bottom(torch.cat([moving[DEPTH], fixed[DEPTH]], dim=1)))
        for k, layer in enumerate(self.up, start=1):
            skip_m, skip_f = moving[DEPTH - k], fixed[DEPTH - k]
            x = F.interpolate(x, size=skip_m.shape[2:], mode=mode, align_corners=False)
            parts = [x, skip_m, skip_f]
            if _offsets(self.config, k):
                parts.append(correlation(skip_f, skip_m, self.config.correlation[k - 1]))
            x = _act(layer(torch.cat(parts, dim=1)))
        return self.velocity(x)

    def forward(
        self, moving: torch.Tensor, fixed: torch.Tensor, features: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
        """Displacement ``(N, D, *spatial)`` in voxels; with ``features`` also both
        encoders' feature pyramids (for the training losses)."""
        shape, n = fixed.shape[2:], fixed.shape[0]
        # one encoder pass over both images (shared weights): fewer, larger convolutions
        # (a 1 mm brain's forward pass 0.45 -> 0.39 s on 2 CPU cores)
        padded = pad_to(torch.cat([moving, fixed]), 2**DEPTH)
        both = self.features(padded)
        f_m, f_f = [x[:n] for x in both], [x[n:] for x in both]
        velocity = self.decode(f_m, f_f)
        u = integrate(velocity, padded.shape[2:], self.config.squarings)
        u = u[(slice(None), slice(None), *(slice(0, n) for n in shape))]
        return (u, f_m, f_f) if features else u


def _offsets(config: CarConfig, level: int) -> int:
    """Channels of the correlation at decoder ``level`` (1: 1/8 of the input size)."""
    radius = config.correlation[level - 1] if level - 1 < len(config.correlation) else 0
    return (2 * radius + 1) ** config.ndim if radius > 0 else 0


def correlation(fixed: torch.Tensor, moving: torch.Tensor, radius: int) -> torch.Tensor:
    """Local cost volume: for every offset ``o`` within ``radius`` voxels (each axis), the
    cosine similarity of the (centred) fixed features at ``x`` and moving features at ``x + o``;
    ``(N, (2 radius + 1)^D, *spatial)``, offsets in C order of (z, y, x)."""
    ndim = fixed.dim() - 2
    dims = tuple(range(2, 2 + ndim))
    # centred per channel: features after LeakyReLU share a positive common part that would
    # make every offset look alike
    f = F.normalize(fixed - fixed.mean(dim=dims, keepdim=True), dim=1)
    m = F.normalize(moving - moving.mean(dim=dims, keepdim=True), dim=1)
    padded = F.pad(m, [radius] * (2 * ndim), mode="replicate")
    size = f.shape[2:]
    out = []
    for offset in itertools.product(range(2 * radius + 1), repeat=ndim):
        window = padded[
            (
                slice(None),
                slice(None),
                *(slice(o, o + n) for o, n in zip(offset, size, strict=True)),
            )
        ]
        out.append((f * window).sum(dim=1))
    return torch.stack(out, dim=1)


def pad_to(image: torch.Tensor, multiple: int) -> torch.Tensor:
    """``image`` ``(N, C, *spatial)`` padded at the far end of each axis (edge values) to a
    multiple of ``multiple`` voxels."""
    pad = []
    for n in reversed(image.shape[2:]):
        pad += [0, (-n) % multiple]
    if not any(pad):
        return image
    return F.pad(image, pad, mode="replicate")


def _normaliser(size, like: torch.Tensor) -> torch.Tensor:
    """Per component, normalised units (grid_sample, ``align_corners=True``) per voxel of a
    grid of ``size`` (array order); ``(1, D, 1, ...)`` in index (x first) order."""
    ndim = len(size)
    scale = torch.tensor([2.0 / max(n - 1, 1) for n in reversed(size)]).to(like)
    return scale.view(1, ndim, *([1] * ndim))


def _identity(shape, like: torch.Tensor) -> torch.Tensor:
    """Normalised coordinates ``(1, *shape, D)`` of every voxel, x first."""
    axes = [torch.linspace(-1.0, 1.0, n).to(like) for n in shape]
    grids = torch.meshgrid(*axes, indexing="ij")
    return torch.stack(grids[::-1], dim=-1)[None]


def warp_normalised(image: torch.Tensor, displacement: torch.Tensor) -> torch.Tensor:
    """``image`` read at ``identity + displacement`` (normalised units, ``(N, D, *spatial)``,
    same spatial size), border values outside."""
    where = _identity(image.shape[2:], displacement) + displacement.movedim(1, -1)
    return grid_sample(image, where, align_corners=True, padding_mode="border")


def warp(image: torch.Tensor, displacement: torch.Tensor) -> torch.Tensor:
    """``image`` ``(N, C, *spatial)`` read at ``index + displacement`` (voxels, x first)."""
    return warp_normalised(image, displacement * _normaliser(image.shape[2:], displacement))


def integrate(velocity: torch.Tensor, shape, squarings: int) -> torch.Tensor:
    """Scaling and squaring of ``velocity`` ``(N, D, *half)`` (voxels of a grid of ``shape``,
    which the half grid spans corner to corner), upsampled to ``shape``: ``(N, D, *shape)``
    voxels."""
    ndim = len(shape)
    mode = "trilinear" if ndim == 3 else "bilinear"
    to_normalised = _normaliser(shape, velocity)
    u = velocity * to_normalised / 2**squarings
    for _ in range(squarings):
        u = u + warp_normalised(u, u)
    u = F.interpolate(u, size=tuple(shape), mode=mode, align_corners=True)
    return u / to_normalised
