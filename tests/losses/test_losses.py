"""Similarity losses and regularisers: minima, invariances, weights, gradients, known values."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import smooth_volume

from carctl.losses import LOSSES, REGULARISERS, SimilarityLoss, loss_spec
from carctl.losses import similarity as sim
from carctl.losses.regularisers import bending, diffusion

# The learned losses depend on the shipped evaluator's quality, are 3-D only and look at
# every voxel within the network's receptive field (so a masked-out region still shifts
# them): their own tests are at the end of this file.
LEARNED = ("imse", "mind+imse")
CLASSICAL = [name for name in LOSSES if name not in LEARNED]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These tensors are tiny: intra-op threads only add overhead (a lot on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _image(size, seed: int = 0, sigma: float = 1.5) -> torch.Tensor:
    """A smooth random ``(1, 1, *spatial)`` float64 image in [0, 1] of ITK ``size``."""
    return torch.from_numpy(smooth_volume(size, seed, sigma) / 100.0).double()[None, None]


def _shuffled(image: torch.Tensor, seed: int = 0) -> torch.Tensor:
    order = torch.randperm(image.numel(), generator=torch.Generator().manual_seed(seed))
    return image.flatten()[order].reshape(image.shape)


def _loss(name: str, fixed: torch.Tensor, moving: torch.Tensor, weight=None) -> torch.Tensor:
    spec = loss_spec(name)
    return spec.function(spec.features(fixed), spec.features(moving), weight)


# --- registry and module twin ---------------------------------------------------------------


def test_registry_names_and_unknown_name():
    assert set(LOSSES) == {"mind", "mi", "lncc", "ncc", "mse", "imse", "mind+imse"}
    assert set(REGULARISERS) == {"diffusion", "bending"}
    assert all(loss_spec(name).name == name for name in LOSSES)
    assert LOSSES["mind"].fills_outside and not LOSSES["mse"].fills_outside
    assert not LOSSES["lncc"].pointwise and LOSSES["mi"].pointwise
    with pytest.raises(ValueError, match="'nope'") as error:
        loss_spec("nope")
    assert all(name in str(error.value) for name in LOSSES)
    with pytest.raises(ValueError):
        SimilarityLoss("nope")


@pytest.mark.parametrize("name", list(LOSSES))
def test_module_twin_equals_features_and_function(name):
    fixed, moving = _image((10, 9, 8), seed=1), _image((10, 9, 8), seed=2)
    weight = torch.rand(fixed.shape, dtype=fixed.dtype, generator=torch.Generator().manual_seed(3))
    module = SimilarityLoss(name)
    assert isinstance(module, torch.nn.Module)
    assert name in repr(module)
    spec = LOSSES[name]
    for w in (None, weight):
        expected = spec.function(spec.features(fixed), spec.features(moving), w)
        torch.testing.assert_close(module(fixed, moving, w), expected, rtol=0, atol=0)


# --- minima and alignment -------------------------------------------------------------------


@pytest.mark.parametrize("name", CLASSICAL)
@pytest.mark.parametrize("size", [(16, 16, 16), (16, 16)], ids=["3d", "2d"])
def test_identical_is_minimum_and_loss_grows_with_shift(name, size):
    base = _image(size)
    fixed = base[..., 2:14]  # crop along x; the moving windows are shifted along x
    losses = [_loss(name, fixed, base[..., 2 + k : 14 + k]).item() for k in (0, 1, 2)]
    backwards = [_loss(name, fixed, base[..., 2 - k : 14 - k]).item() for k in (1, 2)]
    assert losses[0] < losses[1] < losses[2], losses
    assert losses[0] < backwards[0] < backwards[1], backwards
    if name == "mi":  # -MI of an image with itself is minus its (Parzen) entropy: well below 0
        assert losses[0] < -0.5
        assert losses[0] < _loss(name, fixed, _shuffled(fixed)).item() - 0.5
    else:  # mse, mind, ncc, lncc: 0 when identical (lncc: textured everywhere)
        assert abs(losses[0]) < 1e-5
        assert losses[1] > 1e-3


def test_mi_known_values_on_binary_images():
    """A balanced binary image has entropy log 2; the Parzen kernels at 0 and 1 do not overlap."""
    x = torch.arange(8.0, dtype=torch.float64)
    z, y, xx = torch.meshgrid(x, x, x, indexing="ij")
    left = (xx < 4).double()[None, None]
    even_rows = (y % 2 == 0).double()[None, None]  # independent of ``left``, balanced
    assert -sim.mi_loss(left, left).item() == pytest.approx(math.log(2), abs=1e-6)
    assert -sim.mi_loss(left, 1.0 - left).item() == pytest.approx(math.log(2), abs=1e-6)
    assert -sim.mi_loss(left, even_rows).item() == pytest.approx(0.0, abs=1e-6)
    # weight: only x < 2 or x >= 6 voxels count, still balanced
    weight = ((xx < 2) | (xx >= 6)).double()[None, None]
    assert -sim.mi_loss(left, left, weight).item() == pytest.approx(math.log(2), abs=1e-6)
    # a weight keeping only one side leaves a single intensity: no information
    assert -sim.mi_loss(left, left, left).item() == pytest.approx(0.0, abs=1e-6)


def test_mi_rewards_non_linear_and_inverted_relations():
    image = _image((12, 12, 12))
    baseline = sim.mi_loss(image, _shuffled(image)).item()
    identical = sim.mi_loss(image, image).item()
    # the Parzen centres are symmetric on [0, 1], so inversion keeps MI exactly
    assert sim.mi_loss(image, 1.0 - image).item() == pytest.approx(identical, abs=1e-9)
    # non-monotonic remap (many-to-one): less than the identity, far above unrelated images
    bump = sim.mi_loss(image, (2.0 * image - 1.0).square()).item()
    assert identical < bump < baseline - 0.3
    # while NCC sees the inverted image as the worst match
    assert sim.ncc_loss(image, 1.0 - image).item() == pytest.approx(2.0, abs=1e-9)


# --- intensity invariances ------------------------------------------------------------------


@pytest.mark.parametrize("name", ["ncc", "lncc"])
def test_correlation_invariant_to_positive_affine_intensity(name):
    base = _image((16, 16, 14))
    fixed, shifted = base[..., 2:14], base[..., 3:15]
    misaligned = _loss(name, fixed, shifted).item()
    assert misaligned > 0.05
    # (lncc: up to its epsilon, which weighs on low-contrast windows)
    for scale, offset in ((0.5, 0.2), (2.0, -0.3), (0.25, 0.5)):
        assert _loss(name, fixed, scale * fixed + offset).item() == pytest.approx(0.0, abs=1e-4)
        moved = _loss(name, fixed, scale * shifted + offset).item()
        assert moved == pytest.approx(misaligned, abs=1e-4)
        # and in the fixed image too
        swapped = _loss(name, scale * fixed + offset, shifted).item()
        assert swapped == pytest.approx(misaligned, abs=1e-4)


def test_mind_descriptor_shapes_and_range():
    generator = torch.Generator().manual_seed(0)
    three = sim.mind_ssc(torch.rand(2, 1, 6, 7, 8, generator=generator))
    two = sim.mind_ssc(torch.rand(1, 1, 9, 10, generator=generator))
    thin = sim.mind_ssc(torch.rand(1, 1, 1, 8, 9, generator=generator))  # a single slice
    assert three.shape == (2, 12, 6, 7, 8)
    assert two.shape == (1, 4, 9, 10)
    assert thin.shape == (1, 12, 1, 8, 9)
    for features in (three, two, thin):
        assert torch.isfinite(features).all()
        assert features.min() >= 0 and features.max() <= 1
        # the closest patch pair of every voxel has descriptor exp(0) = 1
        torch.testing.assert_close(features.amax(dim=1), torch.ones_like(features[:, 0]))
    constant = sim.mind_ssc(torch.full((1, 1, 5, 5, 5), 0.3))
    assert torch.equal(constant, torch.ones_like(constant))


@pytest.mark.parametrize(
    ("shape", "radius", "dilation"),
    [
        ((6, 7, 8), 1, 1),
        ((7, 8, 9), 0, 1),
        ((9, 8, 11), 2, 2),
        ((1, 8, 9), 1, 1),
        ((2, 7, 9), 1, 2),
        ((9, 10), 1, 2),
    ],
)
def test_mind_in_place_path_equals_differentiable_path(shape, radius, dilation):
    """Without gradients MIND-SSC is computed in place (fast on whole brains: the box filter
    between two arrays, the shifted twins written into the result); with them, out of place.
    Both give bit for bit the same descriptors (the sums are added in the same order), also
    where an axis is shorter than the shift, and gradients flow."""
    generator = torch.Generator().manual_seed(1)
    image = torch.rand(1, 1, *shape, generator=generator)
    with torch.no_grad():
        fast = sim.mind_ssc(image, radius, dilation)
    source = image.clone().requires_grad_(True)
    slow = sim.mind_ssc(source, radius, dilation)
    assert torch.equal(fast, slow.detach())
    slow.sum().backward()
    assert source.grad is not None and torch.isfinite(source.grad).all()


@pytest.mark.parametrize("dilation", [1, 2])
def test_mind_matches_hand_computed_descriptor(dilation):
    """At an interior voxel with no patch filtering (radius 0): ``exp(-(D - min D) / mean)``
    over the 12 squared differences between non-opposite face neighbours."""
    image = _image((9, 9, 9), seed=4)
    features = sim.mind_ssc(image, radius=0, dilation=dilation)
    a = image[0, 0].numpy()
    z = y = x = 4
    d = dilation
    neighbours = [
        a[z, y, x - d],
        a[z, y, x + d],
        a[z, y - d, x],
        a[z, y + d, x],
        a[z - d, y, x],
        a[z + d, y, x],
    ]
    distances = np.array(
        [
            (neighbours[i] - neighbours[j]) ** 2
            for i in range(6)
            for j in range(i + 1, 6)
            if j != i + 1 or i % 2 == 1  # skip opposite neighbours (0-1, 2-3, 4-5)
        ]
    )
    assert distances.size == 12
    distances -= distances.min()
    expected = np.exp(-distances / distances.mean())
    got = features[0, :, z, y, x].numpy()
    np.testing.assert_allclose(np.sort(got), np.sort(expected), rtol=1e-10)


@pytest.mark.parametrize(
    ("shape", "radius", "dilation"), [((11, 12, 13), 1, 1), ((13, 12, 14), 2, 2), ((12, 13), 1, 2)]
)
def test_mind_patch_distances_inside_equal_every_pair_computed(shape, radius, dilation):
    """Half of the patch distances are read from their shifted twins: inside the image (all
    but the outer ``dilation + radius`` voxels) they equal computing all pairs one by one."""
    image = _image(shape, seed=7)
    d = len(shape)
    neighbours = sim._face_neighbours(d, dilation)
    expected = torch.cat(
        [
            (sim._shifted(image, neighbours[a]) - sim._shifted(image, neighbours[b])).square()
            for a in range(2 * d)
            for b in range(a + 1, 2 * d)
            if b // 2 != a // 2  # not opposite
        ],
        dim=1,
    )
    expected = sim._box_filter(expected, radius)
    got = sim._patch_distances(image, radius, dilation)
    assert got.shape == expected.shape
    inside = (slice(None), slice(None)) + (slice(radius + dilation, -(radius + dilation)),) * d
    torch.testing.assert_close(got[inside], expected[inside], rtol=1e-12, atol=1e-12)
    assert not torch.allclose(got, expected)  # the outer voxels differ: the test sees the twins


def test_mind_contrast_invariance():
    image = _image((14, 14, 14))
    reference = sim.mind_ssc(image)
    for scale, offset in ((3.0, 1.0), (0.2, 0.4), (-1.0, 1.0)):  # includes inversion 1 - x
        torch.testing.assert_close(
            sim.mind_ssc(scale * image + offset), reference, atol=1e-6, rtol=0
        )
    shifted = sim.mind_loss(reference, sim.mind_ssc(torch.roll(image, 1, dims=-1))).item()
    assert shifted > 0.01
    # a monotonic non-linear contrast, and its inversion, cost much less than a 1-voxel shift
    for moving in (image.square(), 1.0 - image.square()):
        assert sim.mind_loss(reference, sim.mind_ssc(moving)).item() < 0.2 * shifted
    # while the intensity losses see a large difference
    assert (
        sim.mse_loss(image, 1.0 - image).item()
        > 10 * sim.mse_loss(image, torch.roll(image, 1, dims=-1)).item()
    )


# --- weights --------------------------------------------------------------------------------


def test_weighted_mean_by_hand():
    generator = torch.Generator().manual_seed(0)
    values = torch.rand(2, 3, 4, 5, 6, dtype=torch.float64, generator=generator)
    weight = torch.rand(2, 1, 4, 5, 6, dtype=torch.float64, generator=generator)
    per_voxel = values.numpy().mean(axis=1)
    by_hand = (per_voxel * weight[:, 0].numpy()).sum() / weight.numpy().sum()
    assert sim.weighted_mean(values, weight).item() == pytest.approx(by_hand, rel=1e-12)
    assert sim.weighted_mean(values, None).item() == pytest.approx(values.mean().item())
    ones = torch.ones_like(weight)
    assert sim.weighted_mean(values, 7.0 * ones).item() == pytest.approx(values.mean().item())
    mask = (weight > 0.5).double()
    masked = values.mean(dim=1, keepdim=True)[mask.bool()].mean()
    assert sim.weighted_mean(values, mask).item() == pytest.approx(masked.item())
    assert sim.weighted_mean(values, torch.zeros_like(weight)).item() == 0.0  # no NaN


@pytest.mark.parametrize("name", CLASSICAL)
def test_zero_weight_region_is_ignored(name):
    spec = LOSSES[name]
    fixed = spec.features(_image((12, 12, 16), seed=1))
    moving = spec.features(_image((12, 12, 16), seed=2))
    weight = torch.zeros_like(fixed[:, :1])
    weight[:, :, :4] = 1.0  # z < 4; lncc windows (radius 4) reach z <= 7
    generator = torch.Generator().manual_seed(5)
    noise = torch.rand(moving[:, :, 8:].shape, dtype=moving.dtype, generator=generator)
    changed_outside = moving.clone()
    changed_outside[:, :, 8:] = noise
    reference = spec.function(fixed, moving, weight)
    torch.testing.assert_close(
        spec.function(fixed, changed_outside, weight), reference, rtol=0, atol=1e-12
    )
    # the weight's scale does not matter either
    torch.testing.assert_close(spec.function(fixed, moving, 3.0 * weight), reference)
    # the same change inside the weighted region does change the loss
    changed_inside = moving.clone()
    changed_inside[:, :, :4] = noise[:, :, :4]
    assert abs(spec.function(fixed, changed_inside, weight).item() - reference.item()) > 1e-4
    # and without the weight the outside change counts
    assert (
        abs(spec.function(fixed, changed_outside).item() - spec.function(fixed, moving).item())
        > 1e-4
    )


@pytest.mark.parametrize("name", [n for n, spec in LOSSES.items() if spec.pointwise])
def test_pointwise_losses_work_on_sampled_voxels(name):
    """Pointwise losses are called on ``(1, C, P)`` voxel samples: the order of the voxels
    does not matter and all voxels give the image's value."""
    spec = LOSSES[name]
    fixed = spec.features(_image((8, 8, 8), seed=1))
    moving = spec.features(_image((8, 8, 8), seed=2))
    generator = torch.Generator().manual_seed(3)
    weight = torch.rand(fixed[:, :1].shape, dtype=fixed.dtype, generator=generator)
    c = fixed.shape[1]
    order = torch.randperm(512, generator=torch.Generator().manual_seed(0))
    flat = [t.reshape(1, t.shape[1], -1) for t in (fixed, moving, weight)]
    whole = spec.function(fixed, moving, weight)
    torch.testing.assert_close(spec.function(*flat), whole)
    shuffled = [t[:, :, order] for t in flat]
    torch.testing.assert_close(spec.function(*shuffled), whole)
    assert shuffled[0].shape == (1, c, 512)


