"""The registration benchmark's pair builders (the numbers themselves are benchmark figures)."""

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

BENCHMARK = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_register.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_register", BENCHMARK)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    "case, landmarks",
    [("prostate-case000000", True), ("prostate-case000002", False)],  # 4-D and 3-D labels
)
def test_prostate_pairs_read_4d_and_3d_label_files(bench, shared_data, tmp_path, case, landmarks):
    specs = {s.name: s for s in bench.prostate_pairs(shared_data)}
    pair = specs[case].build(tmp_path)
    assert pair.moving_labels.keys() == pair.fixed_labels.keys()
    assert (pair.fixed_labels[bench.MAIN] > 0).any()
    assert (len(pair.fixed_labels) > 1) == landmarks
    for labels in pair.fixed_labels.values():
        assert labels.ndim == 3 and np.issubdtype(labels.dtype, np.integer)


def test_thorax_fills_what_the_body_encloses_in_each_slice(bench):
    ct = np.full((2, 9, 11), -1000.0)  # air
    ct[:, 1:8, 1:10] = 40.0  # the body
    ct[:, 3:6, 2:5] = -800.0  # a lung, enclosed
    ct[:, 3:6, 6:9] = -800.0  # the other one
    ct[:, 8, 3] = 200.0  # a stray bright voxel outside
    thorax = bench.thorax(ct)
    assert thorax[:, 1:8, 1:10].all()  # the lungs are filled
    assert thorax.sum() == 2 * (7 * 9 + 1)  # and the air around the body is not


def test_chest_ct_pair_is_a_known_deformation_of_the_ct(bench, shared_data, tmp_path):
    pair = bench.chest_ct_pair(shared_data, seed=0, index=0).build(tmp_path)
    from carctl.io import read_image

    moving, fixed = read_image(pair.moving), read_image(pair.fixed)
    assert moving.grid == fixed.grid == pair.truth.grid
    assert pair.mask.shape == fixed.array.shape and 0.2 < pair.mask.mean() < 0.7
    moved = pair.truth.data.square().sum(dim=0).sqrt().numpy()[pair.mask]
    assert 4.0 < moved.mean() < 20.0  # 8 mm RMS plus the rigid part: it does move
    # where the truth maps beyond the moving CT's slices, the fixed image continues its edge
    # (it was a block of zeros, an edge that marked where the moving field of view lies)
    index = moving.grid.to_index(fixed.grid.points() + pair.truth.data.movedim(0, -1))
    beyond = ((index[..., 2] < -0.5) | (index[..., 2] > 39.5)).numpy()
    assert beyond.mean() > 0.01 and (fixed.array[beyond] == 0).mean() < 0.01


def test_breathing_pair_slides_the_rib_cage_along_a_still_chest_wall(bench, shared_data, tmp_path):
    import torch

    from carctl.io import read_image
    from carctl.registration.levels import gaussian_blur

    pair = bench.breathing_pair(shared_data, seed=0, index=0).build(tmp_path)
    moving, fixed = read_image(pair.moving), read_image(pair.fixed)
    assert moving.grid == fixed.grid == pair.truth.grid
    cage = bench.rib_cage(moving.array)
    assert 0.05 < cage.mean() < 0.4 and 0.05 < pair.mask.mean() < 0.4
    assert (fixed.array != moving.array).mean() > 0.05
    # the chest wall (the thorax 5 mm or more outside the rib cage) stays
    length = pair.truth.data.square().sum(dim=0).sqrt().numpy()
    near = gaussian_blur(torch.from_numpy(cage.astype(np.float32))[None, None], [5.0, 5.0, 2.5])
    wall = bench.thorax(moving.array) & (near[0, 0].numpy() < 1e-3)
    assert wall.sum() > 10_000 and length[wall].max() < 0.01
    # the inside moves, down (-z in LPS), the most in the lowest slices
    assert 4.0 < length[pair.mask].mean() < 12.0
    down = pair.truth.data[2].numpy()
    height = moving.grid.points()[..., 2].numpy()
    lowest, highest = height == height.min(), height == height.max()
    assert down[cage & lowest].mean() < down[cage & highest].mean() < -2.0


