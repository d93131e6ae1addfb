"""Evaluation metrics against SimpleITK's filters and brute-force definitions."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from conftest import bspline_field, bspline_transform, make_image, rotation

from carctl import metrics
from carctl.io import read_image
from carctl.spatial.grid import Grid
from carctl.spatial.transform import DisplacementField, jacobian_determinant


def _shifted(labels: sitk.Image, shift_mm, angle: float = 0.0) -> sitk.Image:
    """``labels`` moved by a small rigid transform (nearest neighbour), on its own grid."""
    size = np.asarray(labels.GetSize())
    centre = labels.TransformContinuousIndexToPhysicalPoint(tuple((size - 1) / 2.0))
    transform = sitk.Euler3DTransform(centre, 0.0, 0.0, angle, tuple(shift_mm))
    return sitk.Resample(labels, labels, transform, sitk.sitkNearestNeighbor, 0)


@pytest.fixture(scope="module")
def oasis_pair(shared_data):
    labels = sitk.ReadImage(str(shared_data / "oasis-t1-a/labels.nii.gz"))[40:120, 48:144, 60:160]
    return labels, _shifted(labels, (1.5, -2.0, 1.0), angle=0.05)


@pytest.fixture(scope="module")
def spine_pair(shared_data):
    fixed = sitk.ReadImage(str(shared_data / "spine-t1-t2/t2_seg-manual.nii.gz"))
    moving = sitk.ReadImage(str(shared_data / "spine-t1-t2/t1w_seg-manual.nii.gz"))
    warped = sitk.Resample(moving, fixed, sitk.Transform(), sitk.sitkNearestNeighbor, 0)
    return fixed, warped


def _sitk_dice(fixed: sitk.Image, warped: sitk.Image) -> dict[int, float]:
    overlap = sitk.LabelOverlapMeasuresImageFilter()
    overlap.Execute(sitk.Cast(fixed, sitk.sitkUInt16), sitk.Cast(warped, sitk.sitkUInt16))
    labels = set(np.unique(sitk.GetArrayViewFromImage(fixed))) | set(
        np.unique(sitk.GetArrayViewFromImage(warped))
    )
    return {int(k): overlap.GetDiceCoefficient(int(k)) for k in sorted(labels) if k != 0}


@pytest.mark.parametrize("chunk", [1 << 22, 7])
def test_dice_by_chunks_counts_as_a_whole(chunk, monkeypatch):
    """The agreeing voxels are counted by chunks (the last one shorter): the same Dice as
    counting the whole maps at once."""
    monkeypatch.setattr(metrics, "_DICE_CHUNK", chunk)
    rng = np.random.default_rng(5)
    fixed = rng.integers(0, 5, size=(6, 7, 8))
    warped = np.where(rng.random(fixed.shape) < 0.7, fixed, rng.integers(0, 5, fixed.shape))
    warped[warped == 4] = 0  # a label in one map only
    ours = metrics.dice(fixed, warped)
    for label in range(1, 5):
        a, b = fixed == label, warped == label
        assert ours[label] == 2.0 * (a & b).sum() / (a.sum() + b.sum())


@pytest.mark.slow
@pytest.mark.parametrize("pair", ["oasis_pair", "spine_pair"])
def test_dice_agrees_with_sitk_label_overlap(pair, request):
    fixed, warped = request.getfixturevalue(pair)
    ours = metrics.dice(
        metrics.as_label_map(sitk.GetArrayFromImage(fixed)),
        metrics.as_label_map(sitk.GetArrayFromImage(warped)),
    )
    reference = _sitk_dice(fixed, warped)
    assert ours.keys() == reference.keys()
    for label, value in reference.items():
        assert ours[label] == pytest.approx(value, abs=1e-12), label
    assert 0.3 < np.mean(list(ours.values())) < 1.0  # the shift really changed something


def _sitk_surface_distances(a: sitk.Image, b: sitk.Image) -> tuple[np.ndarray, np.ndarray]:
    """SimpleITK's recipe: surface voxels of one mask, Maurer distance map of the other's.

    The masks are padded with background first: voxels on the image border are surface.
    """
    a, b = (sitk.ConstantPad(m, [1, 1, 1], [1, 1, 1], 0) for m in (a, b))

    def directed(source: sitk.Image, target: sitk.Image) -> np.ndarray:
        contour_source = sitk.BinaryContour(source, fullyConnected=False)
        contour_target = sitk.BinaryContour(target, fullyConnected=False)
        distance = sitk.SignedMaurerDistanceMap(
            contour_target, insideIsPositive=False, squaredDistance=False, useImageSpacing=True
        )
        values = sitk.GetArrayViewFromImage(distance)[
            sitk.GetArrayViewFromImage(contour_source) > 0
        ]
        return np.maximum(values, 0.0)

    return directed(a, b), directed(b, a)


@pytest.mark.slow
@pytest.mark.parametrize("pair", ["oasis_pair", "spine_pair"])
def test_hd95_agrees_with_sitk_distance_filters(pair, request):
    fixed, warped = request.getfixturevalue(pair)
    a, b = sitk.GetArrayFromImage(fixed), sitk.GetArrayFromImage(warped)
    scores = metrics.label_scores(
        metrics.as_label_map(a), metrics.as_label_map(b), Grid.from_sitk(fixed)
    )
    checked = 0
    for score in scores[:12]:  # a dozen labels keeps the test fast
        mask_a = sitk.Cast(fixed == score.label, sitk.sitkUInt8)
        mask_b = sitk.Cast(warped == score.label, sitk.sitkUInt8)
        d_ab, d_ba = _sitk_surface_distances(mask_a, mask_b)
        hd95 = max(np.percentile(d_ab, 95), np.percentile(d_ba, 95))
        assert score.hd95 == pytest.approx(hd95, abs=1e-6), score.label
        hausdorff = sitk.HausdorffDistanceImageFilter()
        hausdorff.Execute(mask_a, mask_b)
        # Surface-to-surface maximum >= SimpleITK's voxel-set Hausdorff distance, and equal
        # to it when no part of one label lies deep inside the other.
        assert score.hd >= hausdorff.GetHausdorffDistance() - 1e-6
        assert score.hd == pytest.approx(max(d_ab.max(), d_ba.max()), abs=1e-6)
        checked += 1
    assert checked > 0


def test_surface_distances_match_brute_force():
    """Directed surface distances equal the minimum pairwise distance between surface voxels."""
    rng = np.random.default_rng(3)
    spacing = (0.8, 1.3, 2.1)  # ITK (x, y, z)
    a = np.zeros((12, 14, 16), bool)
    b = np.zeros_like(a)
    a[3:9, 4:11, 2:12] = True
    b[4:10, 2:9, 5:15] = True
    b[rng.random(b.shape) < 0.02] = True  # stray voxels
    d_ab, d_ba = metrics.surface_distances(a, b, spacing)
    scale = np.asarray(spacing[::-1])
    pa = np.argwhere(metrics.surface(a)) * scale
    pb = np.argwhere(metrics.surface(b)) * scale
    pairwise = torch.cdist(torch.from_numpy(pa), torch.from_numpy(pb)).numpy()
    np.testing.assert_allclose(np.sort(d_ab), np.sort(pairwise.min(axis=1)), atol=1e-5)
    np.testing.assert_allclose(np.sort(d_ba), np.sort(pairwise.min(axis=0)), atol=1e-5)


def test_identical_labels_score_perfectly():
    labels = np.zeros((10, 10, 10), np.int64)
    labels[2:5, 2:8, 3:9] = 1
    labels[6:9, 1:4, 1:4] = 7
    scores = metrics.label_scores(
        labels, labels, Grid((10, 10, 10), (1.0,) * 3, (0.0,) * 3, tuple(np.eye(3).ravel()))
    )
    assert [(s.label, s.dice, s.hd95, s.hd) for s in scores] == [
        (1, 1.0, 0.0, 0.0),
        (7, 1.0, 0.0, 0.0),
    ]


def test_label_missing_from_one_map_scores_zero_without_distance():
    fixed = np.zeros((6, 6, 6), np.int64)
    fixed[1:3, 1:3, 1:3] = 2
    warped = np.zeros_like(fixed)
    scores = metrics.label_scores(
        fixed, warped, Grid((6, 6, 6), (1.0,) * 3, (0.0,) * 3, tuple(np.eye(3).ravel()))
    )
    assert len(scores) == 1 and scores[0].dice == 0.0 and scores[0].hd95 is None


def test_label_maps_must_hold_non_negative_integers():
    with pytest.raises(ValueError, match="non-integer"):
        metrics.as_label_map(np.array([0.0, 0.5]))
    with pytest.raises(ValueError, match="negative"):
        metrics.as_label_map(np.array([0, -1]))
    np.testing.assert_array_equal(metrics.as_label_map(np.array([0.0, 3.0])), [0, 3])
    # wrapped to a negative int64 and refused as "negative values"
    with pytest.raises(ValueError, match="2\\^63 or more"):
        metrics.as_label_map(np.array([0, 2**63], dtype=np.uint64))


def test_no_surface_distance_on_a_sheared_grid():
    """Distances along a sheared grid's axes with its spacing are not mm (a 63-degree shear:
    HD95 4.0 for 1.8): none is given there, Dice still is."""
    a = np.zeros((12, 12, 12), np.int64)
    a[3:8, 3:8, 3:8] = 1
    b = np.roll(a, 2, axis=2)
    shear = np.array([[1.0, 2.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    shear /= np.linalg.norm(shear, axis=0)
    grids = [
        Grid((12, 12, 12), (1.0,) * 3, (0.0,) * 3, tuple(d.ravel()))
        for d in (shear, rotation(0.3, 0.2, -0.4) @ np.diag([1.0, -1.0, 1.0]))
    ]
    assert [g.is_sheared for g in grids] == [True, False]
    # a rotation as a DICOM header rounds it (5 decimals) is not a shear
    rounded = np.round(rotation(0.3, 0.2, -0.4), 5)
    assert not Grid((4, 4, 4), (1.0,) * 3, (0.0,) * 3, tuple(rounded.ravel())).is_sheared
    on_shear, turned = (metrics.label_scores(a, b, g)[0] for g in grids)
    assert on_shear.hd95 is None and on_shear.hd is None and on_shear.dice == turned.dice
    assert turned.hd == pytest.approx(2.0)


def _field(reference: sitk.Image, magnitude: float) -> tuple[sitk.Image, DisplacementField]:
    field = bspline_field(reference, magnitude=magnitude, mesh=3, seed=4)
    array = np.moveaxis(sitk.GetArrayFromImage(field), -1, 0)
    return field, DisplacementField(Grid.from_sitk(field), torch.from_numpy(array))


def test_folding_agrees_with_sitk_jacobian_filter():
    reference = make_image((24, 20, 18), spacing=(1.0, 1.5, 2.0))
    field, ours = _field(reference, magnitude=8.0)  # large enough to fold
    j_sitk = sitk.GetArrayFromImage(sitk.DisplacementFieldJacobianDeterminant(field))
    j = jacobian_determinant(ours).numpy()
    inside = (slice(1, -1),) * 3  # on the border carctl uses one-sided differences, ITK not
    np.testing.assert_allclose(j[inside], j_sitk[inside], atol=1e-9)
    folding_inside = metrics.jacobian_summary(j[inside])["folding_percent"]
    assert folding_inside == pytest.approx(100.0 * np.mean(j_sitk[inside] <= 0), abs=1e-12)
    assert folding_inside > 1.0
    # Over the whole grid the two differ by at most the border voxels that changed sign.
    border_share = 100.0 * (1.0 - j[inside].size / j.size)
    whole = metrics.jacobian_summary(j)["folding_percent"]
    assert abs(whole - 100.0 * np.mean(j_sitk <= 0)) <= border_share


def test_affine_field_has_its_exact_determinant_everywhere():
    from carctl.spatial.transform import Affine, to_displacement

    grid = Grid(
        (9, 8, 7), (1.0, 1.5, 2.0), (3.0, -2.0, 1.0), tuple(rotation(0.2, 0.1, -0.3).ravel())
    )
    matrix = rotation(0.1, -0.2, 0.3) @ np.diag([1.1, 0.9, 1.2])
    j = jacobian_determinant(to_displacement(grid, [Affine(matrix, [1.0, 2.0, 3.0])])).numpy()
    np.testing.assert_allclose(j, np.linalg.det(matrix), rtol=1e-9)


def test_jacobian_accounts_for_the_direction_matrix():
    """With a rotated grid, det J must match the transform's analytic Jacobian (SimpleITK's
    filter ignores the direction, so it is not the reference here)."""
    reference = make_image(
        (24, 20, 18), spacing=(1.0, 1.5, 2.0), direction=rotation(0.4, -0.3, 1.1)
    )
    transform = bspline_transform(reference, magnitude=3.0, mesh=3, seed=5)
    field = bspline_field(reference, magnitude=3.0, mesh=3, seed=5)
    ours = jacobian_determinant(
        DisplacementField(
            Grid.from_sitk(field),
            torch.from_numpy(np.moveaxis(sitk.GetArrayFromImage(field), -1, 0)),
        )
    )
    for index in [(12, 10, 9), (6, 14, 5), (18, 4, 12)]:
        x = np.asarray(reference.TransformIndexToPhysicalPoint(index))
        h = 1e-4
        columns = [
            (
                np.asarray(transform.TransformPoint(tuple(x + h * e)))
                - np.asarray(transform.TransformPoint(tuple(x - h * e)))
            )
            / (2 * h)
            for e in np.eye(3)
        ]
        analytic = np.linalg.det(np.stack(columns, axis=1))
        # Central differences over one voxel: a few per cent from the analytic value at most.
        assert ours[index[::-1]].item() == pytest.approx(analytic, rel=0.03)


def test_identity_field_has_unit_jacobian_and_no_folding():
    grid = Grid((5, 6, 7), (1.0, 2.0, 3.0), (0.0,) * 3, tuple(rotation(0.1, 0.2, 0.3).ravel()))
    j = jacobian_determinant(DisplacementField(grid, torch.zeros(3, 7, 6, 5))).numpy()
    np.testing.assert_allclose(j, 1.0)
    summary = metrics.jacobian_summary(j)
    assert summary == {
        "folding_percent": 0.0,
        "log_jacobian_std": 0.0,
        "jacobian_min": 1.0,
        "jacobian_max": 1.0,
    }


def test_spine_labels_before_registration(shared_data):
    """The header-only overlap of the spine cord masks, the number the issues quote (0.85)."""
    from carctl.resample import resample_image

    fixed = read_image(shared_data / "spine-t1-t2/t2_seg-manual.nii.gz")
    moving = read_image(shared_data / "spine-t1-t2/t1w_seg-manual.nii.gz")
    warped = resample_image(moving, fixed.grid, interpolation="label")
    score = metrics.dice(metrics.as_label_map(fixed.array), metrics.as_label_map(warped.array))
    assert score[1] == pytest.approx(0.85, abs=0.01)


def test_large_label_values_are_scored_without_huge_counts():
    small = np.zeros((8, 8, 8), np.int64)
    small[1:4, 1:4, 1:4] = 3
    small[5:7, 5:7, 5:7] = 5
    large = small.copy()
    large[small == 3] = 3_000_000_000
    large[small == 5] = 17
    grid = Grid((8, 8, 8), (1.0,) * 3, (0.0,) * 3, tuple(np.eye(3).ravel()))
    shifted = np.roll(large, 1, axis=0)
    scores = {s.label: s for s in metrics.label_scores(large, shifted, grid)}
    reference = {s.label: s for s in metrics.label_scores(small, np.roll(small, 1, axis=0), grid)}
    assert sorted(scores) == [17, 3_000_000_000]
    assert scores[3_000_000_000].dice == reference[3].dice
    assert scores[17].hd95 == reference[5].hd95


def test_two_d_label_scores():
    a = np.zeros((20, 30), np.int64)
    a[5:15, 5:20] = 1
    b = np.roll(a, 2, axis=1)
    grid = Grid((30, 20), (0.5, 2.0), (0.0, 0.0), (1.0, 0.0, 0.0, 1.0))
    (score,) = metrics.label_scores(a, b, grid)
    assert score.dice == pytest.approx(2 * 130 / 300)
    assert score.hd95 == pytest.approx(1.0)  # two columns of 0.5 mm


@pytest.mark.parametrize("chunk", [1 << 18, 64, 100])
def test_jacobian_summary_of_arrays_and_tensors_matches_numpy(chunk, monkeypatch):
    """The summary (computed with torch since it took 0.3-0.4 s of a command in NumPy) gives
    NumPy's numbers, for float32 tensors (as the command line passes them) and arrays, in
    one chunk or in several (the last one shorter): their means and spreads merged."""
    monkeypatch.setattr(metrics, "_SUMMARY_CHUNK", chunk)
    rng = np.random.default_rng(0)
    j = rng.normal(1.0, 0.4, size=(7, 9, 11)).astype(np.float32)
    x = j.astype(np.float64)
    log_j = np.log(np.clip(x, *metrics._LOG_JACOBIAN_CLIP))
    expected = {
        "folding_percent": float(100.0 * np.mean(x <= 0)),
        "log_jacobian_std": float(np.std(log_j)),
        "jacobian_min": float(x.min()),
        "jacobian_max": float(x.max()),
    }
    assert expected["folding_percent"] > 0
    for given in (j, torch.from_numpy(j)):
        summary = metrics.jacobian_summary(given)
        assert summary["folding_percent"] == expected["folding_percent"]
        assert summary["jacobian_min"] == expected["jacobian_min"]
        assert summary["jacobian_max"] == expected["jacobian_max"]
        assert summary["log_jacobian_std"] == pytest.approx(expected["log_jacobian_std"], rel=1e-12)
