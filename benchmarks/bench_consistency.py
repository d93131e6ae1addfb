"""Benchmark: inverse consistency of ``carctl register`` on clinical stacks with no ground truth.

One patient's clinical T1, T1c, T2 and FLAIR (``tcga-fg-6692-native``: 0.9 x 0.9 x 5.5 mm,
26 slices, different matrices; T2 and FLAIR tilted about 17 degrees against T1 and T1c, not
co-registered). With no true alignment to compare with, each pair is registered both ways,
A to B and B to A, and the two mappings are composed: for every fixed voxel ``x`` of A's
anatomy, ``|T_BA(T_AB(x)) - x|`` is the inverse-consistency error (mm). A registration that
finds the same alignment from both sides scores near zero; a score of several mm means at
least one direction is wrong (it does not tell which, and a consistent answer can still be
wrong in both directions).

    python benchmarks/bench_consistency.py [--methods rigid affine auto] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SERIES = {
    "t1": "T1_AX*.nii.gz",
    "t1c": "MRHR_T1_AX*.nii.gz",
    "t2": "MRHR_T2*.nii.gz",
    "flair": "MRHR_FLAIR*.nii.gz",
}
PAIRS = (("t1", "t2"), ("t1c", "flair"), ("t1", "t1c"), ("t2", "flair"))
# Anatomy: normalised intensity above this (the check's voxels).
ANATOMY = 0.1


def consistency(a, b, method: str) -> dict:
    """Register ``b`` to ``a`` and ``a`` to ``b``; the inverse-consistency error over ``a``'s
    anatomy (mean and 95th percentile, mm) and both registrations' times (s)."""
    import torch

    from carctl.config import RegistrationOptions
    from carctl.registration.levels import normalise
    from carctl.registration.optimize import field_at
    from carctl.registration.pipeline import register

    started = time.perf_counter()
    there = register(b, a, RegistrationOptions(method=method)).field  # on a's grid, into b
    middle = time.perf_counter()
    back = register(a, b, RegistrationOptions(method=method)).field  # on b's grid, into a
    ended = time.perf_counter()
    points = there.grid.points(dtype=torch.float64).reshape(-1, a.grid.ndim)
    points = points[torch.from_numpy(normalise(a.array) > ANATOMY).reshape(-1)]
    mapped = points + field_at(there.data[None].double(), there.grid, points).T
    returned = mapped + field_at(back.data[None].double(), back.grid, mapped).T
    error = (returned - points).norm(dim=1)
    return {
        "mean_mm": float(error.mean()),
        "p95_mm": float(error.quantile(0.95)),
        "seconds": [middle - started, ended - middle],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=HERE.parent.parent / "shared" / "data")
    parser.add_argument("--methods", nargs="+", default=["rigid", "affine", "auto"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, help="also write every number to this file")
    args = parser.parse_args()

    from carctl.io import read_image
    from carctl.runtime import set_threads

    set_threads(args.threads)
    folder = args.data / "tcga-fg-6692-native"
    images = {name: read_image(next(folder.glob(pattern))) for name, pattern in SERIES.items()}
    rows = []
    print("| pair | method | inverse consistency, mean (mm) | p95 (mm) | registrations (s) |")
    print("|---|---|---|---|---|")
    for a, b in PAIRS:
        for method in args.methods:
            row = {
                "pair": f"{b}<->{a}",
                "method": method,
                **consistency(images[a], images[b], method),
            }
            rows.append(row)
            seconds = " + ".join(f"{s:.1f}" for s in row["seconds"])
            print(
                f"| {row['pair']} | {method} | {row['mean_mm']:.2f} | {row['p95_mm']:.2f} "
                f"| {seconds} |",
                flush=True,
            )
    if args.json:
        args.json.write_text(json.dumps({"threads": args.threads, "results": rows}, indent=1))


if __name__ == "__main__":
    main()
