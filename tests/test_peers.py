"""``carctl apply`` against the reference peers: SimpleITK (ITK) and antspyx (ANTs).

Every case goes through the command line (the ``cli`` fixture), writes real files and reads
them back, so the whole path a user takes is compared: file reading, the pull-back chain
``[field, affine]``, the interpolators and the geometry of every ``grid_pair``.

Intensity tolerances are relative to the moving image's intensity range. The synthetic images
vary by up to ~100 (their range) over a few voxels, so ``1e-3`` of the range corresponds to a
shift of the sampling point of about a hundredth of a voxel: any convention error (a flipped
axis, a transposed direction, the chain in the wrong order, a half-voxel shift) is far above it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import (
    ants_resample,
    bspline_field,
    centred_on,
    make_image,
    rotation,
    smooth_volume,
    write,
)

from carctl.spatial.grid import Grid

pytestmark = pytest.mark.peers
ants = pytest.importorskip("ants")

#: Largest accepted |carctl - peer|, relative to the moving image's intensity range.
RELATIVE_TOLERANCE = 1e-3

#: Labels of the synthetic label maps: background 0, sparse values, some above 255.
LABELS = np.array([0, 1, 2, 5, 17, 300, 1000])


# --- helpers ----------------------------------------------------------------------------


def small_affine(ndim: int, center) -> sitk.AffineTransform:
    """A ~5 degree rotation with a ~3 mm translation about a non-zero centre (ITK affine)."""
    affine = sitk.AffineTransform(ndim)
    if ndim == 3:
        matrix = rotation(0.05, -0.06, 0.07)  # ~5.3 degrees in all
        translation = (2.0, -1.5, 1.8)  # ~3.0 mm
    else:
        angle = 0.087  # 5 degrees
        matrix = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
        translation = (2.2, -2.0)
    affine.SetMatrix(tuple(float(v) for v in matrix.ravel()))
    affine.SetTranslation(translation)
    affine.SetCenter(tuple(float(c) for c in center))
    return affine


def image_centre(image: sitk.Image) -> np.ndarray:
    index = (np.asarray(image.GetSize()) - 1) / 2.0
    return np.asarray(image.TransformContinuousIndexToPhysicalPoint(tuple(index)))


def sitk_resample(moving, fixed, transform, interpolator=sitk.sitkLinear) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.Resample(moving, fixed, transform, interpolator, 0.0))


def field_transform(field: sitk.Image) -> sitk.DisplacementFieldTransform:
    """ITK transform of ``field`` (on a copy: the transform takes the image's buffer)."""
    return sitk.DisplacementFieldTransform(sitk.Image(field))


def relative_difference(a: np.ndarray, b: np.ndarray, moving: sitk.Image) -> float:
    assert a.shape == b.shape
    span = float(np.ptp(sitk.GetArrayViewFromImage(moving)))
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).max() / span)


def run_apply(cli, moving: Path, fixed: Path, out: Path, *options: str) -> sitk.Image:
    """``carctl apply`` through the CLI; the output must lie on the fixed grid."""
    result = cli("apply", moving, "--reference", fixed, *options, "-o", out)
    assert result.code == 0, result.err
    warped = sitk.ReadImage(str(out))
    assert Grid.from_sitk(warped).same_as(Grid.from_sitk(sitk.ReadImage(str(fixed))), 1e-5)
    return warped


def label_map(image: sitk.Image, values=LABELS, dtype=np.int16, seed: int = 0) -> sitk.Image:
    """A label map with the geometry of ``image``: the arg-max of smooth random volumes, so
    that several labels meet at junctions (harder than nested thresholds)."""
    size = image.GetSize()
    scores = np.stack([smooth_volume(size, seed=seed + k, sigma=1.5) for k in range(len(values))])
    labels = sitk.GetImageFromArray(np.asarray(values, dtype=dtype)[np.argmax(scores, axis=0)])
    labels.CopyInformation(image)
    return labels


