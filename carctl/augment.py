"""Intensity augmentation for training contrast-agnostic networks.

:class:`ShuffleRemap` is the IMSE paper's style augmentation (Algorithm 1): the intensity
range ``[-1, 1]`` is cut at random control points into segments, the segments are shuffled,
and every voxel is mapped linearly from its segment onto the segment that took its place
(Eq. 8). The transform itself is deterministic; :meth:`ShuffleRemap.random` draws one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# The paper's range for the number of control points (Section 4.2, Table 3).
CONTROL_POINTS = (2, 50)


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