def test_brain_atlas_pair_maps_both_label_sets_to_the_same_structures(bench, shared_data, tmp_path):
    from carctl.io import read_image

    pair = bench.atlas_pair(shared_data).build(tmp_path)
    fixed, atlas = read_image(pair.fixed), read_image(pair.moving_labels[bench.MAIN])
    wanted = {bench.CORTEX[0], bench.CORTEX[1]}
    wanted |= {fs for sides in bench.ATLAS_STRUCTURES.values() for fs, _ in sides}
    assert len(wanted) == 29
    assert set(np.unique(pair.fixed_labels[bench.MAIN])) - {0} == wanted
    assert set(np.unique(atlas.array).astype(int)) - {0} == wanted
    # the subject's header now says where its anatomy is: each left structure lies on the
    # left (+x in LPS) of its right twin, in the subject as in the atlas, and the brain stem
    # below the thalami (+z superior)
    for image, labels in ((fixed, pair.fixed_labels[bench.MAIN]), (atlas, atlas.array)):

        def centre(label, image=image, labels=labels):
            index = np.argwhere(np.rint(labels) == label).mean(axis=0)[::-1]
            return (
                image.grid.index_to_physical[:3, :3] @ index + image.grid.index_to_physical[:3, 3]
            )

        assert centre(2)[0] > centre(41)[0] + 20  # cerebral white matter
        assert centre(17)[0] > centre(53)[0] + 20  # hippocampus
        assert centre(16)[2] < centre(10)[2] - 10  # brain stem below the left thalamus
    moving = read_image(pair.moving)
    assert moving.array[0, 0, 0] == 0 and moving.array.max() > 0  # the template, brain only


