"""``carctl batch``: the pair list, and a batch as a clinic pipeline runs it."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import make_image, write

from carctl.batch import read_pairs
from carctl.errors import InputError


def _images(folder: Path, *names: str) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    return [write(make_image((6, 5, 4), seed=i), folder / n) for i, n in enumerate(names)]


def test_list_columns_comments_and_relative_paths(tmp_path):
    _images(tmp_path / "sub-01", "t1.nii.gz", "t2.nii.gz", "seg.nii.gz")
    _images(tmp_path / "sub-02", "t1.nii.gz", "t2.nii.gz")
    listing = tmp_path / "pairs.csv"
    listing.write_text(
        "\ufeffName, Moving ,fixed,labels,Fixed-Mask\n"  # a spreadsheet's BOM, any case, -/_
        "# first subject\n"
        "a,sub-01/t1.nii.gz,sub-01/t2.nii.gz,sub-01/seg.nii.gz,\n"
        "\n"
        "b,sub-02/t1.nii.gz,sub-02/t2.nii.gz,,sub-02/t2.nii.gz\n"
    )
    first, second = read_pairs(listing)
    assert (first.line, first.name, second.line, second.name) == (3, "a", 5, "b")
    assert first.moving == str(tmp_path / "sub-01" / "t1.nii.gz")  # relative to the list
    assert first.labels == str(tmp_path / "sub-01" / "seg.nii.gz") and first.fixed_mask is None
    assert second.labels is None and second.fixed_mask == str(tmp_path / "sub-02" / "t2.nii.gz")
    assert second.inputs() == [second.moving, second.fixed, second.fixed_mask]


def test_list_as_tsv_named_by_the_moving_stem(tmp_path):
    moving, fixed = _images(tmp_path, "sub-01_T1w.nii.gz", "sub-01_T2w.nii")
    listing = tmp_path / "pairs.tsv"
    listing.write_text(f"moving\tfixed\n{moving}\t{fixed.name}\n")  # absolute and relative
    (pair,) = read_pairs(listing)
    assert (pair.name, pair.moving, pair.fixed) == ("sub-01_T1w", str(moving), str(fixed))


def test_list_volume_of_a_4d_file(tmp_path):
    series = sitk.JoinSeries([make_image((6, 5, 4), seed=s) for s in range(3)])
    write(series, tmp_path / "bold.nii.gz")
    (fixed,) = _images(tmp_path, "t1.nii.gz")
    listing = tmp_path / "pairs.csv"
    listing.write_text("moving,fixed\nbold.nii.gz:2,t1.nii.gz\n")
    (pair,) = read_pairs(listing)
    assert pair.moving == f"{tmp_path / 'bold.nii.gz'}:2" and pair.name == "bold"


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("", "is empty"),
        ("# only a comment\n", "is empty"),
        ("moving,fixed\n", "names no pair"),
        ("moving,fixd\nm.nii.gz,f.nii.gz\n", "pairs.csv:1: unknown column 'fixd'"),
        ("moving,name\nm.nii.gz,x\n", "pairs.csv:1: no 'fixed' column"),
        ("moving,fixed,moving\nm.nii.gz,f.nii.gz,m.nii.gz\n", "named twice"),
        ("moving,fixed\nm.nii.gz\n", "pairs.csv:2: 1 cells for 2 columns"),
        ("moving,fixed\n,f.nii.gz\n", "pairs.csv:2: the 'moving' cell is empty"),
        ("moving,fixed\nm.nii.gz,absent.nii.gz\n", "pairs.csv:2: no such fixed: '"),
        ("moving,fixed,labels\nm.nii.gz,f.nii.gz,l.nii.gz\n", "no such labels"),
        ("name,moving,fixed\n..,m.nii.gz,f.nii.gz\n", "name '..' must be a plain folder name"),
        ("name,moving,fixed\na/b,m.nii.gz,f.nii.gz\n", "must be a plain folder name"),
        ("moving,fixed\nm.nii.gz,f.nii.gz\n\nm.nii.gz,f.nii.gz\n", "add a 'name' column"),
        ("name,moving,fixed\na,m.nii.gz,f.nii.gz\na,m.nii.gz,f.nii.gz\n", "its own name"),
    ],
)
def test_list_refusals_name_the_line(tmp_path, text, words):
    _images(tmp_path, "m.nii.gz", "f.nii.gz")
    listing = tmp_path / "pairs.csv"
    listing.write_text(text)
    with pytest.raises(InputError, match="^[^\n]*$") as refused:  # one line
        read_pairs(listing)
    assert words in str(refused.value)


def test_missing_list(tmp_path):
    with pytest.raises(InputError, match="no such pair list"):
        read_pairs(tmp_path / "pairs.csv")


# --- the command ---------------------------------------------------------------------------------


def _phantom(seed: int) -> sitk.Image:
    """A small head-like ellipsoid with texture (as the registration tests use)."""
    image = make_image((20, 20, 20), spacing=(3.0, 3.0, 3.0), seed=seed)
    z, y, x = np.meshgrid(*[np.linspace(-1, 1, 20)] * 3, indexing="ij")
    inside = (x / 0.8) ** 2 + (y / 0.7) ** 2 + (z / 0.75) ** 2 < 1
    array = np.where(inside, 20 + sitk.GetArrayFromImage(image), 0).astype(np.float32)
    out = sitk.GetImageFromArray(array)
    out.CopyInformation(image)
    return out


@pytest.fixture
def listing(tmp_path) -> Path:
    """Two good pairs and, between them, one whose moving image is not an image."""
    data = tmp_path / "data"
    data.mkdir()
    fixed = write(_phantom(0), data / "fixed.nii.gz")
    shifted = sitk.Resample(_phantom(0), sitk.TranslationTransform(3, (2.0, -1.5, 1.0)))
    write(shifted, data / "moving.nii.gz")
    write(_phantom(0) > 25, data / "labels.nii.gz")
    (data / "broken.nii.gz").write_bytes(b"not an image")
    path = data / "pairs.csv"
    path.write_text(
        "name,moving,fixed,labels\n"
        "one,moving.nii.gz,fixed.nii.gz,labels.nii.gz\n"
        "broken,broken.nii.gz,fixed.nii.gz,\n"
        f"two,fixed.nii.gz,{fixed},\n"
    )
    return path


def _record(folder: Path) -> dict[str, dict]:
    with open(folder / "batch.csv", newline="") as f:
        return {row["name"]: row for row in csv.DictReader(f)}


def test_batch_registers_records_and_resumes(cli, listing, tmp_path):
    out = tmp_path / "out"
    options = ["-o", out, "--method", "rigid", "--threads", "1"]
    first = cli("batch", listing, *options)
    assert first.code == 1, first.err  # one pair failed: the batch says so, after the rest
    lines = first.err.strip().splitlines()
    assert lines[0].startswith("[1/3] one  done") and lines[2].startswith("[3/3] two  done")
    assert "[2/3] broken  failed: cannot read image" in lines[1]
    assert "2 registered, 0 skipped, 1 failed" in lines[-1] and "Traceback" not in first.err
    record = _record(out)
    assert [record[n]["status"] for n in ("one", "broken", "two")] == ["done", "failed", "done"]
    assert "cannot read image" in record["broken"]["error"]
    assert float(record["one"]["folding_percent"]) == 0.0 and float(record["one"]["seconds"]) > 0
    assert sorted(p.name for p in (out / "one").iterdir()) == [
        "moving_affine.mat",
        "moving_field.nii",
        "moving_warped.nii.gz",
        "moving_warped_labels.nii.gz",
        "summary.json",
    ]
    summary = json.loads((out / "one" / "summary.json").read_text())
    assert summary["name"] == "one" and summary["method"] == "rigid"
    assert summary["options"]["method"] == "rigid" and summary["options"]["seed"] == 0
    # what register writes for the same pair and options, to the voxel
    alone = cli(
        "register",
        listing.parent / "moving.nii.gz",
        listing.parent / "fixed.nii.gz",
        "-o",
        tmp_path / "alone",
        "--method",
        "rigid",
        "--threads",
        "1",
        "--quiet",
    )
    assert alone.code == 0, alone.err
    np.testing.assert_array_equal(
        sitk.GetArrayFromImage(sitk.ReadImage(str(out / "one" / "moving_warped.nii.gz"))),
        sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "alone" / "moving_warped.nii.gz"))),
    )
    # run again: the pairs done are skipped (their numbers kept), the failed one tried again
    stamp = (out / "one" / "moving_field.nii").stat().st_mtime_ns
    again = cli("batch", listing, *options)
    assert again.code == 1 and "0 registered, 2 skipped, 1 failed" in again.err
    assert (out / "one" / "moving_field.nii").stat().st_mtime_ns == stamp
    assert _record(out)["one"]["status"] == "skipped"
    assert _record(out)["one"]["folding_percent"] == record["one"]["folding_percent"]
    # other options: the pairs done are not redone over their results unless forced
    other = cli("batch", listing, *options, "--seed", "1", "-q")
    assert other.code == 1 and _record(out)["one"]["status"] == "failed"
    assert "done before with other options (seed)" in _record(out)["one"]["error"]
    assert (out / "one" / "moving_field.nii").stat().st_mtime_ns == stamp
    # --force redoes them
    redo = cli("batch", listing, *options, "--force", "--quiet", "--inverse")
    assert redo.code == 1 and redo.err == ""
    assert _record(out)["two"]["status"] == "done"
    assert (out / "two" / "fixed_field_inverse.nii").is_file()


def test_batch_resumes_only_what_is_the_same_and_whole(cli, listing, tmp_path):
    """A pair was skipped whenever its summary.json had the same options: with another
    moving image at its line (the folder kept the old results, the record named the new
    image), with --qa or --inverse asked now (never written), and with an output deleted
    (left missing). Now other inputs or outputs are refused as other options are, and a
    folder missing an output is done again."""
    out = tmp_path / "out"
    options = ["-o", out, "--method", "rigid", "--threads", "1", "-q"]
    assert cli("batch", listing, *options).code == 1  # the broken pair fails
    warped = out / "one" / "moving_warped.nii.gz"
    warped.unlink()
    again = cli("batch", listing, *options)
    assert _record(out)["one"]["status"] == "done" and warped.is_file(), again.err
    for extra, what in (
        (["--qa"], "other outputs (qa)"),
        (["--inverse"], "other outputs (inverse)"),
    ):
        cli("batch", listing, *options, *extra)
        assert what in _record(out)["one"]["error"]
    data = listing.parent
    write(sitk.ReadImage(str(data / "fixed.nii.gz")), data / "moving.nii.gz")  # replaced
    cli("batch", listing, *options)
    assert "done before with other inputs (moving)" in _record(out)["one"]["error"]


def test_a_pair_named_as_the_record_is_refused_first(cli, listing, tmp_path):
    """A pair named batch.csv was registered, then the batch stopped: its folder stood where
    the record goes."""
    named = listing.parent / "named.csv"
    named.write_text("name,moving,fixed\nbatch.csv,moving.nii.gz,fixed.nii.gz\n")
    result = cli("batch", named, "-o", tmp_path / "out")
    assert result.code == 1 and "would take the record's place" in result.err
    assert not (tmp_path / "out" / "batch.csv").exists()
    # a pair named as the lock: "[Errno 17] File exists" recorded midway
    named.write_text("name,moving,fixed\n.carctl.lock,moving.nii.gz,fixed.nii.gz\n")
    result = cli("batch", named, "-o", tmp_path / "out")
    assert result.code == 1 and "would take the folder's lock's place" in result.err
    assert not (tmp_path / "out").exists()


def test_a_pair_never_writes_over_another_pairs_input(cli, listing, tmp_path):
    """Found by a sweep: a list chaining a pair onto an earlier pair's warped image had that
    input replaced by the first pair's output (each pair checked its own inputs only), and
    the second pair registered onto the wrong image, exit 0."""
    out = tmp_path / "out"
    (out / "p1").mkdir(parents=True)
    chained = out / "p1" / "moving_warped.nii.gz"
    chained.write_bytes((listing.parent / "fixed.nii.gz").read_bytes())
    before = chained.read_bytes()
    chain = listing.parent / "chain.csv"
    chain.write_text(
        f"name,moving,fixed\np1,moving.nii.gz,fixed.nii.gz\np2,moving.nii.gz,{chained}\n"
    )
    for extra in ([], ["--force"]):
        result = cli("batch", chain, "-o", out, "--method", "rigid", *extra)
        assert result.code == 1 and "an input of the list" in result.err, result.err
    assert chained.read_bytes() == before and not (out / "batch.csv").exists()


def test_qa_refuses_a_blank_warped_image_and_info_an_existing_json_first(cli, listing, tmp_path):
    """Found by a sweep: `qa -w` rated a one-value warped image as aligned ("ok", 0); `info
    --json EXISTING` printed its table, then failed."""
    data = listing.parent
    blank = sitk.ReadImage(str(data / "fixed.nii.gz")) * 0
    write(blank, tmp_path / "blank.nii.gz")
    result = cli(
        "qa",
        data / "moving.nii.gz",
        data / "fixed.nii.gz",
        "-w",
        tmp_path / "blank.nii.gz",
        "-o",
        tmp_path / "qa",
    )
    assert result.code == 1 and "the warped image is constant" in result.err, result.err
    (tmp_path / "j.json").write_text("old")
    result = cli("info", data / "fixed.nii.gz", "--json", tmp_path / "j.json")
    assert result.code == 1 and result.out == "" and "exists" in result.err
    assert (tmp_path / "j.json").read_text() == "old"


def test_batch_resumes_from_another_working_directory(cli, listing, tmp_path, monkeypatch):
    """summary.json listed the outputs relative to the first run's working directory: a
    batch resumed from another one found none of them and redid every pair."""
    single = listing.parent / "single.csv"
    single.write_text("name,moving,fixed\np1,moving.nii.gz,fixed.nii.gz\n")
    monkeypatch.chdir(tmp_path)
    assert cli("batch", single, "-o", "out", "--method", "rigid", "-q").code == 0
    monkeypatch.chdir(tmp_path / "out")
    assert cli("batch", single, "-o", ".", "--method", "rigid", "-q").code == 0
    assert _record(tmp_path / "out")["p1"]["status"] == "skipped"


def test_a_redone_pair_folder_holds_only_the_new_outputs(cli, listing, tmp_path):
    """`--force` without `--inverse` after a run with it left the old inverse field beside
    the new results (summary.json no longer listed it)."""
    single = listing.parent / "single.csv"
    single.write_text("name,moving,fixed\np1,moving.nii.gz,fixed.nii.gz\n")
    out = tmp_path / "out"
    assert cli("batch", single, "-o", out, "--method", "rigid", "-q", "--inverse").code == 0
    assert (out / "p1" / "moving_field_inverse.nii").is_file()
    (out / "p1" / "notes.txt").write_text("mine")  # not an output: kept
    assert cli("batch", single, "-o", out, "--method", "rigid", "-q", "--force").code == 0
    assert sorted(p.name for p in (out / "p1").iterdir()) == [
        "moving_affine.mat",
        "moving_field.nii",
        "moving_warped.nii.gz",
        "notes.txt",
        "summary.json",
    ]


def test_a_second_batch_into_the_same_folder_is_refused(cli, listing, tmp_path):
    """Two batches run at once into one -o rewrote each other's batch.csv and pair folders:
    the second is refused, one line, before it writes anything."""
    from carctl.io import folder_lock

    out = tmp_path / "out"
    with folder_lock(out, "carctl batch"):  # a first batch at work
        result = cli("batch", listing, "-o", out, "--method", "rigid", "-q")
        assert result.code == 1 and len(result.err.strip().splitlines()) == 1
        assert "carctl batch (process " in result.err and str(out) in result.err
        assert [p.name for p in out.iterdir()] == [".carctl.lock"]
    result = cli("batch", listing, "-o", out, "--method", "rigid", "-q", "--threads", "1")
    assert result.code == 1 and _record(out)["one"]["status"] == "done"  # 'broken' fails
    assert ".carctl.lock" not in [p.name for p in out.iterdir()]


def test_batch_stops_on_error_when_asked(cli, listing, tmp_path):
    out = tmp_path / "out"
    result = cli("batch", listing, "-o", out, "--method", "rigid", "--stop-on-error", "-q")
    assert result.code == 1
    assert list(_record(out)) == ["one", "broken"] and not (out / "two").exists()


def test_batch_refuses_a_bad_list_or_option_before_any_work(cli, listing, tmp_path):
    out = tmp_path / "out"
    for args, code, words in (
        ([tmp_path / "absent.csv"], 1, "no such pair list"),
        ([listing, "--method", "bogus"], 2, "unknown --method 'bogus'"),
        ([listing, "--threads", "0"], 2, "--threads must be from 1 to 1024"),
    ):
        result = cli("batch", *args, "-o", out)
        assert result.code == code, result.err
        assert result.err.startswith("carctl: error: ") and words in result.err
        assert len(result.err.strip().splitlines()) == 1
    assert not out.exists()
    (tmp_path / "file").write_text("")
    result = cli("batch", listing, "-o", tmp_path / "file")
    assert result.code == 1 and "it is a file" in result.err
    # a file where a pair's folder goes: "[Errno 17] File exists" recorded after the others ran
    out.mkdir()
    (out / "two").write_text("")
    result = cli("batch", listing, "-o", out)
    assert result.code == 1 and result.err.strip() == (
        f"carctl: error: {listing}:4: the pair's output folder '{out / 'two'}' is a file; give "
        "the pair another name (the 'name' column)"
    )
    assert sorted(p.name for p in out.iterdir()) == ["two"]
    # a list kept where the record goes is not written over
    kept = listing.parent / "batch.csv"
    kept.write_text(listing.read_text())
    result = cli("batch", kept, "-o", listing.parent, "--method", "rigid", "-q")
    assert result.code == 1 and "it is one of the inputs" in result.err
    assert kept.read_text() == listing.read_text() and not (listing.parent / "one").exists()


def test_the_default_search_is_left_out_of_the_recorded_options():
    """summary.json's options name ``search`` only when it is not the default: summaries
    written before the option existed match a batch run with the default (not redone)."""
    from carctl.cli.batch import _chosen
    from carctl.config import RegistrationOptions

    assert "search" not in _chosen(RegistrationOptions())
    assert _chosen(RegistrationOptions(search="wide"))["search"] == "wide"
    assert "device" not in _chosen(RegistrationOptions())
