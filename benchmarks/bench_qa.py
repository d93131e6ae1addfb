"""Benchmark: does ``carctl qa``'s score track the true misalignment, across contrasts?

Misaligned versions of aligned contrast pairs (BraTS ``t1n/t2w/t2f/t1c`` at 1 mm, SPM
``avg152T1/T2/PD`` at 2 mm, cardiac bSSFP/LGE/T2 with 12 mm slices; none of them is in the
evaluator's training data): the fixed image is contrast ``a`` warped by a known mapping
``phi`` of graded size, the moving image is contrast ``b`` as it is, so the true error of
the header alignment at a fixed voxel ``x`` is ``|phi(x) - x|``, averaged over the anatomy.
Two kinds of ``phi``:

* ``global``: a smooth random field plus a rotation and translation, all growing together;
* ``inside``: a smooth random field faded out towards the anatomy's outline (the outline
  stays where it is, the inside moves).

Reported: Spearman's rho between the QA score and the true mean error, pooled over all pairs
and per pair (and, for reference, that of IMSE's mean predicted error). Then the spine T1/T2
pair: the headers (good), a deliberately bad centre-of-mass initialisation (bad), and
carctl's own registration, each with its verdict. ``--calibrate`` prints the verdict
thresholds the data support (see ``calibrate``), to be written into ``carctl.qa.THRESHOLDS``.

    python benchmarks/bench_qa.py [--threads 2] [--json qa.json] [--calibrate]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
SIZES_MM = (0.0, 1.0, 2.0, 3.0, 4.0, 6.0, 8.0, 10.0)  # RMS of the smooth field
KINDS = ("global", "inside")


def pairs(data: Path) -> list[tuple[str, Path, Path]]:
    brats = data / "brats-gli-00001"
    spm = data / "brain-templates-2mm"
    cardiac = data / "cardiac-myops-101"

    def b(contrast: str) -> Path:
        return brats / f"BraTS-GLI-00001-000-{contrast}.nii.gz"

    return [  # name, a (fixed contrast, deformed), b (moving contrast)
        ("brats-t2w-t1n", b("t1n"), b("t2w")),
        ("brats-t1n-t2f", b("t2f"), b("t1n")),
        ("brats-t1c-t2w", b("t2w"), b("t1c")),
        ("spm-T2-T1", spm / "avg152T1.nii", spm / "avg152T2.nii"),
        ("spm-PD-T2", spm / "avg152T2.nii", spm / "avg152PD.nii"),
        ("spm-T1-PD", spm / "avg152PD.nii", spm / "avg152T1.nii"),
        ("cardiac-DE-C0", cardiac / "101_C0.nii.gz", cardiac / "101_DE.nii.gz"),
        ("cardiac-T2-DE", cardiac / "101_DE.nii.gz", cardiac / "101_T2.nii.gz"),
        ("cardiac-C0-T2", cardiac / "101_T2.nii.gz", cardiac / "101_C0.nii.gz"),
    ]


def anatomy_mask(image) -> np.ndarray:
    from carctl.registration.levels import normalise

    return normalise(image.array) > 0.1


def known_deformations(data: Path, model, seed: int, only: list[str] | None = None) -> list[dict]:
    import torch

    from carctl import qa
    from carctl.io import Image, read_image
    from carctl.spatial.sample import warp
    from carctl.synthetic import known_mapping

    rows = []
    for p, (name, a_path, b_path) in enumerate(pairs(data)):
        if only and not any(o in name for o in only):
            continue
        if not a_path.exists() or not b_path.exists():
            print(f"{name}: missing, skipped")
            continue
        a, b = read_image(a_path), read_image(b_path)
        mask = anatomy_mask(a)
        for k, kind in enumerate(KINDS):
            for s, size in enumerate(SIZES_MM):
                if size == 0 and kind != KINDS[0]:
                    continue
                # global: field, rotation and translation grow together; inside: the field
                # alone, faded out over 10 mm inside the outline
                turn = size / 2 if kind == "global" else 0.0
                fade = 10.0 if kind == "inside" else None
                phi = known_mapping(
                    a.grid, mask, size, turn, turn, seed + 100 * p + 10 * k + s, 30.0, fade
                )
                fixed_array = warp(a.tensor(torch.float32), a.grid, a.grid, [phi])[0, 0].numpy()
                fixed = Image(fixed_array, a.grid)
                inside = torch.from_numpy(anatomy_mask(fixed))
                distance = phi.data.square().sum(dim=0).sqrt()
                true = float(distance[inside].mean())
                started = time.perf_counter()
                result = qa.assess(model, qa.prepare(fixed, b))
                rows.append(
                    {
                        "pair": name,
                        "kind": kind,
                        "size_mm": size,
                        "true_mm": true,
                        "score": result.score,
                        "mean_error": result.mean_error,
                        "seconds": time.perf_counter() - started,
                    }
                )
                print(
                    f"{name:16s} {kind:7s} {size:4.1f} mm  true {true:6.2f} mm  "
                    f"score {result.score:.4f}  mean |E| {result.mean_error:.4f}  "
                    f"({rows[-1]['seconds']:.1f} s)",
                    flush=True,
                )
    return rows


def spine(data: Path, model) -> list[dict]:
    """The spine pair through its headers, a centre-of-mass initialisation (deliberately
    bad here: the two fields of view differ; the pipeline's own candidate of that name), and
    carctl's own registration."""
    from carctl import qa
    from carctl.config import RegistrationOptions
    from carctl.io import read_image
    from carctl.metrics import dice
    from carctl.registration.initialise import centre_of_mass
    from carctl.registration.levels import normalise
    from carctl.registration.pipeline import register
    from carctl.resample import resample_image
    from carctl.spatial.transform import Affine

    folder = data / "spine-t1-t2"
    moving, fixed = read_image(folder / "t1w.nii.gz"), read_image(folder / "t2.nii.gz")
    moving_cord = read_image(folder / "t1w_seg-manual.nii.gz")
    fixed_cord = read_image(folder / "t2_seg-manual.nii.gz").array > 0

    shift = centre_of_mass(normalise(moving.array), moving.grid) - centre_of_mass(
        normalise(fixed.array), fixed.grid
    )
    chains = {
        "headers": [],
        "centre of mass": [Affine(np.eye(3), shift)],
        "carctl": [register(moving, fixed, RegistrationOptions()).field],
    }
    assessments = qa.assess_alignments(model, fixed, [(moving, c) for c in chains.values()])
    rows = []
    for (name, chain), assessment in zip(chains.items(), assessments, strict=True):
        cord = resample_image(moving_cord, fixed.grid, chain, "label").array > 0
        rows.append(
            {
                "alignment": name,
                "cord_dice": dice(fixed_cord, cord).get(1, 0.0),
                "score": assessment.score,
            }
        )
    return rows


def calibrate(rows: list[dict]) -> dict | None:
    """Thresholds on the score: ``suspect`` half-way between the median score of alignments
    within 1 mm of the truth and that of alignments 2-3 mm off; ``failed`` half-way between
    2-3 mm and 5 mm or more. None when those medians do not increase."""
    scores = np.array([r["score"] for r in rows])
    true = np.array([r["true_mm"] for r in rows])

    def median(low: float, high: float) -> float:
        return float(np.median(scores[(true >= low) & (true < high)]))

    good, fair, bad = median(0, 1), median(2, 3), median(5, np.inf)
    if not good < fair < bad:
        return None
    return {"suspect": (good + fair) / 2, "failed": (fair + bad) / 2}


def spearman(a, b) -> float:
    from carctl.training.imse import spearman as rho

    return rho(np.asarray(a), np.asarray(b))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=HERE.parent.parent / "shared" / "data")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--calibrate", action="store_true", help="print supported thresholds")
    parser.add_argument("--weights", default="imse")
    parser.add_argument("--pairs", nargs="*", help="only pairs whose name contains one of these")
    parser.add_argument("--no-spine", action="store_true")
    args = parser.parse_args()

    import torch

    from carctl import pretrained, qa

    torch.set_num_threads(args.threads)
    model, _ = pretrained.load(args.weights)
    rows = known_deformations(args.data, model, args.seed, args.pairs)
    by_pair = {}
    for r in rows:
        by_pair.setdefault(r["pair"], []).append(r)
    print("\nSpearman rho, QA score vs true mean error:")
    pooled = spearman([r["score"] for r in rows], [r["true_mm"] for r in rows])
    print(f"  pooled over {len(rows)} alignments, {len(by_pair)} pairs: {pooled:.3f}")
    raw = spearman([r["mean_error"] for r in rows], [r["true_mm"] for r in rows])
    print(f"  (IMSE's mean predicted error |E|, pooled: {raw:.3f})")
    for name, group in by_pair.items():
        rho = spearman([r["score"] for r in group], [r["true_mm"] for r in group])
        print(f"  {name:16s} {rho:.3f}")
    for kind in KINDS:
        group = [r for r in rows if r["kind"] == kind or r["size_mm"] == 0]
        rho = spearman([r["score"] for r in group], [r["true_mm"] for r in group])
        print(f"  kind {kind:11s} {rho:.3f}")
    thresholds = qa.THRESHOLDS
    if args.calibrate:
        print(
            f"thresholds the data support: {calibrate(rows)} (carctl.qa.THRESHOLDS: {thresholds})"
        )
    spine_rows = []
    if not args.no_spine and (args.data / "spine-t1-t2").exists():
        spine_rows = spine(args.data, model)
    print("\nspine T1 -> T2:")
    for r in spine_rows:
        verdict = qa.verdict(r["score"], thresholds)
        r["verdict"] = verdict
        print(
            f"  {r['alignment']:15s} cord Dice {r['cord_dice']:.3f}  "
            f"score {r['score']:.4f}  {verdict}"
        )
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "pooled_spearman": pooled,
                    "thresholds": thresholds,
                    "rows": rows,
                    "spine": spine_rows,
                },
                indent=1,
            )
        )


if __name__ == "__main__":
    main()