def test_lncc_is_not_pointwise():
    images = [_image((8, 8, 8), seed=1), _image((8, 8, 8), seed=2)]
    order = torch.randperm(512, generator=torch.Generator().manual_seed(0))
    permuted = [t.flatten()[order].reshape(t.shape) for t in images]
    assert abs(sim.lncc_loss(*images).item() - sim.lncc_loss(*permuted).item()) > 1e-3


def test_box_filter_matches_brute_force_on_any_size():
    """Window means over the voxels inside the image, also for axes shorter than the window
    (thin volumes at coarse levels, single slices)."""
    generator = torch.Generator().manual_seed(0)
    for shape, radius in (((5, 6, 7), 1), ((1, 5, 12), 4), ((2, 3, 10), 2), ((3, 11), 4)):
        image = torch.rand(1, 1, *shape, dtype=torch.float64, generator=generator)
        got = sim._box_filter(image, radius)[0, 0].numpy()
        a = image[0, 0].numpy()
        expected = np.empty_like(a)
        for index in np.ndindex(a.shape):
            window = tuple(slice(max(0, i - radius), i + radius + 1) for i in index)
            expected[index] = a[window].mean()
        np.testing.assert_allclose(got, expected, rtol=1e-12)


@pytest.mark.parametrize("name", CLASSICAL)
def test_losses_on_thin_volumes(name):
    """A 3-D image thinner than MIND's patch or LNCC's window along one axis."""
    for size in ((12, 10, 1), (12, 10, 3)):
        fixed, moving = _image(size, seed=1), _image(size, seed=2)
        value = _loss(name, fixed, moving)
        assert torch.isfinite(value)
        assert _loss(name, fixed, fixed).item() < value.item()


