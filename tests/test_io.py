"""Reading and writing images: geometry kept for every format, clear refusals, atomic writes."""

from __future__ import annotations

import gzip
import re

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import SHARED_DATA, make_image, rotation, write

from carctl.errors import InputError, OutputError
from carctl.io import (
    atomic_output,
    check_output,
    list_dicom_series,
    output_group,
    read_image,
    read_points,
    split_volume,
    write_image,
)
from carctl.spatial.grid import Grid


def _shared_images() -> list[str]:
    """Every image in ../shared/data, relative to it: each file (one DICOM file standing for
    its folder's files), each DICOM series folder; 4-D files by their first and last volume."""
    if not SHARED_DATA.is_dir():
        return []
    found = []
    for path in sorted(SHARED_DATA.rglob("*")):
        name = path.name.lower()
        relative = str(path.relative_to(SHARED_DATA))
        if path.is_dir() and any(p.suffix == ".dcm" for p in path.iterdir()):
            found += [relative, str(sorted(path.glob("*.dcm"))[0].relative_to(SHARED_DATA))]
        elif name.endswith((".nii", ".nii.gz", ".hdr", ".mha", ".mhd", ".nrrd")):
            reader = sitk.ImageFileReader()
            reader.SetFileName(str(path))
            reader.ReadImageInformation()
            if reader.GetDimension() == 4:
                found += [f"{relative}:0", f"{relative}:{reader.GetSize()[3] - 1}"]
            else:
                found.append(relative)
    return found


SHARED_IMAGES = _shared_images()


def _sitk_reference(path: str) -> sitk.Image:
    """The same image read directly by SimpleITK (the ground truth for geometry)."""
    spec, volume = split_volume(path)
    if spec.is_dir():
        reader = sitk.ImageSeriesReader()
        reader.SetFileNames(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(spec)))
        return reader.Execute()
    image = sitk.ReadImage(str(spec))
    if volume is not None:
        size = list(image.GetSize())
        image = sitk.Extract(image, [*size[:3], 0], [0, 0, 0, volume])
    return image


def _assert_same_geometry(grid: Grid, image: sitk.Image, atol: float = 0.0) -> None:
    assert grid.size == image.GetSize()
    np.testing.assert_allclose(grid.spacing, image.GetSpacing(), rtol=0, atol=atol)
    np.testing.assert_allclose(grid.origin, image.GetOrigin(), rtol=0, atol=atol)
    np.testing.assert_allclose(grid.direction, image.GetDirection(), rtol=0, atol=atol)


@pytest.mark.slow
@pytest.mark.parametrize(
    "name", SHARED_IMAGES or [pytest.param("-", marks=pytest.mark.skip("no data"))]
)
def test_shared_images_read_with_their_geometry_and_round_trip(name, shared_data, tmp_path):
    path = f"{shared_data}/{name}"
    image = read_image(path)
    reference = _sitk_reference(path)
    _assert_same_geometry(image.grid, reference)
    np.testing.assert_array_equal(image.array, sitk.GetArrayFromImage(reference))
    for extension in (".nii.gz", ".mha", ".nrrd"):
        out = write_image(image, tmp_path / f"copy{extension}")
        again = read_image(out)
        # NIfTI stores its matrix in float32: geometry survives to float32 precision there.
        atol = 1e-5 if extension == ".nii.gz" else 1e-9
        _assert_same_geometry(again.grid, reference, atol=atol)
        np.testing.assert_array_equal(again.array, image.array)
        assert again.array.dtype == image.array.dtype


def test_every_kind_of_shared_image_is_covered():
    if not SHARED_IMAGES:
        pytest.skip("no shared data")
    assert len(SHARED_IMAGES) >= 60
    kinds = {".nii", ".nii.gz", ".hdr", ".dcm"}
    assert all(any(i.split(":")[0].endswith(k) for i in SHARED_IMAGES) for k in kinds)
    assert sum(i.startswith("dicom/") and not i.endswith(".dcm") for i in SHARED_IMAGES) == 3


def test_four_d_file_needs_a_volume(shared_data):
    path = shared_data / "prostate-mr-us/mr_labels/case000000.nii.gz"
    with pytest.raises(InputError, match=r"4-D with 3 volumes; choose one as '.*:N'"):
        read_image(path)
    gland = read_image(f"{path}:0")
    assert gland.grid.size == (64, 64, 60)
    assert set(np.unique(gland.array)) == {0.0, 1.0}
    with pytest.raises(InputError, match="there is no volume 3"):
        read_image(f"{path}:3")


