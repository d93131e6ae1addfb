"""``carctl qa``, ``weights``, ``translate``, ``train`` on tiny data, with tiny weights."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from tests.conftest import make_image, write


@pytest.fixture
def tiny_weights(tmp_path, monkeypatch) -> Path:
    """An untrained tiny evaluator as the ``imse`` weights."""
    import torch

    from carctl import pretrained
    from carctl.networks.evaluator import Evaluator, EvaluatorConfig

    folder = tmp_path / "weights"
    torch.manual_seed(0)
    net = Evaluator(EvaluatorConfig(width=4, blocks=1))
    card = {
        "architecture": {"kind": "imse-evaluator", "config": net.config.to_dict()},
        "training": {"command": "carctl train imse (test)"},
        "validation": {},
    }
    pretrained.write(net, folder, "imse", card)
    monkeypatch.setenv("CARCTL_WEIGHTS", str(folder))
    return folder


@pytest.fixture
def images(tmp_path) -> tuple[Path, Path]:
    fixed = write(make_image((24, 22, 20), spacing=(1.0, 1.1, 1.2), seed=3), tmp_path / "f.nii.gz")
    moving = write(
        make_image((22, 22, 22), spacing=(1.2, 1.0, 1.0), origin=(1, -1, 2), seed=4),
        tmp_path / "m.nii.gz",
    )
    return moving, fixed


def test_qa_writes_error_map_png_and_json(cli, tiny_weights, images, tmp_path):
    moving, fixed = images
    out = tmp_path / "qa"
    result = cli("qa", moving, fixed, "-o", out, "--json", "-")
    assert result.code == 0, result.err
    report = json.loads(result.out)
    assert report["verdict"] in ("ok", "suspect", "failed")
    assert np.isfinite(report["score"]) and report["score"] >= 0
    error = sitk.ReadImage(str(out / "m_qa.nii.gz"))
    assert error.GetDimension() == 3
    assert sitk.GetArrayFromImage(error).min() >= 0
    png = (out / "m_qa.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and b"IEND" in png[-12:]


def test_qa_before_and_after_with_a_field(cli, tiny_weights, images, tmp_path):
    moving, fixed = images
    field = tmp_path / "field.nii.gz"
    zero = sitk.Image(sitk.ReadImage(str(fixed)).GetSize(), sitk.sitkVectorFloat64, 3)
    zero.CopyInformation(sitk.ReadImage(str(fixed)))
    sitk.WriteImage(zero, str(field))
    result = cli("qa", moving, fixed, "-f", field, "-o", tmp_path, "--json", "-")
    assert result.code == 0, result.err
    report = json.loads(result.out)
    # a zero field is the header alignment: same score before and after
    assert report["before"]["score"] == pytest.approx(report["score"], rel=1e-4)


def test_qa_assesses_a_chain_of_transforms_as_apply_takes_it(cli, tiny_weights, images, tmp_path):
    """``qa -t A -t '[A,1]'`` (an affine and its inverse: the headers again) scores what the
    headers score; ``-t A`` alone what ``-a A`` scores."""
    moving, fixed = images
    affine = tmp_path / "a.tfm"
    turn = sitk.Euler3DTransform((12.0, 11.0, 10.0), 0.2, -0.1, 0.15, (3.0, -2.0, 1.0))
    sitk.WriteTransform(turn, str(affine))

    def score(*options):
        result = cli("qa", moving, fixed, *options, "-o", tmp_path, "--json", "-", "--force")
        assert result.code == 0, result.err
        return json.loads(result.out)

    both = score("-t", affine, "-t", f"[{affine},1]")
    assert both["before"]["score"] == pytest.approx(both["score"], rel=1e-3)
    assert score("-t", affine)["score"] == pytest.approx(score("-a", affine)["score"], rel=1e-6)
    result = cli("qa", moving, fixed, "-w", fixed, "-t", affine, "-o", tmp_path)
    assert result.code == 2 and "either --warped" in result.err


def test_qa_fail_on_exits_with_its_own_status(cli, tiny_weights, images, tmp_path, monkeypatch):
    from carctl import qa

    moving, fixed = images
    result = cli("qa", fixed, fixed, "-o", tmp_path, "--fail-on", "failed", "-q")
    assert result.code == 0, result.err  # an image against itself
    monkeypatch.setattr(qa, "THRESHOLDS", {"suspect": 0.0, "failed": 0.0})  # everything fails
    result = cli("qa", moving, fixed, "-o", tmp_path, "--fail-on", "failed", "-q", "--force")
    assert result.code == 3
    result = cli("qa", moving, fixed, "-o", tmp_path, "--fail-on", "bad", "--force")
    assert result.code == 2 and "--fail-on" in result.err


def test_qa_refuses_both_warped_and_field(cli, tiny_weights, images, tmp_path):
    moving, fixed = images
    result = cli("qa", moving, fixed, "-w", fixed, "-f", fixed, "-o", tmp_path)
    assert result.code == 2 and "either --warped" in result.err


def test_qa_with_corrupted_weights_is_a_one_line_error(cli, tiny_weights, images, tmp_path):
    (tiny_weights / "imse.safetensors").write_bytes(b"not weights")
    moving, fixed = images
    result = cli("qa", moving, fixed, "-o", tmp_path)
    assert result.code == 1
    assert result.err.count("\n") == 1 and "corrupted" in result.err


def test_weights_list_and_verify(cli, tiny_weights):
    """``list`` shows the steps done in all (a fine-tuned card's, not its last run's
    ``--steps``); ``verify`` refuses a corrupted file."""
    import json

    result = cli("weights", "verify")
    assert result.code == 0 and "imse: ok" in result.out
    card = tiny_weights / "imse.json"
    data = json.loads(card.read_text())
    data["training"].update(steps_done=31234, settings={"steps": 6000})
    card.write_text(json.dumps(data))
    listed = cli("weights", "list").out
    assert "imse-evaluator" in listed and "31234" in listed and "6000" not in listed
    (tiny_weights / "imse.safetensors").write_bytes(b"x")
    assert cli("weights", "verify").code == 1


def test_translate_writes_an_image_on_the_references_grid(cli, tiny_weights, images, tmp_path):
    moving, fixed = images
    out = tmp_path / "t.nii.gz"
    result = cli("translate", moving, "-r", fixed, "-o", out)
    assert result.code == 0, result.err
    assert f"wrote {out}" in result.err  # it said nothing
    image = sitk.ReadImage(str(out))
    assert np.isfinite(sitk.GetArrayFromImage(image)).all()
    assert image.GetDirection() == sitk.ReadImage(str(fixed)).GetDirection()


def test_register_reports_quality_before_and_after(cli, tiny_weights, images, tmp_path):
    moving, fixed = images
    args = ["register", moving, fixed, "-o", tmp_path, "--method", "rigid"]
    result = cli(*args, "--qa", "--json", "-")
    assert result.code == 0, result.err
    summary = json.loads(result.out)
    assert {"before", "after"} <= summary["qa"].keys()
    assert summary["qa"]["after"]["verdict"] in ("ok", "suspect", "failed")
    result = cli(
        "register",
        moving,
        fixed,
        "-o",
        tmp_path,
        "--method",
        "rigid",
        "--no-qa",
        "--json",
        "-",
        "--force",
    )
    assert "qa" not in json.loads(result.out)


def test_train_imse_smoke(cli, tmp_path):
    """A few steps of ``carctl train imse`` on a tiny data folder write weights and a card."""
    data = tmp_path / "data" / "oasis-t1-a"
    data.mkdir(parents=True)
    write(make_image((40, 40, 40), seed=5), data / "t1.nii.gz")
    validation = tmp_path / "data" / "ct-mr-pat002"
    validation.mkdir()
    write(make_image((36, 36, 36), seed=6), validation / "pat002_ct.hdr")
    out = tmp_path / "run"
    args = ["train", "imse", "--data", tmp_path / "data", "--out", out, "--steps", "4"]
    args += ["--batch", "1", "--patch", "16", "--width", "4", "--blocks", "1"]
    result = cli(*args, "--validate-every", "2", "-q")
    assert result.code == 0, result.err
    card = json.loads((out / "imse.json").read_text())
    assert card["training"]["settings"]["steps"] == 4
    assert card["training"]["data"] == ["oasis-t1-a/t1.nii.gz"]
    assert card["architecture"]["config"]["width"] == 4
    assert card["architecture"]["config"]["lookup"] == 1024
    refused = cli(*args, "--lookup", "-1", "-q")
    assert refused.code == 2 and "--lookup" in refused.err
    resumed = cli(*args, "--steps", "8", "--resume", "--stop-at", "6", "-q")
    assert resumed.code == 0, resumed.err
    assert json.loads((out / "state.json").read_text())["step"] == 6
    card = json.loads((out / "imse.json").read_text())
    assert card["training"]["steps_done"] == 6 and card["training"]["settings"]["steps"] == 8


@pytest.mark.parametrize("loss", ["imse", "mind+imse"])
def test_register_with_the_imse_loss(cli, tiny_weights, images, tmp_path, loss):
    moving, fixed = images
    args = ["register", moving, fixed, "-o", tmp_path, "--loss", loss, "--iterations", "3"]
    result = cli(*args, "--no-qa", "--json", "-")
    assert result.code == 0, result.err
    summary = json.loads(result.out)
    assert summary["loss"] == loss
    deformable = next(s for s in summary["stages"] if s["name"] == "deformable")
    assert np.isfinite(deformable["loss_after"])
    # the rigid and affine stages compare MIND features (IMSE is for the deformable stage)
    assert all(level["loss"] == "mind" for level in summary["levels"][:1])


def test_qa_and_translate_refuse_a_constant_image(cli, tiny_weights, images, tmp_path):
    """A constant fixed image validates nothing: qa read such a pair as `ok`."""
    moving, fixed = images
    flat = sitk.ReadImage(str(fixed)) * 0
    flat_path = write(flat, tmp_path / "flat.nii.gz")
    for args, name in (
        (("qa", moving, flat_path, "-o", tmp_path / "qa"), "fixed"),
        (("qa", flat_path, fixed, "-o", tmp_path / "qa"), "moving"),
        (("translate", moving, "-r", flat_path, "-o", tmp_path / "t.nii.gz"), "reference"),
    ):
        result = cli(*args)
        assert result.code == 1, result.err
        assert result.err.strip().splitlines()[-1] == (
            f"carctl: error: the {name} image is constant (every finite voxel 0): "
            "there is nothing to align"
        )
    assert not (tmp_path / "t.nii.gz").exists()


def test_qa_and_translate_refuse_images_of_another_dimension(cli, tiny_weights, images, tmp_path):
    """Found by a sweep: a 2-D image with a 3-D one stopped qa and translate with internal
    errors (IndexError, a broadcast ValueError); register and apply said so in one line."""
    moving, fixed = images
    plane = write(make_image((22, 22), spacing=(1.0, 1.0), seed=5), tmp_path / "plane.nii.gz")
    out, translated = ("-o", tmp_path / "qa"), ("-o", tmp_path / "t.nii.gz")
    for args, said in (
        (("qa", plane, fixed, *out), "the moving image is 2-D and the fixed image 3-D"),
        (("qa", moving, plane, *out), "the moving image is 3-D and the fixed image 2-D"),
        (
            ("qa", moving, fixed, "-w", plane, *out),
            "the moving image is 3-D and the warped image 2-D",
        ),
        (
            ("translate", moving, "-r", plane, *translated),
            "the input image is 3-D and the reference image 2-D",
        ),
        (
            ("translate", plane, "-r", fixed, *translated),
            "the input image is 2-D and the reference image 3-D",
        ),
    ):
        result = cli(*args)
        assert result.code == 1 and result.err.strip() == f"carctl: error: {said}", result.err


def test_qa_scores_images_apart_as_failed_without_a_number(cli, tiny_weights, images, tmp_path):
    """No voxel of the anatomy where both images are present: the score was NaN, and
    ``--json`` stopped with an internal error (NaN is not JSON). Now the score is null, the
    verdict ``failed``, and the table says why."""
    _, fixed = images
    far = write(make_image((22, 22, 22), origin=(1000, 0, 0), seed=4), tmp_path / "far.nii.gz")
    result = cli("qa", far, fixed, "-o", tmp_path / "qa", "--json", "-")
    assert result.code == 0, result.err
    report = json.loads(result.out)
    assert report["score"] is None and report["verdict"] == "failed"
    table = cli("qa", far, fixed, "-o", tmp_path / "qa2")
    assert table.code == 0 and "none (the images do not overlap)" in table.out


def test_qa_reads_non_finite_voxels_as_the_registration_does(cli, tiny_weights, images, tmp_path):
    """A block of NaN voxels in the moving image (MetaImage keeps them) made the score NaN:
    the band-limited resampling spread them. They now read as 0, as in ``register``."""
    moving, fixed = images
    image = sitk.ReadImage(str(moving))
    array = sitk.GetArrayFromImage(image)
    array[8:14, 8:14, 8:14] = np.nan
    holed = sitk.GetImageFromArray(array)
    holed.CopyInformation(image)
    path = write(holed, tmp_path / "holed.mha")
    result = cli("qa", path, fixed, "-o", tmp_path / "qa", "--json", "-")
    assert result.code == 0, result.err
    assert np.isfinite(json.loads(result.out)["score"])


@pytest.mark.parametrize("size", [(40, 36), (3, 3, 3)])
def test_qa_on_2d_and_tiny_images(cli, tiny_weights, tmp_path, size):
    """The shipped evaluator is 3-D and needs more than one voxel at a quarter of the
    resolution: a 2-D pair and a 3 x 3 x 3 pair stopped with internal errors. The score needs
    no evaluator; IMSE's mean error is then null."""
    fixed = write(make_image(size, seed=3), tmp_path / "f.nii.gz")
    moving = write(make_image(size, seed=4), tmp_path / "m.nii.gz")
    result = cli("qa", moving, fixed, "-o", tmp_path / "qa", "--json", "-")
    assert result.code == 0, result.err
    report = json.loads(result.out)
    assert report["imse_mean_error"] is None and np.isfinite(report["score"])


