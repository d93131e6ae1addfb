"""Benchmark: `carctl register` on a large CT (512 x 512 x 400 voxels), time, memory, accuracy.

The shared chest CT series (``dicom/ct-chest-40``: 512 x 512 x 40 at 0.98 x 0.98 x 2 mm) is
resampled (linearly) to 0.2 mm slices, 105 million voxels, the size of a thin-slice clinical
CT; the moving image is that volume moved rigidly (2.3 / -1.1 / 1.7 degrees about its centre,
3 / -2 / 1.5 mm; -1024 HU brought in). Each run is a whole ``carctl register`` process (its
imports, reading and writing count); printed: the stages' seconds, the writing's, the
command's wall time, peak memory (max RSS) and the end-point error of the written field
against the known motion, over the voxels above -500 HU (the body) that stay in view.

``--code DIR`` runs the carctl found in DIR (a checkout, put first on ``PYTHONPATH``; give
several to interleave them, round by round), the installed one by default.

    python benchmarks/bench_large.py [--data ../shared/data] [--methods auto affine]
        [--repeats 2] [--threads 2] [--code DIR ...]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

HERE = Path(__file__).resolve().parent
SLICE_MM, SLICES = 0.2, 400
ROTATION_RAD, TRANSLATION_MM = (0.04, -0.02, 0.03), (3.0, -2.0, 1.5)


def make_pair(data: Path, folder: Path) -> tuple[Path, Path, sitk.Euler3DTransform]:
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(data / "dicom" / "ct-chest-40")))
    series = reader.Execute()
    reference = sitk.Image(series.GetWidth(), series.GetHeight(), SLICES, series.GetPixelID())
    reference.SetSpacing((*series.GetSpacing()[:2], SLICE_MM))
    reference.SetOrigin(series.GetOrigin())
    reference.SetDirection(series.GetDirection())
    fixed = sitk.Resample(series, reference, sitk.Transform(), sitk.sitkLinear, -1024)
    motion = sitk.Euler3DTransform()
    centre = [(n - 1) / 2 for n in fixed.GetSize()]
    motion.SetCenter(fixed.TransformContinuousIndexToPhysicalPoint(centre))
    motion.SetRotation(*ROTATION_RAD)
    motion.SetTranslation(TRANSLATION_MM)
    moving = sitk.Resample(fixed, fixed, motion.GetInverse(), sitk.sitkLinear, -1024)
    paths = folder / "fixed.nii.gz", folder / "moving.nii.gz"
    sitk.WriteImage(fixed, str(paths[0]))
    sitk.WriteImage(moving, str(paths[1]))
    return paths[0], paths[1], motion


def end_point_error(field_path: Path, fixed_path: Path, motion: sitk.Euler3DTransform) -> float:
    """Mean distance (mm) between the field's mapping and the truth (fixed point -> moving
    point: ``motion``, the moving image being the fixed one resampled through its inverse),
    over every 4th body voxel along each axis whose true point stays in the moving view."""
    fixed = sitk.ReadImage(str(fixed_path))
    body = sitk.GetArrayViewFromImage(fixed) > -500
    field = sitk.GetArrayFromImage(sitk.ReadImage(str(field_path)))  # (z, y, x, 3) mm
    z, y, x = (np.arange(0, n, 4) for n in body.shape)
    index = np.stack(np.meshgrid(x, y, z, indexing="ij"), -1).reshape(-1, 3)
    origin = np.asarray(fixed.GetOrigin())
    scaled = np.asarray(fixed.GetDirection()).reshape(3, 3) * np.asarray(fixed.GetSpacing())
    points = index @ scaled.T + origin
    matrix = np.asarray(motion.GetMatrix()).reshape(3, 3)
    centre = np.asarray(motion.GetCenter())
    expected = (points - centre) @ matrix.T + centre + np.asarray(motion.GetTranslation())
    estimated = points + field[index[:, 2], index[:, 1], index[:, 0]]
    where = (expected - origin) @ np.linalg.inv(scaled).T  # continuous index in the view
    keep = body[index[:, 2], index[:, 1], index[:, 0]]
    keep &= np.all((where >= -0.5) & (where < np.asarray(fixed.GetSize()) - 0.5), axis=1)
    return float(np.linalg.norm(estimated - expected, axis=1)[keep].mean())


def run(code: str | None, method: str, pair, out: Path, threads: int) -> dict:
    fixed, moving, motion = pair
    env = dict(os.environ)
    if code:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [code, env.get("PYTHONPATH")]))
    summary = out / "summary.json"
    command = [sys.executable, "-m", "carctl", "register", str(moving), str(fixed), "-o", str(out)]
    command += ["--method", method, "--threads", str(threads), "--quiet", "--force"]
    command += ["--json", str(summary)]
    start = time.perf_counter()
    # run from the output folder: `python -m` puts the working directory first on the path
    process = subprocess.Popen(command, env=env, cwd=out.parent)
    _, status, usage = os.wait4(process.pid, 0)  # this child's own peak memory
    wall = time.perf_counter() - start
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode:
        raise SystemExit(f"carctl register failed ({process.returncode}): {' '.join(command)}")
    report = json.loads(summary.read_text())
    return {
        "stages": {s["name"]: s["seconds"] for s in report["stages"]},
        "write_s": report["write_seconds"],
        "wall_s": wall,
        "peak_rss_mb": usage.ru_maxrss / 1024,  # kB on Linux
        "epe_mm": end_point_error(Path(report["outputs"]["field"]), fixed, motion),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=HERE.parent.parent / "shared" / "data")
    parser.add_argument("--methods", nargs="+", default=["auto"])
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--code", nargs="+", default=[None], help="checkouts to run, in turn")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="carctl-large-") as folder:
        pair = make_pair(args.data, Path(folder))
        print("| code | method | stages (s) | writing (s) | wall (s) | peak RSS (MB) | EPE (mm) |")
        print("|---|---|---|---|---|---|---|")
        for _ in range(args.repeats):
            for method in args.methods:
                for code in args.code:
                    out = Path(folder) / "out"
                    row = run(code, method, pair, out, args.threads)
                    stages = ", ".join(f"{k} {v:.2f}" for k, v in row["stages"].items())
                    print(
                        f"| {code or 'installed'} | {method} | {stages} | {row['write_s']:.1f} "
                        f"| {row['wall_s']:.1f} | {row['peak_rss_mb']:.0f} | {row['epe_mm']:.2f} |",
                        flush=True,
                    )


if __name__ == "__main__":
    main()
