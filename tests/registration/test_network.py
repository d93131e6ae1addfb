"""The network stage of ``carctl register``: its grid, its units, the methods that run it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from carctl import pretrained
from carctl.config import RegistrationOptions
from carctl.io import Image
from carctl.networks.car import CarConfig, CarNet
from carctl.registration import network, pipeline
from carctl.registration.pipeline import register
from carctl.spatial.grid import Grid
from tests.conftest import rotation, write
from tests.registration.test_register import blobs, contrast


@pytest.fixture
def car_weights(tmp_path, monkeypatch):
    """An untrained tiny network as the ``car`` weights (found first)."""
    folder = tmp_path / "weights"
    torch.manual_seed(0)
    net = CarNet(CarConfig(width=4))
    card = {
        "architecture": {"kind": "car-registration", "config": net.config.to_dict()},
        "training": {"command": "carctl train car (test)", "steps_done": 0},
    }
    pretrained.write(net, folder, "car", card)
    monkeypatch.setenv("CARCTL_WEIGHTS", str(folder))
    return folder


@pytest.fixture
def header_affine(monkeypatch):
    """No initialisation search and no linear stages: the header (identity) is the affine.
    For tests of the stages after them (the phantoms' images share their grid and anatomy,
    which the linear stages would only confirm, at most of these tests' cost)."""

    def header(state, progress):
        state.affine = np.eye(4)
        return pipeline.StageReport("initialise", 0.0)

    monkeypatch.setitem(pipeline.STAGES, "initialise", header)
    for name in ("rigid", "affine"):
        monkeypatch.setitem(
            pipeline.STAGES, name, lambda state, progress, n=name: pipeline.StageReport(n, 0.0)
        )


class Shift(torch.nn.Module):
    """A stand-in network: the same displacement (voxels, x first) everywhere."""

    def __init__(self, voxels) -> None:
        super().__init__()
        self.voxels = torch.tensor(voxels, dtype=torch.float32)

    def forward(self, moving, fixed):
        shape = (1, len(self.voxels), *fixed.shape[2:])
        return self.voxels.view(1, -1, *([1] * (len(shape) - 2))).expand(shape).clone()


def test_working_grid_is_padded_isotropic_and_keeps_the_direction():
    direction = rotation(0.3, -0.2, 0.5)
    fixed = Grid((90, 100, 70), (1.0, 1.0, 1.5), (10.0, -20.0, 5.0), tuple(direction.ravel()))
    box = (np.array([10.0, 12.0, 5.0]), np.array([80.0, 90.0, 60.0]))
    grid = network.working_grid(fixed, box)
    assert all(n % network.MULTIPLE == 0 for n in grid.size)
    assert len(set(grid.spacing)) == 1 and grid.spacing[0] >= 1.0
    np.testing.assert_allclose(grid.direction_matrix, fixed.direction_matrix, atol=1e-12)
    # the working grid covers the box's corners
    corners = np.array(np.meshgrid(*zip(*box, strict=True), indexing="ij")).reshape(3, -1).T
    physical = corners @ fixed.index_to_physical[:3, :3].T + fixed.index_to_physical[:3, 3]
    index = grid.to_index(torch.as_tensor(physical)).numpy()
    assert (index >= -1e-6).all() and (index <= np.asarray(grid.size) - 1 + 1e-6).all()


def test_the_working_grid_keeps_its_budget_padding_included():
    """A box that fills the field of view: padded to the multiple, the grid held 37 % more
    voxels than its budget (OASIS's answer grid 2.06 M for 1.5 M); now its spacing grows until
    the padded grid fits. A grid within its budget keeps the spacing of the field of view."""
    from carctl.networks.evaluator import WORKING_VOXELS, working_spacing

    fixed = Grid((160, 192, 224), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), tuple(np.eye(3).ravel()))
    whole = (np.zeros(3), np.asarray(fixed.size, float) - 1)
    for voxels in (network.ANSWER_VOXELS, None):
        grid = network.working_grid(fixed, whole, voxels)
        assert np.prod(grid.size) <= (voxels or WORKING_VOXELS)
        assert grid.spacing[0] > working_spacing(fixed.spacing, fixed.size, voxels)
        assert all(n % network.MULTIPLE == 0 for n in grid.size)
    half = (np.array([40.0, 48.0, 56.0]), np.array([120.0, 144.0, 168.0]))
    grid = network.working_grid(fixed, half, network.ANSWER_VOXELS)
    assert grid.spacing[0] == working_spacing(fixed.spacing, fixed.size, network.ANSWER_VOXELS)


