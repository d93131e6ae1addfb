"""The command line as a user meets it: answers, outputs, and one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from conftest import make_image, rotation, write

import carctl


def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)


def _main_in_fresh_python(runs: list[list[str]]):
    """``carctl`` (``carctl.cli.main``) with each argument list of ``runs`` in turn, in one
    fresh interpreter: its completed process, each run's exit code ("none" when it did not
    exit) and which of torch, SimpleITK and numpy were loaded at the end."""
    probe = (
        "import json, sys\n"
        "from carctl.cli import main\n"
        "codes = []\n"
        f"for args in {runs!r}:\n"
        "    try:\n"
        "        main(args)\n"
        "        codes.append('none')\n"
        "    except SystemExit as e:\n"
        "        codes.append(e.code)\n"
        "heavy = sorted(m for m in ('torch', 'SimpleITK', 'numpy') if m in sys.modules)\n"
        "print('probe:', json.dumps([codes, heavy]))\n"
    )
    result = _python(probe)
    line = next((x for x in result.stdout.splitlines() if x.startswith("probe: ")), None)
    assert line is not None, (result.stdout, result.stderr)
    codes, heavy = json.loads(line[len("probe: ") :])
    return result, codes, heavy


def test_help_and_version_do_not_import_torch():
    commands = ["apply", "batch", "points", "evaluate", "info", "demo"]
    runs = [["--help"], ["--version"]] + [[c, "--help"] for c in commands]
    result, codes, heavy = _main_in_fresh_python(runs)
    assert result.returncode == 0, result.stderr
    assert all(code in (0, None) for code in codes), codes
    assert heavy == []
    assert "Usage: carctl" in result.stdout


def test_bad_input_is_refused_before_loading_torch(tmp_path):
    """A missing or unreadable image or transform file and a bad option value are refused
    before torch loads (about a second): clinic pipelines that check many inputs hear at
    once. ``register``, ``qa``, ``translate`` and ``batch`` (its list and every input in it)."""
    image = str(write(make_image((10, 9, 8)), tmp_path / "image.nii.gz"))
    text = tmp_path / "notes.txt"
    text.write_text("not an image")
    missing = str(tmp_path / "missing.nii.gz")
    listing = tmp_path / "listing.csv"
    listing.write_text(f"moving,fixed\n{image},{missing}\n")
    out = ["-o", str(tmp_path / "out")]
    cases = [
        (["register", missing, image, *out], "no such file"),
        (["register", image, str(text), *out], "cannot read image"),
        (["register", image, image, "--method", "bogus", *out], "unknown --method 'bogus'"),
        (["register", image, image, "--loss", "bogus", *out], "unknown --loss 'bogus'"),
        (["register", image, image, "--threads", "0", *out], "--threads must be from 1 to 1024"),
        (["register", image, image, "--initial-affine", "a.mat", *out], "no such file: 'a.mat'"),
        (["qa", missing, image, *out], "no such file"),
        (["qa", image, image, "--field", "u.nii", *out], "no such file: 'u.nii'"),
        (["qa", image, image, "--affine", "a.mat", *out], "no such file: 'a.mat'"),
        (["qa", image, image, "-t", "[a.mat,1]", *out], "no such file: 'a.mat'"),
        (["translate", missing, "-r", image, "-o", str(tmp_path / "t.nii.gz")], "no such file"),
        (["batch", str(tmp_path / "pairs.csv"), *out], "no such pair list"),
        (["batch", str(listing), *out], "no such fixed: '"),
    ]
    result, codes, heavy = _main_in_fresh_python([args for args, _ in cases])
    assert result.returncode == 0, result.stderr
    assert all(code in (1, 2) for code in codes), codes  # every one exited, as an error
    assert "torch" not in heavy
    errors = result.stderr.strip().splitlines()
    assert len(errors) == len(cases), result.stderr
    for error, (args, fragment) in zip(errors, cases, strict=True):
        assert error.startswith("carctl: error: ") and fragment in error, (args, error)


def test_module_entry_point_and_version():
    result = subprocess.run(
        [sys.executable, "-m", "carctl", "--version"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0
    assert result.stdout.strip() == f"carctl {carctl.__version__}"


def test_program_exit_after_torch_keeps_output_and_status(tmp_path):
    """``python -m carctl`` leaves without the interpreter's teardown once torch is loaded:
    what was printed still arrives, outputs are complete, and errors keep their exit code."""
    reference = write(make_image((10, 9, 8)), tmp_path / "reference.nii.gz")
    moving = write(make_image((10, 9, 8), spacing=(1.5, 1.5, 1.5)), tmp_path / "moving.nii.gz")
    output = tmp_path / "out.nii.gz"
    command = [sys.executable, "-m", "carctl", "apply", moving, "-r", reference, "-o", output]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "wrote" in done.stderr
    assert sitk.GetArrayFromImage(sitk.ReadImage(str(output))).shape == (8, 9, 10)
    again = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert again.returncode != 0 and again.stderr.startswith("carctl: error:")


def test_every_command_is_listed(cli):
    result = cli("--help")
    assert result.code == 0
    for command in ("info", "apply", "evaluate", "demo", "register", "batch"):
        assert command in result.out


def test_paths_with_brackets_are_printed_as_they_are(cli, tmp_path):
    """rich read "[b]" in a printed path as markup and dropped it: ``info '[b].nii.gz'`` was
    titled ``.nii.gz`` and ``apply`` said it wrote ``.nii.gz``."""
    image = write(make_image((10, 9, 8)), tmp_path / "[b].nii.gz")
    assert cli("info", image).out.splitlines()[0].strip().endswith("[b].nii.gz")
    wrote = cli("apply", image, "-r", image, "-o", tmp_path / "[w].nii.gz")
    assert wrote.code == 0 and "[w].nii.gz" in wrote.err


def test_ctrl_c_says_interrupted(capsys):
    """typer turns Ctrl-C into a silent exit 130: the run stopped without a word."""
    from carctl.cli.console import run_guarded

    def interrupted():
        raise SystemExit(130)

    assert run_guarded(interrupted) == 130
    assert capsys.readouterr().err == "carctl: error: interrupted\n"


def test_ctrl_c_while_writing_leaves_no_partial_output(tmp_path, monkeypatch):
    """Ctrl-C while register wrote its field in a thread: twice in 13 tries a `.carctl-*`
    folder with a partial field stayed behind (the group removed its staging folders while
    the writer went on). Now the writers end first, through further Ctrl-C too, and then the
    interrupt is passed on (a sweep found one that came while waiting swallowed: exit 0)."""
    import time

    import carctl.spatial.files as files
    from carctl.cli import register as command
    from carctl.config import RegistrationOptions

    writes = files.write_field

    def slow_write_field(*args, **kwargs):
        time.sleep(0.3)
        return writes(*args, **kwargs)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(files, "write_field", slow_write_field)
    monkeypatch.setattr(files, "write_affine", interrupted)
    moving = write(make_image((12, 11, 10), seed=1), tmp_path / "m.nii.gz")
    fixed = write(make_image((12, 11, 10), seed=2), tmp_path / "f.nii.gz")
    out = tmp_path / "out"
    outputs = {k: str(out / f"{k}.nii.gz") for k in ("warped", "field")}
    outputs["affine"] = str(out / "affine.mat")
    with pytest.raises(KeyboardInterrupt):
        command.run(
            str(moving),
            str(fixed),
            outputs,
            RegistrationOptions(method="rigid"),
            inputs=[moving, fixed],
            fixed_mask=None,
            moving_mask=None,
            labels=None,
            threads=1,
            quiet=True,
            force=False,
            started=time.perf_counter(),
            qa=False,
        )
    time.sleep(0.5)  # a writer still at work would write now
    assert list(out.iterdir()) == []

    class Pool:  # a second Ctrl-C while waiting for the writers
        calls = 0

        def shutdown(self, wait: bool) -> None:
            self.calls += 1
            if self.calls == 1:
                raise KeyboardInterrupt

    pool = Pool()
    with pytest.raises(KeyboardInterrupt):  # passed on once the writers are done
        command.finish(pool)
    assert pool.calls == 2


def test_json_holds_null_for_non_finite_numbers(capsys):
    """JSON has no NaN: a score over no voxels or a NaN field's Jacobian stopped every
    ``--json`` output with an internal error; they are written as null."""
    from carctl.cli.console import emit_json

    payload = {"a": float("nan"), "b": [np.float32("inf"), 1.5], "c": {"d": np.float64("nan")}}
    emit_json(payload, "-", force=False)
    assert json.loads(capsys.readouterr().out) == {"a": None, "b": [None, 1.5], "c": {"d": None}}


def test_help_paragraphs_are_not_broken_mid_sentence(cli, monkeypatch):
    """The docstrings' source line breaks do not reach the help: on a wide terminal each
    command's summary and each paragraph of its help is one line (typer's rich help kept
    them, so summaries came out broken after 'then' or 'checked')."""
    monkeypatch.setenv("COLUMNS", "300")
    listing = cli("--help").out
    assert "the pretrained network, then deformable optimisation." in listing
    assert "every input are checked first, then each pair" in listing
    own = cli("points", "--help").out
    assert "points of the FIXED image come out where they lie in the MOVING image." in own
    assert "then by the affine (-t: in the order given); with neither" in cli("apply", "--help").out
    assert "contrast-invariance loss" in cli("train", "--help").out.split("car ")[-1]


# --- info ----------------------------------------------------------------------------------------


def test_info_reports_geometry(cli, tmp_path):
    direction = np.array([[0, 0, -1], [1, 0, 0], [0, 1, 0.0]])
    path = write(
        make_image((6, 5, 4), spacing=(0.5, 1.0, 2.5), origin=(1, 2, 3), direction=direction),
        tmp_path / "x.nii.gz",
    )
    result = cli("info", path, "--json", "-")
    assert result.code == 0, result.err
    facts = json.loads(result.out)
    assert facts["size"] == [6, 5, 4]
    assert facts["spacing"] == pytest.approx([0.5, 1.0, 2.5])
    assert facts["origin"] == pytest.approx([1, 2, 3], abs=1e-5)
    assert facts["orientation"] == "PSR"
    assert facts["oblique"] is False
    np.testing.assert_allclose(facts["direction"], direction, atol=1e-6)
    assert 0 <= facts["minimum"] < facts["maximum"] <= 100
    table = cli("info", path)
    assert table.code == 0 and "PSR" in table.out and "0.5 x 1 x 2.5" in table.out


def test_info_counts_non_finite_voxels_and_shows_whole_numbers_in_full(cli, tmp_path):
    """Found by a sweep: half of an image +Inf showed only its finite range, and a uint32
    image of 4000000000..4000000949 read "4e+09" for both ends."""
    array = np.full((4, 5, 6), 4_000_000_000, np.uint32)
    array[0, 0, 0] += 949
    big = sitk.GetImageFromArray(array)
    result = cli("info", write(big, tmp_path / "big.nrrd"))
    assert result.code == 0 and "4000000949" in result.out and "4000000000" in result.out
    values = np.arange(120, dtype=np.float32).reshape(4, 5, 6)
    values[:2] = np.inf
    facts = json.loads(
        cli("info", write(sitk.GetImageFromArray(values), tmp_path / "i.nrrd"), "--json", "-").out
    )
    assert facts["non_finite_voxels"] == 60 and facts["maximum"] == 119.0


def test_info_reports_ct_padding(cli, tmp_path):
    """What register and qa leave out of a CT (carctl.padding), shown where a user looks."""
    array = np.full((6, 20, 20), -1024, np.int16)
    array[:, 5:15, 5:15] = 40
    array[:, :2] = -3024
    image = sitk.GetImageFromArray(array)
    path = write(image, tmp_path / "ct.nii.gz")
    facts = json.loads(cli("info", path, "--json", "-").out)
    assert facts["padding"] == {"value": -3024.0, "voxels": 6 * 3 * 20}  # and the next row
    assert "register leaves it out" in cli("info", path).out
    unpadded = write(sitk.GetImageFromArray(np.maximum(array, -1024)), tmp_path / "air.nii.gz")
    assert "padding" not in json.loads(cli("info", unpadded, "--json", "-").out)


def test_info_flags_oblique_images(cli, tmp_path):
    path = write(make_image((4, 4, 4), direction=rotation(0.3, 0.0, 0.0)), tmp_path / "o.nii.gz")
    assert json.loads(cli("info", path, "--json", "-").out)["oblique"] is True


def test_info_describes_affines_and_fields(cli, tmp_path):
    """An ITK affine: its rotation angle, scales, determinant and translation read off the
    matrix (as ANTs and SimpleITK write them); a displacement field: its grid, displacement
    lengths and Jacobian; a 2-component 3-D image is not a field and is refused as an image."""
    from carctl.spatial.files import write_affine, write_field
    from carctl.spatial.grid import Grid
    from carctl.spatial.transform import Affine, to_displacement

    angle = 0.2  # radians, about z
    matrix = rotation(0.0, 0.0, angle) @ np.diag([1.1, 0.9, 1.0])
    affine = Affine(matrix, [3.0, -4.0, 0.0], [1.0, 2.0, 3.0])
    write_affine(affine, tmp_path / "a.mat")
    sitk.WriteTransform(
        sitk.AffineTransform(matrix.ravel().tolist(), (3.0, -4.0, 0.0), (1.0, 2.0, 3.0)),
        str(tmp_path / "a.tfm"),
    )
    for name in ("a.mat", "a.tfm"):
        result = cli("info", tmp_path / name, "--json", "-")
        assert result.code == 0, result.err
        facts = json.loads(result.out)
        assert facts["kind"].startswith("affine")
        assert facts["rotation_degrees"] == pytest.approx(np.degrees(angle), abs=1e-4)
        assert sorted(facts["scales"]) == pytest.approx([0.9, 1.0, 1.1], abs=1e-6)
        assert facts["determinant"] == pytest.approx(0.99, abs=1e-6)
        assert facts["translation_mm"] == pytest.approx(5.0, abs=1e-6)
        assert facts["reflection"] is False
    flipped = Affine(np.diag([-1.0, 1.0, 1.0]), [0.0, 0.0, 0.0])
    write_affine(flipped, tmp_path / "flip.mat")
    facts = json.loads(cli("info", tmp_path / "flip.mat", "--json", "-").out)
    assert facts["reflection"] is True and facts["determinant"] == pytest.approx(-1.0)
    assert facts["rotation_degrees"] == pytest.approx(0.0, abs=1e-6)  # a mirror: it said 180
    # an ITK composite of affines in HDF5, as apply and register --initial-affine read it
    shift = sitk.TranslationTransform(3, (1.0, 2.0, 3.0))
    composite = sitk.CompositeTransform([sitk.AffineTransform(3), shift])
    sitk.WriteTransform(composite, str(tmp_path / "composite.h5"))
    facts = json.loads(cli("info", tmp_path / "composite.h5", "--json", "-").out)
    assert facts["translation"] == pytest.approx([1.0, 2.0, 3.0])

    grid = Grid((10, 8, 6), (2.0, 2.0, 3.0), (-5.0, 0.0, 5.0), tuple(np.eye(3).ravel()))
    shift = Affine(np.eye(3) * 1.05, [3.0, 4.0, 0.0], [0.0, 0.0, 0.0])
    write_field(to_displacement(grid, [shift]), tmp_path / "f.nii.gz")
    result = cli("info", tmp_path / "f.nii.gz", "--json", "-")
    assert result.code == 0, result.err
    facts = json.loads(result.out)
    assert facts["kind"].startswith("displacement field")
    assert facts["size"] == [10, 8, 6] and facts["spacing"] == pytest.approx([2.0, 2.0, 3.0])
    assert facts["folding_percent"] == 0.0
    assert facts["jacobian_min"] == pytest.approx(1.05**3, abs=1e-4)
    points = grid.points(dtype=torch.float64).numpy()
    lengths = np.linalg.norm(points * 0.05 + np.array([3.0, 4.0, 0.0]), axis=-1)
    assert facts["displacement_max_mm"] == pytest.approx(lengths.max(), rel=1e-4)
    assert facts["displacement_mean_mm"] == pytest.approx(lengths.mean(), rel=1e-4)
    table = cli("info", tmp_path / "f.nii.gz")
    assert table.code == 0 and "displacement max mm" in table.out

    two = sitk.Compose(*(make_image((5, 5, 5), seed=k) for k in range(2)))
    sitk.WriteImage(two, str(tmp_path / "two.nii.gz"))
    refused = cli("info", tmp_path / "two.nii.gz")
    assert refused.code == 1 and "components" in refused.err


def test_info_lists_dicom_series(cli, two_series):
    folder = two_series
    result = cli("info", folder, "--json", "-")
    assert result.code == 0, result.err
    listing = json.loads(result.out)["dicom_series"]
    assert sorted(s["modality"] for s in listing) == ["CT", "MR"]
    assert "size" not in json.loads(result.out)  # several series: nothing chosen
    mr = next(s for s in listing if s["modality"] == "MR")
    chosen = json.loads(cli("info", folder, "--series", mr["uid"], "--json", "-").out)
    assert chosen["size"] == [256, 256, 3]


# --- apply ---------------------------------------------------------------------------------------


@pytest.fixture
def pair(tmp_path) -> tuple[Path, Path]:
    moving = write(
        make_image((20, 18, 16), spacing=(1.0, 1.2, 1.4), origin=(-10, -9, -8), seed=1),
        tmp_path / "moving.nii.gz",
    )
    fixed = write(
        make_image(
            (16, 15, 14),
            spacing=(1.3, 1.1, 1.5),
            origin=(8, -7, -6),
            direction=np.diag([-1.0, 1.0, 1.0]),
            seed=2,
        ),
        tmp_path / "fixed.nii.gz",
    )
    return moving, fixed


def test_apply_through_the_headers_matches_sitk(cli, pair, tmp_path):
    moving, fixed = pair
    out = tmp_path / "out.nii.gz"
    result = cli("apply", moving, "--reference", fixed, "-o", out)
    assert result.code == 0, result.err
    expected = sitk.Resample(
        sitk.ReadImage(str(moving)),
        sitk.ReadImage(str(fixed)),
        sitk.Transform(),
        sitk.sitkLinear,
        0.0,
    )
    got = sitk.ReadImage(str(out))
    assert got.GetSize() == expected.GetSize() and got.GetDirection() == pytest.approx(
        expected.GetDirection()
    )
    np.testing.assert_allclose(
        sitk.GetArrayFromImage(got), sitk.GetArrayFromImage(expected), atol=1e-3
    )


def test_apply_resamples_every_volume_of_a_4d_image(cli, pair, tmp_path, monkeypatch):
    """A 4-D image (a time series) comes out 4-D on the reference grid, its fourth axis kept,
    each volume as ``apply FILE:N`` resamples it alone (read two volumes at a time here, in
    three chunks); a fill its kept voxel type cannot hold is refused as for a 3-D image."""
    import carctl.resample

    moving, fixed = pair
    geometry = sitk.ReadImage(str(moving))
    volumes = [
        make_image(geometry.GetSize(), geometry.GetSpacing(), geometry.GetOrigin(), seed=s)
        for s in range(5)
    ]
    series = write(sitk.JoinSeries(volumes, 3.0, 2.0), tmp_path / "series.nii.gz")
    turn = sitk.AffineTransform(3)
    turn.SetMatrix(rotation(0.1, 0.05, -0.08).ravel().tolist())
    turn.SetTranslation((1.5, -1.0, 0.5))
    affine = tmp_path / "affine.mat"
    sitk.WriteTransform(turn, str(affine))
    voxels = np.prod(geometry.GetSize())
    monkeypatch.setattr(carctl.resample, "VOLUME_CHUNK_VOXELS", int(2 * voxels))
    out = tmp_path / "out.nii.gz"
    result = cli("apply", series, "-r", fixed, "-t", affine, "-o", out)
    assert result.code == 0, result.err
    assert "5 volumes" in result.err
    warped = sitk.ReadImage(str(out))
    assert warped.GetSize() == (16, 15, 14, 5)
    assert warped.GetSpacing()[3] == 2.0 and warped.GetOrigin()[3] == 3.0
    every = sitk.GetArrayFromImage(warped)
    for n in (0, 2, 4):
        alone = tmp_path / f"alone{n}.nii.gz"
        assert cli("apply", f"{series}:{n}", "-r", fixed, "-t", affine, "-o", alone).code == 0
        expected = sitk.GetArrayFromImage(sitk.ReadImage(str(alone)))
        np.testing.assert_array_equal(every[n], expected)
    labels = sitk.JoinSeries([sitk.Cast(v > 0.5, sitk.sitkUInt8) for v in volumes])
    labels_path = write(labels, tmp_path / "labels.nii.gz")
    unused = tmp_path / "labels_out.nii.gz"
    refused = cli("apply", labels_path, "-r", fixed, "-n", "label", "--fill", "-5", "-o", unused)
    assert refused.code == 1 and "does not fit the image's uint8 voxels" in refused.err


def test_info_describes_a_4d_file_by_its_volumes(cli, tmp_path):
    """``info`` on a 4-D file refused it ('choose one as FILE:N'): now its volumes' grid, how
    many, the fourth axis, and the range over all of them."""
    volumes = [make_image((6, 5, 4), (1.0, 1.0, 2.0), seed=s) for s in range(3)]
    volumes[2] = volumes[2] + 100.0
    series = write(sitk.JoinSeries(volumes, 7.0, 0.5), tmp_path / "series.nii.gz")
    result = cli("info", series, "--json", "-")
    assert result.code == 0, result.err
    facts = json.loads(result.out)
    assert facts["size"] == [6, 5, 4] and facts["spacing"] == [1.0, 1.0, 2.0]
    assert (facts["volumes"], facts["volume_spacing"], facts["volume_origin"]) == (3, 0.5, 7.0)
    assert facts["dimension"] == 4 and facts["volume_direction"] == 1.0
    assert facts["maximum"] > 100.0
    one = cli("info", f"{series}:1", "--json", "-")
    assert "volumes" not in json.loads(one.out)


def test_apply_label_interpolation_keeps_pixel_type_and_labels(cli, pair, tmp_path):
    moving, fixed = pair
    labels = sitk.Cast(sitk.ReadImage(str(moving)) > 50, sitk.sitkUInt8) * 3
    labels_path = write(labels, tmp_path / "labels.nii.gz")
    out = tmp_path / "warped_labels.nii.gz"
    assert cli("apply", labels_path, "-r", fixed, "-o", out, "--interp", "label").code == 0
    warped = sitk.ReadImage(str(out))
    assert warped.GetPixelID() == sitk.sitkUInt8
    assert set(np.unique(sitk.GetArrayViewFromImage(warped))) <= {0, 3}


def test_apply_refuses_a_fill_the_kept_pixel_type_cannot_hold(cli, pair, tmp_path):
    """``--fill -5`` on a uint8 label map wrote 251 outside the image (a label invented), 2.7
    was cut to 2, both with exit 0."""
    moving, fixed = pair
    labels = sitk.Cast(sitk.ReadImage(str(moving)) > 50, sitk.sitkUInt8) * 3
    labels_path = write(labels, tmp_path / "labels.nii.gz")
    out = tmp_path / "warped.nii.gz"
    for interp, fill in (("label", "-5"), ("nearest", "1000"), ("nearest", "2.7")):
        result = cli(
            "apply", labels_path, "-r", fixed, "-o", out, "--interp", interp, "--fill", fill
        )
        _assert_one_line_error(result, 1, "does not fit the image's uint8 voxels", "0 to 255")
    assert not out.exists()
    assert (
        cli("apply", labels_path, "-r", fixed, "-o", out, "--interp", "label", "--fill", "7").code
        == 0
    )
    assert 7 in np.unique(sitk.GetArrayViewFromImage(sitk.ReadImage(str(out))))
    # linear interpolation writes floats: any fill
    assert (
        cli("apply", labels_path, "-r", fixed, "-o", tmp_path / "f.nii.gz", "--fill", "-5").code
        == 0
    )


def test_affines_that_are_not_finite_or_of_another_dimension(cli, pair, tmp_path):
    """Found by a sweep: an affine with a NaN translation was an internal error in `info` and
    `qa`, an all-zero image from `apply` and NaN points from `points` and `evaluate` (exit 0);
    a 2-D affine was an internal error in `qa` and mapped x and y of 3-D points alone."""
    moving, fixed = pair
    nan = sitk.AffineTransform(3)
    nan.SetTranslation((float("nan"), 0.0, 0.0))
    sitk.WriteTransform(nan, str(tmp_path / "nan.mat"))
    flat = sitk.AffineTransform(2)
    flat.SetTranslation((1.0, 2.0))
    sitk.WriteTransform(flat, str(tmp_path / "flat.mat"))
    points = tmp_path / "p.csv"
    points.write_text("x,y,z\n1,2,3\n4,5,6\n")
    out = tmp_path / "out"
    landmarks = ["evaluate", "--fixed-points", points, "--moving-points", points, "-a"]
    for args in (
        ["info"],
        ["qa", moving, fixed, "-o", out, "-a"],
        ["apply", moving, "-r", fixed, "-o", out / "w.nii.gz", "-a"],
        ["points", points, "-o", out / "p.csv", "-a"],
        landmarks,
    ):
        result = cli(*args, tmp_path / "nan.mat")
        _assert_one_line_error(result, 1, "holds an affine that is not finite")
    result = cli("qa", moving, fixed, "-o", out, "-a", tmp_path / "flat.mat")
    _assert_one_line_error(result, 1, "is a 2-D transform; the images are 3-D")
    for args in (["points", points, "-o", out / "p.csv", "-a"], landmarks):
        result = cli(*args, tmp_path / "flat.mat")
        _assert_one_line_error(result, 1, "3-D points, where 2-D ones are read")
    assert not out.exists() or not any(out.iterdir())


def _assert_one_line_error(result, code: int, *fragments: str) -> None:
    assert result.code == code, (result.code, result.err)
    lines = result.err.strip().splitlines()
    assert len(lines) == 1, result.err
    assert lines[0].startswith("carctl: error: ")
    assert "Traceback" not in result.err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def _only(folder: Path, *names: str) -> None:
    assert sorted(p.name for p in folder.iterdir()) == sorted(names)


def test_apply_missing_input(cli, pair, tmp_path):
    _, fixed = pair
    result = cli("apply", tmp_path / "absent.nii.gz", "-r", fixed, "-o", tmp_path / "out.nii.gz")
    _assert_one_line_error(result, 1, "no such file or directory", "absent.nii.gz")
    _only(tmp_path, "moving.nii.gz", "fixed.nii.gz")


def test_apply_truncated_input(cli, pair, tmp_path):
    moving, fixed = pair
    cut = tmp_path / "cut.nii.gz"
    data = moving.read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    result = cli("apply", cut, "-r", fixed, "-o", tmp_path / "out.nii.gz")
    _assert_one_line_error(result, 1, "cannot read image", "cut.nii.gz")
    _only(tmp_path, "moving.nii.gz", "fixed.nii.gz", "cut.nii.gz")


def test_apply_non_image(cli, pair, tmp_path):
    _, fixed = pair
    notes = tmp_path / "notes.nii"
    notes.write_text("not an image\n")
    result = cli("apply", notes, "-r", fixed, "-o", tmp_path / "out.nii.gz")
    _assert_one_line_error(result, 1, "cannot read image", "notes.nii")
    assert not (tmp_path / "out.nii.gz").exists()


def test_apply_field_that_is_not_a_field(cli, pair, tmp_path):
    moving, fixed = pair
    result = cli("apply", moving, "-r", fixed, "--field", moving, "-o", tmp_path / "out.nii.gz")
    _assert_one_line_error(result, 1, "is not a displacement field")
    assert not (tmp_path / "out.nii.gz").exists()


def test_apply_unreadable_affine(cli, pair, tmp_path):
    moving, fixed = pair
    bad = tmp_path / "bad.mat"
    bad.write_bytes(b"\x00\x01garbage")
    result = cli("apply", moving, "-r", fixed, "--affine", bad, "-o", tmp_path / "out.nii.gz")
    _assert_one_line_error(result, 1, "cannot read transform", "bad.mat")
    assert "not an ITK transform file" in result.err  # ITK's message named only the file
    assert not (tmp_path / "out.nii.gz").exists()
    empty, nan = tmp_path / "empty.tfm", tmp_path / "nan.tfm"
    empty.write_bytes(b"")
    nan.write_text(
        "#Insight Transform File V1.0\n#Transform 0\nTransform: AffineTransform_double_3_3\n"
        "Parameters: nan nan nan\nFixedParameters: 0 0 0\n"
    )
    for path, reason in (
        (empty, "the file is empty"),
        (nan, "its parameters are missing or not numbers"),
        (fixed, "is an image, not an affine transform"),
    ):
        result = cli("apply", moving, "-r", fixed, "--affine", path, "-o", tmp_path / "o.nii.gz")
        _assert_one_line_error(result, 1, reason)


def test_two_outputs_naming_one_file_are_refused_before_any_work(cli, pair, tmp_path):
    """--warped and --field naming one file: without --force the run stopped after writing
    the warped image, with --force the field silently replaced it."""
    moving, fixed = pair
    same = tmp_path / "out" / "same.nii.gz"
    for force in ([], ["--force"]):
        result = cli("register", moving, fixed, "--warped", same, "--field", same, *force)
        _assert_one_line_error(result, 1, "--warped and --field name the same file")
        assert not (tmp_path / "out").exists()
    result = cli("qa", moving, fixed, "--error-map", same, "--png", same, "-o", tmp_path)
    _assert_one_line_error(result, 1, "--error-map and --png name the same file")


def test_outputs_that_cannot_be_written_are_refused_before_any_work(
    cli, pair, tmp_path, monkeypatch
):
    """A file in the output's way, a folder that takes no file (read-only, immutable) and a
    disk that fills up: "internal error" (FileExistsError, PermissionError, OSError) after
    all the work; now one line, the first two before any work."""
    import tempfile

    moving, fixed = pair
    (tmp_path / "afile").write_text("")
    result = cli("apply", moving, "-r", fixed, "-o", tmp_path / "afile" / "sub" / "o.nii.gz")
    _assert_one_line_error(result, 1, "afile' is a file, not a folder")

    def refused(*args, **kwargs):
        raise PermissionError(1, "Operation not permitted")

    with monkeypatch.context() as patched:
        patched.setattr(tempfile, "mkdtemp", refused)
        result = cli("register", moving, fixed, "-o", tmp_path / "out")
        _assert_one_line_error(result, 1, "cannot write", "Operation not permitted")

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("carctl.io.os.replace", full)
    result = cli("apply", moving, "-r", fixed, "-o", tmp_path / "o.nii.gz")
    _assert_one_line_error(result, 1, "cannot write", "No space left on device")
    assert not (tmp_path / "o.nii.gz").exists()
    assert not list(tmp_path.glob(".carctl-*"))  # the staging folder is gone


@pytest.mark.parametrize("writer", ["write_affine", "write_field"])
def test_register_writes_all_its_outputs_or_none(cli, pair, tmp_path, monkeypatch, writer):
    """An error (or Ctrl-C) while writing register's third output left the first two in
    place; they now appear together, when all are written (the field is written in a
    thread beside the warped image: its error is raised too)."""
    import carctl.spatial.files
    from carctl.errors import OutputError

    def failing(*args, **kwargs):
        raise OutputError("cannot write the output: no space left")

    monkeypatch.setattr(carctl.spatial.files, writer, failing)
    moving, fixed = pair
    out = tmp_path / "out"
    result = cli("register", moving, fixed, "-o", out, "--method", "rigid", "-q")
    _assert_one_line_error(result, 1, "no space left")
    assert not out.exists() or not any(out.iterdir())  # no output, no staging folder
    monkeypatch.undo()
    done = cli("register", moving, fixed, "-o", out, "--method", "rigid", "-q")
    assert done.code == 0 and len(list(out.iterdir())) == 3


def test_apply_refuses_to_overwrite_without_force(cli, pair, tmp_path):
    moving, fixed = pair
    out = tmp_path / "out.nii.gz"
    out.write_bytes(b"precious")
    result = cli("apply", moving, "-r", fixed, "-o", out)
    _assert_one_line_error(result, 1, "exists; use --force")
    assert out.read_bytes() == b"precious"
    assert cli("apply", moving, "-r", fixed, "-o", out, "--force").code == 0
    assert out.read_bytes() != b"precious"


def test_apply_never_writes_over_an_input(cli, pair):
    moving, fixed = pair
    before = moving.read_bytes()
    result = cli("apply", moving, "-r", fixed, "-o", moving, "--force")
    _assert_one_line_error(result, 1, "one of the inputs")
    assert moving.read_bytes() == before


def test_apply_bad_interpolation(cli, pair, tmp_path):
    moving, fixed = pair
    result = cli("apply", moving, "-r", fixed, "-o", tmp_path / "out.nii.gz", "--interp", "cubic")
    _assert_one_line_error(result, 1, "unknown interpolation 'cubic'")
    assert not (tmp_path / "out.nii.gz").exists()


def test_apply_missing_required_option_is_a_usage_error(cli, pair):
    moving, _ = pair
    result = cli("apply", moving)
    assert result.code == 2
    assert "Traceback" not in result.err


def test_debug_shows_the_traceback(cli, pair, tmp_path):
    _, fixed = pair
    result = cli(
        "apply", tmp_path / "absent.nii.gz", "-r", fixed, "-o", tmp_path / "o.nii.gz", "--debug"
    )
    assert result.code == 1
    assert "Traceback" in result.err and "carctl: error: no such file" in result.err


def test_internal_errors_are_one_line_too(cli, pair, tmp_path, monkeypatch):
    import carctl.resample

    def broken(*args, **kwargs):
        raise ZeroDivisionError("a bug\nwith details")

    monkeypatch.setattr(carctl.resample, "resample_image", broken)
    moving, fixed = pair
    result = cli("apply", moving, "-r", fixed, "-o", tmp_path / "o.nii.gz")
    _assert_one_line_error(result, 70, "internal error: ZeroDivisionError: a bug", "--debug")
    assert not (tmp_path / "o.nii.gz").exists()


def test_info_lists_whole_series_uids_on_a_narrow_terminal(cli, two_series, monkeypatch):
    """The series table cut the UIDs short ("1.2.826...") that the line under it asks for."""
    import json as json_

    monkeypatch.setenv("COLUMNS", "60")
    listed = json_.loads(cli("info", two_series, "--json", "-").out)["dicom_series"]
    shown = cli("info", two_series).out.split()
    assert all(s["uid"] in shown for s in listed)


def test_multi_series_directory_needs_series(cli, two_series, pair, tmp_path):
    folder = two_series
    _, fixed = pair
    result = cli("apply", folder, "-r", fixed, "-o", tmp_path / "o.nii.gz")
    _assert_one_line_error(result, 1, "holds 2 DICOM series; choose one with --series")
    # register has no --series: it asked for one (a sweep found "No such option: --series")
    result = cli("register", folder, fixed, "-o", tmp_path / "r")
    _assert_one_line_error(result, 1, "holds 2 DICOM series; give a folder holding one of them")
    empty = tmp_path / "empty"
    empty.mkdir()
    result = cli("apply", empty, "-r", fixed, "-o", tmp_path / "o.nii.gz")
    _assert_one_line_error(result, 1, "no DICOM series found")
    assert not (tmp_path / "o.nii.gz").exists()


# --- evaluate ------------------------------------------------------------------------------------


def _labels(tmp_path: Path, name: str, shift: int = 0) -> Path:
    array = np.zeros((20, 20, 20), np.uint8)
    array[5:15, 5 + shift : 15 + shift, 4:16] = 1
    array[16:19, 1:4, 1:4] = 2
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((1.0, 1.0, 2.0))
    return write(image, tmp_path / name)


def test_evaluate_labels_json(cli, tmp_path):
    fixed, warped = _labels(tmp_path, "a.nii.gz"), _labels(tmp_path, "b.nii.gz", shift=2)
    result = cli("evaluate", "--fixed-labels", fixed, "--warped-labels", warped, "--json", "-")
    assert result.code == 0, result.err
    report = json.loads(result.out)
    by_label = {s["label"]: s for s in report["labels"]}
    assert by_label[1]["dice"] == pytest.approx(0.8)  # 10 -> 8 voxels of overlap along y
    assert by_label[2]["dice"] == 1.0 and by_label[2]["hd95"] == 0.0
    assert by_label[1]["hd95"] == pytest.approx(2.0)
    assert report["dice_mean"] == pytest.approx(0.9)
    # the means of both distances (usage.md promised them; HD's was missing)
    assert report["hd95_mean"] == pytest.approx((by_label[1]["hd95"] + 0.0) / 2)
    assert report["hd_mean"] == pytest.approx((by_label[1]["hd"] + by_label[2]["hd"]) / 2)
    assert by_label[1]["hd"] == pytest.approx(2.0)
    out = tmp_path / "report.json"
    table = cli("evaluate", "--fixed-labels", fixed, "--warped-labels", warped, "--json", out)
    assert table.code == 0 and "Label overlap" in table.out
    assert json.loads(out.read_text()) == report


def test_evaluate_pairs_4d_label_maps_volume_by_volume(cli, tmp_path):
    """Two 4-D label maps (one volume per structure: what ``register --labels`` writes for a
    4-D map) are scored volume by volume, each entry with its volume, as FILE:N each gives;
    a 4-D map against one map, or against another count of volumes, is refused."""
    fixed_maps = [sitk.ReadImage(str(_labels(tmp_path, f"f{k}.nii.gz"))) for k in range(3)]
    warped_maps = [
        sitk.ReadImage(str(_labels(tmp_path, f"w{k}.nii.gz", shift=k))) for k in range(3)
    ]
    fixed = write(sitk.JoinSeries(fixed_maps), tmp_path / "fixed4.nii.gz")
    warped = write(sitk.JoinSeries(warped_maps), tmp_path / "warped4.nii.gz")
    result = cli("evaluate", "--fixed-labels", fixed, "--warped-labels", warped, "--json", "-")
    assert result.code == 0, result.err
    report = json.loads(result.out)
    assert sorted({e["volume"] for e in report["labels"]}) == [0, 1, 2]
    for k in range(3):
        alone = cli(
            "evaluate",
            "--fixed-labels",
            f"{fixed}:{k}",
            "--warped-labels",
            f"{warped}:{k}",
            "--json",
            "-",
        )
        expected = json.loads(alone.out)["labels"]
        assert [{**e, "volume": k} for e in expected] == [
            e for e in report["labels"] if e["volume"] == k
        ]
    assert cli("evaluate", "--fixed-labels", fixed, "--warped-labels", warped).code == 0
    for other in (f"{warped}:0", write(sitk.JoinSeries(warped_maps[:2]), tmp_path / "two.nii.gz")):
        refused = cli("evaluate", "--fixed-labels", fixed, "--warped-labels", other)
        assert refused.code == 1 and "do not pair up" in refused.err


def test_evaluate_field_and_landmarks(cli, tmp_path):
    from carctl.spatial.files import write_affine, write_field
    from carctl.spatial.grid import Grid
    from carctl.spatial.transform import Affine, to_displacement

    reference = make_image((12, 12, 12), spacing=(2.0, 2.0, 2.0), origin=(-11, -11, -11))
    grid = Grid.from_sitk(reference)
    affine = Affine(rotation(0.0, 0.0, 0.1), [2.0, -1.0, 0.5])
    write_affine(affine, tmp_path / "affine.mat")
    write_field(to_displacement(grid, [affine]), tmp_path / "field.nii.gz")
    fixed_points = np.array([[0.0, 0.0, 0.0], [5.0, -3.0, 2.0], [-4.0, 6.0, -7.0]])
    moving_points = fixed_points @ affine.matrix.T + affine.translation
    np.savetxt(tmp_path / "fixed.csv", fixed_points, delimiter=",", header="x,y,z", comments="")
    (tmp_path / "moving.txt").write_text(
        "point\n3\n" + "\n".join(" ".join(map(str, p)) for p in moving_points)
    )
    for transform in (
        ["--field", tmp_path / "field.nii.gz"],
        ["--affine", tmp_path / "affine.mat"],
    ):
        result = cli(
            "evaluate",
            *transform,
            "--fixed-points",
            tmp_path / "fixed.csv",
            "--moving-points",
            tmp_path / "moving.txt",
            "--json",
            "-",
        )
        assert result.code == 0, result.err
        report = json.loads(result.out)
        assert report["landmarks"]["before"]["mean"] > 1.0
        assert report["landmarks"]["after"]["max"] < 1e-3
    field_report = json.loads(
        cli("evaluate", "--field", tmp_path / "field.nii.gz", "--json", "-").out
    )["field"]
    assert field_report["folding_percent"] == 0.0
    assert field_report["jacobian_min"] == pytest.approx(1.0, abs=1e-3)  # a rotation keeps volume


def test_evaluate_writes_the_jacobian_image(cli, tmp_path):
    """``--jacobian PATH``: det J on the field's grid (its geometry kept), ITK's own filter's
    values inside the grid, the affine's determinant for an affine field; without --field
    refused, an existing file kept without --force."""
    from conftest import bspline_field

    from carctl.spatial.files import write_field
    from carctl.spatial.grid import Grid
    from carctl.spatial.transform import Affine, to_displacement

    reference = make_image((14, 12, 10), spacing=(2.0, 1.5, 2.5), origin=(-9, 4, -11))
    scale = Affine(np.diag([1.1, 0.9, 1.2]), [1.0, 0.0, -2.0])
    write_field(to_displacement(Grid.from_sitk(reference), [scale]), tmp_path / "affine.nii")
    field = bspline_field(reference, magnitude=3.0, mesh=3, seed=2)
    sitk.WriteImage(field, str(tmp_path / "field.nii.gz"))
    for name, expected in (("affine.nii", None), ("field.nii.gz", field)):
        out = tmp_path / f"jacobian-{name}"
        result = cli("evaluate", "--field", tmp_path / name, "--jacobian", out, "--json", "-")
        assert result.code == 0, result.err
        assert json.loads(result.out)["field"]["jacobian_image"] == str(out)
        image = sitk.ReadImage(str(out))
        assert image.GetSize() == reference.GetSize()
        assert image.GetOrigin() == pytest.approx(reference.GetOrigin())
        assert image.GetSpacing() == pytest.approx(reference.GetSpacing())
        j = sitk.GetArrayFromImage(image)
        if expected is None:
            np.testing.assert_allclose(j, 1.1 * 0.9 * 1.2, rtol=1e-5)
        else:
            itk = sitk.GetArrayFromImage(sitk.DisplacementFieldJacobianDeterminant(expected))
            np.testing.assert_allclose(j[1:-1, 1:-1, 1:-1], itk[1:-1, 1:-1, 1:-1], atol=1e-4)
    again = cli("evaluate", "--field", tmp_path / "affine.nii", "--jacobian", out)
    _assert_one_line_error(again, 1, "--force")
    _assert_one_line_error(
        cli("evaluate", "--fixed-labels", "a", "--warped-labels", "b", "--jacobian", out),
        2,
        "--jacobian needs --field",
    )


def test_evaluate_usage_errors(cli, tmp_path):
    fixed = _labels(tmp_path, "a.nii.gz")
    _assert_one_line_error(cli("evaluate", "--fixed-labels", fixed), 2, "go together")
    _assert_one_line_error(cli("evaluate"), 2, "nothing to evaluate")


def test_evaluate_refuses_labels_on_another_grid(cli, tmp_path):
    fixed = _labels(tmp_path, "a.nii.gz")
    other = write(
        sitk.Cast(make_image((20, 20, 20)) > 50, sitk.sitkUInt8), tmp_path / "other.nii.gz"
    )
    result = cli("evaluate", "--fixed-labels", fixed, "--warped-labels", other)
    _assert_one_line_error(result, 1, "is not on the grid of", "carctl apply --interp label")
    assert "spacing (1, 1, 1) mm against (1, 1, 2)" in result.err
    # only the origin differs: the message described both grids alike
    moved = sitk.ReadImage(str(fixed))
    moved.SetOrigin((0.0, 0.0, 5.0))
    moved_path = write(moved, tmp_path / "moved.nii.gz")
    result = cli("evaluate", "--fixed-labels", fixed, "--warped-labels", moved_path)
    _assert_one_line_error(result, 1, "origin (0, 0, 5) mm against (0, 0, 0)")


def test_evaluate_refuses_other_dimensions_in_one_line(cli, tmp_path):
    """2-D warped labels for 3-D fixed ones, a 3-D field with a 2-D affine, a 2-D affine for
    3-D landmarks on a 3-D image: internal errors (exit 70) before."""
    fixed = _labels(tmp_path, "a.nii.gz")
    plane = sitk.GetImageFromArray(sitk.GetArrayFromImage(sitk.ReadImage(str(fixed)))[5])
    flat = write(plane, tmp_path / "flat.nii.gz")
    result = cli("evaluate", "--fixed-labels", fixed, "--warped-labels", flat)
    _assert_one_line_error(result, 1, "is not on the grid of", "(2-D against 3-D)")
    field = tmp_path / "field.mha"
    zero = sitk.Image((6, 6, 6), sitk.sitkVectorFloat64, 3)
    sitk.WriteImage(zero, str(field))
    affine = tmp_path / "a2.tfm"
    sitk.WriteTransform(sitk.AffineTransform(2), str(affine))
    (tmp_path / "p.csv").write_text("x,y,z\n1,2,3\n4,5,6\n")
    points = ["--fixed-points", tmp_path / "p.csv", "--moving-points", tmp_path / "p.csv"]
    result = cli("evaluate", "--field", field, "--affine", affine, *points)
    _assert_one_line_error(result, 1, "--field is 3-D and --affine 2-D")
    result = cli("evaluate", "--affine", affine, "--fixed-image", fixed, *points)
    _assert_one_line_error(result, 1, "landmarks: the transforms 2-D and", "3-D do not match")


def test_evaluate_reads_2d_landmarks_by_their_header(cli, tmp_path):
    """Landmarks alone (no image or transform to fix their dimension): a CSV headed x,y is
    2-D ("row 1 has 2 values, not 3 coordinates" before)."""
    (tmp_path / "f.csv").write_text("x,y\n1,2\n3,4\n")
    (tmp_path / "m.csv").write_text("x,y\n1,2.5\n3,4\n")
    result = cli(
        "evaluate",
        "--fixed-points",
        tmp_path / "f.csv",
        "--moving-points",
        tmp_path / "m.csv",
        "--json",
        "-",
    )
    assert result.code == 0, result.err
    assert json.loads(result.out)["landmarks"]["errors"] == [0.5, 0.0]


def test_evaluate_refuses_non_label_images(cli, tmp_path):
    fixed = _labels(tmp_path, "a.nii.gz")
    image = make_image((20, 20, 20))
    image.SetSpacing((1.0, 1.0, 2.0))
    intensities = write(image, tmp_path / "t1.nii.gz")
    _assert_one_line_error(
        cli("evaluate", "--fixed-labels", fixed, "--warped-labels", intensities),
        1,
        "not a label map",
    )


# --- demo ----------------------------------------------------------------------------------------


def test_demo_runs_on_the_bundled_pair(cli, tmp_path):
    """Earlier outputs are refused without ``--force`` and overwritten with it (one run of
    the demo: its outputs are what the refusal looks for)."""
    out = tmp_path / "demo"
    out.mkdir()
    (out / "evaluation.json").write_text("an earlier run's")
    again = cli("demo", "-o", out)
    _assert_one_line_error(again, 1, "exists; use --force")
    assert (out / "evaluation.json").read_text() == "an earlier run's"
    result = cli("demo", "-o", out, "--force")
    assert result.code == 0, result.err
    assert sorted(p.name for p in out.iterdir()) == [
        "evaluation.json",
        "t1w_cord_in_t2.nii.gz",
        "t1w_in_t2.nii.gz",
        "t1w_to_t2_affine.mat",
        "t1w_to_t2_field.nii",
    ]
    report = json.loads((out / "evaluation.json").read_text())
    assert report["dice_header"] == pytest.approx(0.85, abs=0.01)
    assert report["dice_mean"] > 0.9  # after registration
    assert report["field"]["folding_percent"] < 0.05


def test_native_reader_messages_do_not_leak(tmp_path):
    """ITK's MetaImage reader prints to the process's stderr itself (regression): carctl's
    one-line error must be all the user sees."""
    full = write(make_image((20, 20, 20)), tmp_path / "full.mha").read_bytes()
    (tmp_path / "cut.mha").write_bytes(full[: len(full) // 2])
    result = subprocess.run(
        [sys.executable, "-m", "carctl", "info", str(tmp_path / "cut.mha")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.strip().splitlines() == [
        f"carctl: error: cannot read image '{tmp_path / 'cut.mha'}': "
        "the file is truncated or corrupted"
    ]


def test_apply_names_the_reference_series_option(cli, two_series, pair, tmp_path):
    folder = two_series
    moving, _ = pair
    result = cli("apply", moving, "-r", folder, "-o", tmp_path / "o.nii.gz")
    _assert_one_line_error(result, 1, "choose one with --reference-series UID")
    uid = next(
        s
        for s in json.loads(cli("info", folder, "--json", "-").out)["dicom_series"]
        if s["modality"] == "MR"
    )["uid"]
    result = cli(
        "apply", moving, "-r", folder, "--reference-series", uid, "-o", tmp_path / "o.nii.gz"
    )
    assert result.code == 0, result.err
    assert sitk.ReadImage(str(tmp_path / "o.nii.gz")).GetSize() == (256, 256, 3)


def test_apply_reads_the_reference_s_header_only(cli, tmp_path, monkeypatch):
    """The reference gives its grid: its voxels are not read (a large reference cost a second
    and its size in memory for nothing); the output lies on that grid."""
    from carctl import io

    image = write(make_image((9, 8, 7)), tmp_path / "image.nii.gz")
    reference = write(
        make_image((6, 5, 4), spacing=(1.5, 1.5, 2.0), origin=(1.0, 2.0, 3.0)),
        tmp_path / "reference.nii.gz",
    )
    read = []
    original = io.read_image_or_volumes
    monkeypatch.setattr(
        io,
        "read_image_or_volumes",
        lambda spec, *a, **k: read.append(spec) or original(spec, *a, **k),
    )
    result = cli("apply", image, "-r", reference, "-o", tmp_path / "out.nii.gz")
    assert result.code == 0, result.err
    assert [str(spec) for spec in read] == [str(image)]
    out = sitk.ReadImage(str(tmp_path / "out.nii.gz"))
    assert out.GetSize() == (6, 5, 4) and out.GetOrigin() == (1.0, 2.0, 3.0)


@pytest.mark.parametrize("ndim", [2, 3])
def test_info_describes_a_field_with_a_non_finite_vector(cli, tmp_path, ndim):
    """The lengths (a sum of squared components) over the finite vectors only; the others
    counted."""
    from carctl.spatial.files import write_field
    from carctl.spatial.grid import Grid
    from carctl.spatial.transform import DisplacementField

    size = (6, 5, 4)[:ndim]
    grid = Grid(size, (1.0,) * ndim, (0.0,) * ndim, tuple(np.eye(ndim).ravel()))
    data = torch.from_numpy(np.random.default_rng(0).normal(size=(ndim, *grid.shape))).float()
    data[0].view(-1)[3] = float("nan")
    write_field(DisplacementField(grid, data), tmp_path / "f.mha")
    facts = json.loads(cli("info", tmp_path / "f.mha", "--json", "-").out)
    lengths = np.linalg.norm(data.numpy().astype(np.float64), axis=0).ravel()
    finite = np.isfinite(lengths)
    assert facts["non_finite_voxels"] == 1
    assert facts["displacement_mean_mm"] == pytest.approx(lengths[finite].mean(), rel=1e-5)
    assert facts["displacement_max_mm"] == pytest.approx(lengths[finite].max(), rel=1e-5)


def test_info_and_points_take_threads(cli, tmp_path):
    """``--threads`` (or $CARCTL_THREADS) bounds the CPU threads of a field's summary and of
    mapping points, as for the other commands; an image's facts still load no torch."""
    from carctl.spatial.files import write_field
    from carctl.spatial.grid import Grid
    from carctl.spatial.transform import DisplacementField

    grid = Grid((6, 5, 4), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), tuple(np.eye(3).ravel()))
    write_field(DisplacementField(grid, torch.zeros(3, 4, 5, 6)), tmp_path / "f.nii")
    (tmp_path / "p.csv").write_text("x,y,z\n1,2,1\n")
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert cli("info", tmp_path / "f.nii", "--threads", "1").code == 0
        assert torch.get_num_threads() == 1
        torch.set_num_threads(2)
        mapped = cli(
            "points",
            tmp_path / "p.csv",
            "-f",
            tmp_path / "f.nii",
            "-o",
            tmp_path / "q.csv",
            "--threads",
            "1",
        )
        assert mapped.code == 0, mapped.err
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    image = str(write(make_image((6, 5, 4)), tmp_path / "image.nii.gz"))
    result, codes, heavy = _main_in_fresh_python(
        [["info", image, "--threads", "1"], ["info", image, "--threads", "0"]]
    )
    assert codes == [0, 2], codes
    assert "torch" not in heavy and "--threads must be from 1 to 1024" in result.stderr


