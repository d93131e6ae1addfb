"""Transforms: ITK's affine parametrisation, fields, chains and their composition."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from conftest import bspline_field, make_image, rotation

from carctl.spatial.grid import Grid
from carctl.spatial.transform import Affine, DisplacementField, map_grid, to_displacement


def _sitk_affine(matrix, translation, center) -> sitk.AffineTransform:
    transform = sitk.AffineTransform(3)
    transform.SetMatrix(tuple(np.asarray(matrix).ravel()))
    transform.SetTranslation(tuple(translation))
    transform.SetCenter(tuple(center))
    return transform


def test_affine_maps_points_like_itk():
    matrix = rotation(0.2, -0.1, 0.4) @ np.diag([1.1, 0.95, 1.05])
    affine = Affine(matrix, [3.0, -2.0, 1.0], center=[10.0, 20.0, -5.0])
    reference = _sitk_affine(matrix, [3.0, -2.0, 1.0], [10.0, 20.0, -5.0])
    points = np.random.default_rng(0).uniform(-50, 50, size=(20, 3))
    got = affine.transform_points(torch.from_numpy(points)).numpy()
    expected = np.array([reference.TransformPoint(tuple(p)) for p in points])
    np.testing.assert_allclose(got, expected, atol=1e-10)


def test_centre_does_not_change_the_mapping_after_from_homogeneous():
    affine = Affine(rotation(0.3, 0.2, 0.1), [1.0, 2.0, 3.0])
    recentred = Affine.from_homogeneous(affine.homogeneous, center=[40.0, -10.0, 7.0])
    np.testing.assert_allclose(recentred.homogeneous, affine.homogeneous, atol=1e-12)
    np.testing.assert_allclose(recentred.center, [40.0, -10.0, 7.0])
    points = torch.randn(10, 3, dtype=torch.float64) * 20
    torch.testing.assert_close(
        affine.inverse().transform_points(affine.transform_points(points)), points
    )


def _grid() -> Grid:
    return Grid.from_sitk(
        make_image(
            (10, 9, 8),
            spacing=(1.5, 1.2, 2.0),
            origin=(-7, -5, -8),
            direction=rotation(0.1, 0.2, -0.3),
        )
    )


def test_field_is_zero_outside_its_grid_and_linear_inside():
    grid = _grid()
    data = torch.zeros(3, *grid.shape, dtype=torch.float64)
    data[0] = 2.0  # a constant shift along x inside the grid
    field = DisplacementField(grid, data)
    inside = grid.points()[4, 4, 4]
    outside = inside + 100.0
    moved = field.transform_points(torch.stack([inside, outside]))
    torch.testing.assert_close(
        moved[0], inside + torch.tensor([2.0, 0.0, 0.0], dtype=torch.float64)
    )
    torch.testing.assert_close(moved[1], outside)


def test_chain_applies_the_first_transform_first():
    grid = _grid()
    shift = Affine(np.eye(3), [5.0, 0.0, 0.0])
    turn = Affine(rotation(0.0, 0.0, np.pi / 2), [0.0, 0.0, 0.0])
    points = grid.points()
    first_shift = map_grid(grid, [shift, turn])
    expected = turn.transform_points(shift.transform_points(points))
    torch.testing.assert_close(first_shift, expected)
    assert not torch.allclose(first_shift, map_grid(grid, [turn, shift]))


def test_field_on_the_same_grid_takes_the_exact_path():
    reference = make_image((10, 9, 8), spacing=(1.5, 1.2, 2.0), direction=rotation(0.1, 0.2, -0.3))
    field_image = bspline_field(reference, magnitude=3.0)
    field = DisplacementField(
        Grid.from_sitk(field_image),
        torch.from_numpy(np.moveaxis(sitk.GetArrayFromImage(field_image), -1, 0)),
    )
    exact = map_grid(field.grid, [field])
    interpolated = field.transform_points(field.grid.points())
    torch.testing.assert_close(exact, interpolated, atol=1e-9, rtol=0)


def test_composed_field_reproduces_the_chain():
    reference = make_image((12, 11, 10), spacing=(1.0, 1.3, 1.7), direction=rotation(0.0, 0.3, 0.2))
    field_image = bspline_field(reference, magnitude=2.0)
    grid = Grid.from_sitk(field_image)
    field = DisplacementField(
        grid, torch.from_numpy(np.moveaxis(sitk.GetArrayFromImage(field_image), -1, 0))
    )
    affine = Affine(rotation(0.05, -0.03, 0.08), [2.0, -3.0, 1.0], center=[5.0, 5.0, 5.0])
    composed = to_displacement(grid, [field, affine])
    torch.testing.assert_close(map_grid(grid, [composed]), map_grid(grid, [field, affine]))
    # ITK agrees: a composite transform applying the field first, then the affine.
    composite = sitk.CompositeTransform(3)
    composite.AddTransform(_sitk_affine(affine.matrix, affine.translation, affine.center))
    composite.AddTransform(sitk.DisplacementFieldTransform(sitk.Image(field_image)))
    index = (3, 7, 5)
    point = grid.points()[index[2], index[1], index[0]].numpy()
    expected = np.asarray(composite.TransformPoint(tuple(point)))
    np.testing.assert_allclose(
        point + composed.data[:, index[2], index[1], index[0]].numpy(), expected, atol=1e-6
    )


def test_dimension_mismatch_is_refused():
    grid = _grid()
    with pytest.raises(ValueError, match="2-D transform cannot map a 3-D grid"):
        map_grid(grid, [Affine(np.eye(2), [0.0, 0.0])])
    with pytest.raises(ValueError, match="field of shape"):
        DisplacementField(grid, torch.zeros(3, 2, 2, 2))


def _dense_jacobian_determinant(field: DisplacementField) -> torch.Tensor:
    """Reference: every voxel's 3x3 Jacobian in float64, then ``torch.linalg.det``."""
    grid, u = field.grid, field.data.to(torch.float64)
    derivative = [torch.gradient(u, dim=3 - axis)[0] for axis in range(3)]
    g = torch.stack(derivative, dim=-1).movedim(0, -2)  # du_a / d index_b
    to_physical = np.linalg.inv(grid.direction_matrix * np.asarray(grid.spacing))
    return torch.linalg.det(torch.eye(3, dtype=torch.float64) + g @ torch.as_tensor(to_physical))