def test_voxel_displacements_become_physical_along_the_grid_axes():
    direction = rotation(0.0, 0.0, np.pi / 2)  # index x runs along physical y
    grid = Grid((16, 16, 16), (2.0, 2.0, 2.0), (0.0, 0.0, 0.0), tuple(direction.ravel()))
    u = torch.zeros(1, 3, 16, 16, 16)
    u[:, 0] = 1.5
    mm = network.to_physical(u, grid)
    np.testing.assert_allclose(mm[0, :, 3, 4, 5].numpy(), 3.0 * direction[:, 0], atol=1e-6)


def test_the_network_field_enters_the_mapping_in_mm(monkeypatch):
    """A network that says "one voxel along x" moves every point by one working voxel per
    pass (the passes compose)."""
    image = blobs()
    monkeypatch.setattr(pretrained, "load", lambda name, device="cpu": (Shift([1.0, 0, 0]), _c()))
    result = register(image, image, RegistrationOptions(method="net"))
    stage = next(s for s in result.stages if s.name == "network")
    step = stage.detail["spacing_mm"]
    inner = result.field.data[:, 8:-8, 8:-8, 8:-8]
    # header-aligned identical images: the affine stays near the identity
    np.testing.assert_allclose(inner[0].mean(), network.PASSES * step, atol=0.1 * step)
    assert stage.detail["passes"] == network.PASSES
    assert float(inner[1:].abs().max()) < 0.1 * step


def _c():
    return pretrained.Card("car", Path("car.json"), {"training": {"steps_done": 1}})


def test_methods_run_their_stages(car_weights):
    image = blobs()
    other = contrast(image)
    names = {}
    for method in ("net", "auto", "io"):
        result = register(image, other, RegistrationOptions(method=method, iterations=2))
        names[method] = [s.name for s in result.stages]
    assert names["net"][-2:] == ["network", "compose"]
    assert names["auto"][-3:] == ["network", "deformable", "compose"]
    assert "network" not in names["io"]


class CentreShift(torch.nn.Module):
    """A stand-in network that mirroring cannot fool: the offset between the two images'
    centres of mass (voxels, x first), the same everywhere."""

    def forward(self, moving, fixed):
        ndim = fixed.dim() - 2

        def centre(image):
            axes = [torch.arange(n, dtype=torch.float32) for n in image.shape[2:]]
            grids = torch.meshgrid(*axes, indexing="ij")[::-1]  # x first
            return torch.stack([(g * image[0, 0]).sum() / image.sum() for g in grids])

        shift = centre(fixed) - centre(moving)
        return shift.view(1, ndim, *([1] * ndim)).expand(1, ndim, *fixed.shape[2:]).clone()


def test_mirrored_passes_are_mapped_back_before_averaging():
    """A pass on the mirrored pair is flipped back and its mirrored component negated: a
    network that answers consistently under mirroring gives the same field either way, while
    one that ignores the images' content (a fixed shift) sees that component cancel."""
    z, y, x = torch.meshgrid(
        *(torch.arange(n, dtype=torch.float32) for n in (9, 11, 13)), indexing="ij"
    )

    def blob(cz, cy, cx):
        return torch.exp(-((z - cz) ** 2 + (y - cy) ** 2 + (x - cx) ** 2) / 8)[None, None]

    fixed, moving = blob(4.0, 5.0, 6.0), blob(3.0, 6.5, 4.0)
    plain = network.averaged(CentreShift(), moving, fixed, mirrors=())
    assert plain[0, :, 0, 0, 0].abs().min() > 0.1  # every component moves
    for mirrors in ((0,), (2,), (0, 1, 2)):
        both = network.averaged(CentreShift(), moving, fixed, mirrors=mirrors)
        torch.testing.assert_close(both, plain, atol=1e-5, rtol=0)
    blind = network.averaged(Shift([1.0, 2.0, 3.0]), moving, fixed, mirrors=(2,))
    assert blind[0, :, 0, 0, 0].tolist() == [1.0, 2.0, 0.0]  # component z cancels