# --- gradients ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", CLASSICAL)
def test_gradcheck_wrt_moving(name):
    generator = torch.Generator().manual_seed(0)
    shape = (1, 1, 3, 4, 5)
    fixed = 0.1 + 0.8 * torch.rand(shape, dtype=torch.float64, generator=generator)
    moving = 0.1 + 0.8 * torch.rand(shape, dtype=torch.float64, generator=generator)
    weight = 0.5 + torch.rand(shape, dtype=torch.float64, generator=generator)
    spec = LOSSES[name]
    fixed_features = spec.features(fixed)
    if name == "mi":

        def function(f, m, w):
            return sim.mi_loss(f, m, w, bins=8, max_samples=30)  # every 2nd voxel

    else:
        function = spec.function

    def loss(m):
        return function(fixed_features, spec.features(m), weight)

    assert torch.autograd.gradcheck(loss, (moving.requires_grad_(),), eps=1e-6, atol=1e-5)


# --- regularisers ---------------------------------------------------------------------------


def _physical(shape, spacing) -> list[torch.Tensor]:
    """Physical coordinates (x, y[, z]) of a grid of tensor ``shape`` (index order reversed)."""
    axes = [torch.arange(n, dtype=torch.float64) for n in shape]
    grids = torch.meshgrid(*axes, indexing="ij")  # (z, y, x) order
    return [g * s for g, s in zip(reversed(grids), spacing, strict=True)]


