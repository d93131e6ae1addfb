"""Benchmark: rigid CT -> MR on a real pair with another tool's answer (``ct-mr-pat002``).

The shared ``ct-mr-pat002`` holds one patient's head CT (1.4 x 1.4 x 5 mm, 29 slices) and T2
MR (0.98 x 0.98 x 5 mm, 22 slices), Analyze files without a common world frame, and
CMTK's rigid answer for them (``cmtk-rigid-reference.txt``: the CT as reference, the MR
floating). There is no ground truth; this compares the rigid answers of carctl (MIND),
ANTs (``Rigid``, Mattes MI) and elastix (its default rigid map, MI) with CMTK's and with
each other, and scores each by the normalised mutual information of the CT and the MR
resampled through it (over the CT's head, above -300 HU; 16, 32 and 64 bins).

CMTK's file holds translation, rotation (degrees), scale and shear about a centre in its
own coordinates: each image's voxel index times spacing with the first axis reversed (its
images are read in a right-to-left order there), the rotations negated against ITK's. Of the
eight axis reversals and two rotation signs, that reading is the closest to every tool's
answer (carctl's 3.6 mm away, ANTs' and elastix's 2.2 mm, nearly all of it along the 5 mm
slices); the next closest is 4.3 mm from carctl's.

    python benchmarks/bench_ct_mr.py [--threads 2]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import SimpleITK as sitk

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "ct-mr-pat002"


def read(path: Path) -> sitk.Image:
    sitk.ProcessObject.SetGlobalWarningDisplay(False)  # "Analyze file is deprecated"
    return sitk.Cast(sitk.ReadImage(str(path)), sitk.sitkFloat32)


def cmtk_reference(path: Path, ct: sitk.Image, mr: sitk.Image) -> sitk.AffineTransform:
    """CMTK's rigid answer as an ITK transform (CT physical -> MR physical; see the module
    docstring for its coordinates)."""
    fields = {}
    for line in path.read_text().splitlines():
        parts = line.split()
        if parts and parts[0] in ("xlate", "rotate", "center"):
            fields[parts[0]] = np.array([float(v) for v in parts[1:4]])
    angles = -np.radians(fields["rotate"])
    rotation = np.eye(3)
    for axis in (0, 1, 2):  # R = Rz Ry Rx
        c, s = np.cos(angles[axis]), np.sin(angles[axis])
        i, j = [(1, 2), (0, 2), (0, 1)][axis]
        turn = np.eye(3)
        turn[i, i] = turn[j, j] = c
        turn[i, j], turn[j, i] = -s, s
        rotation = turn @ rotation
    # CMTK's coordinates of a physical point x: F x + a, F reversing the first axis and a its
    # extent; its answer maps the CT's to the MR's: y = R (F x + a - centre) + centre + shift,
    # and the MR's physical point is F (y - b), b the MR's extent along the first axis
    flip = np.diag([-1.0, 1.0, 1.0])
    a = np.array([(ct.GetSize()[0] - 1) * ct.GetSpacing()[0], 0.0, 0.0])
    b = np.array([(mr.GetSize()[0] - 1) * mr.GetSpacing()[0], 0.0, 0.0])
    centre, shift = fields["center"], fields["xlate"]
    matrix = flip @ rotation @ flip
    offset = flip @ (rotation @ (a - centre) + centre + shift - b)
    transform = sitk.AffineTransform(3)
    transform.SetMatrix(matrix.ravel().tolist())
    transform.SetTranslation(offset.tolist())
    return transform


def carctl_rigid(mr_path: Path, ct_path: Path, out: Path, threads: int) -> sitk.Transform:
    command = [
        str(Path(sys.executable).with_name("carctl")),
        "register",
        str(mr_path),
        str(ct_path),
        "--method",
        "rigid",
        "-o",
        str(out),
        "--threads",
        str(threads),
        "--quiet",
    ]
    subprocess.run(command, check=True)
    return sitk.ReadTransform(str(next(out.glob("*_affine.mat"))))


def ants_rigid(ct_path: Path, mr_path: Path) -> sitk.Transform:
    import ants

    fixed, moving = ants.image_read(str(ct_path)), ants.image_read(str(mr_path))
    result = ants.registration(fixed, moving, "Rigid", aff_metric="mattes", random_seed=1)
    return sitk.ReadTransform(result["fwdtransforms"][0])


def elastix_rigid(ct_path: Path, mr_path: Path) -> sitk.Transform:
    import itk

    fixed = itk.imread(str(ct_path), itk.F)
    moving = itk.imread(str(mr_path), itk.F)
    parameters = itk.ParameterObject.New()
    parameters.AddParameterMap(parameters.GetDefaultParameterMap("rigid"))
    _, found = itk.elastix_registration_method(
        fixed, moving, parameter_object=parameters, log_to_console=False
    )
    found = found.GetParameterMap(0)
    values = [float(v) for v in found["TransformParameters"]]
    transform = sitk.Euler3DTransform()
    transform.SetCenter([float(v) for v in found["CenterOfRotationPoint"]])
    transform.SetRotation(*values[:3])
    transform.SetTranslation(values[3:6])
    return transform


def nmi(ct: sitk.Image, mr: sitk.Image, transform: sitk.Transform, bins: int) -> float:
    """(H(CT) + H(MR)) / H(CT, MR) over the CT's head, the MR resampled through ``transform``."""
    fixed = sitk.GetArrayFromImage(ct)
    moved = sitk.GetArrayFromImage(sitk.Resample(mr, ct, transform, sitk.sitkLinear, 0.0))
    head = fixed > -300
    joint, _, _ = np.histogram2d(fixed[head], moved[head], bins=bins)
    p = joint / joint.sum()

    def entropy(q: np.ndarray) -> float:
        q = q[q > 0]
        return float(-(q * np.log(q)).sum())

    return (entropy(p.sum(1)) + entropy(p.sum(0))) / entropy(p)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    ct, mr = read(args.data / "pat002_ct.hdr"), read(args.data / "pat002_mr_T2.hdr")
    head = np.argwhere(sitk.GetArrayFromImage(ct) > -300)[:, ::-1]  # (i, j, k) indices
    points = head * np.array(ct.GetSpacing()) + np.array(ct.GetOrigin())  # identity direction
    reference = cmtk_reference(args.data / "cmtk-rigid-reference.txt", ct, mr)
    answers = {"header": sitk.Transform(3, sitk.sitkIdentity), "CMTK (its file)": reference}
    with tempfile.TemporaryDirectory(prefix="bench_ct_mr_") as tmp:
        ct_path, mr_path = Path(tmp) / "ct.nii.gz", Path(tmp) / "mr.nii.gz"
        sitk.WriteImage(ct, str(ct_path))
        sitk.WriteImage(mr, str(mr_path))
        runs = {
            "carctl --method rigid": lambda: carctl_rigid(
                mr_path, ct_path, Path(tmp) / "carctl", args.threads
            ),
            "ANTs Rigid (Mattes)": lambda: ants_rigid(ct_path, mr_path),
            "elastix rigid (MI)": lambda: elastix_rigid(ct_path, mr_path),
        }
        for name, run in runs.items():
            answers[name] = run()

    def mapped(transform: sitk.Transform) -> np.ndarray:
        return np.array([transform.TransformPoint(tuple(p)) for p in points[::5]])

    at_reference = mapped(reference)
    print(f"CT head points: {len(points[::5])} (every fifth voxel above -300 HU)\n")
    print(
        "| answer | from CMTK's: mean (mm) | mean offset x / y / z (mm) | NMI 16 / 32 / 64 bins |"
    )
    print("|---|---|---|---|")
    for name, transform in answers.items():
        there = mapped(transform)
        offset = (there - at_reference).mean(axis=0)
        distance = np.linalg.norm(there - at_reference, axis=1).mean()
        scores = " / ".join(f"{nmi(ct, mr, transform, b):.4f}" for b in (16, 32, 64))
        print(
            f"| {name} | {distance:.2f} | {offset[0]:+.2f} / {offset[1]:+.2f} / "
            f"{offset[2]:+.2f} | {scores} |"
        )


if __name__ == "__main__":
    main()