def test_net_mirrors_the_pair_on_a_finer_grid_and_auto_does_not(car_weights, monkeypatch):
    """``--method net`` averages the plain and mirrored passes (its answer) on a grid of
    :data:`network.ANSWER_VOXELS`; ``auto`` runs the network once on the training's grid (the
    deformable stage decides its result either way)."""
    from carctl.networks import evaluator

    # budgets small enough that both grids are coarser than the phantom's own voxels (a
    # network grid is never finer than the image's)
    monkeypatch.setattr(evaluator, "WORKING_VOXELS", 1000)
    monkeypatch.setattr(network, "ANSWER_VOXELS", 3000)
    image = blobs()
    other = contrast(image)
    mirrors, spacing = {}, {}
    for method in ("net", "auto"):
        result = register(image, other, RegistrationOptions(method=method, iterations=2))
        stage = next(s for s in result.stages if s.name == "network")
        mirrors[method] = stage.detail["mirrors"]
        spacing[method] = stage.detail["spacing_mm"]
    assert mirrors == {"net": list(network.MIRRORS), "auto": []} and network.MIRRORS
    extent = np.prod(np.asarray(image.grid.size) * np.asarray(image.grid.spacing))
    assert spacing["net"] == pytest.approx((extent / 3000) ** (1 / 3))
    assert spacing["auto"] == pytest.approx((extent / 1000) ** (1 / 3))


@pytest.mark.parametrize("kept", [False, True])
def test_auto_uses_the_network_field_only_when_it_helps(
    monkeypatch, car_weights, header_affine, kept
):
    """A field that lowers the similarity loss clearly (here: the true local deformation) is
    the deformable stage's start, which then runs the finest level only and at most half
    ``io``'s iterations; one that does not (no displacement) is discarded, and the stage runs
    its whole pyramid as ``io`` does."""
    from carctl.resample import resample_image
    from carctl.spatial.transform import DisplacementField

    image = blobs()
    grid = image.grid
    points = grid.points(dtype=torch.float32)
    centre = points.reshape(-1, 3).mean(dim=0)
    u = torch.zeros(1, 3, *grid.shape)
    for sign, offset in (
        (1, (15, 15, 0)),
        (-1, (-15, 15, 0)),
        (1, (-15, -15, 0)),
        (-1, (15, -15, 0)),
    ):
        where = centre + torch.tensor(offset, dtype=torch.float32)
        bump = torch.exp(-((points - where) ** 2).sum(-1) / (2 * 7.0**2))
        u[0, 0] += 6.0 * sign * bump  # 6 mm along x, alternating lobes: no affine explains it
    fixed = resample_image(contrast(image), grid, [DisplacementField(grid, u[0])])
    field = u if kept else torch.zeros_like(u)
    monkeypatch.setattr(network, "predict", lambda *args, **kwargs: (grid, field))
    # the mechanism, not the threshold measured on real pairs (the true field gains 26 % on
    # this phantom from the header; 11 % after the linear stages, which absorb part of it)
    monkeypatch.setattr(pipeline, "NETWORK_MIN_GAIN", 0.05)
    options = RegistrationOptions(method="auto")
    result = register(image, fixed, options)
    stage = {s.name: s for s in result.stages}
    # io's levels and iterations
    levels = pipeline._schedule(grid, options)["deformable"]
    iterations = list(pipeline.DEFAULT_ITERATIONS[-len(levels) :])
    assert ("discarded" not in stage["network"].detail) == kept
    assert (stage["network"].detail["gain"] >= 0.05) == kept
    deformable = stage["deformable"].detail
    if kept:
        assert deformable["levels_mm"] == levels[-1:]  # finest only
        assert sum(deformable["iterations"]) <= sum(iterations) / 2
    else:
        assert deformable["levels_mm"] == levels
        assert deformable["iterations"] == iterations