@pytest.mark.parametrize("name", ["one.nii.gz", "one.nii"])
def test_a_4d_file_of_one_volume_takes_volume_0(tmp_path, name):
    """Found by a sweep: ITK reads a 4-D NIfTI of one volume as 3-D, and ':0' was refused as
    a volume of a 3-D file, so a script looping over FILE:N stopped at such a file."""
    volume = make_image((6, 5, 4), seed=1)
    path = tmp_path / name
    sitk.WriteImage(sitk.JoinSeries([volume]), str(path))
    whole = read_image(path)
    assert whole.grid.size == (6, 5, 4)
    np.testing.assert_array_equal(read_image(f"{path}:0").array, whole.array)
    with pytest.raises(InputError, match="there is no volume 1|selects a volume of a 4-D"):
        read_image(f"{path}:1")
    plain = write(volume, tmp_path / "plain.nii.gz")  # a 3-D file takes no volume
    with pytest.raises(InputError, match="selects a volume of a 4-D file"):
        read_image(f"{plain}:0")


def test_headers_read_only_for_images_whose_header_reads(tmp_path):
    """``register`` starts importing torch once both images' headers read (while their voxels
    are read): not for a missing file, nor for one that is no image."""
    from carctl.io import headers_read

    image = write(make_image((6, 5, 4)), tmp_path / "image.nii.gz")
    text = tmp_path / "notes.nii.gz"
    text.write_text("not an image")
    folder = tmp_path / "series"
    folder.mkdir()
    assert headers_read(image, folder, f"{image}:0")
    assert not headers_read(image, text)
    assert not headers_read(tmp_path / "missing.nii.gz", image)


def test_a_background_import_that_fails_says_nothing(capfd):
    """``register`` imports torch on another thread while it reads the images: a failing
    import there must not print a traceback before the one-line error the caller's own
    import then gives."""
    import threading

    from carctl.runtime import import_in_background

    before = set(threading.enumerate())
    import_in_background("carctl_no_such_module")
    for thread in set(threading.enumerate()) - before:
        thread.join(10)
    assert capfd.readouterr().err == ""
    with pytest.raises(ModuleNotFoundError):
        import carctl_no_such_module  # noqa: F401


def _four_d(tmp_path, volumes: int = 5, name: str = "series.nii.gz"):
    """A 4-D file of ``volumes`` volumes on an oblique 3-D grid, its fourth axis of 2.5 (from
    10)."""
    direction = rotation(0.2, -0.1, 0.3)
    series = sitk.JoinSeries(
        [
            make_image((7, 6, 5), (1.0, 1.2, 1.5), (3.0, -2.0, 1.0), direction, seed=s)
            for s in range(volumes)
        ],
        10.0,
        2.5,
    )
    return write(series, tmp_path / name)


def test_a_4d_file_is_read_whole_as_volumes_and_written_back(tmp_path):
    """``read_image_or_volumes`` (``carctl apply``) reads a 4-D file whole: its volumes, their
    3-D grid and the fourth axis's spacing and origin, which ``write_volumes`` keeps; a
    volume named as FILE:N, and a 4-D file of one volume, come back as 3-D images."""
    from carctl.io import Image, Volumes, read_image_or_volumes, write_volumes

    path = _four_d(tmp_path)
    volumes = read_image_or_volumes(path)
    assert isinstance(volumes, Volumes) and len(volumes) == 5
    assert (volumes.step, volumes.start) == (2.5, 10.0)
    assert volumes.grid == read_image(f"{path}:3").grid
    np.testing.assert_array_equal(volumes.array[3], read_image(f"{path}:3").array)
    out = write_volumes(volumes, tmp_path / "copy.mha")
    back = sitk.ReadImage(str(out))
    assert back.GetSize() == (7, 6, 5, 5)
    original = sitk.ReadImage(str(path))
    for key in ("GetSpacing", "GetOrigin", "GetDirection"):
        assert getattr(back, key)() == pytest.approx(getattr(original, key)(), abs=1e-6)
    assert isinstance(read_image_or_volumes(f"{path}:1"), Image)
    one = _four_d(tmp_path, 1, "one.nii.gz")
    assert isinstance(read_image_or_volumes(one), Image)


