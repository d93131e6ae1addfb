"""Image similarity losses: plain functions over ``(N, C, *spatial)`` tensors.

Every loss takes the fixed and the (warped) moving *features* and an optional non-negative
``weight`` map ``(N, 1, *spatial)`` that restricts it (masks, overlap), and returns a scalar
to minimise. Features are what :data:`carctl.losses.LOSSES` computes once per resolution level
(MIND-SSC descriptors, or the normalised intensities): the optimiser then only samples them.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F

# Squared-distance clamp of MIND's variance estimate, relative to its mean (as in MIND-SSC).
_MIND_VARIANCE_RANGE = (1e-3, 1e3)
# Smallest descriptor value (see mind_ssc).
_MIND_FLOOR = 1e-6


def weighted_mean(values: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    """Mean of ``values`` ``(N, C, *spatial)`` over channels and voxels, weighted per voxel."""
    if weight is None:
        return values.mean()
    total = (values.mean(dim=1, keepdim=True) * weight).sum()
    return total / weight.sum().clamp_min(1e-8)


# --- features -------------------------------------------------------------------------------


def _shifted(image: torch.Tensor, offset: tuple[int, ...]) -> torch.Tensor:
    """``image`` read at ``index + offset`` (border values repeated), same shape."""
    d = len(offset)
    r = max(abs(o) for o in offset)
    pad = [r] * (2 * d)
    padded = F.pad(image, pad, mode="replicate")
    slices = [slice(None), slice(None)]
    # offset is (i, j, k) ordered like the index; tensor dims are reversed.
    for o, n in zip(reversed(offset), image.shape[2:], strict=True):
        slices.append(slice(r + o, r + o + n))
    return padded[tuple(slices)]


def _shift_into(out: torch.Tensor, image: torch.Tensor, offset: tuple[int, ...]) -> torch.Tensor:
    """:func:`_shifted` written into ``out`` (of ``image``'s shape, not overlapping it): the
    part read inside the image copied at once, then each axis's border from its neighbour,
    one axis after the other (no padded copy)."""
    dims = range(image.dim() - 1, 1, -1)  # the tensor dimension of index axes i, j, k
    if any(abs(o) >= image.shape[dim] for o, dim in zip(offset, dims, strict=True)):
        return out.copy_(_shifted(image, offset))
    source, target = image, out
    for o, dim in zip(offset, dims, strict=True):
        inside = image.shape[dim] - abs(o)
        source = source.narrow(dim, max(o, 0), inside)
        target = target.narrow(dim, max(-o, 0), inside)
    target.copy_(source)
    for o, dim in zip(offset, dims, strict=True):
        n = image.shape[dim]
        if o > 0:  # the last o read beyond the image: the value of the one before them
            edge = out.narrow(dim, n - o, o)
            edge.copy_(out.narrow(dim, n - o - 1, 1).expand_as(edge))
        elif o < 0:
            edge = out.narrow(dim, 0, -o)
            edge.copy_(out.narrow(dim, -o, 1).expand_as(edge))
    return out


def _box_filter(image: torch.Tensor, radius: int) -> torch.Tensor:
    """Mean over the ``(2 radius + 1)^D`` box around each voxel, of the voxels inside the image
    (``avg_pool`` with ``count_include_pad=False``, also on axes shorter than the box), one
    axis at a time: a box and its count of inside voxels both factor over the axes, and
    torch's CPU pooling reads the whole window per voxel (729 values for LNCC's 9-voxel
    windows) where this reads ``D (2 radius + 1)``. (MIND-SSC without gradients runs
    :func:`_box_axis` between arrays of its own instead: the same sums in the same order.)"""
    if radius == 0:
        return image
    out = image
    for dim in range(2, image.dim()):
        out = _box_axis(out, out.clone(), dim, radius, copied=True)
    return out


def _box_axis(
    image: torch.Tensor, total: torch.Tensor, dim: int, radius: int, copied: bool = False
) -> torch.Tensor:
    """``total`` (of ``image``'s shape, not overlapping it) set to the mean of each voxel's
    neighbours within ``radius`` along ``dim`` inside the image, and returned; ``copied``:
    ``total`` holds ``image`` already (a clone: the differentiable path, as ``out=`` writes
    do not take gradients; else the voxel and its lower neighbour are written at once). The
    sums are added in one order: the voxel, then the neighbours at 1, 2, ... voxels, the
    lower before the upper."""
    n = image.shape[dim]
    if not copied and (radius == 0 or n == 1):
        total.copy_(image)
    elif not copied:
        total.narrow(dim, 0, 1).copy_(image.narrow(dim, 0, 1))
        torch.add(
            image.narrow(dim, 1, n - 1),
            image.narrow(dim, 0, n - 1),
            out=total.narrow(dim, 1, n - 1),
        )
    for k in range(1, min(radius, n - 1) + 1):
        if copied or k > 1:  # (k = 1 below was written with the voxel)
            total.narrow(dim, k, n - k).add_(image.narrow(dim, 0, n - k))
        total.narrow(dim, 0, n - k).add_(image.narrow(dim, k, n - k))
    index = torch.arange(n, device=image.device)
    count = index.clamp(max=radius) + (n - 1 - index).clamp(max=radius) + 1
    return total.div_(count.to(total.dtype).reshape(n, *([1] * (image.dim() - 1 - dim))))


def _face_neighbours(d: int, dilation: int) -> list[tuple[int, ...]]:
    """The ``2 D`` face neighbours at distance ``dilation`` as index offsets, in the order
    ``-i, +i, -j, +j, ...`` (neighbour ``n`` lies along axis ``n // 2``, upward when odd)."""
    neighbours = []
    for axis in range(d):
        for sign in (-1, 1):
            offset = [0] * d
            offset[axis] = sign * dilation
            neighbours.append(tuple(offset))
    return neighbours


def _patch_distances(image: torch.Tensor, radius: int, dilation: int) -> torch.Tensor:
    """MIND-SSC's patch distances ``(N, 12 | 4, *spatial)``: for every pair of non-opposite
    face neighbours at distance ``dilation``, in :func:`itertools.combinations` order of the
    neighbours ``-x, +x, -y, +y, ...``, the box-filtered squared difference of the image
    read at the two neighbours."""
    neighbours = _face_neighbours(image.dim() - 2, dilation)
    pairs = [
        (a, b)
        for a, b in itertools.combinations(range(len(neighbours)), 2)
        if sum((x - y) ** 2 for x, y in zip(neighbours[a], neighbours[b], strict=True))
        == 2 * dilation**2
    ]
    # Half of the pairs are the other half moved: with a the lower neighbour along its axis,
    # (I(x - e_a) - I(x + s e_b))^2 is the pair (+e_a, -s e_b) read at x - e_a + s e_b. So
    # the patch distances of the pairs whose first neighbour is the upper one are computed
    # and filtered, and the others read from them (the same inside the image; on its outer
    # `dilation + radius` voxels they repeat the border's value instead).
    upper = [(a, b) for a, b in pairs if a % 2 == 1]
    shifted = {n: _shifted(image, neighbours[n]) for n in sorted({n for p in upper for n in p})}
    batch, _, *spatial = image.shape
    if image.requires_grad and torch.is_grad_enabled():
        filtered = torch.cat([(shifted[a] - shifted[b]).square() for a, b in upper], dim=1)
        filtered = _box_filter(filtered, radius)
        channels = []
        for a, b in pairs:
            if a % 2 == 1:
                channels.append(filtered[:, upper.index((a, b))])
                continue
            twin = upper.index((a + 1, b ^ 1))  # same axes, both neighbours flipped
            offset = _difference(neighbours[a], neighbours[b ^ 1])
            channels.append(_shifted(filtered[:, twin : twin + 1], offset)[:, 0])
        return torch.stack(channels, dim=1)
    # written in place (fresh arrays of a brain's size cost more than the arithmetic): the
    # box filter between two arrays, its last axis into the result's channels, from which
    # the shifted twins are read
    filtered = image.new_empty(batch, len(upper), *spatial)
    for i, (a, b) in enumerate(upper):
        torch.sub(shifted[a], shifted[b], out=filtered[:, i : i + 1])
    filtered.square_()
    spare, last = torch.empty_like(filtered), image.dim() - 1
    for dim in range(2, last):
        filtered, spare = _box_axis(filtered, spare, dim, radius), filtered
    result = image.new_empty(batch, len(pairs), *spatial)
    for i, (a, b) in enumerate(pairs):
        if a % 2 == 1:
            c = upper.index((a, b))
            _box_axis(filtered[:, c : c + 1], result[:, i : i + 1], last, radius)
    for i, (a, b) in enumerate(pairs):
        if a % 2 == 0:
            twin = pairs.index((a + 1, b ^ 1))  # same axes, both neighbours flipped
            offset = _difference(neighbours[a], neighbours[b ^ 1])
            _shift_into(result[:, i : i + 1], result[:, twin : twin + 1], offset)
    return result


def _difference(a: tuple[int, ...], b: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(x - y for x, y in zip(a, b, strict=True))


def mind_ssc(image: torch.Tensor, radius: int = 1, dilation: int = 1) -> torch.Tensor:
    """MIND-SSC descriptors (self-similarity context) of ``image`` ``(N, 1, *spatial)``.

    For every pair of the 2D face neighbours at distance ``dilation`` that are not opposite
    (12 pairs in 3-D, 4 in 2-D), the patch distance ``D`` is the box-filtered (``radius``)
    squared difference of the image shifted to the two neighbours. The descriptor is
    ``exp(-(D - min D) / V)`` with ``V`` the mean of the distances (clamped around its image
    mean), so that it depends on local structure, not on intensities. Returns
    ``(N, 12, *spatial)`` (``(N, 4, ...)`` in 2-D) in ``[0, 1]``. On the outer ``dilation +
    radius`` voxels, half of the distances repeat the border's value (see
    :func:`_patch_distances`).
    """
    distance = _patch_distances(image, radius, dilation)
    # in place unless differentiated: on a 1 mm brain each fresh 12-channel array costs
    # more than the arithmetic (0.6 -> 0.15 s for these lines)
    inplace = not (torch.is_grad_enabled() and distance.requires_grad)
    least = distance.amin(dim=1, keepdim=True)
    distance = distance.sub_(least) if inplace else distance - least
    variance = distance.mean(dim=1, keepdim=True)
    mean_variance = variance.mean()
    low, high = _MIND_VARIANCE_RANGE
    variance = variance.clamp(mean_variance * low + 1e-12, mean_variance * high + 1e-12)
    # floor: exp() of large distances underflows to denormals, which are ~50x slower to
    # compute with on x86 CPUs
    if inplace:
        return distance.div_(variance.neg_()).exp_().clamp_min_(_MIND_FLOOR)
    return torch.exp(-distance / variance).clamp_min(_MIND_FLOOR)


def intensity(image: torch.Tensor) -> torch.Tensor:
    """The identity feature map: the normalised intensities themselves."""
    return image


# --- losses -----------------------------------------------------------------------------------


def mse_loss(
    fixed: torch.Tensor, moving: torch.Tensor, weight: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean squared difference of the features (intensities: same modality)."""
    return weighted_mean((fixed - moving).square(), weight)


# MIND's loss is the mean squared difference of MIND-SSC descriptors (:func:`mind_ssc`).
mind_loss = mse_loss


def ncc_loss(
    fixed: torch.Tensor, moving: torch.Tensor, weight: torch.Tensor | None = None
) -> torch.Tensor:
    """``1 - NCC``: global normalised cross-correlation over the weighted voxels."""
    w = torch.ones_like(fixed[:, :1]) if weight is None else weight
    total = w.sum().clamp_min(1e-8)
    mf = (fixed * w).sum() / total
    mm = (moving * w).sum() / total
    f, m = fixed - mf, moving - mm
    cov = (f * m * w).sum()
    var = (f.square() * w).sum() * (m.square() * w).sum()
    return 1.0 - cov / var.clamp_min(1e-12).sqrt()


def lncc_loss(
    fixed: torch.Tensor,
    moving: torch.Tensor,
    weight: torch.Tensor | None = None,
    radius: int = 4,
) -> torch.Tensor:
    """``1 - LNCC²``: squared local correlation in windows of ``2 radius + 1`` voxels."""
    mean_f = _box_filter(fixed, radius)
    mean_m = _box_filter(moving, radius)
    var_f = _box_filter(fixed * fixed, radius) - mean_f.square()
    var_m = _box_filter(moving * moving, radius) - mean_m.square()
    cov = _box_filter(fixed * moving, radius) - mean_f * mean_m
    # 1e-5 on window *sums* (as in VoxelMorph); these are window means, so it shrinks by the
    # window volume squared (a fixed 1e-5 would outweigh typical local variances of [0, 1] data).
    eps = 1e-5 / float(2 * radius + 1) ** (2 * (fixed.dim() - 2))
    cc = cov.square() / (var_f.clamp_min(0) * var_m.clamp_min(0) + eps)
    return 1.0 - weighted_mean(cc, weight)


def mi_loss(
    fixed: torch.Tensor,
    moving: torch.Tensor,
    weight: torch.Tensor | None = None,
    bins: int = 32,
    max_samples: int = 1 << 17,
) -> torch.Tensor:
    """Negative mutual information from a Parzen-window (Gaussian) joint histogram.

    Intensities are expected in ``[0, 1]`` (see :func:`carctl.registration.levels.normalise`).
    Above ``max_samples`` voxels, a regular subset of them is used (same subset every call).
    """
    f = fixed[:, :1].reshape(-1)
    m = moving[:, :1].reshape(-1)
    w = torch.ones_like(f) if weight is None else weight.reshape(-1).to(f.dtype)
    step = max(1, f.numel() // max_samples)
    f, m, w = f[::step], m[::step], w[::step]
    centres = torch.linspace(0, 1, bins, dtype=f.dtype, device=f.device)
    sigma = 1.0 / (bins - 1)

    def parzen(values: torch.Tensor) -> torch.Tensor:
        z = (values.clamp(0, 1)[:, None] - centres) / sigma
        p = torch.exp(-0.5 * z.square())
        return p / p.sum(dim=1, keepdim=True).clamp_min(1e-12)

    pf, pm = parzen(f) * w[:, None], parzen(m)
    joint = pf.T @ pm
    joint = joint / joint.sum().clamp_min(1e-12)
    marginal_f = joint.sum(dim=1, keepdim=True)
    marginal_m = joint.sum(dim=0, keepdim=True)
    eps = 1e-10
    mi = (joint * (torch.log(joint + eps) - torch.log(marginal_f @ marginal_m + eps))).sum()
    return -mi