@pytest.mark.parametrize("far_off", [False, True])
def test_auto_checks_a_kept_network_field_at_the_coarsest_level(
    monkeypatch, car_weights, header_affine, far_off
):
    """A kept field gets a correction at the coarsest level; above the threshold the field is
    discarded and ``io``'s whole pyramid runs from the affine, below it the finest level
    alone runs from the field."""
    image = blobs()
    grid = image.grid
    shift = torch.zeros(1, 3, *grid.shape)
    shift[0, 0] = 2.0
    fixed = contrast(image)
    monkeypatch.setattr(network, "predict", lambda *args, **kwargs: (grid, shift))
    monkeypatch.setattr(pipeline, "NETWORK_MIN_GAIN", -np.inf)  # keep it whatever it does
    monkeypatch.setattr(pipeline, "NETWORK_MAX_CORRECTION_MM", -1.0 if far_off else 1e9)
    options = RegistrationOptions(method="auto")
    result = register(image, fixed, options)
    detail = next(s for s in result.stages if s.name == "deformable").detail
    levels = pipeline._schedule(image.grid, options)["deformable"]  # io's levels
    assert detail["network_correction_mm"] >= 0
    # the check decides in half the coarsest level's iterations
    first = pipeline.DEFAULT_ITERATIONS[-len(levels)]
    assert detail["network_check_iterations"] == min(pipeline.NETWORK_CHECK_ITERATIONS, first)
    # the motion is the field and the correction together: where the (wrong) 2 mm shift is
    # corrected back, little motion is left
    assert detail["network_motion_mm"] < detail["network_correction_mm"]
    if far_off:
        assert detail["network_start"].startswith("discarded")
        # a small motion: every level at the default weight
        assert detail["level_regularization"] == [detail["regularization"]] * len(levels)
        assert detail["levels_mm"] == levels
        assert detail["iterations"] == list(pipeline.DEFAULT_ITERATIONS[-len(levels) :])
        # the 2 mm shift the "network" wrongly added is gone (identical anatomy)
        inner = result.field.data[:, 6:-6, 6:-6, 6:-6]
        assert float(inner.norm(dim=0).mean()) < 1.0
    else:
        assert detail["network_start"] == "finest level only"
        assert detail["levels_mm"] == levels[-1:]


@pytest.mark.parametrize("given", [None, 0.3])
def test_a_large_motion_found_by_the_first_level_scales_the_default_weight(
    monkeypatch, header_affine, given
):
    """From nothing (``io``), the levels after the first run with the default weight scaled
    by MOTION_SCALE_MM / the first level's mean motion when that is larger; a weight given
    with --regularization is kept, and a motion under the scale changes nothing."""
    image = blobs()
    # few iterations: the weights are what is checked
    options = RegistrationOptions(method="io", regularization=given, iterations=10)
    monkeypatch.setattr(pipeline, "MOTION_SCALE_MM", 1e-6)  # every motion counts as large
    detail = next(
        s for s in register(image, contrast(image), options).stages if s.name == "deformable"
    ).detail
    first, *rest = detail["level_regularization"]
    assert rest
    if given is None:
        assert first == pipeline.DEFAULT_REGULARIZATION["mind"]
        assert all(w < first for w in rest) and len(set(rest)) == 1
    else:
        assert [first, *rest] == [given] * (len(rest) + 1)
    monkeypatch.setattr(pipeline, "MOTION_SCALE_MM", 1e6)  # no motion counts as large
    detail = next(
        s for s in register(image, contrast(image), options).stages if s.name == "deformable"
    ).detail
    assert len(set(detail["level_regularization"])) == 1


def test_a_correction_on_top_of_an_offset_moves_points_like_the_sum():
    """``optimise_level`` with a fixed ``offset`` at the level's points: a zero correction on
    top of a constant offset gives the loss of that constant as the field itself."""
    from carctl.losses import regularisers, similarity
    from carctl.registration import levels, optimize

    image = blobs()
    box = levels.foreground_box(levels.normalise(image.array), None)
    level = levels.build_level(
        image.array, image.grid, contrast(image).array, image.grid, 5.0, similarity.mind_ssc, box
    )
    control = optimize.control_grid(level.grid)
    vector = torch.tensor([1.5, -1.0, 0.5], dtype=level.points.dtype)
    offset = vector.expand(level.points.reshape(-1, 3).shape).contiguous()
    common = (np.eye(4), None, control, similarity.mind_loss, regularisers.diffusion, 0.0, 0, False)

    def first_loss(initial, **extra):
        args = list(common)
        args[1] = initial
        return optimize.optimise_level(level, *args, step=0.1, **extra)[1]

    zero = torch.zeros((*control.shape, 3), dtype=level.points.dtype)
    constant = vector.expand(zero.shape).contiguous()
    assert first_loss(zero, offset=offset) == pytest.approx(first_loss(constant), rel=1e-6)
    assert first_loss(zero, offset=offset) != pytest.approx(first_loss(zero), rel=1e-3)


