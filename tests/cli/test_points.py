"""``carctl points``: landmarks mapped through a saved field and affine, as ITK maps them."""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk
import torch
from conftest import rotation

from carctl.spatial.files import write_affine, write_field
from carctl.spatial.grid import Grid
from carctl.spatial.transform import Affine, DisplacementField

# the last one outside the field's grid: no displacement there, as in ITK
POINTS = np.array(
    [[3.0, -4.5, 10.25], [0.0, 0.0, 0.0], [-7.5, 12.0, 4.0], [15.0, 2.0, -6.0], [80.0, -60.0, 5.0]]
)


def _transforms(tmp_path):
    """An affine (turned, scaled, moved) and a smooth field on an oblique grid, written as
    carctl writes them; returns their paths."""
    matrix = rotation(0.1, -0.05, 0.2) * np.array([1.05, 0.95, 1.0])
    affine = Affine(matrix, np.array([4.0, -2.0, 1.5]), np.array([1.0, 2.0, 3.0]))
    direction = rotation(0.0, 0.0, 0.3).ravel()
    grid = Grid((20, 22, 18), (2.0, 1.5, 2.5), (-20.0, -15.0, -20.0), tuple(direction))
    z, y, x = torch.meshgrid(*(torch.linspace(0, 1, n) for n in (18, 22, 20)), indexing="ij")
    data = torch.stack([3 * torch.sin(3 * x) * y, -2 * torch.cos(2 * z), 1.5 * x * z])
    field = DisplacementField(grid, data.to(torch.float64))
    return (
        write_field(field, tmp_path / "field.nii.gz"),
        write_affine(affine, tmp_path / "affine.mat"),
    )


def _itk(field_path, affine_path, points):
    """The field then the affine, point by point, by SimpleITK's own transforms."""
    field = sitk.DisplacementFieldTransform(
        sitk.Cast(sitk.ReadImage(str(field_path)), sitk.sitkVectorFloat64)
    )
    affine = sitk.ReadTransform(str(affine_path))
    return np.array([affine.TransformPoint(field.TransformPoint(tuple(p))) for p in points])


def test_points_follow_itk_and_keep_the_other_columns(tmp_path, cli):
    """A CSV with ANTs' columns (x,y,z,t and more) comes out with only x, y, z changed, to
    where SimpleITK maps them through the same files (the field first, then the affine)."""
    field, affine = _transforms(tmp_path)
    rows = ["label,x,y,z,t,comment"] + [
        f"L{i},{p[0]},{p[1]},{p[2]},0,note {i}" for i, p in enumerate(POINTS)
    ]
    (tmp_path / "fixed.csv").write_text("\n".join(rows) + "\n")
    result = cli(
        "points", tmp_path / "fixed.csv", "-f", field, "-a", affine, "-o", tmp_path / "m.csv"
    )
    assert result.code == 0, result.err
    assert "5 points" in result.err
    assert "1 of the points lie outside the field's grid" in result.err
    lines = (tmp_path / "m.csv").read_text().splitlines()
    assert lines[0] == "label,x,y,z,t,comment"
    table = [line.split(",") for line in lines[1:]]
    assert [r[0] for r in table] == ["L0", "L1", "L2", "L3", "L4"]
    assert [r[4:] for r in table] == [["0", f"note {i}"] for i in range(5)]
    mapped = np.array([[float(v) for v in r[1:4]] for r in table])
    np.testing.assert_allclose(mapped, _itk(field, affine, POINTS), atol=1e-4)
    assert np.abs(mapped - POINTS).max() > 1  # they did move