class Case:
    """A grid pair written to disk, with a SimpleITK B-spline field on the fixed grid and a
    small affine (``.mat`` written by SimpleITK, as ANTs' ``0GenericAffine.mat``)."""

    def __init__(self, moving: sitk.Image, fixed: sitk.Image, directory: Path, magnitude=3.0):
        self.moving, self.fixed, self.dir = moving, fixed, directory
        self.field = bspline_field(fixed, magnitude=magnitude)
        self.affine = small_affine(fixed.GetDimension(), image_centre(fixed) + 4.0)
        self.moving_path = write(moving, directory / "moving.nii.gz")
        self.fixed_path = write(fixed, directory / "fixed.nii.gz")
        self.field_path = write(self.field, directory / "field.nii.gz")
        self.affine_path = directory / "affine.mat"
        sitk.WriteTransform(self.affine, str(self.affine_path))

    def chain(self) -> sitk.CompositeTransform:
        """The pull-back chain field-then-affine in SimpleITK: a CompositeTransform applies
        the transform added LAST first to a point, so the affine is added first."""
        return sitk.CompositeTransform([self.affine, field_transform(self.field)])


@pytest.fixture
def case(grid_pair, tmp_path) -> Case:
    return Case(grid_pair.moving, grid_pair.fixed, tmp_path)


# --- linear: field, and field then affine -----------------------------------------------


def test_apply_field_matches_simpleitk_and_ants(case, cli, tmp_path):
    """carctl apply --field = sitk.Resample(DisplacementFieldTransform) = antsApplyTransforms."""
    displacement = np.linalg.norm(sitk.GetArrayFromImage(case.field), axis=-1)
    assert displacement.max() > 2.0, "the field must move points by several mm to mean anything"

    warped = run_apply(
        cli, case.moving_path, case.fixed_path, tmp_path / "out.nii.gz", "--field", case.field_path
    )
    ours = sitk.GetArrayFromImage(warped)
    itk = sitk_resample(case.moving, case.fixed, field_transform(case.field))
    antspy = ants_resample(case.fixed_path, case.moving_path, [case.field_path], "linear")

    assert relative_difference(ours, itk, case.moving) < RELATIVE_TOLERANCE
    assert relative_difference(ours, antspy, case.moving) < RELATIVE_TOLERANCE
    # Not vacuous: most of the output is inside the image, and the field changed it.
    assert np.mean(ours != 0) > 0.5
    headers_only = sitk_resample(case.moving, case.fixed, sitk.Transform())
    assert relative_difference(ours, headers_only, case.moving) > 100 * RELATIVE_TOLERANCE


def test_apply_field_then_affine_matches_simpleitk_and_ants(case, cli, tmp_path):
    """carctl apply --field F --affine A = ANTs -t F -t A = SimpleITK Composite[A, F]."""
    warped = run_apply(
        cli,
        case.moving_path,
        case.fixed_path,
        tmp_path / "out.nii.gz",
        "--field",
        case.field_path,
        "--affine",
        case.affine_path,
    )
    ours = sitk.GetArrayFromImage(warped)
    itk = sitk_resample(case.moving, case.fixed, case.chain())
    antspy = ants_resample(
        case.fixed_path, case.moving_path, [case.field_path, case.affine_path], "linear"
    )
    # The SimpleITK reference is right: it agrees with ANTs, and the other composition order
    # (affine first, then field) is far from both.
    assert relative_difference(itk, antspy, case.moving) < RELATIVE_TOLERANCE
    wrong_order = sitk.CompositeTransform([field_transform(case.field), case.affine])
    wrong = sitk_resample(case.moving, case.fixed, wrong_order)
    assert relative_difference(wrong, antspy, case.moving) > 10 * RELATIVE_TOLERANCE

    assert relative_difference(ours, itk, case.moving) < RELATIVE_TOLERANCE
    assert relative_difference(ours, antspy, case.moving) < RELATIVE_TOLERANCE
    field_only = sitk_resample(case.moving, case.fixed, field_transform(case.field))
    assert relative_difference(ours, field_only, case.moving) > 100 * RELATIVE_TOLERANCE


