"""Benchmark: warping through a displacement field, carctl vs SimpleITK vs ANTs (antspyx).

Each tool runs in its own process (so imports, reading and writing count, as for a user) on the
same inputs, with the same number of threads. Printed: whole-process wall time, the time of the
resampling call alone, peak memory (max RSS), and the largest difference from SimpleITK's
result as a fraction of the moving image's intensity range.

    python benchmarks/bench_apply.py [--data ../shared/data] [--threads 2] [--repeats 3]
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

RUNNERS = {
    "carctl": """
from carctl.io import read_image, write_image
from carctl.resample import load_chain, resample_image
from carctl.runtime import set_threads
set_threads(THREADS)
moving, fixed, chain = read_image(MOVING), read_image(FIXED), load_chain(FIELD)
t = time.perf_counter()
out = resample_image(moving, fixed.grid, chain, interpolation=INTERP)
compute = time.perf_counter() - t
write_image(out, OUT, force=True)
""",
    "SimpleITK": """
import SimpleITK as sitk
sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(THREADS)
moving, fixed = sitk.ReadImage(MOVING, sitk.sitkFloat32), sitk.ReadImage(FIXED)
field = sitk.ReadImage(FIELD, sitk.sitkVectorFloat64)
t = time.perf_counter()
interp = {"linear": sitk.sitkLinear, "label": sitk.sitkLabelLinear}[INTERP]
out = sitk.Resample(moving, fixed, sitk.DisplacementFieldTransform(field), interp, 0.0)
compute = time.perf_counter() - t
sitk.WriteImage(out, OUT)
""",
    "ANTs (antspyx)": """
import ants
moving, fixed = ants.image_read(MOVING), ants.image_read(FIXED)
t = time.perf_counter()
interp = {"linear": "linear", "label": "genericLabel"}[INTERP]
out = ants.apply_transforms(fixed=fixed, moving=moving, transformlist=[FIELD], interpolator=interp)
compute = time.perf_counter() - t
ants.image_write(out, OUT)
""",
}


FOOTER = 'print(json.dumps({"compute": compute, "rss_kb": PEAK_KB}))\n'
# Appended to every runner: the process's own peak resident memory (VmHWM, reset by exec).
PEAK = """
with open("/proc/self/status") as status:
    PEAK_KB = next(int(line.split()[1]) for line in status if line.startswith("VmHWM"))
"""


def run(tool: str, case: dict, out: Path, threads: int) -> dict:
    header = (
        "import json, os, time\n"
        f"MOVING, FIXED, FIELD, OUT = {str(case['moving'])!r}, {str(case['fixed'])!r}, "
        f"{str(case['field'])!r}, {str(out)!r}\n"
        f"THREADS, INTERP = {threads}, {case['interp']!r}\n"
    )
    env = dict(
        os.environ, OMP_NUM_THREADS=str(threads), ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS=str(threads)
    )
    start = time.perf_counter()
    process = subprocess.Popen(
        [sys.executable, "-c", header + RUNNERS[tool] + PEAK + FOOTER],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        text=True,
    )
    stdout, stderr = process.communicate()
    wall = time.perf_counter() - start
    if process.returncode != 0:
        raise RuntimeError(f"{tool} failed: {stderr[-2000:]}")
    result = json.loads(stdout.strip().splitlines()[-1])
    return {"wall": wall, "compute": result["compute"], "rss_mb": result["rss_kb"] / 1024}


def make_cases(data: Path, work: Path) -> list[dict]:
    """A 1 mm brain warped by a smooth 5 mm field, and the spine pair whose grids differ."""
    cases = []
    brats = data / "brats-gli-00001"
    for name, moving, fixed, labels in (
        (
            "BraTS t1n -> t2w, 240x240x155 @ 1 mm",
            brats / "BraTS-GLI-00001-000-t1n.nii.gz",
            brats / "BraTS-GLI-00001-000-t2w.nii.gz",
            None,
        ),
        (
            "spine T1 (RAS) -> T2 (PSR), 60x55x52",
            data / "spine-t1-t2/t1w.nii.gz",
            data / "spine-t1-t2/t2.nii.gz",
            data / "spine-t1-t2/t1w_seg-manual.nii.gz",
        ),
        (
            "OASIS labels (45), 160x192x224 @ 1 mm",
            data / "oasis-t1-a/labels.nii.gz",
            data / "oasis-t1-a/labels.nii.gz",
            None,
        ),
    ):
        fixed_image = sitk.ReadImage(str(fixed))
        transform = sitk.BSplineTransformInitializer(fixed_image, [4, 4, 4])
        params = np.random.default_rng(0).normal(0.0, 5.0, len(transform.GetParameters()))
        transform.SetParameters(tuple(params))
        field = sitk.TransformToDisplacementField(
            transform,
            sitk.sitkVectorFloat32,
            fixed_image.GetSize(),
            fixed_image.GetOrigin(),
            fixed_image.GetSpacing(),
            fixed_image.GetDirection(),
        )
        field_path = work / f"field{len(cases)}.nii.gz"
        sitk.WriteImage(field, str(field_path))
        interp = "label" if "labels" in name else "linear"
        cases.append(
            {"name": name, "moving": moving, "fixed": fixed, "field": field_path, "interp": interp}
        )
        if labels is not None:
            cases.append(
                {
                    "name": name.replace("T1 (RAS)", "T1 cord mask (RAS)"),
                    "moving": labels,
                    "fixed": fixed,
                    "field": field_path,
                    "interp": "label",
                }
            )
    return cases


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=HERE.parent.parent / "shared" / "data")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        print(
            "| case | tool | wall (s) | resampling (s) | peak RSS (MB) "
            "| max diff vs SimpleITK (of range) | label agreement vs SimpleITK |"
        )
        print("|---|---|---|---|---|---|---|")
        for case in make_cases(args.data, work):
            outputs = {}
            moving = sitk.GetArrayFromImage(sitk.ReadImage(str(case["moving"])))
            value_range = float(np.ptp(moving))
            for tool in RUNNERS:
                out = work / f"{tool.split()[0]}.nii.gz"
                runs = [run(tool, case, out, args.threads) for _ in range(args.repeats)]
                best = min(runs, key=lambda r: r["wall"])
                outputs[tool] = (
                    best,
                    sitk.GetArrayFromImage(sitk.ReadImage(str(out))).astype(np.float64),
                )
            reference = outputs["SimpleITK"][1]
            for tool, (best, result) in outputs.items():
                diff = np.abs(result - reference).max() / value_range
                agree = (result == reference).mean() if case["interp"] == "label" else float("nan")
                agree_text = f"{100 * agree:.2f} %" if case["interp"] == "label" else "-"
                print(
                    f"| {case['name']} ({case['interp']}) | {tool} | {best['wall']:.2f} "
                    f"| {best['compute']:.2f} | {best['rss_mb']:.0f} | {diff:.1e} | {agree_text} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
