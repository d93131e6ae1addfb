"""Sampling and warping: ITK's answers on every geometry, labels kept, known motions recovered."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from conftest import bspline_field, make_image, rotation

from carctl.io import Image
from carctl.spatial.grid import Grid
from carctl.spatial.sample import INTERPOLATORS, bspline_coefficients, sample, warp
from carctl.spatial.transform import Affine, DisplacementField, map_grid

_SITK = {
    "linear": sitk.sitkLinear,
    "nearest": sitk.sitkNearestNeighbor,
    "bspline": sitk.sitkBSpline,
}


def _field(field: sitk.Image) -> DisplacementField:
    array = np.moveaxis(sitk.GetArrayFromImage(field), -1, 0)
    return DisplacementField(Grid.from_sitk(field), torch.from_numpy(array))


@pytest.mark.parametrize("mode", ["linear", "nearest", "bspline"])
def test_warp_matches_sitk_resample(grid_pair, mode):
    field = bspline_field(grid_pair.fixed, magnitude=2.5, seed=7)
    expected = sitk.GetArrayFromImage(
        sitk.Resample(
            grid_pair.moving,
            grid_pair.fixed,
            sitk.DisplacementFieldTransform(sitk.Image(field)),
            _SITK[mode],
            0.0,
        )
    )
    moving = Image.from_sitk(grid_pair.moving)
    got = warp(
        moving.tensor(torch.float32),
        moving.grid,
        Grid.from_sitk(grid_pair.fixed),
        [_field(field)],
        mode=mode,
    )
    tolerance = 1e-3 * np.ptp(moving.array)
    np.testing.assert_allclose(got[0, 0].numpy(), expected, atol=tolerance)
    assert (np.abs(expected) > 0).mean() > 0.3  # the grids do overlap


@pytest.mark.parametrize("mode", ["linear", "nearest", "bspline"])
def test_two_d_warp_matches_sitk(mode):
    moving = make_image(
        (30, 26),
        spacing=(0.8, 1.1),
        origin=(-12.0, -14.0),
        direction=rotation(0, 0, 0.3)[:2, :2],
        seed=3,
    )
    fixed = make_image(
        (24, 22),
        spacing=(1.0, 1.2),
        origin=(-11.0, -12.0),
        direction=rotation(0, 0, -0.2)[:2, :2],
        seed=4,
    )
    field = bspline_field(fixed, magnitude=2.0, seed=1)
    expected = sitk.GetArrayFromImage(
        sitk.Resample(
            moving, fixed, sitk.DisplacementFieldTransform(sitk.Image(field)), _SITK[mode], 0.0
        )
    )
    m = Image.from_sitk(moving)
    got = warp(m.tensor(torch.float32), m.grid, Grid.from_sitk(fixed), [_field(field)], mode=mode)
    np.testing.assert_allclose(got[0, 0].numpy(), expected, atol=1e-3 * np.ptp(m.array))


def test_thin_single_slice_volume():
    """A 3-D image one slice thick: points within half a slice read it, the rest get the fill."""
    moving = make_image((16, 14, 1), spacing=(1.0, 1.0, 5.0), seed=5)
    fixed = make_image((12, 10, 3), spacing=(1.2, 1.3, 3.0), origin=(1.0, 0.5, -3.0), seed=6)
    expected = sitk.GetArrayFromImage(
        sitk.Resample(moving, fixed, sitk.Transform(), sitk.sitkLinear, -1.0)
    )
    m = Image.from_sitk(moving)
    got = warp(m.tensor(torch.float32), m.grid, Grid.from_sitk(fixed), [], fill=-1.0)
    np.testing.assert_allclose(got[0, 0].numpy(), expected, atol=1e-4)
    assert (expected[1] != -1).all() and (expected[0] == -1).all() and (expected[2] == -1).all()


def test_identity_reproduces_the_image_exactly():
    image = Image.from_sitk(
        make_image((9, 8, 7), spacing=(1, 2, 3), direction=rotation(0.4, 0.2, 0.1))
    )
    for mode in INTERPOLATORS:
        out = warp(image.tensor(torch.float64), image.grid, image.grid, [], mode=mode)
        np.testing.assert_allclose(out[0, 0].numpy(), image.array, atol=1e-6, err_msg=mode)


def test_known_translation_is_exact():
    """A moving image that is the fixed one shifted by (2, -1, 3) voxels is undone exactly."""
    array = sitk.GetArrayFromImage(make_image((16, 15, 14)))
    spacing = np.array([1.5, 1.0, 2.0])
    fixed_grid = Grid((16, 15, 14), tuple(spacing), (0.0,) * 3, tuple(np.eye(3).ravel()))
    shift = np.array([2, -1, 3])
    moving_grid = Grid(
        (16, 15, 14), tuple(spacing), tuple(shift * spacing), tuple(np.eye(3).ravel())
    )
    moving = torch.from_numpy(array)[None, None]
    # moving(x) = fixed(x - s): the pull-back is x -> x + s.
    out = warp(moving, moving_grid, fixed_grid, [Affine(np.eye(3), shift * spacing)])
    np.testing.assert_allclose(out[0, 0].numpy(), array, atol=1e-4)  # float32 coordinates


def test_outside_points_get_the_fill_value():
    grid = Grid((4, 4, 4), (1.0,) * 3, (0.0,) * 3, tuple(np.eye(3).ravel()))
    image = torch.ones(1, 1, 4, 4, 4)
    points = torch.tensor([[1.0, 1.0, 1.0], [-0.6, 1.0, 1.0], [3.6, 0, 0], [1.0, 1.0, 3.4]])
    for mode in INTERPOLATORS:
        values = sample(image, grid, points, mode=mode, fill=-7.0)[0, 0]
        assert values.tolist() == pytest.approx([1.0, -7.0, -7.0, 1.0], abs=1e-6), mode


def test_nearest_rounds_half_way_up_like_itk():
    grid = Grid((4, 1, 1), (1.0,) * 3, (0.0,) * 3, tuple(np.eye(3).ravel()))
    image = torch.tensor([10, 20, 30, 40]).reshape(1, 1, 1, 1, 4)
    points = torch.tensor([[0.5, 0, 0], [1.5, 0, 0], [2.5, 0, 0]], dtype=torch.float64)
    assert sample(image, grid, points, mode="nearest")[0, 0].tolist() == [20, 30, 40]


def test_label_interpolation_is_the_arg_max_of_linear_indicators():
    rng = np.random.default_rng(0)
    labels = sitk.GetArrayFromImage(make_image((14, 13, 12), seed=9)) // 20  # labels 0..5
    labels = labels.astype(np.int32) * 7  # values 0, 7, 14, ... (not 0..K)
    grid = Grid((14, 13, 12), (1.0, 1.1, 1.2), (0.0,) * 3, tuple(np.eye(3).ravel()))
    points = torch.from_numpy(rng.uniform(-0.4, 11.0, size=(4000, 3)))
    got = sample(torch.from_numpy(labels)[None, None], grid, points, mode="label")[0, 0].numpy()
    values = np.unique(labels)
    indicators = torch.from_numpy((labels[None] == values[:, None, None, None]).astype(np.float64))[
        None
    ]
    linear = sample(indicators, grid, points, mode="linear")[0].numpy()  # (K, P)
    expected = values[linear.argmax(axis=0)]
    top2 = np.sort(linear, axis=0)[-2:]
    clear = top2[1] - top2[0] > 1e-9  # ties may go either way
    assert clear.mean() > 0.9
    np.testing.assert_array_equal(got[clear], expected[clear])
    assert set(np.unique(got)) <= set(values)
    assert got.dtype == labels.dtype


def test_bspline_coefficients_interpolate_the_samples():
    array = torch.from_numpy(sitk.GetArrayFromImage(make_image((11, 9, 2), seed=2))).double()[
        None, None
    ]
    grid = Grid((11, 9, 2), (1.0,) * 3, (0.0,) * 3, tuple(np.eye(3).ravel()))
    points = grid.points()
    np.testing.assert_allclose(
        sample(array, grid, points, mode="bspline").numpy(), array.numpy(), atol=1e-6
    )
    assert bspline_coefficients(array).shape == array.shape


def test_bspline_keeps_nan_voxels_local():
    """A block of NaN voxels went through the B-spline prefilter into every output voxel
    (32 768 of 32 768; linear reading: 729). Now the finite voxels read as B-spline reads
    them with the NaN ones as 0, and NaN marks only where a NaN voxel weighs in."""
    image = Image.from_sitk(make_image((16, 16, 16), seed=1))
    holed = image.tensor(torch.float32).clone()
    holed[..., 4:8, 4:8, 4:8] = float("nan")
    shifted = Grid(image.grid.size, image.grid.spacing, (0.3, -0.2, 0.1), image.grid.direction)
    out = warp(holed, image.grid, shifted, mode="bspline")
    linear = warp(holed, image.grid, shifted, mode="linear")
    assert bool(out.isnan().any()) and int(out.isnan().sum()) <= int(linear.isnan().sum())
    far = torch.zeros_like(out, dtype=torch.bool)
    far[..., 10:, 10:, 10:] = True  # beyond the block by more than the spline's reach
    plain = warp(image.tensor(torch.float32), image.grid, shifted, mode="bspline")
    assert bool(out[far].isfinite().all())
    # far from the block the values differ from the untouched image's only by the prefilter's
    # decay from the zeroed block
    torch.testing.assert_close(out[far], plain[far], atol=0.05 * float(plain.abs().max()), rtol=0)


def test_linear_sampling_is_differentiable_in_the_points():
    image = Image.from_sitk(make_image((10, 10, 10)))
    points = (image.grid.points()[2:8, 2:8, 2:8] + 0.3).requires_grad_(True)
    sample(image.tensor(torch.float64), image.grid, points).sum().backward()
    assert points.grad is not None and points.grad.abs().sum() > 0


def test_unknown_mode_and_bad_shapes_are_refused():
    grid = Grid((4, 4, 4), (1.0,) * 3, (0.0,) * 3, tuple(np.eye(3).ravel()))
    with pytest.raises(ValueError, match="unknown interpolation"):
        sample(torch.zeros(1, 1, 4, 4, 4), grid, torch.zeros(2, 3), mode="cubic")
    with pytest.raises(ValueError, match="does not match"):
        sample(torch.zeros(1, 1, 4, 4, 5), grid, torch.zeros(2, 3))


def _slab_case(mode: str):
    """A moving image (intensities, or labels for nearest/label), a field and an affine."""
    moving = make_image((20, 18, 16), spacing=(1.1, 1.0, 1.3), seed=3)
    fixed = make_image(
        (17, 15, 13),
        spacing=(1.2, 1.2, 1.4),
        origin=(1.0, -0.5, 2.0),
        direction=rotation(0.1, 0.0, 0.2),
    )
    field = _field(bspline_field(fixed, magnitude=2.0, seed=2))
    image = Image.from_sitk(moving)
    tensor = image.tensor(torch.float32)
    if mode in ("nearest", "label"):
        tensor = (tensor // 25).to(torch.int16)
    chain = [field, Affine(rotation(0.05, 0.0, 0.0), [1.0, 0.0, -1.0])]
    return tensor, image.grid, field, chain


@pytest.mark.parametrize("mode", list(INTERPOLATORS))
def test_warping_in_slabs_equals_warping_at_once(mode):
    """Slabs bound memory on large grids; they change no label and no value beyond rounding."""
    tensor, moving_grid, field, chain = _slab_case(mode)
    whole = warp(tensor, moving_grid, field.grid, chain, mode=mode)
    for slab_voxels in (1, 17 * 15 * 4, 10**9):
        sliced = warp(tensor, moving_grid, field.grid, chain, mode=mode, slab_voxels=slab_voxels)
        assert sliced.dtype == whole.dtype
        # float32 coordinates of a slab's origin round differently: 1e-6 of the range at most
        atol = 0 if mode in ("nearest", "label") else 1e-4
        torch.testing.assert_close(sliced, whole, rtol=0, atol=atol)
    if mode in ("nearest", "label"):
        assert whole.dtype == torch.int16


@pytest.mark.parametrize("ndim", [2, 3])
def test_linear_warp_through_headers_or_one_field_equals_the_general_path(ndim):
    """Through the headers alone or one float32 field on the fixed grid, linear warping makes
    grid_sample's coordinates directly; the values are the general path's (a chain with an
    identity affine appended) to float32 rounding, in slabs too, with the fill outside, and a
    zero field reads exactly what the headers alone read."""
    size, spacing, origin = (17, 15, 13)[:ndim], (1.2, 1.2, 1.4)[:ndim], (1.0, -0.5, 2.0)[:ndim]
    direction = rotation(0.1, 0.0, 0.2) if ndim == 3 else np.array([[0.8, -0.6], [0.6, 0.8]])
    fixed = make_image(size, spacing=spacing, origin=origin, direction=direction)
    moving = Image.from_sitk(make_image((20, 18, 16)[:ndim], spacing=(1.1, 1.0, 1.3)[:ndim]))
    image = moving.tensor(torch.float32)
    grid = Grid.from_sitk(fixed)
    field = _field(bspline_field(fixed, magnitude=4.0, seed=2))
    field = DisplacementField(grid, field.data.to(torch.float32))
    identity = Affine(np.eye(ndim), np.zeros(ndim))
    span = float(image.max() - image.min())
    for chain in ([], [field]):
        general = warp(image, moving.grid, grid, [*chain, identity], fill=-7.0)
        outside = general == -7.0
        assert outside.any() and not outside.all()
        index = moving.grid.to_index(map_grid(grid, [*chain, identity]))  # float64
        border = (index - (-0.5)).abs().min(-1).values
        border = torch.minimum(
            border, (index - (torch.tensor(moving.grid.size) - 0.5)).abs().min(-1).values
        )
        for slab_voxels in (size[0] * size[1] * 2, 10**9):
            direct = warp(image, moving.grid, grid, chain, fill=-7.0, slab_voxels=slab_voxels)
            # inside or not may differ only for points on the half-voxel border (a tie that
            # float32 rounding breaks either way); elsewhere the values agree
            differ = (direct == -7.0) != outside
            assert bool((border[differ[0, 0]] < 1e-4).all())
            same = ~differ
            torch.testing.assert_close(direct[same], general[same], rtol=0, atol=1e-4 * span)
    zero = DisplacementField(grid, torch.zeros_like(field.data))
    assert torch.equal(warp(image, moving.grid, grid, [zero]), warp(image, moving.grid, grid))


def test_slab_grids_tile_the_grid():
    grid = Grid((5, 4, 7), (1.0, 2.0, 3.0), (1.0, 2.0, 3.0), tuple(rotation(0.3, 0.2, 0.1).ravel()))
    points = grid.points()
    torch.testing.assert_close(grid.slab(2, 5).points(), points[2:5])
    with pytest.raises(ValueError, match="outside"):
        grid.slab(3, 8)


@pytest.mark.gpu
@pytest.mark.parametrize("mode", list(INTERPOLATORS))
def test_warp_on_cuda_matches_cpu(mode):
    tensor, moving_grid, field, chain = _slab_case(mode)
    on_cpu = warp(tensor, moving_grid, field.grid, chain, mode=mode, slab_voxels=1000)
    cuda_field = DisplacementField(field.grid, field.data.cuda())
    on_gpu = warp(
        tensor.cuda(), moving_grid, field.grid, [cuda_field, chain[1]], mode=mode, slab_voxels=1000
    )
    assert on_gpu.device.type == "cuda"
    atol = 0 if mode in ("nearest", "label") else 1e-4
    torch.testing.assert_close(on_gpu.cpu(), on_cpu, rtol=0, atol=atol)


@pytest.mark.parametrize("ndim", [2, 3])
def test_grid_sample_over_threads_equals_one_call(monkeypatch, ndim):
    """Splitting one image's points into one batch entry per thread changes no value."""
    from carctl.spatial import sample

    monkeypatch.setattr(sample, "_THREADED_POINTS", 16)
    generator = torch.Generator().manual_seed(0)
    image = torch.rand(1, 3, *([9] * ndim), generator=generator)
    coords = torch.rand(1, *([7] * (ndim - 1)), 101, ndim, generator=generator) * 2.4 - 1.2
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(3)
        got = sample.grid_sample(image, coords, align_corners=True, padding_mode="border")
    finally:
        torch.set_num_threads(threads)
    expected = torch.nn.functional.grid_sample(
        image, coords, align_corners=True, padding_mode="border"
    )
    assert torch.equal(got, expected)