def test_register_qa_after_headers_apart_is_no_warning(cli, tiny_weights, images, tmp_path):
    """Headers that leave the images apart have no score (none before); a registration that
    brings them together was reported as "looks worse than its input" and batch.csv wrote
    "nan" for the score it did not have."""
    from carctl.cli.batch import _measures

    _, fixed = images
    far = write(make_image((22, 22, 22), origin=(1000, 0, 0), seed=3), tmp_path / "far.nii.gz")
    result = cli("register", far, fixed, "-o", tmp_path / "o", "--qa", "--json", "-")
    assert result.code == 0, result.err
    quality = json.loads(result.out)["qa"]
    assert quality["before"]["score"] is None and quality["after"]["score"] is not None
    assert "looks worse" not in result.err
    row = _measures(
        {"qa": {"before": {"score": float("nan")}, "after": {"score": 1.0, "verdict": "ok"}}}
    )
    assert row["qa_before"] is None and row["qa_after"] == 1.0


def test_qa_of_a_warped_image_leaves_out_the_fill_beyond_the_moving_image(
    cli, tiny_weights, tmp_path
):
    """A moving image of 12 of the fixed image's 36 slices, warped onto the fixed grid: the
    planes filled with 0 beyond it are absent, as they are when the transform is given
    (scored as present, the fill read as misalignment)."""
    fixed_image = make_image((30, 28, 36), spacing=(1.5, 1.5, 1.5), seed=8)
    fixed = write(fixed_image, tmp_path / "f.nii.gz")
    moving = write(fixed_image[:, :, 12:24], tmp_path / "m.nii.gz")
    warped = tmp_path / "w.nii.gz"
    assert cli("apply", moving, "-r", fixed, "-o", warped).code == 0
    result = cli("qa", moving, fixed, "-w", warped, "-o", tmp_path / "qa", "--json", "-")
    assert result.code == 0, result.err
    report = json.loads(result.out)
    # the warped image is the moving one through its header: the same score as before
    assert report["score"] == pytest.approx(report["before"]["score"], abs=0.05)