def test_evaluate_prints_landmark_distances_to_the_micrometre(cli, tmp_path):
    """Equal landmark errors have no spread: the table says 0, not their float rounding
    (1.826e-15 before); the JSON keeps the numbers as computed."""
    fixed = np.array([[0.0, 0.0, 0.0], [5.1, -3.3, 2.7], [-4.9, 6.3, -7.1]])
    np.savetxt(tmp_path / "fixed.csv", fixed, delimiter=",", header="x,y,z", comments="")
    moved = fixed + np.array([0.3, -1.7, 2.9])
    np.savetxt(tmp_path / "moving.csv", moved, delimiter=",", header="x,y,z", comments="")
    points = ["--fixed-points", tmp_path / "fixed.csv", "--moving-points", tmp_path / "moving.csv"]
    affine_file = tmp_path / "shift.mat"
    from carctl.spatial.files import write_affine
    from carctl.spatial.transform import Affine

    write_affine(Affine(np.eye(3), [0.3, -1.7, 2.9]), affine_file)
    result = cli("evaluate", *points, "-a", affine_file)
    assert result.code == 0, result.err
    before = next(line for line in result.out.splitlines() if "before" in line)
    cells = [cell.strip() for cell in before.split("│") if cell.strip()]
    assert cells[0] == "before" and cells[2] == "0", before  # std of three equal errors


