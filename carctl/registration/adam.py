"""Adam (Kingma and Ba, 2015) for the few tensors an instance optimisation has.

Written out rather than taken from ``torch.optim``: the first ``step`` of a torch optimiser
imports the compiler stack (about one second per process on the development machine), which
is more than a small registration's whole affine stage.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch


class Adam:
    """Adam on ``params``, each with its own learning rate (``lrs``), scaled per step."""

    def __init__(
        self,
        params: Sequence[torch.Tensor],
        lrs: Sequence[float],
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
    ) -> None:
        self.params = list(params)
        self.lrs = list(lrs)
        self.betas = betas
        self.eps = eps
        self.steps = 0
        self._first = [torch.zeros_like(p) for p in self.params]
        self._second = [torch.zeros_like(p) for p in self.params]

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self, scale: float = 1.0) -> None:
        """One update with every learning rate times ``scale``; parameters without a
        gradient stay as they are."""
        b1, b2 = self.betas
        self.steps += 1
        correction1 = 1 - b1**self.steps
        root2 = math.sqrt(1 - b2**self.steps)
        for p, lr, m, v in zip(self.params, self.lrs, self._first, self._second, strict=True):
            if p.grad is None:
                continue
            m.mul_(b1).add_(p.grad, alpha=1 - b1)
            v.mul_(b2).addcmul_(p.grad, p.grad, value=1 - b2)
            p.addcdiv_(m, (v.sqrt() / root2).add_(self.eps), value=-lr * scale / correction1)