def test_apply_to_a_4d_series_matches_ants_time_series_mode(case, cli, tmp_path):
    """``carctl apply SERIES`` (4-D) = ``antsApplyTransforms -e 3`` (antspyx ``imagetype=3``)
    through a field and an affine: every volume, the fourth axis kept."""
    volumes = [case.moving * (1.0 + 0.5 * k) + 10.0 * k for k in range(3)]
    series = write(sitk.JoinSeries(volumes, 4.0, 1.5), tmp_path / "series.nii.gz")
    chain = ("-t", case.field_path, "-t", case.affine_path)
    out = tmp_path / "out.nii.gz"
    result = cli("apply", series, "--reference", case.fixed_path, *chain, "-o", out)
    assert result.code == 0, result.err
    warped = sitk.ReadImage(str(out))
    assert warped.GetSize() == (*case.fixed.GetSize(), 3)
    assert (warped.GetSpacing()[3], warped.GetOrigin()[3]) == (1.5, 4.0)
    ours = sitk.GetArrayFromImage(warped)
    antspy = ants.apply_transforms(
        fixed=ants.image_read(str(case.fixed_path)),
        moving=ants.image_read(str(series)),
        transformlist=[str(case.field_path), str(case.affine_path)],
        imagetype=3,
    )
    theirs = np.transpose(antspy.numpy())  # (x, y, z, t) -> (t, z, y, x)
    assert theirs.shape == ours.shape
    for k in range(3):
        assert relative_difference(ours[k], theirs[k], volumes[k]) < RELATIVE_TOLERANCE
    assert relative_difference(ours[2], ours[0], case.moving) > 100 * RELATIVE_TOLERANCE


def test_apply_and_points_chain_transforms_in_ants_order(case, cli, tmp_path):
    """``-t F -t A2 -t [A,1]``: a reference point goes through F, then A2, then A's inverse,
    as antsApplyTransforms (``whichtoinvert``) and a SimpleITK composite do; ``carctl
    points`` maps points through the same chain."""
    second = small_affine(case.fixed.GetDimension(), image_centre(case.fixed) - 6.0)
    second.SetTranslation(tuple(-2.0 * np.asarray(second.GetTranslation())))
    second_path = tmp_path / "second.tfm"
    sitk.WriteTransform(second, str(second_path))
    specs = [str(case.field_path), str(second_path), f"[{case.affine_path},1]"]
    options = [x for spec in specs for x in ("-t", spec)]
    warped = run_apply(cli, case.moving_path, case.fixed_path, tmp_path / "out.nii.gz", *options)
    ours = sitk.GetArrayFromImage(warped)
    # SimpleITK applies the transform added last first
    chain = [case.affine.GetInverse(), second, field_transform(case.field)]
    itk = sitk_resample(case.moving, case.fixed, sitk.CompositeTransform(chain))
    antspy = ants.apply_transforms(
        fixed=ants.image_read(str(case.fixed_path)),
        moving=ants.image_read(str(case.moving_path)),
        transformlist=[str(case.field_path), str(second_path), str(case.affine_path)],
        whichtoinvert=[False, False, True],
    )
    assert relative_difference(itk, np.transpose(antspy.numpy()), case.moving) < RELATIVE_TOLERANCE
    assert relative_difference(ours, itk, case.moving) < RELATIVE_TOLERANCE
    plain = sitk_resample(case.moving, case.fixed, case.chain())  # not the same chain
    assert relative_difference(ours, plain, case.moving) > 100 * RELATIVE_TOLERANCE

    d = case.fixed.GetDimension()
    rng = np.random.default_rng(0)
    corners = [np.asarray(case.fixed.TransformIndexToPhysicalPoint((0,) * d))]
    corners.append(
        np.asarray(
            case.fixed.TransformIndexToPhysicalPoint(tuple(n - 1 for n in case.fixed.GetSize()))
        )
    )
    points = corners[0] + rng.uniform(0.3, 0.7, (12, d)) * (corners[1] - corners[0])
    names = "xyz"[:d]
    (tmp_path / "p.csv").write_text(
        ",".join(names) + "\n" + "".join(",".join(f"{v:.6f}" for v in p) + "\n" for p in points)
    )
    result = cli("points", tmp_path / "p.csv", "-o", tmp_path / "q.csv", *options)
    assert result.code == 0, result.err
    mapped = np.loadtxt(tmp_path / "q.csv", delimiter=",", skiprows=1)
    composite = sitk.CompositeTransform(chain)
    expected = np.array([composite.TransformPoint(tuple(float(v) for v in p)) for p in points])
    np.testing.assert_allclose(mapped, expected, atol=1e-3)