def test_outputs_on_a_sheared_grid_are_never_written_as_nifti(cli, tmp_path):
    """Found by a sweep: on a sheared fixed grid (a tilted gantry's) ITK wrote the warped image
    and the field as NIfTI with orthogonal axes, 6.8 mm off the grid, without a word. The
    default names now switch to .mha; a NIfTI name given is refused before any work."""
    shear = np.array([[1.0, 0.3, 0.0], [0.0, 1.0, 0.2], [0.0, 0.0, 1.0]])
    shear /= np.linalg.norm(shear, axis=0)
    moving = write(make_image((20, 18, 16), spacing=(1.5,) * 3, seed=1), tmp_path / "m.nii.gz")
    fixed = write(
        make_image((20, 18, 16), spacing=(1.5,) * 3, direction=shear, seed=2),
        tmp_path / "f.mha",
    )
    out = tmp_path / "out"
    done = cli("register", moving, fixed, "--method", "rigid", "-o", out, "-q", "--json", "-")
    assert done.code == 0, done.err
    written = json.loads(done.out)["outputs"]
    assert Path(written["warped"]).name == "m_warped.mha"
    assert Path(written["field"]).name == "m_field.mha"
    for key in ("warped", "field"):
        back = sitk.ReadImage(written[key])
        np.testing.assert_allclose(back.GetDirection(), shear.ravel(), atol=1e-6)
    for given in (("--warped", tmp_path / "w.nii.gz"), ("--field", tmp_path / "f.nii")):
        refused = cli("register", moving, fixed, "--method", "rigid", *given, "-o", out, "--force")
        _assert_one_line_error(refused, 1, "its grid is sheared", "write it as .mha or .nrrd")
    applied = cli("apply", moving, "-r", fixed, "-o", tmp_path / "a.nii.gz")
    _assert_one_line_error(applied, 1, "its grid is sheared")
    assert not (tmp_path / "a.nii.gz").exists()