def test_points_agree_with_evaluate_and_invert_the_affine(tmp_path, cli):
    """The landmark error ``evaluate`` reports is the distance from the mapped points; an
    affine's points mapped back with --invert-affine are where they started; an elastix
    point set of voxel indices (with --image) comes out as a physical point set."""
    import json

    from conftest import make_image, write

    field, affine = _transforms(tmp_path)
    np.savetxt(tmp_path / "fixed.csv", POINTS, delimiter=",", header="x,y,z", comments="")
    moving = POINTS + np.array([1.0, -2.0, 0.5])
    np.savetxt(tmp_path / "moving.csv", moving, delimiter=",", header="x,y,z", comments="")
    out = tmp_path / "mapped.csv"
    assert cli("points", tmp_path / "fixed.csv", "-f", field, "-a", affine, "-o", out).code == 0
    mapped = np.loadtxt(out, delimiter=",", skiprows=1)
    report = cli(
        "evaluate",
        "--fixed-points",
        tmp_path / "fixed.csv",
        "--moving-points",
        tmp_path / "moving.csv",
        "-f",
        field,
        "-a",
        affine,
        "--json",
        "-",
    )
    errors = json.loads(report.out)["landmarks"]["errors"]
    np.testing.assert_allclose(errors, np.linalg.norm(mapped - moving, axis=1), atol=1e-5)

    there = tmp_path / "there.csv"
    back = tmp_path / "back.csv"
    assert cli("points", tmp_path / "fixed.csv", "-a", affine, "-o", there).code == 0
    assert cli("points", there, "-a", affine, "--invert-affine", "-o", back).code == 0
    np.testing.assert_allclose(np.loadtxt(back, delimiter=",", skiprows=1), POINTS, atol=1e-5)

    image = write(make_image((8, 9, 10), (1.0, 2.0, 0.5), (5.0, -3.0, 2.0)), tmp_path / "i.nii")
    (tmp_path / "index.txt").write_text("index\n2\n1 2 3\n0 0 0\n")
    assert (
        cli(
            "points",
            tmp_path / "index.txt",
            "-a",
            affine,
            "--image",
            image,
            "-o",
            tmp_path / "set.txt",
        ).code
        == 0
    )
    lines = (tmp_path / "set.txt").read_text().splitlines()
    assert lines[:2] == ["point", "2"]
    physical = np.array([[6.0, 1.0, 3.5], [5.0, -3.0, 2.0]])
    expected = sitk.ReadTransform(str(affine))
    for line, p in zip(lines[2:], physical, strict=True):
        got = [float(v) for v in line.split()]
        np.testing.assert_allclose(got, expected.TransformPoint(tuple(p)), atol=1e-5)


def test_points_refusals_are_one_line(tmp_path, cli):
    field, affine = _transforms(tmp_path)
    np.savetxt(tmp_path / "p.csv", POINTS, delimiter=",", header="x,y,z", comments="")
    p, out = tmp_path / "p.csv", tmp_path / "o.csv"
    cases = [
        ((p, "-o", out), 2, "--field and/or --affine"),
        ((p, "-f", field, "-a", affine, "--invert-affine", "-o", out), 2, "--inverse-field"),
        ((p, "-a", affine, "-o", p), 1, "one of the inputs"),
        ((p, "-a", affine, "-o", tmp_path / "o.json"), 1, "unknown extension"),
        ((tmp_path / "none.csv", "-a", affine, "-o", out), 1, "none.csv"),
    ]
    for name, text, message in (
        ("header.csv", "x,y,z\n", "holds no points"),
        ("nan.csv", "x,y,z\n1,2,3\n1,2,nan\n", "point 2 is not finite"),
        ("short.csv", "x,y,z\n1,2,3\n1,2\n", "row 3 has 2 values"),
    ):
        (tmp_path / name).write_text(text)
        cases.append(((tmp_path / name, "-a", affine, "-o", out), 1, message))
    # a field with a NaN vector (MetaImage keeps it) and a singular affine to invert: NaN
    # points written with exit status 0, and an internal error (LinAlgError)
    holed = DisplacementField(
        Grid((4, 4, 4), (1.0,) * 3, (0.0,) * 3, tuple(np.eye(3).ravel())), torch.zeros(3, 4, 4, 4)
    )
    holed.data[0, 1, 2, 3] = float("nan")
    nan_field = write_field(holed, tmp_path / "nan.mha")
    flat = write_affine(Affine(np.zeros((3, 3)), np.zeros(3)), tmp_path / "flat.mat")
    cases += [
        ((p, "-f", nan_field, "-o", out), 1, "has 1 voxel with a non-finite vector"),
        ((p, "-a", flat, "--invert-affine", "-o", out), 1, "singular or not finite"),
    ]
    for args, code, message in cases:
        result = cli("points", *args)
        assert result.code == code and message in result.err, (args, result.err)
        assert len(result.err.strip().splitlines()) == 1 and "Traceback" not in result.err
    assert cli("points", p, "-a", affine, "-o", out).code == 0
    again = cli("points", p, "-a", affine, "-o", out)
    assert again.code == 1 and "--force" in again.err
    assert cli("points", p, "-a", affine, "-o", out, "--force").code == 0