def test_content_box_of_a_warped_image():
    from carctl import qa
    from carctl.io import Image
    from carctl.spatial.grid import Grid

    grid = Grid((6, 5, 4), (1.0, 2.0, 3.0), (10.0, 0.0, -5.0), tuple(np.eye(3).ravel()))
    array = np.zeros((4, 5, 6), np.float32)
    array[1:3, 1:5, 2:4] = 7.0
    cut = qa.content(Image(array, grid))
    assert cut.array.shape == (2, 4, 2) and (cut.array == 7).all()
    assert cut.grid.size == (2, 4, 2) and cut.grid.origin == (12.0, 2.0, -2.0)
    whole = Image(np.ones((4, 5, 6), np.float32), grid)
    assert qa.content(whole) is whole


def test_qa_writes_its_outputs_together_or_none(cli, tiny_weights, images, tmp_path, monkeypatch):
    """Found by a sweep: a picture that could not be written (a full disk) left the error map
    in place, and the rerun refused it as existing."""
    from carctl import qa

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(qa, "png_bytes", full)
    moving, fixed = images
    result = cli("qa", moving, fixed, "-o", tmp_path / "qa", "-q")
    assert result.code == 1 and "No space left on device" in result.err
    assert not (tmp_path / "qa").exists() or not list((tmp_path / "qa").glob("*qa*"))
