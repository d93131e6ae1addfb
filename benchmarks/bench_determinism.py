"""Run the same ``carctl register`` in separate processes and count the distinct results:
are outputs bit-identical from run to run on this machine? (The register issue asks for it
on CPU; docs/usage.md records a known defect seen with 2 threads on an Intel CPU.)

    python benchmarks/bench_determinism.py [--data ../shared/data] [--runs 10] [--threads 2]
        [--method auto] [--moving M --fixed F] [--env NAME=VALUE ...]

Default pair: the spinal-cord T1 onto the T2. Each run's outcome is the initialisation's
first loss (MIND of the header, at the first level, before any optimisation: where a
difference starts) and the sha256 of its field and warped image; the table gives each
distinct outcome with its count. ``--env`` sets variables for the runs (e.g.
``PYTHONHASHSEED=0``, ``MKL_CBWR=COMPATIBLE``) to test what makes them agree.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=HERE.parent.parent / "shared" / "data")
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--method", default="auto")
    parser.add_argument("--moving", type=Path, help="default: the spine pair's T1")
    parser.add_argument("--fixed", type=Path, help="default: the spine pair's T2")
    parser.add_argument("--env", nargs="*", default=[], metavar="NAME=VALUE")
    args = parser.parse_args()

    from carctl.pretrained import sha256

    moving = args.moving or args.data / "spine-t1-t2" / "t1w.nii.gz"
    fixed = args.fixed or args.data / "spine-t1-t2" / "t2.nii.gz"
    environment = dict(os.environ)
    environment.update(item.split("=", 1) for item in args.env)

    outcomes = collections.Counter()
    with tempfile.TemporaryDirectory(prefix="carctl-determinism-") as work:
        for run in range(args.runs):
            out = Path(work) / f"run{run}"
            summary = out / "summary.json"
            command = [
                sys.executable, "-m", "carctl", "register", str(moving), str(fixed),
                "-o", str(out), "--method", args.method, "--threads", str(args.threads),
                "--json", str(summary), "--quiet",
            ]  # fmt: skip
            subprocess.run(command, env=environment, check=True)
            report = json.loads(summary.read_text())
            first = next(s["loss_before"] for s in report["stages"] if s["name"] == "initialise")
            field, warped = (sha256(Path(report["outputs"][k]))[:12] for k in ("field", "warped"))
            outcomes[(repr(first), field, warped)] += 1
    settings = f" with {' '.join(args.env)}" if args.env else ""
    print(
        f"{args.runs} runs of `register --method {args.method} --threads {args.threads}`"
        f"{settings} on {moving.name} -> {fixed.name}"
    )
    print("| runs | first loss (initialise) | field sha256 | warped sha256 |")
    print("|---|---|---|---|")
    for (first, field, warped), count in outcomes.most_common():
        print(f"| {count} | {first} | {field} | {warped} |")
    print("identical" if len(outcomes) == 1 else f"NOT identical: {len(outcomes)} outcomes")


if __name__ == "__main__":
    main()
