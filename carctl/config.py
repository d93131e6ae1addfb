"""Settings of a registration, as frozen dataclasses (the CLI builds them from its options)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RegistrationOptions:
    """What ``carctl register`` does; ``None`` means "chosen from the images"."""

    method: str = "auto"  # see carctl.registration.pipeline.METHODS
    loss: str = "mind"  # see carctl.losses.LOSSES
    diffeomorphic: bool = False
    regularization: float | None = None  # weight of the regulariser (default per loss)
    regulariser: str = "diffusion"  # see carctl.losses.REGULARISERS
    iterations: int | None = None  # per deformable level
    resolution: float | None = None  # finest deformable spacing, mm
    device: str = "cpu"
    seed: int = 0
