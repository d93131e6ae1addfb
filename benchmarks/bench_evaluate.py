"""Benchmark: scoring label maps (Dice, HD95) with carctl vs SimpleITK's filters.

Each tool runs in its own process on the same two label maps: the 45-label OASIS FreeSurfer
segmentation against a copy moved by a small rigid transform, and the spinal-cord masks of the
spine pair (T1 mask resampled onto the T2 grid through the headers). Printed: whole-process wall
time, the scoring time alone, peak memory, and the largest difference between carctl's and
SimpleITK's per-label Dice and HD95.

SimpleITK's HD95 is the usual recipe (LabelContour-style surfaces and Maurer distance maps, the
larger of the two directed 95th percentiles), run on the whole image for each label.

    python benchmarks/bench_evaluate.py [--data ../shared/data] [--threads 2] [--repeats 3]
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

import SimpleITK as sitk

HERE = Path(__file__).resolve().parent

RUNNERS = {
    "carctl": """
from carctl.evaluation import evaluate
from carctl.runtime import set_threads
set_threads(THREADS)
t = time.perf_counter()
report = evaluate(fixed_labels=FIXED, warped_labels=WARPED)
compute = time.perf_counter() - t
scores = {s["label"]: (s["dice"], s["hd95"]) for s in report["labels"]}
""",
    "SimpleITK": """
import numpy as np
import SimpleITK as sitk
sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(THREADS)
fixed, warped = sitk.ReadImage(FIXED, sitk.sitkUInt16), sitk.ReadImage(WARPED, sitk.sitkUInt16)
t = time.perf_counter()
overlap = sitk.LabelOverlapMeasuresImageFilter()
overlap.Execute(fixed, warped)
labels = sorted(set(np.unique(sitk.GetArrayViewFromImage(fixed))) - {0})

def directed(a, b):
    contour_a = sitk.BinaryContour(sitk.ConstantPad(a, [1] * 3, [1] * 3, 0), fullyConnected=False)
    contour_b = sitk.BinaryContour(sitk.ConstantPad(b, [1] * 3, [1] * 3, 0), fullyConnected=False)
    distance = sitk.SignedMaurerDistanceMap(
        contour_b, insideIsPositive=False, squaredDistance=False, useImageSpacing=True
    )
    inside = sitk.GetArrayViewFromImage(contour_a) > 0
    return np.maximum(sitk.GetArrayViewFromImage(distance)[inside], 0.0)

scores = {}
for label in labels:
    a, b = fixed == int(label), warped == int(label)
    hd95 = max(np.percentile(directed(a, b), 95), np.percentile(directed(b, a), 95))
    scores[int(label)] = (overlap.GetDiceCoefficient(int(label)), float(hd95))
compute = time.perf_counter() - t
""",
}

FOOTER = """
with open("/proc/self/status") as status:
    peak_kb = next(int(line.split()[1]) for line in status if line.startswith("VmHWM"))
print(json.dumps({"compute": compute, "rss_kb": peak_kb, "scores": scores}))
"""


def run(tool: str, fixed: Path, warped: Path, threads: int) -> dict:
    header = (
        f"import json, time\nFIXED, WARPED, THREADS = {str(fixed)!r}, {str(warped)!r}, {threads}\n"
    )
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    start = time.perf_counter()
    process = subprocess.run(
        [sys.executable, "-c", header + RUNNERS[tool] + FOOTER],
        capture_output=True,
        text=True,
        env=env,
    )
    wall = time.perf_counter() - start
    if process.returncode != 0:
        raise RuntimeError(f"{tool} failed: {process.stderr[-2000:]}")
    result = json.loads(process.stdout.strip().splitlines()[-1])
    result["wall"] = wall
    return result


def make_cases(data: Path, work: Path) -> list[tuple[str, Path, Path]]:
    oasis = sitk.ReadImage(str(data / "oasis-t1-a/labels.nii.gz"))
    size = sitk.VectorDouble([(s - 1) / 2.0 for s in oasis.GetSize()])
    centre = oasis.TransformContinuousIndexToPhysicalPoint(size)
    moved = sitk.Resample(
        oasis,
        oasis,
        sitk.Euler3DTransform(centre, 0.03, -0.02, 0.05, (1.5, -1.0, 2.0)),
        sitk.sitkNearestNeighbor,
        0,
    )
    sitk.WriteImage(moved, str(work / "oasis_moved.nii.gz"))
    spine = data / "spine-t1-t2"
    fixed = sitk.ReadImage(str(spine / "t2_seg-manual.nii.gz"))
    warped = sitk.Resample(
        sitk.ReadImage(str(spine / "t1w_seg-manual.nii.gz")),
        fixed,
        sitk.Transform(),
        sitk.sitkNearestNeighbor,
        0,
    )
    sitk.WriteImage(warped, str(work / "spine_warped.nii.gz"))
    return [
        (
            "OASIS 45 labels, 160x192x224",
            data / "oasis-t1-a/labels.nii.gz",
            work / "oasis_moved.nii.gz",
        ),
        ("spine cord mask, 60x55x52", spine / "t2_seg-manual.nii.gz", work / "spine_warped.nii.gz"),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=HERE.parent.parent / "shared" / "data")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        print(
            "| case | tool | wall (s) | scoring (s) | peak RSS (MB) "
            "| largest Dice difference | largest HD95 difference (mm) |"
        )
        print("|---|---|---|---|---|---|---|")
        for name, fixed, warped in make_cases(args.data, Path(tmp)):
            results = {}
            for tool in RUNNERS:
                runs = [run(tool, fixed, warped, args.threads) for _ in range(args.repeats)]
                results[tool] = min(runs, key=lambda r: r["wall"])
            reference = results["SimpleITK"]["scores"]
            for tool, result in results.items():
                scores = result["scores"]
                common = [k for k in reference if k in scores and reference[k][1] is not None]
                dice = max(abs(scores[k][0] - reference[k][0]) for k in common)
                hd95 = max(abs(scores[k][1] - reference[k][1]) for k in common)
                print(
                    f"| {name} | {tool} | {result['wall']:.2f} | {result['compute']:.2f} "
                    f"| {result['rss_kb'] / 1024:.0f} | {dice:.1e} | {hd95:.1e} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