# --- resource failures (found by a sweep on a full tmpfs, under ulimit -v, with signals) ------


def test_an_image_written_short_is_refused_not_moved_into_place(tmp_path, monkeypatch):
    """ITK's NIfTI writer does not fail on a full disk: the file, cut short, was moved into
    place and `register`/`apply` exited 0."""
    import SimpleITK

    from carctl.errors import OutputError
    from carctl.io import write_sitk

    real = SimpleITK.WriteImage

    def cut_short(image, name, *args, **kwargs):
        real(image, name, *args, **kwargs)
        with open(name, "r+b") as stream:
            stream.truncate(400)

    monkeypatch.setattr(SimpleITK, "WriteImage", cut_short)
    for name in ("a.nii.gz", "a.nii"):
        with pytest.raises(OutputError, match="came out incomplete .*is the disk full"):
            write_sitk(make_image((20, 18, 16)), tmp_path / name)
    assert list(tmp_path.iterdir()) == []


def test_sigterm_stops_like_an_interrupt_with_its_own_status(capsys):
    """A `register` killed with SIGTERM left its staging folder (a partial field) behind:
    SIGTERM now runs the interrupt's cleanup, and exits with 143."""
    import os
    import signal

    from carctl.cli import console

    kept = signal.getsignal(signal.SIGTERM)
    try:
        console.terminate_as_interrupt()

        def killed():
            os.kill(os.getpid(), signal.SIGTERM)
            signal.pthread_kill(threading.main_thread().ident, 0)  # let the handler run
            raise AssertionError("SIGTERM did not stop the work")

        import threading

        assert console.run_guarded(killed) == 143
        assert capsys.readouterr().err.strip() == "carctl: error: terminated"
    finally:
        signal.signal(signal.SIGTERM, kept)
        console._state.pop("terminated", None)