def test_transform_chains_refuse_what_they_cannot_mean(case, cli, tmp_path):
    """-t beside --field, a field's inverse and a malformed spec: one-line errors."""
    out = tmp_path / "out.nii.gz"
    base = ["apply", case.moving_path, "-r", case.fixed_path, "-o", out]
    for extra, code, words in (
        (["-t", case.affine_path, "--field", case.field_path], 2, "as --field/--affine or as -t"),
        (["-t", f"[{case.field_path},1]"], 1, "a displacement field is not inverted here"),
        (["-t", f"[{case.affine_path},2]"], 1, "write a transform as PATH or [PATH,1]"),
    ):
        result = cli(*base, *extra)
        assert result.code == code and words in result.err, (extra, result.err)
        assert len(result.err.strip().splitlines()) == 1
    assert not out.exists()
    result = cli(
        "points",
        case.fixed_path,
        "-o",
        tmp_path / "q.csv",
        "-t",
        case.affine_path,
        "--invert-affine",
    )
    assert result.code == 2 and "'[AFFINE,1]'" in result.err


# --- nearest neighbour -----------------------------------------------------------------


def test_apply_nearest_matches_simpleitk_exactly(case, cli, tmp_path):
    """--interp nearest picks the very voxel ITK's NearestNeighbor picks, everywhere."""
    warped = run_apply(
        cli,
        case.moving_path,
        case.fixed_path,
        tmp_path / "out.nii.gz",
        "--field",
        case.field_path,
        "--affine",
        case.affine_path,
        "--interp",
        "nearest",
    )
    assert warped.GetPixelID() == case.moving.GetPixelID()
    ours = sitk.GetArrayFromImage(warped)
    itk = sitk_resample(case.moving, case.fixed, case.chain(), sitk.sitkNearestNeighbor)
    disagreeing = int(np.count_nonzero(ours != itk))
    assert disagreeing == 0, f"{disagreeing} of {ours.size} voxels differ from SimpleITK"
    # Every output value is a voxel of the input (or the fill value).
    assert np.isin(ours, np.append(sitk.GetArrayViewFromImage(case.moving), 0.0)).all()


