"""IMSE: Shuffle Remap, the evaluator network, the weights registry, training steps."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from carctl import pretrained
from carctl.augment import ShuffleRemap
from carctl.networks.evaluator import Evaluator, EvaluatorConfig

# --- Shuffle Remap ---------------------------------------------------------------------------


def _remap(seed: int) -> ShuffleRemap:
    return ShuffleRemap.random(torch.Generator().manual_seed(seed))


def test_shuffle_remap_keeps_the_range():
    x = torch.linspace(-1, 1, 10001)
    for seed in range(20):
        y = _remap(seed)(x)
        assert y.min() >= -1 and y.max() <= 1


def test_shuffle_remap_is_linear_and_increasing_within_each_segment():
    for seed in range(10):
        remap = _remap(seed)
        edges = remap.edges
        for i in range(remap.order.numel()):
            low, high = float(edges[i]), float(edges[i + 1])
            if high - low < 1e-4:
                continue
            x = torch.linspace(low, high, 7, dtype=torch.float64)[:-1]  # half-open segment
            y = remap(x)
            j = int(remap.order[i])
            slope = (float(edges[j + 1]) - float(edges[j])) / (high - low)
            assert torch.all(torch.diff(y) > 0)
            torch.testing.assert_close(torch.diff(y), torch.diff(x) * slope)
            torch.testing.assert_close(y[0], edges[j])  # segment start -> target start


def test_shuffle_remap_matches_the_papers_equation_8():
    remap = ShuffleRemap(torch.tensor([-1.0, -0.5, 0.2, 1.0]), torch.tensor([2, 0, 1]))
    # x = 0.0 lies in segment 1 ([-0.5, 0.2)), which takes segment 0's range [-1, -0.5)
    expected = (0.0 - -0.5) / (0.2 - -0.5) * (-0.5 - -1.0) + -1.0
    assert float(remap(torch.tensor([0.0]))) == pytest.approx(expected)
    assert float(remap(torch.tensor([1.0]))) == pytest.approx(0.2)  # top of the last segment


def test_shuffle_remap_is_deterministic_with_a_seed_and_varies_without():
    x = torch.rand(1000) * 2 - 1
    torch.testing.assert_close(_remap(3)(x), _remap(3)(x))
    assert not torch.allclose(_remap(3)(x), _remap(4)(x))


def test_shuffle_remap_draws_control_points_in_the_papers_range():
    counts = {_remap(seed).edges.numel() - 2 for seed in range(200)}
    assert min(counts) >= 2 and max(counts) <= 50 and len(counts) > 20


# --- the evaluator network -------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(13, 17, 9), (1, 20, 21), (32, 32, 32)])
def test_evaluator_runs_on_odd_3d_sizes(shape):
    net = Evaluator(EvaluatorConfig(width=4, blocks=1))
    x = torch.rand(1, 1, *shape)
    assert net(x, x).shape == (1, 1, *shape)


def test_evaluator_starts_at_no_error_and_cards_of_the_older_design_are_refused():
    """The evaluator starts at zero (the answer for aligned images, and L1's best constant);
    a card without ``lookup`` describes the design of before 2026-12-06, which is no longer
    built: refused with one clear line rather than loaded into the wrong network."""
    from carctl import pretrained

    torch.manual_seed(0)
    x, y = torch.rand(2, 1, 12, 11, 10).unbind(0)
    assert torch.equal(
        Evaluator(EvaluatorConfig(width=4, blocks=1))(x[None], y[None]),
        torch.zeros(1, 1, 12, 11, 10),
    )
    old = {"kind": "imse-evaluator", "config": {"ndim": 3, "width": 4, "blocks": 1}}
    with pytest.raises(pretrained.WeightsError, match="carctl train imse"):
        pretrained.build(old)


def test_rank_lookup_undoes_a_shuffle_remap_of_an_aligned_image():
    """The lookup reads the remap off the pair: the other image back in the reference's
    contrast, to within the spread of a group; misaligned, it cannot (what the evaluator
    sees)."""
    from carctl.networks.evaluator import LOOKUP_SLOPE, rank_lookup

    generator = torch.Generator().manual_seed(3)
    image = torch.nn.functional.interpolate(
        torch.rand(1, 1, 8, 8, 8, generator=generator), size=(32, 32, 32), mode="trilinear"
    )
    image = image * 2 - 1
    remap = ShuffleRemap.random(generator, (20, 20))
    other = remap(image)
    assert (other - image).abs().mean() > 0.2  # a different contrast
    back = rank_lookup(image, other, 1024)
    assert back.shape == image.shape
    assert (back - image).abs().mean() < 0.01
    shifted = rank_lookup(image, remap(image.roll(3, dims=2)), 1024)
    assert (shifted - image).abs().mean() > 10 * (back - image).abs().mean()
    # deterministic; with a gradient (for --loss imse) the same value, and the gradient is
    # the lookup's slope: the inverse remap's, bounded
    moving = other.clone().requires_grad_(True)
    looked_up = rank_lookup(image, moving, 1024)
    assert torch.equal(looked_up.detach(), back)
    looked_up.sum().backward()
    slopes = moving.grad
    assert slopes.abs().max() <= LOOKUP_SLOPE
    # the segment that holds the most voxels, where it went, and its inverse slope
    counts = torch.bucketize(image.flatten(), remap.edges[1:-1], right=True).bincount()
    a = int(counts.argmax())
    b = int(remap.order[a])
    inverse = (remap.edges[a + 1] - remap.edges[a]) / (remap.edges[b + 1] - remap.edges[b])
    inside = torch.bucketize(image, remap.edges[1:-1], right=True) == a
    assert float(slopes[inside].median()) == pytest.approx(float(inverse), rel=0.2)


def _views(generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """A smooth random image in [-1, 1] and a copy of it shifted by a fraction of a voxel."""
    import torch.nn.functional as F

    noise = torch.rand(1, 1, 10, 10, 10, generator=generator)
    image = F.interpolate(noise, size=(20, 20, 20), mode="trilinear") * 2 - 1
    shifted = torch.lerp(image, image.roll(1, dims=2), 0.5)
    return image, shifted


def test_normalised_evaluator_learns_the_difference_of_two_views_of_one_contrast():
    """The sanity task (no Shuffle Remap: the error map is the plain difference) at a learning
    rate the older design could not take (it ran away at 3e-3, docs/benchmarks.md): the
    normalised design trains stably and predicts most of the difference within 60 steps."""
    torch.manual_seed(0)
    net = Evaluator(EvaluatorConfig(width=4, blocks=1))
    optimiser = torch.optim.Adam(net.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    for _ in range(60):
        reference, other = _views(generator)
        loss = (net(reference, other) - (reference - other)).abs().mean()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    reference, other = _views(torch.Generator().manual_seed(99))  # an unseen pair
    with torch.no_grad():
        error = (net(reference, other) - (reference - other)).abs().mean()
    assert error < 0.5 * (reference - other).abs().mean()


def test_evaluator_2d():
    net = Evaluator(EvaluatorConfig(ndim=2, width=4, blocks=1))
    x = torch.rand(2, 1, 31, 18)
    assert net(x, x).shape == (2, 1, 31, 18)


# --- weights registry ------------------------------------------------------------------------


@dataclass
class TinyWeights:
    folder: Path  # holds the weights ``tiny``
    network: type  # the class they build
    kind: str  # the card's architecture kind
    channels: int  # output channels of the network


def _tiny_evaluator():
    return Evaluator(EvaluatorConfig(width=4, blocks=1)), "imse-evaluator", 1


def _tiny_car():
    from carctl.networks.car import CarConfig, CarNet

    return CarNet(CarConfig(width=4)), "car-registration", 3


@pytest.fixture(params=[_tiny_evaluator, _tiny_car], ids=["imse", "car"])
def weights_dir(request, tmp_path, monkeypatch) -> TinyWeights:
    """Tiny untrained weights named ``tiny``, of each architecture carctl ships."""
    monkeypatch.setenv("CARCTL_WEIGHTS", str(tmp_path))
    torch.manual_seed(0)
    net, kind, channels = request.param()
    architecture = {"kind": kind, "config": net.config.to_dict()}
    pretrained.write(net, tmp_path, "tiny", {"architecture": architecture})
    return TinyWeights(tmp_path, type(net), kind, channels)


def test_weights_round_trip_through_the_card(weights_dir):
    model, card = pretrained.load("tiny")
    assert isinstance(model, weights_dir.network)
    assert card.data["architecture"]["kind"] == weights_dir.kind
    assert card.data["architecture"]["config"]["width"] == 4
    x = torch.rand(1, 1, 8, 8, 8)
    assert model(x, x).shape == (1, weights_dir.channels, 8, 8, 8)
    assert not model.training
    # loaded in the layout oneDNN's convolutions run fastest (carctl.networks.channels_last)
    convolutions = [m for m in model.modules() if isinstance(m, torch.nn.Conv3d)]
    assert convolutions
    assert all(m.weight.is_contiguous(memory_format=torch.channels_last_3d) for m in convolutions)


@pytest.mark.parametrize("where", [-3, 0.5], ids=["end", "middle"])
def test_corrupted_weights_are_refused(weights_dir, where):
    path = weights_dir.folder / "tiny.safetensors"
    data = bytearray(path.read_bytes())
    data[where if isinstance(where, int) else int(len(data) * where)] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(pretrained.WeightsError, match="corrupted"):
        pretrained.load("tiny")


def test_weights_that_do_not_fit_the_card_are_refused(weights_dir):
    card = weights_dir.folder / "tiny.json"
    data = json.loads(card.read_text())
    data["architecture"]["config"]["width"] = 8
    card.write_text(json.dumps(data))
    with pytest.raises(pretrained.WeightsError, match="architecture"):
        pretrained.load("tiny")


def test_unknown_weights_name(weights_dir):
    with pytest.raises(pretrained.WeightsError, match="no weights named"):
        pretrained.load("nothing")


def test_shipped_weights_verify():
    shipped = [c for c in pretrained.cards() if c.path.parent.name == "weights"]
    assert {c.name for c in shipped} >= {"imse"}
    for c in shipped:
        pretrained.verify(c)
        assert c.data["training"]["command"].startswith("carctl train ")
        assert "validation" in c.data


# --- training --------------------------------------------------------------------------------


def _tiny_volumes():
    from carctl.training.data import Volume

    rng = np.random.default_rng(0)
    z, y, x = np.mgrid[:40, :40, :40]
    blob = ((z - 20) ** 2 + (y - 20) ** 2 + (x - 20) ** 2 < 15**2).astype(np.float32)
    inner = ((z - 17) ** 2 + (y - 22) ** 2 + (x - 19) ** 2 < 6**2).astype(np.float32)
    image = blob * 0.6 + inner * 0.4 + 0.02 * rng.normal(size=blob.shape).astype(np.float32)
    labels = (blob + inner).astype(np.int64)
    return [Volume("blob", array=image * 2 - 1), Volume("labels", labels=labels)]


def test_training_batch_label_is_the_difference_of_the_two_views():
    from carctl.training import imse

    settings = imse.ImseTraining(batch=2, patch=16)
    batch = imse.make_batch(_tiny_volumes(), settings, torch.Generator().manual_seed(0))
    assert batch["reference"].shape == (2, 1, 16, 16, 16)
    assert batch["other"].min() >= -1.2 and batch["other"].max() <= 1.2
    # x2 - (x2 - x1) is x1, which the remapped input is a function of: same ordering where
    # the remap is monotone is not guaranteed, but the label is bounded by the range
    assert batch["target"].abs().max() <= 2


def test_a_few_training_steps_reduce_the_loss(tmp_path):
    from carctl.training import imse

    torch.manual_seed(0)
    settings = imse.ImseTraining(
        steps=40,
        batch=2,
        patch=16,
        validate_every=20,
        learning_rate=3e-3,
        # starts at the no-error answer: the loop must do better than that
        network=EvaluatorConfig(width=4, blocks=1),
    )
    volumes = _tiny_volumes()
    checks = imse.validation_batches(volumes, settings, count=4)
    before = imse.validate(Evaluator(settings.network), checks)["l1"]
    torch.manual_seed(settings.seed)
    model, metrics = imse.train(settings, volumes, volumes, tmp_path)
    assert metrics["l1"] < before
    assert (tmp_path / "model.safetensors").exists() and (tmp_path / "state.json").exists()


def test_training_resumes_where_it_stopped(tmp_path):
    from carctl.training import imse

    settings = imse.ImseTraining(
        steps=6, batch=1, patch=16, validate_every=3, network=EvaluatorConfig(width=4, blocks=1)
    )
    volumes = _tiny_volumes()
    whole, _ = imse.train(settings, volumes, volumes, tmp_path / "whole")

    def interrupt(step: int, metrics: dict) -> None:
        if step == 3:  # just after the checkpoint of step 3
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        imse.train(settings, volumes, volumes, tmp_path / "split", progress=interrupt)
    resumed, _ = imse.train(settings, volumes, volumes, tmp_path / "split", resume=True)
    for a, b in zip(whole.state_dict().values(), resumed.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b)


# --- the shipped evaluator on real images ----------------------------------------------------


def _shifted(mm: float):
    from carctl.spatial.transform import Affine

    return [Affine(np.eye(3), np.array([mm, -mm / 2, mm / 3]))]


def test_shipped_evaluator_error_grows_with_a_shift_of_the_same_image():
    """On the bundled T2 (one of the training volumes, on its own), the evaluator's mean
    predicted error of the image against itself grows with a shift."""
    from carctl import qa
    from carctl.demo import demo_files
    from carctl.io import read_image

    model, _ = pretrained.load(qa.WEIGHTS)
    image = read_image(demo_files()["fixed"])
    grid = qa.working_grid(image)
    errors = [
        qa.assess(model, qa.prepare(image, image, _shifted(mm), grid)).mean_error
        for mm in (0.0, 2.0, 5.0)
    ]
    assert errors[0] < errors[1] < errors[2]


def test_shipped_evaluator_predicts_little_error_between_an_image_and_itself():
    from carctl import qa
    from carctl.demo import demo_files
    from carctl.io import read_image

    model, _ = pretrained.load(qa.WEIGHTS)
    image = read_image(demo_files()["fixed"])
    same = qa.assess(model, qa.prepare(image, image))
    assert same.mean_error < 0.05  # intensities span [-1, 1]


def test_shipped_evaluator_flags_a_different_contrast_shift():
    """T1 against the T2 of the same volunteer (never a training pair): a 5 mm shift scores
    worse than the headers."""
    from carctl import qa
    from carctl.demo import demo_files
    from carctl.io import read_image

    model, _ = pretrained.load(qa.WEIGHTS)
    files = demo_files()
    fixed, moving = read_image(files["fixed"]), read_image(files["moving"])
    grid = qa.working_grid(fixed)
    header = qa.assess(model, qa.prepare(fixed, moving, (), grid)).mean_error
    shifted = qa.assess(model, qa.prepare(fixed, moving, _shifted(5.0), grid)).mean_error
    assert shifted > header