@pytest.mark.parametrize(
    ("shape", "spacing"),
    [((5, 6, 7), (0.8, 1.3, 2.0)), ((6, 7), (1.5, 0.7)), ((1, 6, 7), (1.0, 1.2, 3.0))],
    ids=["3d", "2d", "single-slice"],
)
def test_regularisers_on_constant_and_affine_fields(shape, spacing):
    d = len(shape)
    x = _physical(shape, spacing)
    constant = torch.stack([torch.full(shape, 2.5 - c, dtype=torch.float64) for c in range(d)])[
        None
    ]
    assert diffusion(constant, spacing).item() == 0.0
    assert bending(constant, spacing).item() == 0.0
    a = torch.tensor(np.random.default_rng(0).normal(size=(d, d)))
    if shape[0] == 1:  # no z derivative on a single slice
        a[:, 2] = 0.0
    affine = torch.stack([sum(a[c, k] * x[k] for k in range(d)) + c for c in range(d)])[None]
    # u = A x + t: d u_c / d x_k = A[c, k] everywhere, averaged over the d components
    assert diffusion(affine, spacing).item() == pytest.approx(a.square().sum().item() / d)
    assert bending(affine, spacing).item() == pytest.approx(0.0, abs=1e-20)


@pytest.mark.parametrize("d", [2, 3])
def test_bending_of_quadratic_fields(d):
    shape, spacing = (6, 7, 8)[-d:], (0.9, 1.1, 1.6)[:d]
    x = _physical(shape, spacing)
    zero = torch.zeros(shape, dtype=torch.float64)
    for axis in range(d):
        pure = torch.stack([x[axis].square()] + [zero] * (d - 1))[None]  # d2/dx_axis2 = 2
        assert bending(pure, spacing).item() == pytest.approx(4.0 / d)
    mixed = torch.stack([zero] * (d - 1) + [x[0] * x[1]])[None]  # d2/dxdy = 1, counted twice
    assert bending(mixed, spacing).item() == pytest.approx(2.0 / d)