def test_apply_nearest_rounds_half_voxel_ties_up_like_itk(cli, tmp_path):
    """On a grid whose voxels fall exactly half-way between moving voxels, carctl rounds the
    index up (ITK's floor(x + 0.5)), as ITK does when it maps each point on its own.

    The ITK reference uses a zero displacement field to force that point-by-point path:
    with an identity transform ITK's ResampleImageFilter interpolates the index along each
    scanline, and its rounding then falls on either side of some exact ties."""
    moving = make_image((20, 18, 16), seed=5)
    fixed = make_image((39, 35, 31), spacing=(0.5, 0.5, 0.5), seed=6)  # index = i / 2
    moving_path, fixed_path = (
        write(moving, tmp_path / "m.nii.gz"),
        write(fixed, tmp_path / "f.nii.gz"),
    )

    ours = sitk.GetArrayFromImage(
        run_apply(cli, moving_path, fixed_path, tmp_path / "out.nii.gz", "--interp", "nearest")
    )
    zero = sitk.Image(fixed.GetSize(), sitk.sitkVectorFloat64, 3)
    zero.CopyInformation(fixed)
    itk = sitk_resample(
        moving, fixed, sitk.DisplacementFieldTransform(zero), sitk.sitkNearestNeighbor
    )
    assert np.array_equal(ours, itk)

    # The rule itself: fixed index i reads moving index ceil(i / 2) on every axis.
    m = sitk.GetArrayFromImage(moving)
    up = [(np.arange(n) + 1) // 2 for n in ours.shape]
    down = [np.arange(n) // 2 for n in ours.shape]
    assert np.array_equal(ours, m[np.ix_(*up)])
    assert np.mean(ours != m[np.ix_(*down)]) > 0.5  # the ties are real and decisive


# --- label maps ------------------------------------------------------------------------


def test_apply_label_matches_ants_generic_label(case, cli, tmp_path, record_property):
    """--interp label agrees with ANTs' genericLabel on >= 99% of voxels, keeps the pixel
    type and never invents a label."""
    labels = label_map(case.moving)
    labels_path = write(labels, tmp_path / "labels.nii.gz")
    present = np.unique(sitk.GetArrayViewFromImage(labels))
    assert len(present) >= 5

    warped = run_apply(
        cli,
        labels_path,
        case.fixed_path,
        tmp_path / "out.nii.gz",
        "--field",
        case.field_path,
        "--affine",
        case.affine_path,
        "--interp",
        "label",
    )
    assert warped.GetPixelID() == sitk.sitkInt16
    ours = sitk.GetArrayFromImage(warped)
    antspy = ants_resample(
        case.fixed_path, labels_path, [case.field_path, case.affine_path], "genericLabel"
    )
    agreement = float(np.mean(ours == antspy))
    record_property("label_agreement", agreement)
    print(f"label agreement with ANTs genericLabel: {agreement:.5f}")
    assert agreement >= 0.99
    assert set(np.unique(ours)) <= set(present)
    assert len(np.unique(ours)) >= 5  # not a degenerate output


@pytest.mark.parametrize("reference", ["half-voxel shift", "half the voxels", "twice the voxels"])
def test_apply_label_breaks_ties_as_ants_whatever_the_axis_order(cli, tmp_path, reference):
    """Exact ties (a point half-way between labels, routine on grids half a voxel apart or
    at whole multiples) go to the smallest label, as ANTs' genericLabel: they went to the
    first corner in index order, so the same map stored with an axis flipped warped
    differently and about 5 % of voxels differed from ANTs."""
    rng = np.random.default_rng(3)
    blocks = rng.choice([1, 2, 5, 9], size=(4, 4, 4)).astype(np.int16)
    array = blocks.repeat(3, 0).repeat(3, 1).repeat(3, 2)  # 12^3, 3-voxel blocks
    labels = sitk.GetImageFromArray(array)
    stored = write(labels, tmp_path / "labels.nii.gz")
    flipped = sitk.Flip(labels, [True, False, True])
    flipped.SetDirection((-1, 0, 0, 0, 1, 0, 0, 0, -1))
    flipped.SetOrigin((11.0, 0.0, 11.0))
    flipped_path = write(flipped, tmp_path / "flipped.nii.gz")
    size, spacing, origin = {
        "half-voxel shift": ((11, 11, 11), 1.0, 0.5),
        "half the voxels": ((6, 6, 6), 2.0, 0.5),
        "twice the voxels": ((23, 23, 23), 0.5, 0.0),
    }[reference]
    grid = sitk.Image(size, sitk.sitkFloat32)
    grid.SetSpacing((spacing,) * 3)
    grid.SetOrigin((origin,) * 3)
    fixed = write(grid, tmp_path / "fixed.nii.gz")
    identity = tmp_path / "identity.mat"
    sitk.WriteTransform(sitk.AffineTransform(3), str(identity))
    outputs = []
    for name, path in (("a", stored), ("b", flipped_path)):
        warped = run_apply(cli, path, fixed, tmp_path / f"{name}.nii.gz", "--interp", "label")
        outputs.append(sitk.GetArrayFromImage(warped))
    antspy = ants_resample(fixed, stored, [identity], "genericLabel")
    assert np.array_equal(outputs[0], outputs[1])
    assert np.array_equal(outputs[0], antspy), float(np.mean(outputs[0] != antspy))


@pytest.mark.parametrize(
    "dtype", ["uint8", "int8", "int16", "uint16", "int32", "uint32", "int64", "uint64", "float32"]
)
@pytest.mark.parametrize("interp", ["nearest", "label"])
def test_apply_label_and_nearest_keep_every_pixel_type(cli, tmp_path, interp, dtype):
    """nearest and label work on label maps of every pixel type SimpleITK writes to NIfTI,
    keep that type and give the same voxels as for an int16 copy of the same map."""
    moving = make_image((16, 14, 12), spacing=(1.2, 1.0, 1.4), seed=3)
    fixed = centred_on(moving, (15, 13, 12), (1.1, 1.3, 1.2), rotation(0.2, -0.1, 0.3))
    fixed_path = write(fixed, tmp_path / "fixed.nii.gz")
    values = [0, 1, 2, 5, 17, 42, 100]  # fit every integer type
    reference = label_map(moving, values, np.int16)
    labels = label_map(moving, values, np.dtype(dtype))
    labels_path = write(labels, tmp_path / "labels.nii.gz")
    field_path = write(bspline_field(fixed, magnitude=2.0), tmp_path / "field.nii.gz")

    expected = sitk.GetArrayFromImage(
        run_apply(
            cli,
            write(reference, tmp_path / "reference.nii.gz"),
            fixed_path,
            tmp_path / "expected.nii.gz",
            "--field",
            field_path,
            "--interp",
            interp,
        )
    )
    warped = run_apply(
        cli,
        labels_path,
        fixed_path,
        tmp_path / "out.nii.gz",
        "--field",
        field_path,
        "--interp",
        interp,
    )
    assert warped.GetPixelID() == labels.GetPixelID()
    assert np.array_equal(
        sitk.GetArrayFromImage(warped).astype(np.int64), expected.astype(np.int64)
    )


# --- cubic B-spline --------------------------------------------------------------------


def test_apply_bspline_matches_simpleitk(case, cli, tmp_path):
    """--interp bspline = SimpleITK's sitkBSpline (cubic, ITK's mirror boundary)."""
    warped = run_apply(
        cli,
        case.moving_path,
        case.fixed_path,
        tmp_path / "out.nii.gz",
        "--field",
        case.field_path,
        "--affine",
        case.affine_path,
        "--interp",
        "bspline",
    )
    ours = sitk.GetArrayFromImage(warped)
    itk = sitk_resample(case.moving, case.fixed, case.chain(), sitk.sitkBSpline)
    assert relative_difference(ours, itk, case.moving) < RELATIVE_TOLERANCE
    # Cubic differs from linear by far more than the tolerance: the right kernel was used.
    linear = sitk_resample(case.moving, case.fixed, case.chain(), sitk.sitkLinear)
    assert relative_difference(ours, linear, case.moving) > 10 * RELATIVE_TOLERANCE


# --- 2-D -------------------------------------------------------------------------------


def rotation_2d(angle: float) -> np.ndarray:
    return np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])