def test_jacobian_determinant_by_slabs_matches_the_dense_determinant(monkeypatch):
    from carctl.spatial import transform
    from carctl.spatial.transform import jacobian_determinant

    direction = tuple(rotation(0.3, 0.2, 0.1).ravel())
    grid = Grid((13, 11, 37), (0.7, 1.3, 2.0), (4.0, -2.0, 9.0), direction)
    # slabs of 4 slices (the last of 1): every slab's border is a border of another
    monkeypatch.setattr(transform, "_SLAB_VOXELS", 13 * 11 * 4)
    data = torch.randn(3, *grid.shape, generator=torch.Generator().manual_seed(0))
    # a float64 field: float64 arithmetic, as exact as the dense determinant
    field = DisplacementField(grid, data.double())
    ours = jacobian_determinant(field)
    assert ours.dtype == torch.float64 and ours.shape == grid.shape
    dense = _dense_jacobian_determinant(field)
    torch.testing.assert_close(ours, dense, rtol=0, atol=1e-12)
    # a float32 field (what registration writes): float32 arithmetic, close to it
    ours = jacobian_determinant(DisplacementField(grid, data))
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours.double(), dense, rtol=0, atol=1e-5)


@pytest.mark.parametrize("shape", [(3, 5, 6, 7), (3, 2, 4, 3)])
def test_central_difference_equals_torch_gradient(shape):
    from carctl.spatial.transform import _central_difference

    x = torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    for dim in (1, 2, 3):
        torch.testing.assert_close(_central_difference(x, dim), torch.gradient(x, dim=dim)[0])