def test_missing_weights_skip_the_network_in_auto_and_fail_net(monkeypatch):
    monkeypatch.setattr(network, "WEIGHTS", "no-such-weights")
    image = blobs()
    result = register(image, image, RegistrationOptions(method="auto", iterations=1))
    stage = next(s for s in result.stages if s.name == "network")
    assert "no weights named" in stage.detail["skipped"]
    with pytest.raises(pretrained.WeightsError):
        register(image, image, RegistrationOptions(method="net"))


def test_a_non_finite_network_field_is_never_used(monkeypatch, car_weights):
    """A network answering NaN (weights of a diverged training) made the whole field NaN ->
    zero: the affine was lost too, with exit status 0. auto now goes on without it (with a
    warning in its report), net refuses."""
    from carctl.errors import InputError

    def nan_field(*args, **kwargs):
        grid = network.working_grid(args[2], args[6])
        return grid, torch.full((1, 3, *grid.shape), float("nan"))

    monkeypatch.setattr(network, "predict", nan_field)
    image = blobs()
    result = register(image, contrast(image), RegistrationOptions(method="auto", iterations=1))
    stage = next(s for s in result.stages if s.name == "network")
    assert "warning" in stage.detail and bool(result.field.data.isfinite().all())
    with pytest.raises(InputError, match="not finite"):
        register(image, contrast(image), RegistrationOptions(method="net"))


def test_auto_warns_when_the_network_is_skipped_for_its_weights(monkeypatch, cli, tmp_path):
    """Unusable weights under ``auto -q`` were skipped without a word (only the JSON's
    ``skipped`` said so); register now warns on stderr. 2-D images skip it silently."""
    from carctl.io import write_image

    monkeypatch.setattr(network, "WEIGHTS", "no-such-weights")
    path = write_image(blobs(), tmp_path / "a.nii.gz")
    result = cli("register", path, path, "-o", tmp_path / "o", "-q", "--iterations", "1")
    assert result.code == 0, result.err
    assert "warning: the network was skipped (" in result.err and "no weights named" in result.err


def test_2d_images_skip_the_network_and_net_says_why(cli, tmp_path, car_weights):
    from tests.conftest import make_image

    image = write(make_image((40, 36), seed=2), tmp_path / "a.nii.gz")
    other = write(make_image((40, 36), seed=2), tmp_path / "b.nii.gz")
    result = cli("register", image, other, "-o", tmp_path, "--method", "net")
    assert result.code != 0 and "3-D network only" in result.err
    assert "Traceback" not in result.err
    ok = cli("register", image, other, "-o", tmp_path, "--iterations", "1", "--json", "-")
    assert ok.code == 0, ok.err
    stage = next(s for s in json.loads(ok.out)["stages"] if s["name"] == "network")
    assert "2-D" in stage["skipped"] and "warning" not in ok.err


def test_cli_net_reports_the_network_stage_and_its_time(cli, tmp_path, car_weights):
    image = blobs()
    from carctl.io import write_image

    moving, fixed = tmp_path / "m.nii.gz", tmp_path / "f.nii.gz"
    write_image(image, moving)
    write_image(Image(contrast(image).array, image.grid), fixed)
    result = cli("register", moving, fixed, "-o", tmp_path, "--method", "net", "--json", "-")
    assert result.code == 0, result.err
    summary = json.loads(result.out)
    stage = next(s for s in summary["stages"] if s["name"] == "network")
    assert stage["seconds"] > 0 and stage["weights"] == "car"
    assert all(n % 16 == 0 for n in stage["grid_size"])
    assert (tmp_path / "m_field.nii").exists() and (tmp_path / "m_warped.nii.gz").exists()


def test_shipped_network_cuts_the_error_after_affine(shared_data):
    """The shipped ``car`` weights on a contrast pair they never saw (SPM avg152 PD -> a
    known deformation of T1; the SPM templates are held out of training): ``--method net``
    ends closer to the truth than its own affine stage alone."""
    from carctl.io import read_image
    from carctl.synthetic import end_point_error, known_pair

    spm = shared_data / "brain-templates-2mm"
    t1 = read_image(spm / "avg152T1.nii")
    tissue = sum(read_image(spm / f"{t}.nii").array for t in ("grey", "white", "csf")) > 0.5
    pair = known_pair(t1, read_image(spm / "avg152PD.nii"), tissue, seed=11)
    net = register(pair.moving, pair.fixed, RegistrationOptions(method="net"))
    affine = pipeline.compose(net.field.grid, net.affine.homogeneous, None)
    before = end_point_error(affine, pair.truth, pair.mask)
    after = end_point_error(net.field, pair.truth, pair.mask)
    assert after < 0.75 * before, (before, after)


