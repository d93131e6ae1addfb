"""Time the feature maps every registration level computes (MIND-SSC descriptors, no
gradients) on a real 1 mm brain, and print a fingerprint of the result (so that two versions
of carctl can be compared for speed and for bit-identical descriptors).

    python benchmarks/bench_features.py [--data ../shared/data] [--threads 2] [--repeats 5]

The image is the BraTS T2-FLAIR (240 x 240 x 155, 1 mm), normalised as the registration
normalises it, whole and cropped to its brain's box (140 x 215 x 180); the first call of each
size is reported apart (it touches freshly allocated memory), then the median of the rest.
"""

from __future__ import annotations

import argparse
import hashlib
import statistics
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=HERE.parent.parent / "shared" / "data")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    import torch

    from carctl.io import read_image
    from carctl.losses.similarity import mind_ssc
    from carctl.registration.levels import normalise
    from carctl.runtime import keep_freed_memory

    torch.set_num_threads(args.threads)
    keep_freed_memory()  # as the command line does
    from bench_register import brats_contrast

    path = brats_contrast(args.data, "t2f")
    whole = torch.from_numpy(normalise(read_image(path).array))[None, None]
    crop = whole[:, :, 10:150, 15:230, 30:210].contiguous()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("| image | voxels | first call (s) | median of the rest (s) | sha1 of the descriptors |")
    print("|---|---|---|---|---|")
    for name, image in (("whole", whole), ("brain box", crop)):
        times = []
        with torch.no_grad():
            for _ in range(args.repeats + 1):
                start = time.perf_counter()
                features = mind_ssc(image)
                times.append(time.perf_counter() - start)
        digest = hashlib.sha1(features.numpy().tobytes()).hexdigest()[:12]
        shape = "x".join(str(n) for n in image.shape[2:])
        median = statistics.median(times[1:])
        print(f"| {name} | {shape} | {times[0]:.3f} | {median:.3f} | {digest} |")


if __name__ == "__main__":
    main()
