"""Device discipline without a GPU: the per-step computations run on a level whose tensors
live on torch's ``meta`` device (shapes only), with the linear stages' parameters on the CPU
as on a GPU run. A tensor made on the wrong device fails there as it would on CUDA."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from carctl.losses import LOSSES, REGULARISERS, loss_spec
from carctl.registration import affine, optimize
from carctl.registration.levels import build_level, foreground_box, normalise
from tests.registration.test_register import blobs, contrast


def meta_level(loss: str):
    image, other = blobs(), contrast(blobs())
    fixed, moving = normalise(other.array), normalise(image.array)
    level = build_level(
        fixed,
        other.grid,
        moving,
        image.grid,
        5.0,
        loss_spec(loss).features,
        foreground_box(fixed, None),
        fills_outside=True,
    )

    def meta(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.to("meta")

    return dataclasses.replace(
        level,
        fixed=meta(level.fixed),
        weight=meta(level.weight),
        moving=meta(level.moving),
        fill=meta(level.fill),
        points=meta(level.points),
    )


@pytest.mark.parametrize("loss", list(LOSSES))
def test_linear_stage_loss_runs_on_the_levels_device(loss):
    """The affine's parameters stay on the CPU (float64) and the level on its device: the
    mapped points follow the level. They stayed on the CPU, so every registration on a
    GPU failed in its first stage."""
    if loss_spec(loss).linear:  # learned losses: their linear stages use MIND
        pytest.skip("linear stages run MIND")
    level = meta_level(loss)
    params = affine.AffineParameters(np.eye(4), np.zeros(3), affine=True)
    index = torch.arange(0, 40, device="meta")
    with torch.no_grad():
        for subset in (None, index):
            value = affine.level_loss(level, params.homogeneous(), LOSSES[loss].function, subset)
            assert value.device.type == "meta"
        many = torch.stack([params.homogeneous()] * 3)
        assert affine.level_loss(level, many, LOSSES[loss].function).shape == (3,)


def test_deformable_step_runs_on_the_levels_device():
    """The deformable stage's objective (field, interpolation, regulariser, loss) runs on the
    level's device up to the first scalar it reports."""
    level = meta_level("mind")
    control = optimize.control_grid(level.grid)
    start = torch.zeros((*control.shape, 3), device="meta")
    with pytest.raises(RuntimeError, match="item\\(\\) cannot be called on meta tensors"):
        optimize.optimise_level(
            level,
            np.eye(4),
            start,
            control,
            LOSSES["mind"].function,
            REGULARISERS["diffusion"],
            0.2,
            iterations=1,
            diffeomorphic=False,
            step=1.0,
        )
