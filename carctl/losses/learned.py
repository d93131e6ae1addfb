"""IMSE as a similarity loss: the frozen evaluator's mean predicted |error|.

The level's images are normalised to ``[0, 1]``; the evaluator takes ``[-1, 1]``. The fixed
image is the reference (the error map is in its contrast), the moved moving image the other.
The weights load once per device, on first use (see :mod:`carctl.pretrained`).
"""

from __future__ import annotations

import functools

import torch

from carctl.losses.similarity import mind_loss, mind_ssc, weighted_mean

WEIGHTS = "imse"


@functools.lru_cache(maxsize=4)
def evaluator(device: str) -> torch.nn.Module:
    from carctl import pretrained

    model, _ = pretrained.load(WEIGHTS, device=device)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model


def centred(image: torch.Tensor) -> torch.Tensor:
    """``[0, 1]`` intensities to the evaluator's ``[-1, 1]``."""
    return image * 2 - 1


def imse_loss(
    fixed: torch.Tensor, moving: torch.Tensor, weight: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean absolute error predicted by the evaluator for ``(fixed, moving)`` images
    ``(1, 1, *spatial)`` in ``[-1, 1]``, weighted by ``weight``."""
    model = evaluator(str(fixed.device))
    if fixed.dim() - 2 != model.config.ndim:
        from carctl.errors import InputError

        raise InputError(
            f"the IMSE evaluator is {model.config.ndim}-D and the images {fixed.dim() - 2}-D"
        )
    error = model(fixed.float(), moving.float()).to(fixed.dtype)
    return weighted_mean(error.abs(), weight)


def mind_and_centred(image: torch.Tensor) -> torch.Tensor:
    """MIND-SSC descriptors with the ``[-1, 1]`` intensities as one more (last) channel."""
    return torch.cat([mind_ssc(image), centred(image)], dim=1)


def mind_imse_loss(
    fixed: torch.Tensor, moving: torch.Tensor, weight: torch.Tensor | None = None
) -> torch.Tensor:
    """MIND-SSC's loss on all channels but the last plus IMSE's on the last (intensities)."""
    return mind_loss(fixed[:, :-1], moving[:, :-1], weight) + imse_loss(
        fixed[:, -1:], moving[:, -1:], weight
    )