def test_a_4d_file_whose_fourth_axis_mixes_with_space_is_refused(tmp_path):
    """Its volumes lie at other places in space: refused whole, and one volume too (found by a
    sweep: FILE:N gave every volume the first one's origin and a direction that is no
    rotation, with exit 0)."""
    from carctl.io import read_image_or_volumes

    series = sitk.ReadImage(str(_four_d(tmp_path)))
    angle = np.radians(10.0)
    direction = np.eye(4)
    direction[2:, 2:] = [[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]]
    series.SetDirection(direction.ravel().tolist())
    path = write(series, tmp_path / "mixed.mha")
    for spec in (path, f"{path}:2"):
        with pytest.raises(InputError, match="fourth axis is not apart from the three spatial"):
            read_image_or_volumes(spec)


def test_a_4d_file_whose_fourth_axis_runs_backwards_keeps_it(tmp_path):
    """A fourth axis of direction -1 (later volumes earlier): written back so (found by a
    sweep: the output's volumes came out at 7, 9.5, 12 instead of 7, 4.5, 2)."""
    from carctl.io import read_image_or_volumes, write_volumes

    series = sitk.ReadImage(str(_four_d(tmp_path)))
    direction = np.asarray(series.GetDirection()).reshape(4, 4)
    direction[3, 3] = -1.0
    series.SetDirection(direction.ravel().tolist())
    path = write(series, tmp_path / "backwards.mha")
    volumes = read_image_or_volumes(path)
    assert volumes.sense == -1.0
    back = sitk.ReadImage(str(write_volumes(volumes, tmp_path / "copy.nrrd")))
    times = [back.TransformIndexToPhysicalPoint((0, 0, 0, k))[3] for k in range(3)]
    assert times == pytest.approx([10.0, 7.5, 5.0])


def test_a_volume_beyond_a_one_volume_nifti_is_said_so(tmp_path):
    """ITK reads a 4-D NIfTI of one volume as 3-D: ':1' was called a volume of a 3-D file."""
    path = write(sitk.JoinSeries([make_image((4, 4, 4))]), tmp_path / "one.nii.gz")
    with pytest.raises(InputError, match="has 1 volume; there is no volume 1"):
        read_image(f"{path}:1")


def test_dicom_series_sorted_by_position(shared_data):
    image = read_image(shared_data / "dicom/ct-chest-40")
    assert image.grid.size == (512, 512, 40)
    # Slices are 2 mm apart and ascending along +z (sorted by position, not by file name).
    assert image.grid.spacing[2] == pytest.approx(2.0)
    assert image.grid.direction_matrix[2, 2] == pytest.approx(1.0)


def test_directory_with_several_series_asks_for_one(two_series):
    series = list_dicom_series(two_series)
    assert len(series) == 2
    assert {s.modality for s in series} == {"MR", "CT"}
    with pytest.raises(
        InputError, match="holds 2 DICOM series; give a folder holding one"
    ) as error:
        read_image(two_series)  # from a command without a series option
    with pytest.raises(InputError, match="holds 2 DICOM series; choose one with --series"):
        read_image(two_series, series_option="--series")
    for s in series:
        assert s.uid in str(error.value)
    chosen = next(s for s in series if s.modality == "MR")
    image = read_image(two_series, series=chosen.uid)
    assert image.grid.size == (256, 256, 3)
    with pytest.raises(InputError, match="no DICOM series '1.2.3'"):
        read_image(two_series, series="1.2.3")


def test_empty_directory_has_no_series(tmp_path):
    with pytest.raises(InputError, match="no DICOM series found"):
        read_image(tmp_path)


@pytest.mark.parametrize(
    "direction",
    [
        np.eye(3),
        np.diag([-1.0, -1.0, 1.0]),
        np.array([[0, 0, -1], [1, 0, 0], [0, 1, 0.0]]),
        rotation(0.2, -0.4, 0.7),
    ],
    ids=["LPS", "RAS", "PSR", "oblique"],
)
@pytest.mark.parametrize("extension", [".nii", ".nii.gz", ".mha", ".mhd", ".nrrd", ".hdr"])
def test_any_orientation_and_anisotropic_spacing_round_trip(direction, extension, tmp_path):
    original = make_image(
        (7, 6, 5), spacing=(0.7, 1.3, 3.1), origin=(-3.5, 12.25, 40.0), direction=direction
    )
    image = Image_from(original)
    again = read_image(write_image(image, tmp_path / f"x{extension}"))
    atol = 1e-5 if extension in (".nii", ".nii.gz", ".hdr") else 1e-9
    _assert_same_geometry(again.grid, original, atol=atol)
    np.testing.assert_array_equal(again.array, image.array)