@pytest.mark.parametrize("d", [2, 3])
def test_regulariser_spacing_scaling(d):
    generator = torch.Generator().manual_seed(d)
    field = torch.randn(1, d, *(6, 5, 7)[-d:], dtype=torch.float64, generator=generator)
    ones = (1.0,) * d
    for s in (0.5, 2.0, 3.0):
        spacing = (s,) * d
        assert diffusion(field, spacing).item() == pytest.approx(diffusion(field, ones) / s**2)
        assert bending(field, spacing).item() == pytest.approx(bending(field, ones) / s**4)
    # spacing is in index order: a field varying along x only sees the x spacing
    x_only = field[(..., *[slice(0, 1)] * (d - 1), slice(None))].expand_as(field)
    assert diffusion(x_only, (1.0,) * d).item() > 0
    ratio = diffusion(x_only, (2.0,) + (1.0,) * (d - 1)) / diffusion(
        x_only, (1.0,) + (5.0,) * (d - 1)
    )
    assert ratio.item() == pytest.approx(0.25)
    ratio = bending(x_only, (2.0,) + (1.0,) * (d - 1)) / bending(x_only, (1.0,) + (5.0,) * (d - 1))
    assert ratio.item() == pytest.approx(1 / 16)


@pytest.mark.parametrize("shape", [(1, 6, 5), (4, 1, 1), (1, 1, 1), (1, 7), (2, 2, 2)])
def test_regularisers_on_thin_grids(shape):
    d = len(shape)
    generator = torch.Generator().manual_seed(0)
    field = torch.randn(1, d, *shape, dtype=torch.float64, generator=generator)
    field.requires_grad_()
    spacing = (1.0, 2.0, 0.5)[:d]
    for regulariser in REGULARISERS.values():
        value = regulariser(field, spacing)
        assert torch.is_tensor(value) and value.dim() == 0 and torch.isfinite(value)
        assert value.item() >= 0
        if value.requires_grad:
            (grad,) = torch.autograd.grad(value, field)
            assert torch.isfinite(grad).all()
    if shape == (1, 1, 1):
        assert diffusion(field, spacing).item() == 0.0
        assert bending(field, spacing).item() == 0.0
    if shape == (2, 2, 2):  # no pure second differences, but mixed ones exist
        assert bending(field, spacing).item() > 0