def test_cord_points_of_the_demo_pair_go_to_the_moving_image_and_back(tmp_path, cli):
    """On the bundled real spine pair: points of the fixed cord mapped to the moving image by
    register's --field come back within 0.1 mm through its --inverse-field (the network's
    field: deformable, and half the time of ``auto``)."""
    from carctl.demo import demo_files

    files = demo_files()
    labels = sitk.ReadImage(str(files["fixed_labels"]))
    index = np.argwhere(sitk.GetArrayFromImage(labels) > 0)[::200, ::-1].astype(float)
    points = np.array([labels.TransformContinuousIndexToPhysicalPoint(list(i)) for i in index])
    np.savetxt(tmp_path / "cord.csv", points, delimiter=",", header="x,y,z", comments="")
    out = tmp_path / "out"
    result = cli(
        "register",
        files["moving"],
        files["fixed"],
        "-o",
        out,
        "--field",
        out / "field.nii",
        "--inverse-field",
        out / "inverse.nii.gz",
        "--quiet",
        "--seed",
        "0",
        "--method",
        "net",
    )
    assert result.code == 0, result.err
    there, back = tmp_path / "there.csv", tmp_path / "back.csv"
    assert cli("points", tmp_path / "cord.csv", "-f", out / "field.nii", "-o", there).code == 0
    assert cli("points", there, "-f", out / "inverse.nii.gz", "-o", back).code == 0
    moved = np.linalg.norm(np.loadtxt(there, delimiter=",", skiprows=1) - points, axis=1)
    error = np.linalg.norm(np.loadtxt(back, delimiter=",", skiprows=1) - points, axis=1)
    assert len(points) > 10 and moved.mean() > 0.5  # the registration moved them
    assert error.max() < 0.1


SLICER_RAS = """# Markups fiducial file version = 4.11
# CoordinateSystem = RAS
# columns = id,x,y,z,ow,ox,oy,oz,vis,sel,lock,label,desc,associatedNodeID
vtkMRMLMarkupsFiducialNode_0,10.5,-20.25,30,0,0,0,1,1,1,0,F-1,tip,
vtkMRMLMarkupsFiducialNode_1,-1,2,-3,0,0,0,1,1,1,0,F-2,,
"""


def test_slicer_markups_are_read_in_their_coordinate_system_and_kept(cli, tmp_path):
    """3D Slicer's .fcsv landmarks (RAS unless the header says LPS) were refused with an
    unclear error; they are read as LPS points, and written back in the file's own system
    with its other columns kept."""
    from carctl.io import read_points
    from carctl.spatial.files import write_affine
    from carctl.spatial.transform import Affine

    ras = tmp_path / "f.fcsv"
    ras.write_text(SLICER_RAS)
    np.testing.assert_allclose(read_points(ras), [[-10.5, 20.25, 30.0], [1.0, -2.0, -3.0]])
    lps = tmp_path / "lps.fcsv"
    lps.write_text(SLICER_RAS.replace("= RAS", "= LPS"))
    np.testing.assert_allclose(read_points(lps), [[10.5, -20.25, 30.0], [-1.0, 2.0, -3.0]])
    write_affine(Affine(np.eye(3), [1.0, 2.0, 3.0]), tmp_path / "shift.mat")  # LPS mm
    result = cli("points", ras, "-a", tmp_path / "shift.mat", "-o", tmp_path / "out.fcsv")
    assert result.code == 0, result.err
    out = (tmp_path / "out.fcsv").read_text().splitlines()
    assert out[:3] == SLICER_RAS.splitlines()[:3]  # the header as it was: RAS
    assert out[3].split(",")[1:4] == ["9.500000", "-22.250000", "33.000000"]  # RAS again
    assert out[3].split(",")[11:13] == ["F-1", "tip"]
    np.testing.assert_allclose(read_points(tmp_path / "out.fcsv"), read_points(ras) + [1, 2, 3])
    plain = cli("points", ras, "-a", tmp_path / "shift.mat", "-o", tmp_path / "out.csv")
    assert plain.code == 0 and (tmp_path / "out.csv").read_text().startswith("x,y,z\n")
    np.testing.assert_allclose(read_points(tmp_path / "out.csv"), read_points(ras) + [1, 2, 3])
    write_affine(Affine(np.eye(3), [0.0, 0.0, 0.0]), tmp_path / "same.mat")
    made = cli(
        "points", tmp_path / "out.csv", "-a", tmp_path / "same.mat", "-o", tmp_path / "new.fcsv"
    )
    assert made.code == 0 and "CoordinateSystem = LPS" in (tmp_path / "new.fcsv").read_text()
    np.testing.assert_allclose(
        read_points(tmp_path / "new.fcsv"), read_points(tmp_path / "out.csv")
    )
