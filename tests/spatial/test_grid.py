"""The coordinate conventions: index <-> physical <-> normalised, as ITK defines them."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import make_image, rotation

from carctl.spatial.grid import Grid


@pytest.fixture
def oblique():
    return make_image(
        (7, 6, 5),
        spacing=(0.7, 1.3, 2.9),
        origin=(10.0, -20.0, 5.5),
        direction=rotation(0.3, -0.5, 0.8),
    )


def test_points_match_sitk_index_to_physical(oblique):
    grid = Grid.from_sitk(oblique)
    points = grid.points()
    assert points.shape == (5, 6, 7, 3)  # (Z, Y, X, D)
    for index in [(0, 0, 0), (6, 5, 4), (3, 1, 2)]:
        expected = oblique.TransformIndexToPhysicalPoint(index)
        np.testing.assert_allclose(
            points[index[2], index[1], index[0]].numpy(), expected, atol=1e-12
        )


def test_physical_to_index_inverts(oblique):
    grid = Grid.from_sitk(oblique)
    rng = np.random.default_rng(0)
    index = torch.from_numpy(rng.uniform(-2, 8, size=(50, 3)))
    from carctl.spatial.grid import apply_homogeneous

    physical = apply_homogeneous(grid.index_to_physical, index)
    for i, p in zip(index.numpy(), physical.numpy(), strict=True):
        np.testing.assert_allclose(
            oblique.TransformContinuousIndexToPhysicalPoint(tuple(i)), p, atol=1e-10
        )
    np.testing.assert_allclose(grid.to_index(physical).numpy(), index.numpy(), atol=1e-10)


def test_normalised_coordinates_follow_align_corners():
    grid = Grid((5, 3, 1), (1.0,) * 3, (0.0,) * 3, tuple(np.eye(3).ravel()))
    index = torch.tensor([[0.0, 0.0, 0.0], [4.0, 2.0, 0.0], [2.0, 1.0, 0.0]])
    expected = torch.tensor([[-1.0, -1.0, -1.0], [1.0, 1.0, -1.0], [0.0, 0.0, -1.0]])
    torch.testing.assert_close(grid.index_to_normalised(index), expected)


def test_inside_rule_is_itk_half_voxel():
    grid = Grid((4, 4, 4), (1.0,) * 3, (0.0,) * 3, tuple(np.eye(3).ravel()))
    index = torch.tensor(
        [[-0.5, 0, 0], [-0.51, 0, 0], [3.49, 3.49, 3.49], [3.5, 0, 0]], dtype=torch.float64
    )
    assert grid.contains_index(index).tolist() == [True, False, True, False]


@pytest.mark.parametrize(
    ("direction", "code"),
    [
        (np.eye(3), "LPS"),
        (np.diag([-1.0, -1.0, 1.0]), "RAS"),
        (np.array([[0, 0, -1], [1, 0, 0], [0, 1, 0.0]]), "PSR"),
        (np.diag([1.0, -1.0, -1.0]), "LAI"),
    ],
)
def test_orientation_codes(direction, code):
    grid = Grid((2, 2, 2), (1.0,) * 3, (0.0,) * 3, tuple(direction.ravel()))
    assert grid.orientation == code
    assert not grid.is_oblique


def test_orientation_code_matches_sitk_dicom_orient(oblique):
    import SimpleITK as sitk

    for direction in (
        rotation(0.2, 0.1, 0.3),
        np.diag([-1.0, 1.0, -1.0]) @ rotation(0.1, 0.3, -0.2),
    ):
        grid = Grid((2, 2, 2), (1.0,) * 3, (0.0,) * 3, tuple(direction.ravel()))
        expected = sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(
            tuple(direction.ravel())
        )
        assert grid.orientation == expected
        assert grid.is_oblique


def test_invalid_grids_are_refused():
    with pytest.raises(ValueError, match="spacing must be positive"):
        Grid((2, 2, 2), (1.0, 0.0, 1.0), (0.0,) * 3, tuple(np.eye(3).ravel()))
    with pytest.raises(ValueError, match="singular"):
        Grid((2, 2, 2), (1.0,) * 3, (0.0,) * 3, (1, 0, 0, 1, 0, 0, 0, 0, 1))
    with pytest.raises(ValueError, match="2 or 3 dimensions"):
        Grid((2,), (1.0,), (0.0,), (1.0,))


def test_from_index_to_physical_round_trip(oblique):
    grid = Grid.from_sitk(oblique)
    again = Grid.from_index_to_physical(grid.size, grid.index_to_physical)
    assert again.same_as(grid, tolerance=1e-12)


@pytest.mark.parametrize("size", [(7, 5, 3), (1, 4, 1), (9, 4)])
def test_map_indices_channels_first_is_the_transposed_channels_last(size):
    """Built component by component (no transposed copy): bit for bit the same values."""
    d = len(size)
    direction = rotation(0.3, -0.5, 0.8) if d == 3 else np.array([[0.6, -0.8], [0.8, 0.6]])
    grid = Grid(size, (0.5, 2.0, 3.0)[:d], (4.0, -2.0, 1.0)[:d], tuple(direction.ravel()))
    matrix = np.eye(d + 1)
    matrix[:d] = np.random.default_rng(0).normal(size=(d, d + 1))
    for dtype in (torch.float32, torch.float64):
        last = grid.map_indices(matrix, dtype)
        first = grid.map_indices(matrix, dtype, channels_first=True)
        assert first.shape == (d, *grid.shape) and first.is_contiguous()
        assert torch.equal(first, last.movedim(-1, 0))


@pytest.mark.parametrize("size", [(5, 4, 3), (6, 1), (1, 1, 4)])
def test_inside_tests_agree_with_a_whole_array_comparison(size):
    """contains_index and contains_normalised (compared axis by axis) keep ITK's rule:
    ``-0.5 <= index < n - 0.5`` on every axis, points on and beside the borders included."""
    d = len(size)
    grid = Grid(size, (1.0,) * d, (0.0,) * d, tuple(np.eye(d).ravel()))
    rng = np.random.default_rng(3)
    edges = np.array([[-0.5, n - 0.5] for n in size])  # exactly on the border, and beside it
    index = rng.uniform(-1.5, max(size) + 0.5, size=(400, d))
    index[:100] = edges[np.arange(d), rng.integers(0, 2, size=(100, d))]
    index = torch.from_numpy(index)
    expected = ((index >= -0.5) & (index < torch.tensor(size) - 0.5)).all(dim=-1)
    assert 0 < int(expected.sum()) < len(index)
    assert torch.equal(grid.contains_index(index), expected)
    assert torch.equal(grid.contains_index(index.reshape(20, 20, d)), expected.reshape(20, 20))
    away = (index - torch.round(index - 0.5) - 0.5).abs().min(dim=-1).values > 1e-6
    normalised = grid.contains_normalised(grid.index_to_normalised(index))
    assert torch.equal(normalised[away], expected[away])