@pytest.mark.parametrize("name", LEARNED)
def test_learned_losses_take_any_float_and_thin_volumes(name):
    for size in ((12, 10, 1), (12, 10, 3), (9, 8, 7)):
        fixed, moving = _image(size, seed=1), _image(size, seed=2)
        value = _loss(name, fixed.double(), moving.double())
        assert value.dtype == torch.float64 and torch.isfinite(value)


def test_learned_loss_refuses_2d_images():
    from carctl.errors import InputError

    fixed = torch.rand(1, 1, 10, 12)
    with pytest.raises(InputError, match="3-D"):
        LOSSES["imse"].function(fixed, fixed, None)


@pytest.mark.parametrize("shape", [(5, 6, 7), (1, 6, 5), (4, 5), (1, 1, 1)])
def test_diffusion_gradient_is_autograds(shape):
    """The diffusion penalty's written-out gradient equals autograd's of the same sums (and
    torch's numerical check), on a channels-last field seen channels-first, as the
    deformable stage passes it."""
    from carctl.losses.regularisers import _difference

    d = len(shape)
    generator = torch.Generator().manual_seed(1)
    table = torch.randn(*reversed(shape), d, dtype=torch.float64, generator=generator)
    table.requires_grad_()
    spacing = (0.9, 2.0, 1.3)[:d]
    field = table.movedim(-1, 0)[None]
    reference = sum(_difference(field, a, s).square().mean() for a, s in enumerate(spacing))
    value = diffusion(field, spacing)
    assert value.item() == pytest.approx(float(torch.as_tensor(reference).detach()), rel=1e-12)
    if torch.is_tensor(reference) and reference.requires_grad:
        (expected,) = torch.autograd.grad(reference, table)
        (got,) = torch.autograd.grad(value, table)
        assert torch.allclose(got, expected, rtol=1e-10, atol=1e-15)
    assert torch.autograd.gradcheck(lambda t: diffusion(t.movedim(-1, 0)[None], spacing), table)
