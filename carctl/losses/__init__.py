"""Similarity losses and regularisers, chosen by name through :data:`LOSSES`.

A loss is a pair: ``features`` turns a normalised image into what is compared (computed once
per resolution level), ``function(fixed, moving, weight)`` compares them. Each function has a
module twin, :class:`SimilarityLoss`, for code that composes ``nn.Module``s.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from carctl.losses import learned, regularisers, similarity


@dataclass(frozen=True)
class LossSpec:
    name: str
    features: Callable[[torch.Tensor], torch.Tensor]
    function: Callable[..., torch.Tensor]
    description: str
    # the moving features are compared with a constant where the moving image is absent
    # (otherwise the loss is restricted to the overlap)
    fills_outside: bool = False
    # compares voxel by voxel, so a random subset of voxels gives an unbiased estimate
    pointwise: bool = True
    # the loss the rigid and affine stages use instead (None: this one)
    linear: str | None = None
    # how many voxels beyond a voxel its features read (MIND-SSC: neighbour plus patch)
    reach: int = 0
    # where the moving image's voxels are coarser (thick slices), the fixed image is blurred
    # to them and the moving one interpolated (see levels.MOVING_GROWTH). Losses over
    # neighbourhoods gained (a T1n in 5 mm slices onto its deformed 1 mm self: MIND 2.17 ->
    # 0.58 mm, LNCC 0.64 -> 0.57); the voxel-by-voxel intensity losses lost (NCC 2.20 ->
    # 2.36, MSE 1.54 -> 1.67; MI 3.41 -> 3.44 on a FLAIR stack onto the T1n) and compare
    # each image at its own voxels
    match_resolution: bool = True


LOSSES: dict[str, LossSpec] = {
    spec.name: spec
    for spec in (
        LossSpec(
            "mind",
            similarity.mind_ssc,
            similarity.mind_loss,
            "MIND-SSC descriptors, squared difference (any contrast or modality)",
            fills_outside=True,
            reach=2,
        ),
        LossSpec(
            "mi",
            similarity.intensity,
            similarity.mi_loss,
            "mutual information, Parzen joint histogram (any contrast)",
            match_resolution=False,
        ),
        LossSpec(
            "lncc",
            similarity.intensity,
            similarity.lncc_loss,
            "local normalised cross-correlation, 9-voxel windows (similar contrast; MIND for "
            "the rigid and affine stages)",
            pointwise=False,
            # LNCC reads every voxel at every step: on the linear stages that cost 12 of the 27 s
            # of a 1 mm brain pair (MIND's sampled steps: 2 s) for the same labels' Dice
            linear="mind",
        ),
        LossSpec(
            "ncc",
            similarity.intensity,
            similarity.ncc_loss,
            "global normalised cross-correlation (linearly related intensities)",
            match_resolution=False,
        ),
        LossSpec(
            "mse",
            similarity.intensity,
            similarity.mse_loss,
            "mean squared error (same contrast)",
            match_resolution=False,
        ),
        LossSpec(
            "imse",
            learned.centred,
            learned.imse_loss,
            "IMSE: the learned evaluator's mean predicted error (any contrast; MIND for the "
            "rigid and affine stages)",
            pointwise=False,
            linear="mind",
        ),
        LossSpec(
            "mind+imse",
            learned.mind_and_centred,
            learned.mind_imse_loss,
            "MIND-SSC plus IMSE (their sum; MIND alone for the rigid and affine stages)",
            fills_outside=True,
            pointwise=False,
            linear="mind",
        ),
    )
}

REGULARISERS: dict[str, Callable[..., torch.Tensor]] = {
    "diffusion": regularisers.diffusion,
    "bending": regularisers.bending,
}


def loss_spec(name: str) -> LossSpec:
    try:
        return LOSSES[name]
    except KeyError:
        raise ValueError(f"unknown loss {name!r}; choose from {', '.join(LOSSES)}") from None


class SimilarityLoss(nn.Module):
    """Module twin of a loss in :data:`LOSSES`: ``forward(fixed, moving, weight=None)``
    takes *images*, computes their features and compares them."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self.spec = loss_spec(name)

    def forward(
        self, fixed: torch.Tensor, moving: torch.Tensor, weight: torch.Tensor | None = None
    ) -> torch.Tensor:
        spec = self.spec
        return spec.function(spec.features(fixed), spec.features(moving), weight)

    def extra_repr(self) -> str:
        return self.spec.name
