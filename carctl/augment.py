"""Intensity augmentation for training contrast-agnostic networks.

:class:`ShuffleRemap` is the IMSE paper's style augmentation (Algorithm 1): the intensity
range ``[-1, 1]`` is cut at random control points into segments, the segments are shuffled,
and every voxel is mapped linearly from its segment onto the segment that took its place
(Eq. 8). The transform itself is deterministic; :meth:`ShuffleRemap.random` draws one.

:class:`RandomConvolution` is CAR's contrast augmentation (Section 2.1): a stack of 1x1(x1)
convolutions with kernel weights drawn from ``U(0, 10)`` and shifted to zero mean,
LeakyReLU(0.2) after each; a per-voxel random non-linear intensity mapping that keeps every
edge where it is. :meth:`RandomConvolution.random` draws one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from carctl.registration.levels import gaussian_blur

# The paper's range for the number of control points (Section 4.2, Table 3).
CONTROL_POINTS = (2, 50)
# CAR's random convolutions: layers, hidden channels, kernel weights drawn from U(0, HIGH).
RC_LAYERS, RC_CHANNELS, RC_HIGH = 4, 8, 10.0


@dataclass(frozen=True)
class ShuffleRemap:
    """Piecewise-linear remapping of ``[-1, 1]`` onto itself.

    ``edges`` are the ``N + 2`` increasing segment boundaries (``-1``, the ``N`` control
    points, ``1``); ``order[i]`` is the segment whose range segment ``i`` is mapped onto.
    """

    edges: torch.Tensor
    order: torch.Tensor

    def __post_init__(self) -> None:
        if self.edges.dim() != 1 or self.order.shape != (self.edges.numel() - 1,):
            raise ValueError("ShuffleRemap needs N + 2 edges and N + 1 segment indices")

    @classmethod
    def random(
        cls,
        generator: torch.Generator | None = None,
        control_points: tuple[int, int] = CONTROL_POINTS,
    ) -> ShuffleRemap:
        """A random remapping: ``N`` uniform control points with ``N`` drawn from the
        inclusive range ``control_points``, then a random permutation of the segments."""
        low, high = control_points
        n = int(torch.randint(low, high + 1, (), generator=generator))
        points = torch.sort(torch.rand(n, generator=generator, dtype=torch.float64) * 2 - 1)[0]
        edges = torch.cat([points.new_tensor([-1.0]), points, points.new_tensor([1.0])])
        return cls(edges, torch.randperm(n + 1, generator=generator))

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        """Remap ``image`` (values in ``[-1, 1]``, any shape); the result stays in
        ``[-1, 1]``. The value ``1`` belongs to the last segment (the paper's half-open
        segments would send it to 0)."""
        edges = self.edges.to(image.device, image.dtype)
        order = self.order.to(image.device)
        x = image.clamp(-1.0, 1.0)
        segment = (torch.bucketize(x, edges[1:-1], right=True)).clamp_max(order.numel() - 1)
        low, high = edges[segment], edges[segment + 1]
        target = order[segment]
        new_low, new_high = edges[target], edges[target + 1]
        fraction = (x - low) / (high - low).clamp_min(torch.finfo(image.dtype).tiny)
        return (new_low + fraction * (new_high - new_low)).clamp(-1.0, 1.0)


@dataclass(frozen=True)
class RandomConvolution:
    """Stacked 1x1 convolutions ``1 -> C -> ... -> C -> 1`` (``weights[k]`` is
    ``(out, in)``), LeakyReLU(0.2) after each, the result rescaled to ``[0, 1]``.

    A bias-free stack of 1x1 convolutions and LeakyReLUs is positively homogeneous
    (``f(a x) = a f(x)`` for ``a > 0``), i.e. *linear* on a non-negative image. So the input is
    standardised, and before each activation every channel is standardised over the image
    and shifted by ``shifts[k]`` (drawn from ``U(-1, 1)``): the kinks of the activations fall
    inside the intensity range and the stack maps intensities non-linearly, even
    non-monotonically, as contrasts of real modalities do.
    """

    weights: tuple[torch.Tensor, ...]
    shifts: tuple[torch.Tensor, ...]

    @classmethod
    def random(
        cls,
        generator: torch.Generator | None = None,
        layers: int = RC_LAYERS,
        channels: int = RC_CHANNELS,
    ) -> RandomConvolution:
        """Kernel weights of each layer from ``U(0, 10)``, then shifted to zero mean."""
        sizes = [1] + [channels] * (layers - 1) + [1]
        weights, shifts = [], []
        for n_in, n_out in zip(sizes[:-1], sizes[1:], strict=True):
            w = torch.rand(n_out, n_in, generator=generator, dtype=torch.float64) * RC_HIGH
            weights.append(w - w.mean())
            shifts.append(torch.rand(n_out, generator=generator, dtype=torch.float64) * 2 - 1)
        return cls(tuple(weights), tuple(shifts))

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        """``image`` ``(N, 1, *spatial)`` in a new contrast, each sample rescaled to
        ``[0, 1]`` (a constant result becomes zeros)."""
        x = image.flatten(2).movedim(1, -1)  # (N, voxels, channels): a matrix product per voxel

        def standardised(t: torch.Tensor) -> torch.Tensor:
            return (t - t.mean(dim=1, keepdim=True)) / t.std(dim=1, keepdim=True).clamp_min(1e-6)

        x = standardised(x)
        for w, b in zip(self.weights, self.shifts, strict=True):
            x = F.leaky_relu(standardised(x @ w.to(x).T) + b.to(x), 0.2)
        low, high = x.amin(dim=1, keepdim=True), x.amax(dim=1, keepdim=True)
        x = (x - low) / (high - low).clamp_min(1e-12)
        return x.movedim(-1, 1).reshape(image.shape)


def _smooth_scalar(image: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """A smooth random map ``(N, 1, *spatial)`` with values in ``[-1, 1]`` (each sample's
    largest magnitude 1): noise on a lattice of 3-6 points per axis, linearly interpolated."""
    n, spatial = image.shape[0], image.shape[2:]
    coarse = int(torch.randint(3, 7, (), generator=generator))
    noise = torch.randn(n, 1, *(coarse,) * len(spatial), generator=generator)
    mode = "trilinear" if len(spatial) == 3 else "bilinear"
    field = F.interpolate(noise, size=tuple(spatial), mode=mode, align_corners=True).to(image)
    peak = field.abs().flatten(1).amax(dim=1).clamp_min(1e-6)
    return field / peak.view(-1, *[1] * (field.dim() - 1))


def bias_field(
    image: torch.Tensor, strength: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """``image`` ``(N, 1, *spatial)`` in ``[0, 1]`` times a smooth random field
    ``exp(a s)`` (``s`` smooth in ``[-1, 1]``, ``a`` drawn from ``U(0, strength)``), as an
    MR receive coil's inhomogeneity shades an image; rescaled to ``[0, 1]`` again."""
    if strength <= 0:
        return image
    a = float(torch.rand((), generator=generator)) * strength
    out = image * torch.exp(a * _smooth_scalar(image, generator))
    high = out.flatten(1).amax(dim=1).clamp_min(1e-12)
    return out / high.view(-1, *[1] * (out.dim() - 1))


def random_blur(
    image: torch.Tensor, strength: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """``image`` ``(N, 1, *spatial)`` blurred by a Gaussian whose sigma along each axis is
    drawn from ``U(0, strength)`` voxels: a blurrier or thicker-sliced scan of the same
    anatomy (a template averaged over subjects, a 5 mm clinical stack). Keeps ``[0, 1]``."""
    if strength <= 0:
        return image
    sigma = (torch.rand(image.dim() - 2, generator=generator) * strength).tolist()
    return gaussian_blur(image, sigma)


def unpaired_blobs(image: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """``image`` ``(N, 1, *spatial)`` in ``[0, 1]`` with smooth random regions (where a
    smooth random map exceeds a random level: a few blobs over 5-30 % of the crop) painted a
    random intensity, partly transparent: structure that the other image of a pair does not
    show, as a lesion bright on FLAIR and faint on T1 is."""
    level = 0.3 + 0.4 * float(torch.rand((), generator=generator))
    opacity = 0.5 + 0.5 * float(torch.rand((), generator=generator))
    value = float(torch.rand((), generator=generator))
    region = torch.sigmoid((_smooth_scalar(image, generator) - level) / 0.05) * opacity
    return image * (1 - region) + value * region
