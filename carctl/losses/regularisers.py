"""Smoothness penalties of a displacement field ``(N, D, *spatial)`` in physical mm.

Derivatives are finite differences divided by the grid ``spacing`` (mm, index order), so a
penalty has the same meaning at every resolution level.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def _difference(field: torch.Tensor, axis: int, spacing: float) -> torch.Tensor:
    """Forward difference along index ``axis`` (tensor dimension ``-1 - axis``), per mm."""
    dim = field.dim() - 1 - axis
    n = field.shape[dim]
    if n < 2:
        return field.new_zeros(())
    return (field.narrow(dim, 1, n - 1) - field.narrow(dim, 0, n - 1)) / spacing


def diffusion(field: torch.Tensor, spacing: Sequence[float]) -> torch.Tensor:
    """Mean squared first derivative, summed over the axes (membrane energy)."""
    return sum(_difference(field, axis, s).square().mean() for axis, s in enumerate(spacing))  # type: ignore[return-value]


def bending(field: torch.Tensor, spacing: Sequence[float]) -> torch.Tensor:
    """Mean squared second derivative, pure and mixed (thin-plate bending energy)."""
    total = field.new_zeros(())
    d = len(spacing)
    for a in range(d):
        first = _difference(field, a, spacing[a])
        if first.dim() == 0:
            continue
        for b in range(a, d):
            second = _difference(first, b, spacing[b])
            if second.dim() == 0:
                continue
            total = total + (1.0 if a == b else 2.0) * second.square().mean()
    return total