@pytest.mark.parametrize(
    "dtype", [torch.uint8, torch.int8, torch.int16, torch.uint16, torch.int32, torch.float32]
)
def test_label_votes_on_the_map_s_own_type_as_on_int64(dtype):
    """A label map is voted on in its own type (widened only where torch lacks it): the same
    labels as the int64 copy it used to be, in the map's type."""
    from carctl.spatial import sample

    grid = Grid((9, 7, 5), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), tuple(np.eye(3).ravel()))
    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 6, (1, 1, 5, 7, 9), generator=generator).to(dtype)
    index = torch.rand(400, 3, dtype=torch.float64, generator=generator) * torch.tensor(
        [8.0, 6.0, 4.0], dtype=torch.float64
    )
    ours = sample.INTERPOLATORS["label"].prepare(labels)
    voted = sample._sample_label(ours, grid, index)
    wide = labels.to(torch.float64 if labels.is_floating_point() else torch.int64)
    assert torch.equal(voted.to(wide.dtype), sample._sample_label(wide, grid, index))
    assert sample.INTERPOLATORS["label"].finish(voted, labels).dtype == dtype


@pytest.mark.parametrize("ndim", [2, 3])
def test_warp_reads_a_broadcast_image_as_its_copy(ndim):
    """qa warps the moving image's ones as a broadcast view (no whole-size tensor): the same
    values as the contiguous tensor, through the headers (the direct path) and an affine."""
    size = (9, 8, 7)[:ndim]
    moving = Grid(size, (1.0, 1.5, 2.0)[:ndim], (0.0,) * ndim, tuple(np.eye(ndim).ravel()))
    fixed = Grid((7, 9, 5)[:ndim], (1.2,) * ndim, (-1.0, 0.5, 1.0)[:ndim], moving.direction)
    linear = np.eye(ndim)
    linear[0, 1], linear[1, 0] = -0.1, 0.1
    shift = Affine(linear, np.arange(1.0, ndim + 1.0), np.zeros(ndim))
    view = torch.ones((1,) * (ndim + 2)).expand(1, 1, *moving.shape)
    for chain in ([], [shift]):
        expected = warp(view.contiguous(), moving, fixed, chain)
        assert torch.equal(warp(view, moving, fixed, chain), expected)
        assert 0 < int((expected > 0.5).sum()) < expected.numel()
