"""CAR: random-convolution contrasts, the registration network, its training and weights."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from carctl.augment import RC_HIGH, RandomConvolution
from carctl.networks.car import CarConfig, CarNet, integrate, warp

# --- random convolutions ---------------------------------------------------------------------


def _rc(seed: int) -> RandomConvolution:
    return RandomConvolution.random(torch.Generator().manual_seed(seed))


def _phantom() -> torch.Tensor:
    """Three nested regions with smooth shading: ``(1, 1, 24, 24, 24)`` in [0, 1]."""
    z, y, x = torch.meshgrid(*(torch.arange(24.0),) * 3, indexing="ij")
    r = ((z - 12) ** 2 + (y - 12) ** 2 + (x - 12) ** 2).sqrt()
    image = 0.3 * (r < 10) + 0.4 * (r < 5) + 0.02 * x / 24
    return image[None, None]


def test_random_convolution_kernels_are_drawn_as_in_the_paper():
    rc = _rc(0)
    assert [tuple(w.shape) for w in rc.weights] == [(8, 1), (8, 8), (8, 8), (1, 8)]
    for w in rc.weights:
        assert abs(float(w.mean())) < 1e-9  # zero-centred
        assert float(w.max() - w.min()) <= RC_HIGH  # a U(0, 10) draw, shifted


def test_random_contrasts_differ_and_stay_in_range():
    image = _phantom()
    outputs = [_rc(seed)(image) for seed in range(12)]
    for out in outputs:
        assert out.shape == image.shape
        assert float(out.min()) == pytest.approx(0.0) and float(out.max()) == pytest.approx(1.0)
    flat = torch.stack([o.flatten() for o in outputs]).double()
    correlation = torch.corrcoef(flat).abs()
    off = correlation[~torch.eye(len(outputs), dtype=torch.bool)]
    assert float(off.min()) < 0.5  # some contrasts are far apart
    torch.testing.assert_close(_rc(3)(image), _rc(3)(image))  # deterministic per draw


def test_random_contrasts_are_nonlinear_but_keep_the_structure():
    """Each output is a function of the input intensity (voxels of one value get one value:
    every edge stays where it is), and not an affine one."""
    levels = torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0])
    image = levels[torch.randint(0, 5, (1, 1, 10, 10, 10), generator=torch.Generator())]
    nonlinear = 0
    for seed in range(10):
        out = _rc(seed)(image)
        values = []
        for v in levels:
            inside = out[image == v]
            assert float(inside.max() - inside.min()) < 1e-6
            values.append(float(inside[0]))
        fit = np.polyfit(levels.numpy(), values, 1)
        nonlinear += float(np.abs(np.polyval(fit, levels.numpy()) - values).max()) > 0.05
    assert nonlinear >= 5


def test_bias_field_shades_smoothly_and_keeps_the_range():
    """A smooth multiplicative field: the ratio to the input varies slowly across the crop
    and within the drawn strength; the result is rescaled to a maximum of 1."""
    from carctl.augment import bias_field

    image = _phantom() + 0.1  # no zeros: the ratio is defined everywhere
    image = image / image.max()
    for seed in range(5):
        out = bias_field(image, 0.5, torch.Generator().manual_seed(seed))
        assert out.shape == image.shape and float(out.min()) >= 0
        assert float(out.max()) == pytest.approx(1.0)
        ratio = (out / image).log()
        assert float(ratio.max() - ratio.min()) <= 2 * 0.5 + 1e-5  # exp(a s), |s| <= 1
        step = (ratio[..., 1:] - ratio[..., :-1]).abs().max()  # smooth along x
        assert float(step) < 0.5 / 3
    again = bias_field(image, 0.5, torch.Generator().manual_seed(2))
    torch.testing.assert_close(again, bias_field(image, 0.5, torch.Generator().manual_seed(2)))
    assert bias_field(image, 0.0) is image


def test_unpaired_blobs_paint_part_of_the_crop_and_keep_the_range():
    from carctl.augment import unpaired_blobs

    image = _phantom()
    changed = []
    for seed in range(8):
        out = unpaired_blobs(image, torch.Generator().manual_seed(seed))
        assert out.shape == image.shape
        assert float(out.min()) >= 0 and float(out.max()) <= 1
        changed.append(float(((out - image).abs() > 0.05).float().mean()))
    assert min(changed) > 0 and max(changed) < 0.7  # a part of the crop, never all of it
    assert len({round(c, 3) for c in changed}) > 4  # other blobs for every draw


def test_random_blur_smooths_each_axis_within_the_drawn_sigma():
    """A Gaussian of a random sigma per axis (at most the strength): mass and range kept,
    edges softened, other axes blurred by other amounts, the same for the same draw."""
    from carctl.augment import random_blur
    from carctl.registration.levels import gaussian_blur

    image = _phantom()
    sharp = (image[..., 1:] - image[..., :-1]).abs().max()
    for seed in range(4):
        out = random_blur(image, 2.0, torch.Generator().manual_seed(seed))
        assert out.shape == image.shape
        assert float(out.min()) >= -1e-6 and float(out.max()) <= float(image.max()) + 1e-6
        assert float(out.mean()) == pytest.approx(float(image.mean()), rel=0.05)
        sigma = (torch.rand(3, generator=torch.Generator().manual_seed(seed)) * 2.0).tolist()
        torch.testing.assert_close(out, gaussian_blur(image, sigma))
        if sigma[0] > 0.5:  # sigma[0] is along x, the last tensor axis
            assert float((out[..., 1:] - out[..., :-1]).abs().max()) < float(sharp)
    assert random_blur(image, 0.0) is image


def test_training_views_get_the_augmentations_asked():
    """``bias`` and ``unpaired`` change the network's inputs only; off, the views are the
    random contrasts alone."""
    from carctl.training import car

    image = _phantom()
    plain = car.CarTraining()
    shaded = car.CarTraining(bias=0.5, unpaired=1.0)
    view = car._view(image, plain, torch.Generator().manual_seed(0))
    assert view is image
    out = car._view(image, shaded, torch.Generator().manual_seed(0))
    assert not torch.allclose(out, image) and float(out.max()) <= 1 + 1e-6
    blurred = car._view(image, car.CarTraining(blur=1.5), torch.Generator().manual_seed(0))
    assert float(blurred.std()) < float(image.std())


# --- the network -----------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(1, 1, 19, 23, 17), (2, 1, 33, 17)])
def test_forward_pass_on_odd_sizes(shape):
    torch.manual_seed(0)
    net = CarNet(CarConfig(ndim=len(shape) - 2, width=4)).eval()
    moving, fixed = torch.rand(shape), torch.rand(shape)
    with torch.no_grad():
        u = net(moving, fixed)
    assert u.shape == (shape[0], len(shape) - 2, *shape[2:])
    assert torch.isfinite(u).all()
    assert float(u.abs().max()) < 0.05  # the velocity layer starts near zero


def test_one_encoder_pass_for_both_images_is_two_passes():
    """The forward pass encodes moving and fixed as one batch (shared weights): the same as
    encoding each alone, for a batch of pairs too."""
    from carctl.networks.car import DEPTH, integrate, pad_to

    torch.manual_seed(0)
    net = CarNet(CarConfig(width=4)).eval()
    moving, fixed = torch.rand((2, 1, 17, 20, 18)), torch.rand((2, 1, 17, 20, 18))
    with torch.no_grad():
        u = net(moving, fixed)
        padded_m, padded_f = pad_to(moving, 2**DEPTH), pad_to(fixed, 2**DEPTH)
        velocity = net.decode(net.features(padded_m), net.features(padded_f))
        alone = integrate(velocity, padded_f.shape[2:], net.config.squarings)[..., :17, :20, :18]
    torch.testing.assert_close(u, alone, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("ndim", [3, 2])
def test_channels_last_weights_give_the_same_displacement(ndim):
    """The faster layout the shipped networks load in (3-D) changes no answer; a 2-D network
    is left as it is."""
    from carctl.networks import channels_last

    torch.manual_seed(0)
    plain = CarNet(CarConfig(ndim=ndim, width=4)).eval()
    torch.nn.init.normal_(plain.velocity.weight, std=0.05)  # a field worth comparing
    fast = CarNet(plain.config).eval()
    fast.load_state_dict(plain.state_dict())
    fast = channels_last(fast)
    shape = (1, 1, 19, 23, 17)[: 2 + ndim]
    moving, fixed = torch.rand(shape), torch.rand(shape)
    with torch.no_grad():
        expected, got = plain(moving, fixed), fast(moving, fixed)
    assert float(expected.abs().max()) > 0.1
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
    layout = fast.velocity.weight.is_contiguous(memory_format=torch.channels_last_3d)
    assert layout == (ndim == 3)


def test_correlation_peaks_at_the_offset_between_the_features():
    """Moving features equal to the fixed ones shifted by (z, y, x) = (1, 0, -2) voxels: the
    cost volume is highest at that offset."""
    import itertools

    from carctl.networks.car import correlation

    torch.manual_seed(0)
    moving = torch.randn(1, 6, 12, 12, 12)
    fixed = torch.roll(moving, shifts=(-1, 0, 2), dims=(2, 3, 4))  # fixed(x) = moving(x + o)
    cost = correlation(fixed, moving, radius=2)[..., 3:-3, 3:-3, 3:-3].mean(dim=(2, 3, 4))[0]
    offsets = list(itertools.product(range(-2, 3), repeat=3))
    assert offsets[int(cost.argmax())] == (1, 0, -2)
    assert float(cost.max()) == pytest.approx(1.0, abs=1e-5)


def test_a_constant_velocity_integrates_to_the_same_translation():
    velocity = torch.zeros(1, 3, 8, 10, 12)
    velocity[:, 0], velocity[:, 2] = 1.5, -2.0  # voxels of the full grid, x first
    u = integrate(velocity, (16, 20, 24), squarings=7)
    inner = u[:, :, 4:-4, 4:-4, 4:-4]  # away from the clamped border
    torch.testing.assert_close(inner[:, 0], torch.full_like(inner[:, 0], 1.5))
    torch.testing.assert_close(inner[:, 2], torch.full_like(inner[:, 2], -2.0))


def test_warp_reads_the_moving_image_at_index_plus_displacement():
    image = torch.arange(6.0 * 7 * 8).reshape(1, 1, 6, 7, 8)
    u = torch.zeros(1, 3, 6, 7, 8)
    u[:, 0] = 1.0  # one voxel along x (the last array axis)
    moved = warp(image, u)
    torch.testing.assert_close(moved[..., :-1], image[..., 1:])


# --- training --------------------------------------------------------------------------------


def _volumes():
    from tests.networks.test_imse import _tiny_volumes

    return _tiny_volumes()


def test_training_pairs_carry_their_true_displacement():
    """Warping the moving crop by the known ``d`` reproduces the fixed crop."""
    from carctl.training import car

    settings = car.CarTraining(patch=32)
    for seed in range(4):
        pair = car.make_pair(_volumes(), settings, torch.Generator().manual_seed(seed))
        mask = pair["mask"].float()
        before = ((pair["fixed"] - pair["moving"]).abs() * mask).sum() / mask.sum()
        after = ((pair["fixed"] - warp(pair["moving"], pair["truth"])).abs() * mask).sum()
        after = after / mask.sum()
        if before > 0.02:
            assert after < 0.3 * before


def test_a_few_training_steps_reduce_the_loss(tmp_path):
    """The mean loss over the samples of a short run is lower after it than before."""
    from carctl.training import car, loop

    settings = car.CarTraining(
        steps=40,
        patch=16,
        learning_rate=3e-3,
        validate_every=40,
        network=CarConfig(width=4),
    )
    volumes = _volumes()

    def total(model):
        out = 0.0
        for step in range(settings.steps):
            generator = loop.step_generator(settings.seed, step)
            pair = car.make_pair(volumes, settings, generator)
            with torch.no_grad():
                out += float(car.losses(model, pair, settings, generator)["total"])
        return out / settings.steps

    torch.manual_seed(settings.seed)
    before = total(CarNet(settings.network))
    model, metrics = car.train(settings, volumes, volumes, tmp_path)
    assert total(model) < before
    assert {"epe", "epe_before", "epe_ratio"} <= metrics.keys()
    assert (tmp_path / "model.safetensors").exists()


def test_a_resumed_run_reports_its_progress_from_the_checkpoint(tmp_path):
    """Stopped at step 2 and resumed, the run's first progress report is step 2 (the bar
    does not restart at 0), then it goes on to the end."""
    from carctl.training import car

    settings = car.CarTraining(steps=3, patch=16, validate_every=3, network=CarConfig(width=4))
    volumes = _volumes()
    car.train(settings, volumes, volumes, tmp_path, stop=2)
    seen = []
    car.train(
        settings, volumes, volumes, tmp_path, resume=True, progress=lambda s, m: seen.append(s)
    )
    assert seen == [2, 3]


def _tiny_data(tmp_path: Path) -> Path:
    """A data folder holding one small T1-like volume where training looks for OASIS."""
    from tests.conftest import make_image, write

    folder = tmp_path / "data" / "oasis-t1-a"
    folder.mkdir(parents=True)
    write(make_image((40, 40, 40), seed=5), folder / "t1.nii.gz")
    return tmp_path / "data"


def test_train_car_cli_smoke(cli, tmp_path, monkeypatch):
    """``carctl train car`` on a tiny data folder writes weights whose card loads; a run
    resumed with more steps records both commands (the recipe of its weights)."""
    import sys

    _tiny_data(tmp_path)
    out = tmp_path / "run"
    args = ["train", "car", "--data", str(tmp_path / "data"), "--out", str(out)]
    args += ["--patch", "16", "--width", "4", "--validate-every", "3", "-q"]
    monkeypatch.setattr(sys, "argv", ["carctl", *args, "--steps", "3"])
    result = cli(*args, "--steps", "3")
    assert result.code == 0, result.err
    # no CT/MR validation pair in the folder: said, even with -q (it validated in silence)
    assert "warning: no validation volumes" in result.err
    card = json.loads((out / "car.json").read_text())
    assert card["architecture"]["kind"] == "car-registration"
    assert card["training"]["command"].startswith("carctl train car")
    assert card["training"]["steps_done"] == 3
    more = [*args, "--steps", "4", "--resume"]
    monkeypatch.setattr(sys, "argv", ["carctl", *more])
    resumed = cli(*more)
    assert resumed.code == 0 and "resuming with" not in resumed.err  # more steps: no change
    training = json.loads((out / "car.json").read_text())["training"]
    assert training["steps_done"] == 4
    assert len(training["commands"]) == 2 and training["commands"][0] == card["training"]["command"]
    assert training["commands"][1].endswith("--steps 4 --resume")
    assert training["command"] == " && ".join(training["commands"])
    bad = cli("train", "car", "--data", tmp_path / "data", "--patch", "20", "-q")
    assert bad.code != 0 and "multiple of 16" in bad.err
    for option, value in (("--unpaired", "1.5"), ("--bias", "-1"), ("--blur", "-0.5")):
        bad = cli("train", "car", "--data", tmp_path / "data", option, value, "-q")
        assert bad.code == 2 and option in bad.err and "Traceback" not in bad.err
    for scales in ("1,x", "0.1", ""):
        bad = cli("train", "car", "--data", tmp_path / "data", "--scales", scales, "-q")
        assert bad.code == 2 and "--scales" in bad.err and "Traceback" not in bad.err


def test_train_refusals_and_a_kept_checkpoint(cli, tmp_path, monkeypatch):
    """Values that stopped with internal errors (--validate-every 0: ZeroDivisionError,
    --lr nan, --device tpu, a resume with another --width: a state-dict RuntimeError) or were
    taken (--contrast inf: NaN weights; --name ../x: weights outside --out; a fresh run into
    a folder holding a checkpoint: the finished run overwritten) are one-line errors."""
    import sys

    _tiny_data(tmp_path)
    out = tmp_path / "run"
    args = ["train", "car", "--data", str(tmp_path / "data"), "--out", str(out)]
    args += ["--patch", "16", "--width", "4", "--validate-every", "2", "--steps", "2", "-q"]
    monkeypatch.setattr(sys, "argv", ["carctl", *args])
    assert cli(*args).code == 0
    weights = (out / "car.safetensors").read_bytes()
    for extra, words in (
        (["--validate-every", "0"], "--validate-every must be at least 1"),
        (["--lr", "nan"], "--lr must be a number"),
        (["--device", "tpu"], "unknown --device 'tpu'"),
        (["--contrast", "inf"], "--contrast must be a number"),
        (["--name", "../x"], "must be a plain file name"),
        (["--seed", str(10**20)], "--seed must be from 0 to"),  # an internal error
        (["--resume", "--out", str(tmp_path / "typo")], "holds no training checkpoint"),
        ([], "holds a training checkpoint: --resume continues it"),
        (["--resume", "--width", "8", "--steps", "4"], "network width 4 -> 8"),
    ):
        result = cli(*args, *extra)
        lines = result.err.strip().splitlines()
        assert result.code in (1, 2) and len(lines) == 1 and words in lines[0], (extra, result.err)
    assert (out / "car.safetensors").read_bytes() == weights
    # a refused resume joined the recipe (commands.json, then the card), whose replay
    # stopped at it; so did one refused when its checkpoint would not load
    recipe = (out / "commands.json").read_text()
    assert len(json.loads(recipe)) == 1
    assert not (tmp_path / "x.safetensors").exists()
    # a resume with another seed was taken without a word (the card kept the last only)
    reseeded = cli(*args, "--resume", "--steps", "3", "--seed", "5")
    assert reseeded.code == 0 and "warning: resuming with other settings" in reseeded.err
    assert "seed 0 -> 5" in reseeded.err
    recipe = (out / "commands.json").read_text()
    (out / "model.safetensors").write_bytes(b"not a weights file")
    broken = cli(*args, "--resume", "--steps", "4", "--seed", "5")
    assert broken.code == 1 and "Traceback" not in broken.err
    assert (out / "commands.json").read_text() == recipe


def test_training_stops_when_its_loss_is_not_finite(tmp_path):
    """A diverged run wrote NaN weights and exited 0; it now stops at the first non-finite
    loss, before a step or a checkpoint writes anything from it."""
    import torch

    from carctl.errors import CarctlError
    from carctl.training import loop
    from carctl.training.car import CarTraining

    model = torch.nn.Linear(2, 1)
    settings = CarTraining(steps=4, validate_every=1)

    def loss_of(generator):
        return model(torch.ones(2)).sum() * float("nan"), {}

    with pytest.raises(CarctlError, match="diverged at step 1"):
        loop.fit(model, settings, loss_of, dict, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_weights_holding_nan_are_refused(tmp_path, monkeypatch, cli):
    """NaN weights (a diverged training's) passed `weights verify`, and register wrote the
    identity with exit status 0: loading refuses them, and writing them is refused too."""
    import torch
    from safetensors.torch import save_file

    from carctl import pretrained
    from carctl.networks.car import CarConfig, CarNet

    net = CarNet(CarConfig(width=4))
    card = {"architecture": {"kind": "car-registration", "config": net.config.to_dict()}}
    folder = tmp_path / "weights"
    written = pretrained.write(net, folder, "car", card)
    # safetensors wrote its files for their owner alone; the cards for everyone
    assert written.weights.stat().st_mode & 0o777 == written.path.stat().st_mode & 0o777
    tensors = {k: torch.full_like(v, float("nan")) for k, v in net.state_dict().items()}
    save_file(tensors, str(written.weights))
    data = json.loads(written.path.read_text())
    data["sha256"] = pretrained.sha256(written.weights)  # a card that matches the NaN file
    written.path.write_text(json.dumps(data))
    monkeypatch.setenv("CARCTL_WEIGHTS", str(folder))
    result = cli("weights", "verify")
    assert result.code == 1 and "holds NaN or infinite values" in result.err
    with torch.no_grad():
        next(net.parameters()).fill_(float("inf"))
    with pytest.raises(pretrained.WeightsError, match="NaN or infinite"):
        pretrained.write(net, tmp_path / "other", "car", card)


def test_broken_cards_in_carctl_weights_are_refused_not_passed_over(cli, tmp_path, monkeypatch):
    """Found by a sweep: a card whose sha256 was null was an internal error; a card that did
    not parse, or a weights file without its card, in $CARCTL_WEIGHTS was passed over for the
    checkout's weights without a word (`weights verify`: ok); so was a $CARCTL_WEIGHTS that
    is not a folder."""
    from carctl import pretrained
    from carctl.networks.car import CarConfig, CarNet

    net = CarNet(CarConfig(width=4))
    card = {"architecture": {"kind": "car-registration", "config": net.config.to_dict()}}
    folder = tmp_path / "weights"
    written = pretrained.write(net, folder, "car", card)
    monkeypatch.setenv("CARCTL_WEIGHTS", str(folder))
    assert pretrained.card("car").path == written.path
    data = json.loads(written.path.read_text())
    for broken, words in (
        (json.dumps({**data, "sha256": None}), "sha256 missing or malformed"),
        ("{bad", "is unreadable"),
        (None, "has no model card car.json"),
    ):
        if broken is None:
            written.path.unlink()
        else:
            written.path.write_text(broken)
        result = cli("weights", "verify")
        assert result.code == 1 and words in result.err and "internal" not in result.err
        with pytest.raises(pretrained.WeightsError, match=words):
            pretrained.card("car")
    (folder / "notes.json").write_text("{}")  # a JSON file beside no weights is no card
    written.path.write_text(json.dumps(data))
    assert pretrained.card("car").path == written.path
    monkeypatch.setenv("CARCTL_WEIGHTS", str(tmp_path / "absent"))
    result = cli("weights", "list")
    assert result.code == 1 and "$CARCTL_WEIGHTS" in result.err and "is not a folder" in result.err


def test_train_car_views_at_the_scales_asked(cli, tmp_path, monkeypatch):
    """``--scales``: the training views' spacings (units of each volume's working spacing),
    recorded in the card, none finer than the image's own; by default the volume and a 1.5
    times coarser view."""
    import sys

    from carctl.networks import evaluator
    from carctl.training import data as training_data

    # working spacing 2 mm for the 40 mm cube (1 mm voxels): 1.6 and 2 mm views, not 0.5 mm
    monkeypatch.setattr(evaluator, "WORKING_VOXELS", 8000)

    _tiny_data(tmp_path)
    seen = []
    load = training_data.load_volumes

    def spy(*args, **kwargs):
        volumes = load(*args, **kwargs)
        seen.extend(v.name for v in volumes)
        return volumes

    monkeypatch.setattr(training_data, "load_volumes", spy)
    args = ["train", "car", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "run")]
    args += ["--patch", "16", "--width", "4", "--steps", "1", "--scales", "0.25,0.8,1", "-q"]
    monkeypatch.setattr(sys, "argv", ["carctl", *args])
    result = cli(*args)
    assert result.code == 0, result.err
    card = json.loads((tmp_path / "run" / "car.json").read_text())
    assert card["training"]["settings"]["scales"] == [0.25, 0.8, 1.0]
    names = {n for n in seen if n.startswith("oasis-t1-a/t1.nii.gz@")}
    assert names == {"oasis-t1-a/t1.nii.gz@1.60mm", "oasis-t1-a/t1.nii.gz@2.00mm"}
    assert training_data.SCALES == (1.0, 1.5)


def test_train_car_init_fine_tunes_from_weights(cli, tmp_path, monkeypatch):
    """``--init`` starts from earlier weights (their card checked): after a step at a zero
    learning rate the weights written are those weights; the card's recipe starts with
    theirs. Weights of another width, a missing file and a corrupted one are refused in one
    line."""
    import sys

    from safetensors.torch import load_file

    _tiny_data(tmp_path)
    common = ["train", "car", "--data", str(tmp_path / "data"), "--patch", "16", "-q"]
    first = [*common, "--width", "4", "--out", str(tmp_path / "a"), "--steps", "2"]
    monkeypatch.setattr(sys, "argv", ["carctl", *first])
    assert cli(*first).code == 0
    start = tmp_path / "a" / "car.safetensors"

    again = [*common, "--width", "4", "--out", str(tmp_path / "b"), "--init", str(start)]
    again += ["--steps", "1", "--lr", "0"]
    monkeypatch.setattr(sys, "argv", ["carctl", *again])
    result = cli(*again)
    assert result.code == 0, result.err
    before, after = load_file(str(start)), load_file(str(tmp_path / "b" / "car.safetensors"))
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    training = json.loads((tmp_path / "b" / "car.json").read_text())["training"]
    commands = training["commands"]
    assert len(commands) == 2 and "--init" in commands[1] and "--init" not in commands[0]
    assert training["steps_done"] == 2 + 1

    out = ["--out", str(tmp_path / "c"), "--steps", "1"]
    wider = cli(*common, *out, "--width", "8", "--init", str(start))
    assert wider.code != 0 and "not weights of this network" in wider.err
    assert "Traceback" not in wider.err
    missing = cli(*common, *out, "--width", "4", "--init", str(tmp_path / "none.safetensors"))
    assert missing.code != 0 and "no such file" in missing.err
    start.write_bytes(start.read_bytes()[:-4] + b"\0\0\0\0")
    corrupted = cli(*common, *out, "--width", "4", "--init", str(start))
    assert corrupted.code != 0 and "corrupted" in corrupted.err


def test_train_car_blend_averages_start_and_fine_tuned_weights(cli, tmp_path, monkeypatch):
    """``--blend W`` (WiSE-FT) writes ``W`` of the fine-tuned weights plus ``1 - W`` of
    ``--init``'s, validated again; the checkpoint keeps the fine-tuned ones, so a finished
    run resumed with ``--blend`` blends without training. Without ``--init``, or out of
    (0, 1], refused in one line."""
    import sys

    from safetensors.torch import load_file

    _tiny_data(tmp_path)
    common = ["train", "car", "--data", str(tmp_path / "data"), "--patch", "16", "-q"]
    common += ["--width", "4"]
    first = [*common, "--out", str(tmp_path / "a"), "--steps", "2"]
    monkeypatch.setattr(sys, "argv", ["carctl", *first])
    assert cli(*first).code == 0
    start = tmp_path / "a" / "car.safetensors"
    tune = [*common, "--out", str(tmp_path / "b"), "--init", str(start), "--steps", "2"]
    tune += ["--lr", "0.01"]
    monkeypatch.setattr(sys, "argv", ["carctl", *tune])
    assert cli(*tune).code == 0
    tuned = load_file(str(tmp_path / "b" / "car.safetensors"))
    blended = [*tune, "--blend", "0.25", "--resume"]
    monkeypatch.setattr(sys, "argv", ["carctl", *blended])
    result = cli(*blended)
    assert result.code == 0, result.err
    a, b = load_file(str(start)), load_file(str(tmp_path / "b" / "car.safetensors"))
    assert any(not torch.equal(a[k], tuned[k]) for k in a)
    for k in a:
        assert torch.allclose(b[k], 0.25 * tuned[k] + 0.75 * a[k], atol=1e-6), k
    checkpoint = load_file(str(tmp_path / "b" / "model.safetensors"))
    assert all(torch.equal(checkpoint[k], tuned[k]) for k in tuned)
    card = json.loads((tmp_path / "b" / "car.json").read_text())
    assert card["validation"]["blend"] == 0.25 and "epe" in card["validation"]
    assert card["training"]["settings"]["blend"] == 0.25
    assert (
        card["training"]["init_sha256"]
        == json.loads((tmp_path / "a" / "car.json").read_text())["sha256"]
    )
    assert card["training"]["commands"][-1].endswith("--blend 0.25 --resume")
    for extra in (["--blend", "0.5"], ["--init", str(start), "--blend", "0"]):
        bad = cli(*common, "--out", str(tmp_path / "c"), "--steps", "1", *extra)
        assert bad.code == 2 and "--blend" in bad.err and "Traceback" not in bad.err


def test_torchrun_trains_with_two_processes(tmp_path):
    """``torchrun --nproc_per_node 2`` (Gloo on CPU): both processes step together and
    process 0 writes the checkpoint and the weights."""
    import shutil
    import subprocess
    import sys

    torchrun = shutil.which("torchrun") or str(Path(sys.executable).with_name("torchrun"))
    if not Path(torchrun).exists():
        pytest.skip("torchrun not installed")
    _tiny_data(tmp_path)
    out = tmp_path / "run"
    command = [torchrun, "--standalone", "--nproc_per_node", "2", "-m", "carctl", "train", "car"]
    command += ["--data", str(tmp_path / "data"), "--out", str(out), "--steps", "2"]
    command += ["--patch", "16", "--width", "4", "--validate-every", "2", "--threads", "1", "-q"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads((out / "state.json").read_text())["step"] == 2
    assert json.loads((out / "car.json").read_text())["training"]["steps_done"] == 2


def test_a_run_resumed_under_another_name_keeps_the_whole_recipe(cli, tmp_path, monkeypatch):
    """A run stopped before its end and resumed with ``--name other`` wrote a card listing
    the resuming command alone (no card of that name was there to read the first from); a
    name of a checkpoint file (``state``: the card replaced the checkpoint) is refused."""
    import sys

    _tiny_data(tmp_path)
    out = tmp_path / "run"
    args = ["train", "car", "--data", str(tmp_path / "data"), "--out", str(out)]
    args += ["--patch", "16", "--width", "4", "--validate-every", "2", "--steps", "4", "-q"]
    first = [*args, "--stop-at", "2"]
    monkeypatch.setattr(sys, "argv", ["carctl", *first])
    assert cli(*first).code == 0
    again = [*args, "--resume", "--name", "other"]
    monkeypatch.setattr(sys, "argv", ["carctl", *again])
    assert cli(*again).code == 0
    training = json.loads((out / "other.json").read_text())["training"]
    assert training["commands"] == [
        "carctl train car " + " ".join(first[2:]),
        "carctl train car " + " ".join(again[2:]),
    ]
    assert training["steps_done"] == 4
    for name in ("state", "model", "commands"):
        refused = cli(*args, "--resume", "--name", name)
        assert refused.code == 2 and "names a checkpoint file in --out" in refused.err


def test_a_checkpoint_left_while_a_run_loaded_its_data_is_not_trained_over(
    cli, tmp_path, monkeypatch
):
    """A run that finished into --out while a fresh one loaded its data (before it took the
    folder's lock) was trained over from scratch: the check is repeated under the lock. A
    resumed run whose commands.json is not a list says so instead of losing it in silence."""
    import sys

    from carctl.training import data

    _tiny_data(tmp_path)
    out = tmp_path / "run"
    args = ["train", "car", "--data", str(tmp_path / "data"), "--out", str(out)]
    args += ["--patch", "16", "--width", "4", "--validate-every", "2", "--steps", "2", "-q"]
    monkeypatch.setattr(sys, "argv", ["carctl", *args])
    loaded = data.load_volumes

    def meanwhile(*a, **k):  # another run finishes into --out as this one loads
        out.mkdir(exist_ok=True)
        (out / "state.json").write_text('{"step": 2}')
        return loaded(*a, **k)

    monkeypatch.setattr(data, "load_volumes", meanwhile)
    result = cli(*args)
    assert result.code == 2 and "holds a training checkpoint" in result.err
    assert (out / "state.json").read_text() == '{"step": 2}'
    monkeypatch.setattr(data, "load_volumes", loaded)
    (out / "state.json").unlink()
    assert cli(*args).code == 0
    (out / "commands.json").write_text('{"a": 1}')
    again = [*args, "--resume", "--steps", "3", "--name", "other"]
    monkeypatch.setattr(sys, "argv", ["carctl", *again])
    result = cli(*again)
    assert result.code == 0 and "commands.json is not a list of commands" in result.err


def test_weights_of_another_size_are_refused_with_the_mismatch(tmp_path):
    """torch's state-dict error opens with a heading ("Error(s) in loading state_dict for
    CarNet:"), which alone was the reason given; the first mismatch below it is given now."""
    from carctl import pretrained
    from carctl.networks.car import CarConfig, CarNet

    small = CarNet(CarConfig(width=4))
    card = {"architecture": {"kind": "car-registration", "config": small.config.to_dict()}}
    written = pretrained.write(small, tmp_path, "car", card)
    with pytest.raises(pretrained.WeightsError, match=r"refused \(size mismatch for "):
        pretrained.load_weights(CarNet(CarConfig(width=8)), written.weights, "refused")