@pytest.mark.parametrize("limit", [0.0, 1e9])
def test_auto_runs_the_whole_pyramid_when_the_network_finds_a_large_motion(
    monkeypatch, car_weights, header_affine, limit
):
    """A field the check barely corrects still gives way to io's whole pyramid when the
    motion it describes (field + correction) exceeds NETWORK_MAX_MOTION_MM: the finest level
    alone cannot finish a large motion. (A zero field is not over a limit of zero, so the
    check runs.)"""
    image = blobs()
    grid = image.grid
    fixed = contrast(image)
    monkeypatch.setattr(network, "predict", lambda *a, **k: (grid, torch.zeros(1, 3, *grid.shape)))
    monkeypatch.setattr(pipeline, "NETWORK_MIN_GAIN", -np.inf)
    monkeypatch.setattr(pipeline, "NETWORK_MAX_CORRECTION_MM", 1e9)  # never far off
    monkeypatch.setattr(pipeline, "NETWORK_MAX_MOTION_MM", limit)
    options = RegistrationOptions(method="auto")
    result = register(image, fixed, options)
    detail = next(s for s in result.stages if s.name == "deformable").detail
    levels = pipeline._schedule(image.grid, options)["deformable"]
    assert detail["network_motion_mm"] >= 0
    if limit == 0:
        assert detail["network_start"] == (
            "discarded: a large motion (the whole pyramid ran from the affine)"
        )
        assert detail["levels_mm"] == levels
    else:
        assert detail["network_start"] == "finest level only"
        assert detail["levels_mm"] == levels[-1:]


def test_a_network_field_with_a_large_motion_of_its_own_skips_the_check(
    monkeypatch, car_weights, header_affine
):
    """When the network's field alone moves the coarsest control points by more than
    NETWORK_MAX_MOTION_MM on average, io's whole pyramid runs at once, without the check (the
    check's correction could only confirm the pyramid on the pairs measured)."""
    image = blobs()
    grid = image.grid
    fixed = contrast(image)
    shift = torch.zeros(1, 3, *grid.shape)
    shift[:, 0] = 5.0  # mm, along x everywhere
    monkeypatch.setattr(network, "predict", lambda *a, **k: (grid, shift.clone()))
    monkeypatch.setattr(pipeline, "NETWORK_MIN_GAIN", -np.inf)
    checks = []
    optimise = pipeline._optimise_levels

    def spy(state, spacings, counts, progress, start=None, offset=None):
        checks.append(offset is not None)
        return optimise(state, spacings, counts, progress, start, offset)

    monkeypatch.setattr(pipeline, "_optimise_levels", spy)
    options = RegistrationOptions(method="auto")
    result = register(image, fixed, options)
    detail = next(s for s in result.stages if s.name == "deformable").detail
    assert detail["network_motion_mm"] == pytest.approx(5.0, rel=1e-4)
    assert detail["network_start"] == (
        "discarded: a large motion in the network's own field (the whole pyramid ran from the "
        "affine)"
    )
    assert "network_check_iterations" not in detail and checks == [False]
    assert detail["levels_mm"] == pipeline._schedule(grid, options)["deformable"]


class _Totals:
    """A progress that records each stage's announced step count."""

    def __init__(self) -> None:
        self.totals: dict[str, int] = {}

    def start(self, stage: str, total: int) -> None:
        self.totals[stage] = total

    def advance(self, steps: int = 1) -> None:
        pass


