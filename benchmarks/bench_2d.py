"""Benchmark: 2-D registration of contrast slices with a known deformation.

Axial slices of the BraTS case (``brats-gli-00001``: T1n, T1c, T2w, T2-FLAIR, co-registered
by the dataset) as 2-D images. The moving contrast is deformed by a smooth random field (a
cubic B-spline on a 6 x 6 control grid, coefficients N(0, SIZE mm)) after a rigid motion
(rotation U(-5, 5) degrees, translation U(-3, 3) mm), all drawn from the seed; the true
fixed -> moving mapping is the inverse of that, computed by SimpleITK
(``InvertDisplacementField``). Each pair is registered with ``--method affine`` and with
``auto`` at each ``--regularization`` weight asked (``default``: carctl's own); the score is
the mean end-point error (mm) over the brain mask, and the spread (std) of the Jacobian
determinant there. ``same`` pairs (T1n onto T1n) show what a same-contrast pair costs.

    python benchmarks/bench_2d.py [--seeds 0 1 2 3 4] [--weights default 0.2 0.5 1] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

HERE = Path(__file__).resolve().parent
CASE = "brats-gli-00001/BraTS-GLI-00001-000-"
# (moving contrast, fixed contrast, axial slice)
PAIRS = (("t2w", "t1n", 77), ("t2f", "t1n", 60), ("t1c", "t2w", 90), ("t1n", "t1n", 70))


def make_pair(data: Path, moving: str, fixed: str, index: int, seed: int, size: float):
    """Moving image (deformed), fixed image, brain mask (fixed grid) and the true field."""
    import numpy as np
    import SimpleITK as sitk

    from carctl.io import Image
    from carctl.spatial.files import read_field

    def plane(name: str, kind=sitk.sitkFloat32) -> sitk.Image:
        return sitk.ReadImage(str(data / f"{CASE}{name}.nii.gz"), kind)[:, :, index]

    source, target, mask = plane(moving), plane(fixed), plane("mask", sitk.sitkUInt8)
    rng = np.random.default_rng(seed)
    bspline = sitk.BSplineTransformInitializer(source, [6, 6], 3)
    bspline.SetParameters(rng.normal(0, size, len(bspline.GetParameters())).tolist())
    rigid = sitk.Euler2DTransform()
    middle = [(n - 1) / 2 for n in source.GetSize()]
    rigid.SetCenter(source.TransformContinuousIndexToPhysicalPoint(middle))
    rigid.SetAngle(float(np.radians(rng.uniform(-5, 5))))
    rigid.SetTranslation(rng.uniform(-3, 3, 2).tolist())
    motion = sitk.CompositeTransform([rigid, bspline])  # a point: the B-spline, then rigid
    warped = sitk.Resample(source, source, motion, sitk.sitkLinear, 0.0)
    forward = sitk.TransformToDisplacementField(
        motion,
        sitk.sitkVectorFloat64,
        target.GetSize(),
        target.GetOrigin(),
        target.GetSpacing(),
        target.GetDirection(),
    )
    truth = sitk.InvertDisplacementField(forward, 50, 0.001, 0.0001, False)
    path = Path(os.environ.get("TMPDIR", "/tmp")) / f"carctl-bench2d-{os.getpid()}.nii.gz"
    sitk.WriteImage(truth, str(path))
    field = read_field(path)
    path.unlink()
    brain = sitk.GetArrayFromImage(mask) > 0
    return Image.from_sitk(warped), Image.from_sitk(target), brain, field


def score(moving, fixed, brain, truth, method: str, weight: float | None) -> tuple[float, float]:
    import torch

    from carctl.config import RegistrationOptions
    from carctl.registration.pipeline import register
    from carctl.spatial.transform import jacobian_determinant
    from carctl.synthetic import end_point_error

    options = RegistrationOptions(method=method, device="cpu", regularization=weight)
    result = register(moving, fixed, options)
    spread = float(jacobian_determinant(result.field)[torch.from_numpy(brain)].std())
    return end_point_error(result.field, truth, brain), spread


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=HERE.parent.parent / "shared" / "data")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--weights", nargs="+", default=["default", "0.2", "0.5", "1"])
    parser.add_argument("--size", type=float, default=5.0, help="B-spline coefficients' std (mm)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    import numpy as np

    from carctl.runtime import set_threads

    set_threads(args.threads)
    weights = [None if w == "default" else float(w) for w in args.weights]
    columns = ["affine"] + [f"auto {w}" for w in args.weights]
    print("| pair | seed | " + " | ".join(columns) + " |")
    print("|---" * (len(columns) + 2) + "|")
    totals: dict[tuple[bool, str], list[float]] = {}
    for moving_name, fixed_name, index in PAIRS:
        for seed in args.seeds:
            pair = make_pair(args.data, moving_name, fixed_name, index, seed, args.size)
            cells = [score(*pair, "affine", None)]
            cells += [score(*pair, "auto", w) for w in weights]
            same = moving_name == fixed_name
            for column, (error, _) in zip(columns, cells, strict=True):
                totals.setdefault((same, column), []).append(error)
            text = " | ".join(f"{e:.3f} ({s:.3f})" for e, s in cells)
            name = f"{moving_name} -> {fixed_name} (slice {index})"
            print(f"| {name} | {seed} | {text} |", flush=True)
    for same, label in ((False, "contrast pairs"), (True, "same contrast")):
        means = [np.mean(totals.get((same, c), [np.nan])) for c in columns]
        print(f"| mean, {label} | | " + " | ".join(f"{m:.3f}" for m in means) + " |")


if __name__ == "__main__":
    main()
