"""Benchmark: ``carctl batch`` on a pair list against one ``carctl register`` process per pair.

Both ways write the same outputs with the same options; the batch loads torch and carctl's
code once. Runs alternate (register processes, then the batch, ``--repeats`` times) so that
the machine's drift falls on both. Printed: wall time of each way, per pair and in all.

    python benchmarks/bench_batch.py PAIRS.csv [--method net] [--threads 2] [--repeats 2]

``PAIRS.csv`` as ``carctl batch`` reads it (``moving,fixed`` columns, paths relative to it).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from carctl.batch import read_pairs


def _timed(command: list[str]) -> float:
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"{' '.join(command)} failed: {done.stderr.strip()}")
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("pairs", type=Path)
    parser.add_argument("--method", default="auto")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    carctl = [sys.executable, "-m", "carctl"]
    options = ["--method", args.method, "--threads", str(args.threads)]
    pairs = read_pairs(args.pairs)
    work = Path(tempfile.mkdtemp(prefix="bench_batch_"))
    try:
        for repeat in range(args.repeats):
            alone = []
            for pair in pairs:
                out = ["-o", str(work / "alone" / pair.name), "--quiet", "--force"]
                command = [*carctl, "register", pair.moving, pair.fixed, *options, *out]
                alone.append(_timed(command))
            batch_out = work / f"batch{repeat}"
            batch = _timed([*carctl, "batch", str(args.pairs), *options, "-o", str(batch_out)])
            print(
                f"round {repeat + 1}: {len(pairs)} register processes "
                f"{sum(alone):.1f} s ({' / '.join(f'{t:.1f}' for t in alone)}), "
                f"one batch {batch:.1f} s ({batch / len(pairs):.1f} s a pair)",
                flush=True,
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