def test_linear_stages_run_shorter_where_the_network_follows(monkeypatch):
    """The rigid and affine stages stop earlier (NETWORK_*_ITERATIONS) when the network runs
    after them (``net``; ``auto`` but on a thick moving stack, whose network ``auto`` skips),
    and run their whole count where their answer is final or the deformable stage starts from
    it alone (``affine``, ``io``, ``auto`` on a thick stack)."""

    def header_start(state, progress):  # no search: the stages after it are the subject
        state.affine = np.eye(4)
        return pipeline.StageReport("initialise", 0.0)

    skipped = pipeline.StageReport("network", 0.0, detail={"skipped": "test"})
    monkeypatch.setitem(pipeline.STAGES, "initialise", header_start)
    monkeypatch.setitem(pipeline.STAGES, "network", lambda state, progress: skipped)
    monkeypatch.setitem(
        pipeline.STAGES, "deformable", lambda state, progress: pipeline.StageReport("d", 0.0)
    )
    image = blobs()
    thick_grid = Grid((28, 28, 7), (2.5, 2.5, 10.0), image.grid.origin, image.grid.direction)
    thick = Image(contrast(image).array[::4], thick_grid)
    per_level = {}
    for method, moving in (
        ("net", contrast(image)),
        ("auto", contrast(image)),
        ("io", contrast(image)),
        ("affine", contrast(image)),
        ("auto-thick", thick),
    ):
        progress = _Totals()
        options = RegistrationOptions(method=method.split("-")[0])
        register(moving, image, options, progress=progress)
        levels = pipeline._schedule(image.grid, options)
        per_level[method] = (
            progress.totals["rigid"] // len(levels["rigid"]),
            progress.totals["affine"] // len(levels["affine"]),
        )
    short = (pipeline.NETWORK_RIGID_ITERATIONS, pipeline.NETWORK_AFFINE_ITERATIONS)
    whole = (pipeline.RIGID_ITERATIONS, pipeline.AFFINE_ITERATIONS)
    assert short[0] < whole[0] and short[1] < whole[1]
    assert per_level == {
        "net": short,
        "auto": short,
        "io": whole,
        "affine": whole,
        "auto-thick": whole,
    }


def test_a_dropped_network_field_never_reads_as_meeting_the_bar():
    """A gain just under NETWORK_MIN_GAIN (0.0999) read "lowered mind by 10 % (a start must
    lower it by 10 %): not used": the gain is now given to a tenth of a percent, rounded
    down."""
    assert pipeline.NETWORK_MIN_GAIN == 0.1
    assert pipeline.short_of_gain(0.0999, "mind") == (
        "the network's field lowered mind by 9.9 % (a start must lower it by 10 %): not used"
    )
    assert "by 2.4 %" in pipeline.short_of_gain(0.02404, "mind")
    assert "by 0.0 %" in pipeline.short_of_gain(0.0, "mind")
    assert pipeline.short_of_gain(-0.08, "mind").startswith(
        "the network's field raised mind by 8.0 %"
    )


@pytest.mark.parametrize("coarse_gain", [0.2, 0.05])
def test_auto_asks_the_coarser_linear_level_when_the_finest_gain_falls_short(
    monkeypatch, car_weights, coarse_gain
):
    """Noise lowers the network's gain at the finest linear level more than at the coarser
    one (an SPM template at SNR 40: 9.4 % there, 10.1 % at 4 mm): where the finest falls
    short of NETWORK_MIN_GAIN, the coarser level's gain may keep the field; where both do,
    it is discarded and the message gives the better of the two."""
    image = blobs()
    grid = image.grid
    original = pipeline._schedule

    def two_linear_levels(fixed, options):  # the phantom is too small for two
        schedule = original(fixed, options)
        finest = schedule["affine"][-1]
        return schedule | {"affine": [2 * finest, finest]}

    gains = {"fine": 0.05, "coarse": coarse_gain}

    def similarity(state, spacing, affine, displacement=None, linear=False):
        level = "fine" if spacing == state.schedule["affine"][-1] else "coarse"
        return 1.0 if displacement is None else 1.0 - gains[level]

    monkeypatch.setattr(pipeline, "_schedule", two_linear_levels)
    monkeypatch.setattr(pipeline, "_similarity", similarity)
    monkeypatch.setattr(
        network, "predict", lambda *args, **kwargs: (grid, torch.zeros(1, 3, *grid.shape))
    )
    monkeypatch.setitem(
        pipeline.STAGES, "deformable", lambda state, progress: pipeline.StageReport("d", 0.0)
    )
    result = register(image, contrast(image), RegistrationOptions(method="auto"))
    stage = next(s for s in result.stages if s.name == "network")
    detail = stage.detail
    # the stage's losses stay the finest level's, as every stage's report (the coarser
    # level's were reported when it was asked)
    assert (stage.loss_before, stage.loss_after) == (1.0, pytest.approx(0.95))
    assert detail["gain"] == pytest.approx(0.05)
    assert detail["coarse_gain"] == pytest.approx(coarse_gain)
    if coarse_gain >= pipeline.NETWORK_MIN_GAIN:
        assert "discarded" not in detail
    else:
        assert "lowered mind by 5.0 %" in detail["discarded"]