def test_inverse_consistency_is_small_for_a_pair_registered_both_ways():
    from carctl.io import Image
    from tests.registration.test_register import blobs, contrast

    path = BENCHMARK.parent / "bench_consistency.py"
    spec = importlib.util.spec_from_file_location("bench_consistency", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    phantom = blobs()
    shifted = Image(np.roll(contrast(phantom).array, 1, axis=2), phantom.grid)  # 2.5 mm in x
    row = module.consistency(phantom, shifted, "rigid")
    assert row["mean_mm"] < 0.5 and row["p95_mm"] < 1.0 and len(row["seconds"]) == 2


def test_thick_slices_average_slices_and_keep_their_centres(bench):
    from carctl.io import Image
    from carctl.spatial.grid import Grid

    turn = np.array([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    grid = Grid((4, 3, 12), (1.0, 2.0, 1.5), (3.0, -1.0, 7.0), tuple(turn.ravel()))
    array = np.arange(12 * 3 * 4, dtype=np.float32).reshape(12, 3, 4)
    thick = bench.thick_slices(Image(array, grid), factor=5)
    assert thick.grid.size == (4, 3, 2) and thick.grid.spacing == (1.0, 2.0, 7.5)
    np.testing.assert_allclose(thick.array[1], array[5:10].mean(axis=0))
    # a thick voxel sits where the middle one of its slices was
    for k in (0, 1):
        centre = thick.grid.index_to_physical @ [2.0, 1.0, k, 1.0]
        middle = grid.index_to_physical @ [2.0, 1.0, 5 * k + 2, 1.0]
        np.testing.assert_allclose(centre, middle)


@pytest.mark.slow
def test_a_flair_in_thick_slices_registers_onto_a_1mm_t1(bench, shared_data, tmp_path):
    """BraTS FLAIR in 5 mm axial slices onto the T1n under a known deformation (the header
    5.76 mm off, the affine stage 4.2). The deformable stage compared the stack's features,
    a slice apart, with the T1n's 1 mm apart: 2.46 mm, worse than the network alone (2.13);
    now it sees the T1n blurred to the stack's slices: 1.50 (1.62 from the network's field,
    which auto no longer runs on a stack this thick)."""
    from carctl.config import RegistrationOptions
    from carctl.io import read_image
    from carctl.registration.pipeline import register
    from carctl.synthetic import end_point_error, known_pair

    # thick_pairs' thick-t2f5-t1n (its seed 0 + 7), built in memory
    t1n = read_image(bench.brats_contrast(shared_data, "t1n"))
    flair = read_image(bench.brats_contrast(shared_data, "t2f"))
    made = known_pair(t1n, flair, t1n.array > 0, 5.0, 4.0, 4.0, seed=7)
    moving = bench.thick_slices(flair)
    assert moving.grid.spacing == (1.0, 1.0, 5.0)
    result = register(moving, made.fixed, RegistrationOptions())
    assert end_point_error(result.field, made.truth, made.mask) < 1.8


def test_large_ct_error_is_zero_for_the_true_motion_and_its_size_for_none(tmp_path):
    """bench_large's end-point error reads the field in carctl's convention (fixed point ->
    moving point): the true motion's field scores 0, a zero field the motion's own size."""
    import SimpleITK as sitk

    spec = importlib.util.spec_from_file_location(
        "bench_large", BENCHMARK.with_name("bench_large.py")
    )
    large = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(large)
    fixed = sitk.Image(12, 10, 8, sitk.sitkFloat32) + 100.0  # all "body"
    fixed.SetSpacing((2.0, 1.5, 3.0))
    fixed.SetOrigin((5.0, -3.0, 7.0))
    sitk.WriteImage(fixed, str(tmp_path / "fixed.nii.gz"))
    motion = sitk.Euler3DTransform()
    motion.SetCenter(fixed.TransformContinuousIndexToPhysicalPoint((5.5, 4.5, 3.5)))
    motion.SetRotation(0.02, -0.01, 0.03)
    motion.SetTranslation((0.5, -0.4, 0.3))
    to_field = sitk.TransformToDisplacementFieldFilter()
    to_field.SetReferenceImage(fixed)
    field = to_field.Execute(motion)
    sitk.WriteImage(field, str(tmp_path / "truth.nii"))
    assert large.end_point_error(tmp_path / "truth.nii", tmp_path / "fixed.nii.gz", motion) < 1e-4
    zero = sitk.Image(fixed.GetSize(), sitk.sitkVectorFloat64, 3)
    zero.CopyInformation(fixed)
    sitk.WriteImage(zero, str(tmp_path / "zero.nii"))
    error = large.end_point_error(tmp_path / "zero.nii", tmp_path / "fixed.nii.gz", motion)
    assert 0.5 < error < 1.0


def test_half_pairs_cut_the_moving_image_in_place_and_score_where_it_answers(
    bench, shared_data, tmp_path
):
    """``half-top``/``half-bottom``: half of the T2w, each voxel where it was in the whole
    image; the error is counted where the truth lands inside the half only."""
    from carctl.io import read_image

    whole = read_image(shared_data / "brats-gli-00001" / "BraTS-GLI-00001-000-t2w.nii.gz")
    spec = bench.half_pairs(shared_data, seed=0, first=9)[0]  # the upper half
    assert spec.name == "half-top"
    pair = spec.build(tmp_path)
    moving = read_image(pair.moving)
    low = whole.grid.size[2] // 2
    assert moving.grid.size == (*whole.grid.size[:2], whole.grid.size[2] - low)
    corner = moving.grid.index_to_physical @ [3.0, 5.0, 2.0, 1.0]
    np.testing.assert_allclose(corner, whole.grid.index_to_physical @ [3, 5, 2 + low, 1])
    np.testing.assert_array_equal(moving.array, whole.array[low:])
    brain = read_image(pair.fixed).array > 0
    assert 0.2 < pair.mask.sum() / brain.sum() < 0.8  # half of the brain, give or take


@pytest.mark.slow
def test_bench_features_times_mind_and_fingerprints_it(shared_data):
    """bench_features prints one row per image: its size, the first call, the median of the
    rest and a fingerprint of the descriptors."""
    import subprocess

    script = BENCHMARK.with_name("bench_features.py")
    command = [sys.executable, str(script), "--data", str(shared_data), "--repeats", "1"]
    out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    rows = [line.split("|")[1:-1] for line in out.splitlines() if line.startswith("| ")]
    assert [r[0].strip() for r in rows[1:]] == ["whole", "brain box"]
    assert [r[1].strip() for r in rows[1:]] == ["155x240x240", "140x215x180"]
    for row in rows[1:]:
        assert float(row[2]) > 0 and float(row[3]) > 0
        assert len(row[4].strip()) == 12 and int(row[4], 16) >= 0
