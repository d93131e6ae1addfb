"""Settings of a registration, as frozen dataclasses (the CLI builds them from its options).

Settings check themselves when built, so that a bad value is refused before any image is
read, whether it comes from the command line or from Python.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

DEVICES = ("auto", "cpu", "cuda")
# The names the options accept, here without their tables (which load torch) so that a bad
# value is refused at once: carctl.registration.pipeline.METHODS, carctl.losses.LOSSES and
# carctl.losses.REGULARISERS hold the same names in the same order (a test checks).
METHODS = ("auto", "net", "io", "affine", "rigid")
LOSSES = ("mind", "mi", "lncc", "ncc", "mse", "imse", "mind+imse")
# Losses whose initialisation, rigid and affine stages use MIND (``LossSpec.linear``; a test
# keeps the two in step): without a deformable stage they change nothing.
LINEAR_MIND_LOSSES = ("lncc", "imse", "mind+imse")
REGULARISERS = ("diffusion", "bending")
# The initialisation's rotation search (carctl.registration.initialise).
SEARCHES = ("default", "wide")


def check_seed(seed: int) -> None:
    """Refuse a ``--seed`` torch's generators cannot take (one-line usage error; a seed of
    20 digits was an internal error)."""
    from carctl.errors import UsageError

    if not 0 <= seed < 2**63:
        raise UsageError(f"--seed must be from 0 to {2**63 - 1}")


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
    device: str = "cpu"  # or "cuda"; "auto" picks CUDA when there is one
    seed: int = 0
    search: str = "default"  # see SEARCHES: the initialisation's rotations

    def unused(self) -> list[str]:
        """The options given that ``method`` does not use: those of the deformable stage
        (``--iterations``, ``--regularization``, ``--diffeomorphic``, and a ``--loss`` whose
        linear stages use MIND) for a method without one (affine, rigid, net); they were
        taken without a word."""
        if self.method in ("auto", "io"):
            return []
        given = (
            ("--iterations", self.iterations is not None),
            ("--regularization", self.regularization is not None),
            ("--diffeomorphic", self.diffeomorphic),
            (f"--loss {self.loss}", self.loss in LINEAR_MIND_LOSSES),
        )
        return [name for name, set_ in given if set_]

    def __post_init__(self) -> None:
        from carctl.errors import UsageError

        for option, value, choices in (
            ("--method", self.method, METHODS),
            ("--loss", self.loss, LOSSES),
            ("regulariser", self.regulariser, REGULARISERS),
            ("--device", self.device, DEVICES),
            ("--search", self.search, SEARCHES),
        ):
            if value not in choices:
                raise UsageError(f"unknown {option} '{value}'; choose from {', '.join(choices)}")
        if self.iterations is not None and self.iterations < 0:
            raise UsageError("--iterations must be at least 0")
        if self.resolution is not None and not 0 < self.resolution < math.inf:
            raise UsageError("--resolution must be positive and finite")
        if self.regularization is not None and not 0 <= self.regularization < math.inf:
            raise UsageError("--regularization must be at least 0 and finite")
        check_seed(self.seed)
