"""The QA score (:mod:`carctl.qa`): what two quick re-registrations agree they would still
correct, in mm, on synthetic pairs with known shifts and on the shared real data."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from carctl import qa
from carctl.io import Image, read_image
from carctl.spatial.grid import Grid
from carctl.spatial.transform import Affine
from tests.registration.test_register import blobs, contrast, ct_like, padded


@pytest.fixture(scope="module")
def phantom() -> Image:
    return blobs(size=(40, 40, 40), spacing=2.0)


def _shift(mm) -> list[Affine]:
    return [Affine(np.eye(len(mm)), np.asarray(mm, dtype=float))]


def test_score_is_near_zero_for_an_image_against_itself(phantom):
    assessment = qa.assess(None, qa.prepare(phantom, phantom))
    assert assessment.score < 0.2
    assert assessment.error is None and np.isnan(assessment.mean_error)


@pytest.mark.parametrize("other", ["same", "contrast"])
def test_score_estimates_a_known_shift_in_mm(phantom, other):
    """The moving image shifted by 2 and 5 mm (through its header: the content sits that far
    off): the score grows with the shift and reads in mm, within 40 %."""
    moving = phantom if other == "same" else contrast(phantom)
    grid = qa.working_grid(phantom)
    scores = []
    for mm in (0.0, 2.0, 5.0):
        direction = np.array([0.6, -0.8, 0.0]) * mm
        scores.append(qa.assess(None, qa.prepare(phantom, moving, _shift(direction), grid)).score)
    assert scores[0] < scores[1] < scores[2]
    assert scores[1] == pytest.approx(2.0, rel=0.4)
    assert scores[2] == pytest.approx(5.0, rel=0.4)


def test_padded_ct_is_scored_as_its_anatomy(phantom):
    """Scanner padding (-3024 beyond a circle, the same place in both CTs) read as intensity:
    the working grid spanned the padding and the circle's edge read as alignment (the shared
    chest CT under a known 4 mm RMS deformation, scored through the truth: 1.75 mm padded,
    1.01 unpadded; now 1.04). Now it reads as air, as the registration reads it."""
    ct = ct_like(phantom)
    scan = padded(ct)
    assert qa.finite(scan.array).min() == -1024.0
    assert qa.working_grid(scan) == qa.working_grid(ct)
    shift = _shift([0.0, 3.0, 0.0])
    plain = qa.assess(None, qa.prepare(ct, ct, shift)).score
    assert qa.assess(None, qa.prepare(scan, scan, shift)).score == pytest.approx(plain, rel=0.05)


def test_score_is_deterministic(phantom):
    pair = qa.prepare(phantom, contrast(phantom), _shift([1.0, 2.0, 0.0]))
    assert qa.assess(None, pair).score == qa.assess(None, pair).score


def test_misalignment_map_is_on_the_working_grid_and_in_mm(phantom):
    pair = qa.prepare(phantom, contrast(phantom), _shift([3.0, 0.0, 0.0]))
    assessment = qa.assess(None, pair)
    image = qa.misalignment_image(assessment)
    assert image.grid == pair.grid
    inside = image.array[pair.mask[0, 0].numpy()]
    assert inside.min() >= 0 and float(inside.mean()) == pytest.approx(assessment.score, rel=1e-5)


def test_score_on_anisotropic_and_2d_images():
    """Thick slices (the z axis is not pooled) and a 2-D pair both work."""
    volume = blobs(size=(40, 40, 8), spacing=2.0)
    thick = Image(
        volume.array, Grid((40, 40, 8), (2.0, 2.0, 8.0), (0.0,) * 3, tuple(np.eye(3).ravel()))
    )
    score = qa.assess(None, qa.prepare(thick, contrast(thick), _shift([3.0, 0.0, 0.0]))).score
    assert 1.5 < score < 4.5
    flat = Image(blobs().array[14], Grid((28, 28), (2.5, 2.5), (0.0, 0.0), (1.0, 0.0, 0.0, 1.0)))
    same = qa.assess(None, qa.prepare(flat, contrast(flat))).score
    shifted = qa.assess(None, qa.prepare(flat, contrast(flat), _shift([4.0, 0.0]))).score
    assert same < 1.0 < shifted


def test_agreed_length_counts_what_two_corrections_share():
    u = torch.zeros((1, 3, 2, 2, 2))
    u[:, 0] = 3.0
    v = u.clone()
    v[:, 1] = 4.0  # (3, 4, 0) against (3, 0, 0)
    assert torch.allclose(qa.agreed_length([u]), torch.full((1, 1, 2, 2, 2), 3.0))
    assert torch.allclose(qa.agreed_length([u, u]), torch.full((1, 1, 2, 2, 2), 3.0))
    assert bool((qa.agreed_length([u, -u]) == 0).all())  # pointing apart: nothing agreed
    shared = qa.agreed_length([u, v])
    mean_length, half_distance = float(np.hypot(3.0, 2.0)), 2.0
    assert torch.allclose(shared, torch.full_like(shared, mean_length - half_distance))
    assert bool((shared <= 3.0).all())  # never more than the shorter one


def test_verdicts_follow_the_thresholds():
    low, high = qa.THRESHOLDS["suspect"], qa.THRESHOLDS["failed"]
    assert 0 < low < high
    assert qa.verdict(low / 2) == "ok"
    assert qa.verdict((low + high) / 2) == "suspect"
    assert qa.verdict(high) == "failed"
    assert qa.verdict(float("nan")) == "failed"
    assert qa.verdict(0.4, {"suspect": 0.5, "failed": 1.0}) == "ok"


# --- real data --------------------------------------------------------------------------------


def test_brats_contrasts_score_grows_with_a_known_deformation(shared_data):
    """BraTS T2w against a warped T1n (``bench_qa``'s construction): 0 and 6 mm apart."""
    from carctl.spatial.sample import warp
    from carctl.synthetic import known_mapping

    folder = shared_data / "brats-gli-00001"
    a = read_image(folder / "BraTS-GLI-00001-000-t1n.nii.gz")
    b = read_image(folder / "BraTS-GLI-00001-000-t2w.nii.gz")
    mask = a.array > np.percentile(a.array, 60)
    scores = []
    for size in (0.0, 6.0):
        phi = known_mapping(a.grid, mask, size, size / 2, size / 2, seed=7, control_mm=30.0)
        fixed = Image(warp(a.tensor(torch.float32), a.grid, a.grid, [phi])[0, 0].numpy(), a.grid)
        scores.append(qa.assess(None, qa.prepare(fixed, b)).score)
    assert qa.verdict(scores[0]) != "failed"
    assert qa.verdict(scores[1]) == "failed"
    assert scores[1] > scores[0] + 3


def test_thick_slice_cardiac_contrasts_are_not_failed_at_their_own_alignment(shared_data):
    """Five 12 mm slices: one re-registration alone moved these 4.4-5.9 mm (a false
    ``failed``); the two checks disagree there, and what they disagree on does not count."""
    folder = shared_data / "cardiac-myops-101"
    fixed, moving = read_image(folder / "101_C0.nii.gz"), read_image(folder / "101_DE.nii.gz")
    assert qa.verdict(qa.assess(None, qa.prepare(fixed, moving)).score) != "failed"


def test_spine_headers_are_not_failed_and_a_bad_centre_of_mass_start_is(shared_data):
    from carctl.registration.initialise import centre_of_mass
    from carctl.registration.levels import normalise

    folder = shared_data / "spine-t1-t2"
    moving, fixed = read_image(folder / "t1w.nii.gz"), read_image(folder / "t2.nii.gz")
    shift = centre_of_mass(normalise(moving.array), moving.grid) - centre_of_mass(
        normalise(fixed.array), fixed.grid
    )
    headers, bad = qa.assess_alignments(
        None, fixed, [(moving, []), (moving, [Affine(np.eye(3), shift)])]
    )
    assert qa.verdict(headers.score) != "failed"
    assert qa.verdict(bad.score) == "failed"