@pytest.fixture
def case_2d(tmp_path) -> Case:
    moving = make_image(
        (30, 26), spacing=(1.1, 0.9), origin=(-5.0, 7.0), direction=rotation_2d(0.3), seed=4
    )
    # Oblique and left-handed (a flipped axis), other size and spacing.
    fixed = centred_on(moving, (24, 28), (1.3, 1.0), rotation_2d(-0.4) @ np.diag([1.0, -1.0]))
    return Case(moving, fixed, tmp_path, magnitude=2.0)


@pytest.mark.parametrize(
    "interp, itk_interpolator",
    [
        ("linear", sitk.sitkLinear),
        ("nearest", sitk.sitkNearestNeighbor),
        ("bspline", sitk.sitkBSpline),
    ],
)
def test_apply_2d_oblique_matches_simpleitk(case_2d, cli, tmp_path, interp, itk_interpolator):
    """2-D oblique grids, field then affine: carctl = SimpleITK for every interpolator."""
    warped = run_apply(
        cli,
        case_2d.moving_path,
        case_2d.fixed_path,
        tmp_path / "out.nii.gz",
        "--field",
        case_2d.field_path,
        "--affine",
        case_2d.affine_path,
        "--interp",
        interp,
    )
    ours = sitk.GetArrayFromImage(warped)
    itk = sitk_resample(case_2d.moving, case_2d.fixed, case_2d.chain(), itk_interpolator)
    assert np.mean(ours != 0) > 0.5
    if interp == "nearest":
        assert np.array_equal(ours, itk)
    else:
        assert relative_difference(ours, itk, case_2d.moving) < RELATIVE_TOLERANCE


def test_apply_2d_oblique_matches_ants(case_2d, cli, tmp_path):
    """2-D oblique grids: carctl = antsApplyTransforms, field alone and field then affine."""
    for name, options, transforms in (
        ("field", ["--field", case_2d.field_path], [case_2d.field_path]),
        (
            "chain",
            ["--field", case_2d.field_path, "--affine", case_2d.affine_path],
            [case_2d.field_path, case_2d.affine_path],
        ),
    ):
        ours = sitk.GetArrayFromImage(
            run_apply(
                cli,
                case_2d.moving_path,
                case_2d.fixed_path,
                tmp_path / f"out-{name}.nii.gz",
                *options,
            )
        )
        antspy = ants_resample(case_2d.fixed_path, case_2d.moving_path, transforms, "linear")
        assert relative_difference(ours, antspy, case_2d.moving) < RELATIVE_TOLERANCE, name