def Image_from(image: sitk.Image):
    from carctl.io import Image

    return Image.from_sitk(image)


def test_two_d_images_are_read(tmp_path):
    image = make_image((9, 7), spacing=(0.5, 2.0), origin=(1.0, -2.0), direction=[[0, 1], [1, 0]])
    read = read_image(write(image, tmp_path / "slice.nii.gz"))
    assert read.grid.ndim == 2 and read.grid.size == (9, 7)
    assert read.grid.direction == (0.0, 1.0, 1.0, 0.0)


# --- refusals ---------------------------------------------------------------------------------


def test_missing_file(tmp_path):
    with pytest.raises(InputError, match="no such file or directory"):
        read_image(tmp_path / "nope.nii.gz")


def test_empty_file(tmp_path):
    (tmp_path / "empty.nii.gz").write_bytes(b"")
    with pytest.raises(InputError, match="the file is empty"):
        read_image(tmp_path / "empty.nii.gz")


def test_truncated_file(tmp_path):
    full = write(make_image((20, 20, 20)), tmp_path / "full.nii.gz").read_bytes()
    (tmp_path / "cut.nii.gz").write_bytes(full[: len(full) // 2])
    with pytest.raises(InputError, match="cannot read image '.*cut.nii.gz'"):
        read_image(tmp_path / "cut.nii.gz")


def test_truncated_uncompressed_file(tmp_path):
    full = write(make_image((20, 20, 20)), tmp_path / "full.nii").read_bytes()
    (tmp_path / "cut.nii").write_bytes(full[: len(full) // 2])
    with pytest.raises(InputError, match="cannot read image"):
        read_image(tmp_path / "cut.nii")


def test_not_an_image(tmp_path):
    (tmp_path / "notes.nii.gz").write_bytes(gzip.compress(b"these are not voxels\n" * 50))
    (tmp_path / "notes.txt").write_text("hello")
    for name in ("notes.nii.gz", "notes.txt"):
        with pytest.raises(InputError, match="cannot read image"):
            read_image(tmp_path / name)


def test_vector_images_are_refused(tmp_path):
    vector = sitk.Compose([make_image((5, 5, 5))] * 3)
    with pytest.raises(InputError, match="3 components per voxel"):
        read_image(write(vector, tmp_path / "vector.nii.gz"))


def test_five_d_images_are_refused(tmp_path):
    array = np.zeros((2, 2, 3, 4, 5), dtype=np.float32)
    image = sitk.GetImageFromArray(array, isVector=False)
    path = write(image, tmp_path / "five.nii.gz")
    with pytest.raises(InputError, match="5-D; carctl reads 2-D and 3-D images"):
        read_image(path)


def test_series_option_is_for_directories(tmp_path):
    path = write(make_image((4, 4, 4)), tmp_path / "x.nii.gz")
    with pytest.raises(InputError, match="--series applies to a DICOM directory"):
        read_image(path, series="1.2", series_option="--series")


# --- writing ----------------------------------------------------------------------------------


def test_existing_output_needs_force(tmp_path):
    image = Image_from(make_image((4, 4, 4)))
    path = write_image(image, tmp_path / "out.nii.gz")
    with pytest.raises(OutputError, match="exists; use --force"):
        write_image(image, path)
    write_image(image, path, force=True)


def test_never_writes_over_an_input_even_with_force(tmp_path):
    source = write(make_image((4, 4, 4)), tmp_path / "in.nii.gz")
    before = source.read_bytes()
    with pytest.raises(OutputError, match="it is one of the inputs"):
        write_image(read_image(source), source, force=True, inputs=[source])
    assert source.read_bytes() == before


def test_analyze_data_file_of_an_input_is_protected(tmp_path):
    source = write(make_image((4, 4, 4)), tmp_path / "in.hdr")
    assert (tmp_path / "in.img").exists()
    with pytest.raises(OutputError, match="it is one of the inputs"):
        check_output(tmp_path / "in.hdr", force=True, inputs=[source])


def test_unknown_output_extension(tmp_path):
    with pytest.raises(OutputError, match="unknown extension"):
        check_output(tmp_path / "out.png")


def test_failed_write_leaves_nothing_behind(tmp_path):
    with pytest.raises(RuntimeError, match="boom"), atomic_output(tmp_path / "out.nii.gz") as tmp:
        tmp.write_bytes(b"partial")
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_failed_overwrite_keeps_the_old_file(tmp_path):
    target = tmp_path / "out.nii.gz"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError), atomic_output(target, force=True) as tmp:
        tmp.write_bytes(b"new but incomplete")
        raise RuntimeError("interrupted")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.nii.gz"]


def test_multi_file_formats_are_moved_whole(tmp_path):
    image = Image_from(make_image((4, 5, 6)))
    write_image(image, tmp_path / "out.mhd")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.mhd", "out.zraw"]
    np.testing.assert_array_equal(read_image(tmp_path / "out.mhd").array, image.array)


# --- points -----------------------------------------------------------------------------------


def test_points_csv_and_elastix_formats(tmp_path):
    (tmp_path / "header.csv").write_text("x,y,z,t,label\n1,2,3,0,1\n-4.5,5,6.25,0,2\n")
    (tmp_path / "plain.csv").write_text("1,2,3\n-4.5,5,6.25\n")
    (tmp_path / "points.txt").write_text("point\n2\n1 2 3\n-4.5 5 6.25\n")
    expected = np.array([[1, 2, 3], [-4.5, 5, 6.25]])
    for name in ("header.csv", "plain.csv", "points.txt"):
        np.testing.assert_allclose(read_points(tmp_path / name), expected)


def test_index_points_need_and_use_their_grid(tmp_path):
    image = make_image(
        (10, 10, 10), spacing=(2.0, 1.0, 0.5), origin=(5, 6, 7), direction=rotation(0.1, 0.2, 0.3)
    )
    (tmp_path / "index.txt").write_text("index\n1\n1 2 3\n")
    with pytest.raises(InputError, match="voxel indices"):
        read_points(tmp_path / "index.txt")
    points = read_points(tmp_path / "index.txt", grid=Grid.from_sitk(image))
    np.testing.assert_allclose(points[0], image.TransformContinuousIndexToPhysicalPoint((1, 2, 3)))


def test_bad_points_file(tmp_path):
    (tmp_path / "bad.txt").write_text("point\n3\n1 2 3\n")
    with pytest.raises(InputError, match="3 points announced, 1 found"):
        read_points(tmp_path / "bad.txt")


def test_read_grid_from_the_header_equals_the_full_read(shared_data, tmp_path):
    from carctl.io import read_grid

    oblique = write(make_image((6, 5, 4), direction=rotation(0.2, 0.3, 0.1)), tmp_path / "o.nii.gz")
    slice_2d = write(make_image((9, 7), spacing=(0.5, 2.0)), tmp_path / "s.mha")
    for spec in (
        oblique,
        slice_2d,
        shared_data / "spine-t1-t2/t2.nii.gz",
        shared_data / "ct-mr-pat002/pat002_ct.hdr",
        f"{shared_data}/prostate-mr-us/mr_labels/case000000.nii.gz:1",
        shared_data / "dicom/mr-3slice",
    ):
        assert read_grid(spec) == read_image(spec).grid, spec


def test_keep_freed_memory_is_safe_to_call():
    """The command line's allocator setting: True where glibc takes it, False elsewhere,
    never an error; arrays still behave afterwards."""
    import platform

    import torch

    from carctl.runtime import keep_freed_memory

    done = keep_freed_memory()
    assert done is (platform.system() == "Linux" and platform.libc_ver()[0] == "glibc")
    big = torch.ones(1 << 23)
    del big
    assert float(torch.ones(1 << 23).sum()) == float(1 << 23)


def test_an_output_group_writes_all_or_nothing(tmp_path):
    """Ctrl-C after two of three outputs: none of them in place, no staging folder left;
    without it, all three appear at the group's end (not before)."""
    from carctl.io import write_text

    paths = [tmp_path / f"{n}.json" for n in "abc"]
    with pytest.raises(KeyboardInterrupt), output_group():
        for path in paths[:2]:
            write_text("{}", path)
        raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []
    with output_group():
        for path in paths:
            write_text("{}", path)
            assert not path.exists()  # staged until the group ends
    assert all(p.read_text() == "{}" for p in paths)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "b.json", "c.json"]


# --- refusals found by a sweep of odd inputs (nineteenth session) -----------------------------


def test_data_file_named_in_a_header_is_protected(tmp_path):
    """A MetaImage input whose header names another data file (``in.mhd`` reading ``w.zraw``,
    as a renamed header does): writing ``w.mhd`` would write ``w.zraw`` over it. Guessing the
    data file from the header's own name let it through, and the input changed."""
    sitk.WriteImage(make_image((4, 4, 4)), str(tmp_path / "w.mhd"), useCompression=True)
    (tmp_path / "w.mhd").rename(tmp_path / "in.mhd")
    before = (tmp_path / "w.zraw").read_bytes()
    image = read_image(tmp_path / "in.mhd")
    with pytest.raises(OutputError, match="'.*w.zraw': it is one of the inputs"):
        write_image(image, tmp_path / "w.mhd", force=True, inputs=[tmp_path / "in.mhd"])
    assert (tmp_path / "w.zraw").read_bytes() == before
    # an NRRD detached header's "data file:" too
    (tmp_path / "in.nhdr").write_text(
        "NRRD0004\ntype: float\ndimension: 3\nsizes: 4 4 4\nencoding: raw\ndata file: payload.raw\n"
    )
    from carctl.io import input_files

    assert tmp_path / "payload.raw" in input_files(tmp_path / "in.nhdr")
    # an attached NRRD: its header ends at the first blank line, the data may read as anything
    (tmp_path / "att.nrrd").write_bytes(
        b"NRRD0004\ntype: uint8\ndimension: 1\nsizes: 16\nencoding: raw\n\ndata file: x.raw\n"
    )
    assert input_files(tmp_path / "att.nrrd") == [tmp_path / "att.nrrd"]


@pytest.mark.parametrize(
    "name", ["w.nii.nii.gz", "x.nii.gz.nii.gz", "j.hdr.nii.gz", "n.NII.nii.gz", "h.nii.hdr"]
)
def test_nifti_names_the_writer_would_change_are_refused_before_any_work(name, tmp_path):
    """ITK's NIfTI writer cuts a name at '.nii', '.hdr' or '.img' inside it (w.nii.nii.gz
    became w.nii.gz): the run failed only at its end ("nothing was written")."""
    with pytest.raises(OutputError, match="would write another file name"):
        check_output(tmp_path / name)
    for fine in ("o.nii_x.nii.gz", "k.v1.nii.gz", "d.nii.mha"):
        check_output(tmp_path / fine)


def test_an_output_group_moves_nothing_when_one_output_is_missing(tmp_path):
    """One output of a group not written (as a writer that names its file otherwise): the
    others were moved into place before the error."""
    from carctl.io import write_text

    with pytest.raises(OutputError, match="nothing was written to"), output_group():
        write_text("{}", tmp_path / "a.json")
        with atomic_output(tmp_path / "b.json", extensions=(".json",)):
            pass  # writes nothing
    assert list(tmp_path.iterdir()) == []


def test_a_header_with_a_nan_origin_is_refused_in_one_line(tmp_path):
    image = make_image((4, 4, 4))
    image.SetOrigin((float("nan"), 0.0, 0.0))
    sitk.WriteImage(image, str(tmp_path / "nan.nii.gz"))
    with pytest.raises(InputError, match="unusable geometry: grid origin must be finite"):
        read_image(tmp_path / "nan.nii.gz")
    with pytest.raises(ValueError, match="spacing must be positive and finite"):
        Grid((4, 4, 4), (1.0, np.inf, 1.0), (0.0,) * 3, tuple(np.eye(3).ravel()))


def test_a_bad_volume_index_is_named(tmp_path):
    path = write(make_image((4, 4, 4)), tmp_path / "m.nii.gz")
    for spec in (f"{path}:-1", f"{path}:x"):
        with pytest.raises(InputError, match="the volume after ':' must be a whole number"):
            read_image(spec)
    with pytest.raises(InputError, match="no such file or directory"):
        read_image(tmp_path / "none.nii.gz:1")


def test_points_csv_with_a_byte_order_mark(tmp_path):
    (tmp_path / "bom.csv").write_bytes(b"\xef\xbb\xbfx,y,z\r\n1,2,3\r\n")
    np.testing.assert_allclose(read_points(tmp_path / "bom.csv"), [[1, 2, 3]])


@pytest.mark.parametrize("dtype", [np.float32, np.int16, np.uint8, np.float64])
def test_large_nifti_gz_written_in_parallel_reads_back_as_itk_writes_it(
    dtype, tmp_path, monkeypatch
):
    """A large .nii.gz is written by carctl (ITK's header, the voxels as gzip members
    compressed side by side): ITK reads it back whole, with the geometry and the header ITK
    itself writes."""
    import carctl.io as io

    monkeypatch.setattr(io, "PARALLEL_GZIP_BYTES", 1000)
    monkeypatch.setattr(io, "_GZIP_PIECE", 4096)  # many members
    rng = np.random.default_rng(0)
    array = (rng.random((13, 11, 9)) * 100).astype(dtype)
    grid = Grid(
        (9, 11, 13), (0.7, 1.1, 2.5), (-3.0, 4.0, 5.5), tuple(rotation(0.2, -0.1, 0.3).ravel())
    )
    from carctl.io import Image

    image = Image(array, grid)
    written = write_image(image, tmp_path / "big.nii.gz")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.nii.gz"]
    back = read_image(written)
    np.testing.assert_array_equal(back.array, array)
    assert back.grid.same_as(grid)
    sitk.WriteImage(image.to_sitk(), str(tmp_path / "itk.nii"), useCompression=False)
    with gzip.open(written, "rb") as stream:
        ours = stream.read()
    itk = (tmp_path / "itk.nii").read_bytes()
    assert ours[:352] == itk[:352] and ours == itk


def test_large_4d_nifti_gz_written_in_parallel_reads_back_as_itk_writes_it(tmp_path, monkeypatch):
    """The same for a 4-D series (``apply`` on a time series): ITK's 4-D header, its fourth
    axis's spacing and origin kept, the voxels of every volume."""
    import carctl.io as io
    from carctl.io import Volumes, read_image_or_volumes, write_volumes

    monkeypatch.setattr(io, "PARALLEL_GZIP_BYTES", 1000)
    monkeypatch.setattr(io, "_GZIP_PIECE", 4096)
    array = (np.random.default_rng(1).random((6, 13, 11, 9)) * 100).astype(np.float32)
    grid = Grid(
        (9, 11, 13), (0.7, 1.1, 2.5), (-3.0, 4.0, 5.5), tuple(rotation(0.2, -0.1, 0.3).ravel())
    )
    volumes = Volumes(array, grid, 2.5, 7.0)
    written = write_volumes(volumes, tmp_path / "big.nii.gz")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.nii.gz"]
    back = read_image_or_volumes(written)
    np.testing.assert_array_equal(back.array, array)
    assert back.grid.same_as(grid) and (back.step, back.start) == (2.5, 7.0)
    sitk.WriteImage(volumes.to_sitk(), str(tmp_path / "itk.nii"), useCompression=False)
    with gzip.open(written, "rb") as stream:
        ours = stream.read()
    assert ours == (tmp_path / "itk.nii").read_bytes()


def test_a_dicom_series_off_a_regular_grid_is_refused(shared_data, tmp_path):
    """Found by a sweep: a series missing a slice was read on ITK's regular grid (slices up to
    1 mm from where their headers put them) without a word; a gantry tilt likewise."""
    import shutil

    series = tmp_path / "ct"
    shutil.copytree(shared_data / "dicom" / "ct-chest-40", series)
    assert read_image(series).grid.size == (512, 512, 40)  # the whole series is regular
    sorted(series.iterdir())[19].unlink()
    with pytest.raises(InputError, match=r"not on a regular grid: its slices step by 2 to 4 mm"):
        read_image(series)


@pytest.mark.parametrize(
    "old, new, words",
    [  # the slice's bytes (implicit VR little endian) before and after
        (
            b"\x20\x00\x32\x00\x10\x00\x00\x00-250",  # ImagePositionPatient renamed away
            b"\x20\x00\x31\x00\x10\x00\x00\x00-250",
            "has no readable position (0020|0032)",
        ),
        (b"1\\0\\0\\0\\1\\0", b"0\\1\\0\\1\\0\\0", "differs in its orientation"),
        (b"0.9765625\\0.9765625", b"0.5000000\\0.5000000", "differs in its pixel spacing"),
    ],
)
def test_a_dicom_slice_unlike_the_others_is_refused(shared_data, tmp_path, old, new, words):
    """Found by a sweep: one slice without ImagePositionPatient skipped the regular-grid
    check, and ITK stacked it among the others out of order (13 slices 2 mm off, exit 0); a
    slice of another orientation or pixel spacing was stacked with the rest in silence."""
    import shutil

    series = tmp_path / "ct"
    shutil.copytree(shared_data / "dicom" / "ct-chest-40", series)
    slice_ = series / "00-slice070.dcm"
    data = slice_.read_bytes()
    assert data.count(old) == 1
    slice_.write_bytes(data.replace(old, new))
    with pytest.raises(InputError, match=re.escape(words)):
        read_image(series)


@pytest.mark.parametrize("name", ["s.nii.gz", "s.nii", "s.hdr"])
def test_a_sheared_grid_is_not_written_as_nifti(tmp_path, name):
    """ITK writes a sheared direction into NIfTI (and the Analyze pair it writes as NIfTI)
    with its axes made orthogonal, without an error: the file read back elsewhere."""
    from carctl.io import Image

    shear = np.array([[1.0, 0.3, 0.0], [0.0, 1.0, 0.2], [0.0, 0.0, 1.0]])
    shear /= np.linalg.norm(shear, axis=0)
    grid = Grid((5, 4, 3), (1.0, 1.5, 2.0), (3.0, -4.0, 5.0), tuple(shear.ravel()))
    assert (
        grid.is_sheared
        and not Grid((5, 4, 3), (1.0,) * 3, (0.0,) * 3, rotation(0, 0, 0.3).ravel()).is_sheared
    )
    image = Image(np.ones(grid.shape, np.float32), grid)
    with pytest.raises(OutputError, match="its grid is sheared"):
        write_image(image, tmp_path / name)
    assert not list(tmp_path.iterdir())
    assert read_image(write_image(image, tmp_path / "s.mha")).grid.same_as(grid, 1e-6)


def test_a_singular_direction_is_named_not_a_matrix_row(tmp_path):
    """ITK's message ends with the refused matrix: the error read "... 'sing.mha': 0 0 0"."""
    path = tmp_path / "sing.mha"
    path.write_bytes(
        b"ObjectType = Image\nNDims = 3\nBinaryData = True\nBinaryDataByteOrderMSB = False\n"
        b"TransformMatrix = 1 0 0 0 1 0 0 0 0\nOffset = 0 0 0\nElementSpacing = 1 1 1\n"
        b"DimSize = 4 5 6\nElementType = MET_SHORT\nElementDataFile = LOCAL\n" + bytes(240)
    )
    with pytest.raises(InputError, match="its direction matrix is singular"):
        read_image(path)


def test_a_folder_lock_refuses_a_second_holder_and_is_gone_after(tmp_path):
    """Two runs writing into one folder overwrote each other's record (``batch``) or
    checkpoints (``train``): the second is refused, told which run holds the folder, while
    the first holds it; a lock file that is a link is refused, never followed (it was: the
    input it pointed to was overwritten)."""
    import os

    from carctl.io import LOCK_NAME, folder_lock

    folder = tmp_path / "new" / "out"
    with folder_lock(folder, "carctl train car"):
        assert (folder / LOCK_NAME).read_text() == f"carctl train car (process {os.getpid()})\n"
        with pytest.raises(OutputError) as refused, folder_lock(folder, "carctl batch"):
            pass
        assert str(refused.value) == (
            f"carctl train car (process {os.getpid()}) is writing into '{folder}'; wait for it "
            "to end or give another folder"
        )
    assert list(folder.iterdir()) == []
    with folder_lock(folder, "carctl batch"):  # free again
        pass
    victim = tmp_path / "input.nii.gz"
    victim.write_bytes(b"image")
    (folder / LOCK_NAME).symlink_to(victim)
    with pytest.raises(OutputError, match="is not a plain file"), folder_lock(folder, "x"):
        pass
    assert victim.read_bytes() == b"image"


def test_native_output_is_silenced_by_the_main_thread_only():
    """Found by a sweep: `register` writes its field and warped image in threads; each write
    redirected the process's stdout and stderr to /dev/null and back, and a thread's restore
    ending after another's redirect had begun left stdout on /dev/null (`--json -` printed
    nothing, exit 0, in 3 of 6 runs). Other threads leave the descriptors alone."""
    import os
    import threading

    from carctl.io import native_output_silenced

    before = os.fstat(1).st_ino, os.fstat(2).st_ino
    seen = []

    def in_a_thread():
        with native_output_silenced():
            seen.append((os.fstat(1).st_ino, os.fstat(2).st_ino))

    worker = threading.Thread(target=in_a_thread)
    worker.start()
    worker.join()
    assert seen == [before]
    with native_output_silenced():  # the main thread's hides them
        null = os.stat(os.devnull).st_ino
        assert (os.fstat(1).st_ino, os.fstat(2).st_ino) == (null, null)
    assert (os.fstat(1).st_ino, os.fstat(2).st_ino) == before