@pytest.mark.parametrize(
    "error",
    [MemoryError(), RuntimeError("[enforce fail at alloc_cpu.cpp:127] ... can't allocate memory")],
)
def test_out_of_memory_is_one_line_not_an_internal_error(capsys, error):
    from carctl.cli import console

    def fails():
        raise error

    assert console.run_guarded(fails) == 1
    said = capsys.readouterr().err.strip()
    assert said.startswith("carctl: error: not enough memory") and "internal" not in said


def test_weights_on_a_full_disk_are_one_line_and_leave_no_temporary(tmp_path, monkeypatch):
    import safetensors.torch

    from carctl import pretrained
    from carctl.errors import OutputError

    def full(tensors, name, *args, **kwargs):
        Path(name).write_bytes(b"part")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    with pytest.raises(OutputError, match="No space left on device"):
        pretrained.save_tensors({"w": torch.zeros(3)}, tmp_path / "model.safetensors")
    assert list(tmp_path.iterdir()) == []


def test_register_writes_its_json_with_the_images_or_nothing(cli, pair, tmp_path, monkeypatch):
    """The JSON summary was written after the images had been moved into place: a JSON that
    could not be written left the images (and a rerun refused them as existing)."""
    from carctl.cli import console
    from carctl.errors import OutputError

    def cannot(*args, **kwargs):
        raise OutputError("cannot write 'r.json': No space left on device")

    monkeypatch.setattr(console, "emit_json", cannot)
    moving, fixed = pair
    out = tmp_path / "out"
    result = cli(
        "register",
        moving,
        fixed,
        "--method",
        "rigid",
        "-o",
        out,
        "-q",
        "--json",
        tmp_path / "r.json",
    )
    _assert_one_line_error(result, 1, "No space left on device")
    assert not out.exists() or not [p for p in out.iterdir() if not p.name.startswith(".")]
