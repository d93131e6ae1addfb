"""Benchmark: registration accuracy, time and memory of carctl and three peers, side by side.

Methods: carctl (``register`` with default options; ``carctl-net``, ``carctl-io`` and
``carctl-affine`` run its other ``--method`` choices when asked for), ANTs (antspyx,
``antsRegistrationSyNQuick[s]``: rigid + affine + SyN, all on Mattes MI), elastix (itk-elastix
default ``affine`` + ``bspline`` maps, AdvancedMattesMutualInformation) and convexAdam (defaults,
MIND-SSC; the moving image is first resampled onto the fixed grid through the headers, since
convexAdam works on one grid).

Every method runs in its own process (this script with ``--one``) on the same files and thread
count. Reported per pair and method: accuracy, the registration call's wall time, the whole
process's wall time (start, imports, reading, registering, writing) and its peak memory (VmHWM,
read right after the registration call). Each method's answer is converted into one
displacement field on the fixed grid (physical LPS mm, pull-back fixed -> moving, ITK's
convention) and scored by this script with carctl's metrics:

* ``spine``: Dice of the spinal cord (T1 mask warped onto the T2 grid by the method's own label
  interpolation, against the T2 mask).
* known deformations (``brats-*``, ``spm-*``, ``oasis-t1``, see ``carctl.synthetic.known_pair``):
  mean end-point error inside the mask (mm); for ``oasis-t1`` also the mean Dice of its 45
  labels (moving labels warped by the method, fixed labels warped by the truth).
* ``brain-atlas``: inter-subject, SPM's MNI T1 template (brain only) with the
  Neuromorphometrics atlas onto the OASIS subject: mean Dice of the 29 structures both
  label (see :func:`atlas_pair`).
* ``ct-chest``: the chest CT against a copy of itself under a known deformation of 8 mm RMS
  (see :func:`chest_ct_pair`): mean end-point error inside the thorax (mm);
  ``chest-ct-padded`` the same with both images padded beyond a scanner's circle;
  ``ct-breath`` under a breathing motion that slides the lungs along the chest wall (see
  :func:`breathing_pair`): mean end-point error inside the rib cage (mm).
* ``prostate-*`` (MR -> ultrasound): Dice of the gland and mean Dice of the landmark blobs.
* every pair: folding (% of fixed voxels where det J of the mapping <= 0).

The row ``header`` is the identity mapping through the scanner headers (no registration).

    python benchmarks/bench_register.py [--quick] [--pairs spine prostate ...]
        [--methods carctl ants ...] [--threads 2] [--json results.json]
"""

from __future__ import annotations

import argparse
import functools
import gzip
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
FIELD, WARPED = "field.nii", "warped.nii.gz"
MAIN = "main"  # the label map whose mean Dice is reported; other label maps are landmarks


# --- workers: one method in one process -------------------------------------------------------
# Each worker reads the pair's files with the method's own reader and writes, into `out`: the
# mapping as a displacement field on the fixed grid (FIELD), the moving image warped by the
# method itself (WARPED, to check the field against) and every label map of the case warped
# with the method's own label interpolation (label_<name>.nii.gz). Only the tool itself is
# imported (not carctl, not torch, unless the tool needs them), so peak memory is the tool's.
# (itk's Python wrapping imports torch itself when torch is installed, as it is here.)


class Clock:
    """Wall time of the registration call, and the process's peak memory right after it."""

    def __enter__(self) -> Clock:
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self.start
        self.rss_mb = peak_rss_mb()


def peak_rss_mb() -> float:
    """This process's peak resident memory (VmHWM, reset by exec)."""
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmHWM")) / 1024


def label_output(out: Path, name: str) -> Path:
    return out / f"label_{name}.nii.gz"


def run_carctl(case: dict, out: Path, threads: int, method: str = "auto") -> Clock:
    from carctl.config import RegistrationOptions
    from carctl.io import read_image, write_image
    from carctl.registration.pipeline import register
    from carctl.resample import resample_image
    from carctl.runtime import keep_freed_memory, set_threads
    from carctl.spatial.files import write_field

    keep_freed_memory()  # as the command line does
    set_threads(threads)
    moving, fixed = read_image(case["moving"]), read_image(case["fixed"])
    with Clock() as clock:
        options = RegistrationOptions(
            method=method,
            loss=case["carctl_loss"],
            regularization=case["carctl_regularization"],
            resolution=case.get("carctl_resolution"),
        )
        result = register(moving, fixed, options)
    write_field(result.field, out / FIELD)
    write_image(resample_image(moving, fixed.grid, [result.field]), out / WARPED)
    for name, path in case["labels"].items():
        warped = resample_image(read_image(path), fixed.grid, [result.field], "label")
        write_image(warped, label_output(out, name))
    return clock


def run_ants(case: dict, out: Path, threads: int) -> Clock:
    import ants  # threads: ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS, set by the parent

    fixed, moving = ants.image_read(case["fixed"]), ants.image_read(case["moving"])
    with Clock() as clock:
        result = ants.registration(
            fixed, moving, type_of_transform="antsRegistrationSyNQuick[s]", outprefix=f"{out}/"
        )
    transforms = result["fwdtransforms"]  # [warp, affine]: a point goes through the warp first
    # antsApplyTransforms -o [file, 1]: the chain composed into one field on the fixed grid
    composed = ants.apply_transforms(fixed, moving, transforms, compose=f"{out}/composed_")
    with open(composed, "rb") as written:
        packed = written.read(2) == b"\x1f\x8b"  # antspyx 0.6 gzips it whatever the name
    if packed:  # ITK reads a gzipped NIfTI only under a .gz name
        with gzip.open(composed, "rb") as source, open(out / FIELD, "wb") as target:
            shutil.copyfileobj(source, target)
        os.remove(composed)
    else:
        os.replace(composed, out / FIELD)
    ants.image_write(result["warpedmovout"], str(out / WARPED))
    for name, path in case["labels"].items():
        labels = ants.image_read(path)
        warped = ants.apply_transforms(fixed, labels, transforms, interpolator="genericLabel")
        ants.image_write(warped, str(label_output(out, name)))
    return clock


def run_elastix(case: dict, out: Path, threads: int) -> Clock:
    import itk

    # Threads through ITK's global default: elastix_registration_method(number_of_threads=N > 1)
    # crashes with the multi-metric B-spline map (InsightSoftwareConsortium/ITKElastix#160).
    itk.MultiThreaderBase.SetGlobalDefaultNumberOfThreads(threads)
    fixed = itk.imread(case["fixed"], itk.F)
    moving = itk.imread(case["moving"], itk.F)
    parameters = itk.ParameterObject.New()
    parameters.AddParameterMap(parameters.GetDefaultParameterMap("affine"))
    parameters.AddParameterMap(parameters.GetDefaultParameterMap("bspline"))
    with Clock() as clock:
        warped, transform = itk.elastix_registration_method(
            fixed,
            moving,
            parameter_object=parameters,
            log_to_console=False,
        )
    field_image = itk.transformix_deformation_field(moving, transform)
    itk.imwrite(field_image, str(out / FIELD))
    itk.imwrite(warped, str(out / WARPED))
    transform.SetParameter("FinalBSplineInterpolationOrder", "0")  # nearest, for labels
    for name, path in case["labels"].items():
        labels = itk.imread(path, itk.F)
        itk.imwrite(itk.transformix_filter(labels, transform), str(label_output(out, name)))
    return clock


def run_convexadam(case: dict, out: Path, threads: int) -> Clock:
    import SimpleITK as sitk
    import torch
    from convexAdam.apply_convex import apply_convex
    from convexAdam.convex_adam_MIND import convex_adam_pt

    torch.set_num_threads(threads)
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads)
    fixed = sitk.ReadImage(case["fixed"], sitk.sitkFloat32)
    moving = sitk.ReadImage(case["moving"], sitk.sitkFloat32)
    with Clock() as clock:
        on_fixed = sitk.Resample(moving, fixed, sitk.Transform(), sitk.sitkLinear, 0.0)
        displacement = convex_adam_pt(
            sitk.GetArrayFromImage(fixed), sitk.GetArrayFromImage(on_fixed)
        )
    # convexAdam's answer, for arrays in SimpleITK's (Z, Y, X) order: displacement[z, y, x, c]
    # is the pull-back displacement along array axis c (k, j, i) in voxels, so that
    # warped[p] = moving[p + displacement[p]] (its apply_convex). To physical mm on the fixed
    # grid: reverse to (i, j, k) and multiply by direction @ diag(spacing).
    to_physical = np.reshape(fixed.GetDirection(), (3, 3)) * np.asarray(fixed.GetSpacing())
    physical = displacement[..., ::-1] @ to_physical.T
    field_image = sitk.GetImageFromArray(physical.astype(np.float64), isVector=True)
    field_image.CopyInformation(fixed)
    sitk.WriteImage(sitk.Cast(field_image, sitk.sitkVectorFloat32), str(out / FIELD))
    warped = sitk.GetImageFromArray(
        apply_convex(displacement, sitk.GetArrayFromImage(on_fixed)).astype(np.float32)
    )
    warped.CopyInformation(fixed)
    sitk.WriteImage(warped, str(out / WARPED))
    # Labels: one interpolation from the original moving labels through the physical field
    # (header resampling and convexAdam's field composed), like ANTs' genericLabel.
    transform = sitk.DisplacementFieldTransform(field_image)
    for name, path in case["labels"].items():
        labels = sitk.ReadImage(path)
        warped = sitk.Resample(labels, fixed, transform, sitk.sitkLabelLinear, 0)
        sitk.WriteImage(warped, str(label_output(out, name)))
    return clock


METHODS: dict[str, Callable[[dict, Path, int], Clock]] = {
    "carctl": run_carctl,
    # carctl's other --method choices (not run unless asked for with --methods)
    "carctl-net": functools.partial(run_carctl, method="net"),
    "carctl-io": functools.partial(run_carctl, method="io"),
    "carctl-affine": functools.partial(run_carctl, method="affine"),
    "ants": run_ants,
    "elastix": run_elastix,
    "convexadam": run_convexadam,
}


def thread_environment(threads: int) -> dict[str, str]:
    names = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
    names += ("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", "CARCTL_THREADS")
    return {name: str(threads) for name in names}


def worker(method: str, case_file: Path, out: Path, threads: int) -> None:
    """``--one``: run one method on one case; the last stdout line is a JSON summary."""
    case = json.loads(case_file.read_text())
    clock = METHODS[method](case, out, threads)
    print(json.dumps({"seconds": clock.seconds, "rss_mb": clock.rss_mb}))


# --- pairs ------------------------------------------------------------------------------------


@dataclass(eq=False)
class Pair:
    """A moving and a fixed image, what to warp, and what the warped labels must match."""

    name: str
    moving: Path
    fixed: Path
    moving_labels: dict[str, Path]  # MAIN and landmark label maps, on the moving grid
    fixed_labels: dict[str, np.ndarray]  # the same maps on the fixed grid
    truth: object = None  # carctl DisplacementField of a known deformation
    mask: np.ndarray | None = None  # where the end-point error is measured


@dataclass(frozen=True)
class PairSpec:
    name: str
    build: Callable[[Path], Pair]  # work directory -> pair


def write_labels(spec: str, path: Path) -> Path:
    """A label volume (``FILE`` or ``FILE:N``) written as a 3-D uint16 NIfTI file of its own."""
    from carctl.io import Image, read_grid, write_image

    write_image(Image(label_array(spec).astype(np.uint16), read_grid(spec)), path)
    return path


def label_array(spec: str | Path) -> np.ndarray:
    from carctl.io import read_image
    from carctl.metrics import as_label_map

    return as_label_map(np.rint(read_image(spec).array).clip(0), str(spec))


def spine_pair(data: Path) -> PairSpec:
    folder = data / "spine-t1-t2"

    def build(work: Path) -> Pair:
        return Pair(
            "spine",
            folder / "t1w.nii.gz",
            folder / "t2.nii.gz",
            {MAIN: folder / "t1w_seg-manual.nii.gz"},
            {MAIN: label_array(folder / "t2_seg-manual.nii.gz")},
        )

    return PairSpec("spine", build)


def prostate_pairs(data: Path) -> list[PairSpec]:
    folder = data / "prostate-mr-us"

    def spec(case: str) -> PairSpec:
        name = f"prostate-{case.split('.')[0]}"

        def build(work: Path) -> Pair:
            import SimpleITK as sitk

            mr, us = folder / "mr_labels" / case, folder / "us_labels" / case
            reader = sitk.ImageFileReader()
            reader.SetFileName(str(mr))
            reader.ReadImageInformation()
            size = reader.GetSize()  # 4-D: gland and landmarks; 3-D: gland alone
            channels = size[3] if len(size) == 4 else 1

            def volume(path: Path, c: int) -> str:
                return f"{path}:{c}" if len(size) == 4 else str(path)

            names = [MAIN] + [f"landmark{c}" for c in range(1, channels)]
            return Pair(
                name,
                folder / "mr_images" / case,
                folder / "us_images" / case,
                {
                    n: write_labels(volume(mr, c), work / f"mr_{n}.nii.gz")
                    for c, n in enumerate(names)
                },
                {n: label_array(volume(us, c)) for c, n in enumerate(names)},
            )

        return PairSpec(name, build)

    cases = sorted(p.name for p in (folder / "mr_images").glob("*.nii.gz"))
    return [spec(case) for case in cases]


def brats_contrast(data: Path, contrast: str) -> Path:
    """The BraTS case's file of ``contrast`` (``t1n``, ``t1c``, ``t2w``, ``t2f``)."""
    return data / "brats-gli-00001" / f"BraTS-GLI-00001-000-{contrast}.nii.gz"


def known_pairs(data: Path, seed: int, scale: float = 1.0) -> list[PairSpec]:
    """Pairs with a known deformation: fixed = contrast ``a`` warped, moving = contrast ``b``;
    ``scale`` multiplies the deformation's size (0: the contrasts as the dataset aligns them,
    so the end-point error is how far a method moves away from that alignment)."""
    spm = data / "brain-templates-2mm"
    oasis = data / "oasis-t1-a"

    def positive(image) -> np.ndarray:
        return image.array > 0

    def tissue(image) -> np.ndarray:
        from carctl.io import read_image

        maps = [read_image(spm / f"{t}.nii").array for t in ("grey", "white", "csf")]
        return sum(maps) > 0.5

    def labelled(image) -> np.ndarray:
        return label_array(oasis / "labels.nii.gz") > 0

    table = [  # name, a, b, mask of a, labels of a (or None)
        ("brats-t2w-t1n", brats_contrast(data, "t1n"), brats_contrast(data, "t2w"), positive, None),
        ("brats-t2f-t1n", brats_contrast(data, "t1n"), brats_contrast(data, "t2f"), positive, None),
        ("brats-t1c-t2w", brats_contrast(data, "t2w"), brats_contrast(data, "t1c"), positive, None),
        ("spm-T2-T1", spm / "avg152T1.nii", spm / "avg152T2.nii", tissue, None),
        ("spm-PD-T1", spm / "avg152T1.nii", spm / "avg152PD.nii", tissue, None),
        ("oasis-t1", oasis / "t1.nii.gz", oasis / "t1.nii.gz", labelled, oasis / "labels.nii.gz"),
    ]

    def spec(index: int, name: str, a: Path, b: Path, mask, labels: Path | None) -> PairSpec:
        def build(work: Path) -> Pair:
            from carctl.io import read_image, write_image
            from carctl.resample import resample_image
            from carctl.synthetic import known_pair

            a_image = read_image(a)
            made = known_pair(
                a_image,
                read_image(b),
                mask(a_image),
                rms_mm=5.0 * scale,
                degrees=4.0 * scale,
                translation_mm=4.0 * scale,
                seed=seed + index,
            )
            write_image(made.fixed, work / "fixed.nii.gz")
            moving_labels, fixed_labels = {}, {}
            if labels is not None:
                moving_labels[MAIN] = labels
                truth_labels = resample_image(
                    read_image(labels), a_image.grid, [made.truth], "label"
                )
                fixed_labels[MAIN] = truth_labels.array.astype(np.int64)
            return Pair(
                name, b, work / "fixed.nii.gz", moving_labels, fixed_labels, made.truth, made.mask
            )

        return PairSpec(name, build)

    return [spec(i, *row) for i, row in enumerate(table)]


def thorax(ct: np.ndarray) -> np.ndarray:
    """The thorax of a chest CT ``(Z, Y, X)`` in Hounsfield units: the body (above -500 HU)
    with what it encloses in each axial slice (the lungs)."""
    return enclosed(ct > -500)


def enclosed(mask: np.ndarray) -> np.ndarray:
    """``mask`` ``(Z, Y, X)`` with what it encloses in each axial slice: a voxel with mask on
    both of its sides along x and along y (filled row by row from both sides)."""
    inside = np.ones_like(mask)
    for axis in (1, 2):
        before = np.maximum.accumulate(mask, axis=axis)
        after = np.flip(np.maximum.accumulate(np.flip(mask, axis=axis), axis=axis), axis=axis)
        inside &= before & after
    return mask | inside


def rib_cage(ct: np.ndarray) -> np.ndarray:
    """What breathing moves in a chest CT ``(Z, Y, X)`` in Hounsfield units: the lungs (air
    below -500 HU inside the thorax, smoothed over their vessels) with what they enclose in
    each axial slice (the heart, the mediastinum, the top of the liver)."""
    import torch

    from carctl.registration.levels import gaussian_blur

    lungs = torch.from_numpy(((ct < -500) & thorax(ct)).astype(np.float32))[None, None]
    lungs = gaussian_blur(lungs, [2.0, 2.0, 1.0])[0, 0].numpy() > 0.5
    return enclosed(lungs)


def breathing(image, amplitude_mm: float, seed: int, mask: np.ndarray):
    """A breathing motion of a chest CT: ``mask`` (:func:`rib_cage`, its edge blurred over
    2 mm) moves down by ``amplitude_mm`` times 0.3 at the image's top to 1 at its bottom (the
    diaphragm moves most) and out along y by up to a third of that, plus smooth noise of 2 mm
    RMS; the chest wall stays, so the motion jumps at the pleura (the lungs slide along it).
    Returns the mapping phi(x) = x + u(x) as a field."""
    import torch

    from carctl.registration.levels import gaussian_blur
    from carctl.spatial.transform import DisplacementField
    from carctl.synthetic import smooth_field

    grid = image.grid
    inside = torch.from_numpy(mask.astype(np.float64))[None, None]
    inside = gaussian_blur(inside, [2.0 / s for s in grid.spacing])[0, 0]
    points = grid.points()
    height = points[..., 2]
    top, bottom = float(height.max()), float(height.min())
    down = 0.3 + 0.7 * (top - height) / (top - bottom)
    front = points[..., 1] - float(points[..., 1][torch.from_numpy(mask)].mean())
    u = torch.zeros((3, *grid.shape), dtype=torch.float64)
    u[1] = amplitude_mm / 3 * torch.tanh(front / 40.0)
    u[2] = -amplitude_mm * down
    u = (u + smooth_field(grid, 2.0, seed=seed, mask=mask)) * inside
    return DisplacementField(grid, u.contiguous())


def breathing_pair(data: Path, seed: int, index: int, scale: float = 1.0) -> PairSpec:
    """``ct-breath``: the chest CT against a copy of itself under :func:`breathing` of 12 mm
    at the diaphragm (times ``scale``): end-point error inside the rib cage (mm)."""

    def build(work: Path) -> Pair:
        import torch

        from carctl.io import read_image, write_image
        from carctl.spatial.sample import warp

        ct = read_image(data / "dicom" / "ct-chest-40")
        cage = rib_cage(ct.array)
        truth = breathing(ct, 12.0 * scale, seed + index, cage)
        cage = torch.from_numpy(cage.astype(np.uint8))[None, None]
        mask = warp(cage, ct.grid, ct.grid, [truth], mode="nearest")[0, 0].numpy() > 0
        fixed = continued_beyond(truth, ct)
        write_image(ct, work / "moving.nii.gz")
        write_image(fixed, work / "fixed.nii.gz")
        return Pair("ct-breath", work / "moving.nii.gz", work / "fixed.nii.gz", {}, {}, truth, mask)

    return PairSpec("ct-breath", build)


# Scanners store what lies beyond their reconstruction circle as one value far below air.
CIRCLE_MM, PADDING_HU = 251.0, -3024.0


def padded_beyond_circle(image, radius_mm: float = CIRCLE_MM, value: float = PADDING_HU):
    """``image`` (axial slices) with ``value`` beyond ``radius_mm`` of each slice's centre."""
    from carctl.io import Image

    array = np.array(image.array, dtype=np.float32)
    _, y, x = array.shape
    sx, sy = image.grid.spacing[:2]
    yy, xx = np.mgrid[:y, :x]
    array[:, np.hypot((xx - (x - 1) / 2) * sx, (yy - (y - 1) / 2) * sy) > radius_mm] = value
    return Image(array, image.grid)


def chest_ct_pair(
    data: Path, seed: int, index: int, scale: float = 1.0, padded: bool = False
) -> PairSpec:
    """The chest CT (40 slices of 0.98 x 0.98 x 2 mm) against a copy of itself deformed by a
    known mapping (as :func:`known_pairs`'s, 8 mm RMS inside the thorax: breathing moves the
    lungs further than the brain pairs' 5 mm); end-point error inside the thorax. With
    ``padded`` (``chest-ct-padded``, the same deformation) both images hold -3024 beyond a
    circle of 251 mm in every slice, the same place in both, as a scanner stores them."""
    name = "chest-ct-padded" if padded else "ct-chest"

    def build(work: Path) -> Pair:
        from carctl.io import read_image, write_image
        from carctl.synthetic import known_pair

        ct = read_image(data / "dicom" / "ct-chest-40")
        made = known_pair(ct, ct, thorax(ct.array), rms_mm=8.0 * scale, seed=seed + index)
        fixed = continued_beyond(made.truth, ct)
        if padded:
            ct, fixed = padded_beyond_circle(ct), padded_beyond_circle(fixed)
        write_image(ct, work / "moving.nii.gz")  # every tool reads the same NIfTI file
        write_image(fixed, work / "fixed.nii.gz")
        return Pair(
            name, work / "moving.nii.gz", work / "fixed.nii.gz", {}, {}, made.truth, made.mask
        )

    return PairSpec(name, build)


def continued_beyond(truth, moving):
    """The fixed image of a known pair of ``moving`` onto itself under the mapping ``truth``
    (a field on the fixed grid), with what it maps beyond ``moving``'s field of view read at
    its nearest edge voxel instead of zero. Warping filled that part with zeros: a block whose
    edge marks the moving image's field of view where the truth puts it, which no real pair
    shows (each scan is cut by its own field of view) and which a method could align instead
    of the anatomy (the end-point error is measured where the truth maps inside only, as
    before)."""
    import torch

    from carctl.io import Image
    from carctl.spatial.sample import grid_sample

    grid = truth.grid
    points = grid.points() + truth.data.to(torch.float64).movedim(0, -1)
    where = moving.grid.index_to_normalised(moving.grid.to_index(points))
    image = torch.from_numpy(np.ascontiguousarray(moving.array, dtype=np.float32))[None, None]
    values = grid_sample(
        image,
        where.to(torch.float32)[None],
        mode="bilinear",
        padding_mode="border",
        align_corners=True,
    )
    return Image(values[0, 0].numpy(), grid)


# FreeSurfer aseg labels (the OASIS subject's) and the Neuromorphometrics labels (SPM's MNI
# atlas) of the same structures: (FreeSurfer, Neuromorphometrics), left then right. Cortex is
# every Neuromorphometrics cortical parcel (index >= 100: odd left, even right).
ATLAS_STRUCTURES = {
    "cerebral white matter": ((2, 45), (41, 44)),
    "lateral ventricle": ((4, 52), (43, 51)),
    "cerebellum white matter": ((7, 41), (46, 40)),
    "cerebellum cortex": ((8, 39), (47, 38)),
    "thalamus": ((10, 60), (49, 59)),
    "caudate": ((11, 37), (50, 36)),
    "putamen": ((12, 58), (51, 57)),
    "pallidum": ((13, 56), (52, 55)),
    "hippocampus": ((17, 48), (53, 47)),
    "amygdala": ((18, 32), (54, 31)),
    "accumbens": ((26, 30), (58, 23)),
    "ventral DC": ((28, 62), (60, 61)),
    "3rd ventricle": ((14, 4),),
    "4th ventricle": ((15, 11),),
    "brain stem": ((16, 35),),
}
CORTEX = (3, 42)  # FreeSurfer left, right cerebral cortex


def oasis_oriented(path: Path):
    """The OASIS subject (``t1.nii.gz`` or ``labels.nii.gz``) with its anatomy's directions in
    the header: the shared copy has an identity direction, but its index axes run towards
    the left, inferior and anterior (read off its FreeSurfer labels and slices); centred on
    the physical origin."""
    from carctl.io import Image, read_image
    from carctl.spatial.grid import Grid

    image = read_image(path)
    direction = np.array([[1.0, 0, 0], [0, 0, -1], [0, -1, 0]])
    centre = direction @ ((np.asarray(image.grid.size) - 1) / 2.0)
    grid = Grid(image.grid.size, image.grid.spacing, tuple(-centre), tuple(direction.ravel()))
    return Image(image.array, grid)


def atlas_pair(data: Path) -> PairSpec:
    """Inter-subject, atlas to subject: SPM's MNI T1 template (``avg152T1``, 2 mm, brain only:
    its tissue maps' sum above 0.5) with the Neuromorphometrics labels (1.5 mm) onto the
    OASIS subject (1 mm) with its FreeSurfer labels; mean Dice of the 29 structures both
    label (:data:`ATLAS_STRUCTURES` and the cerebral cortex), on the subject's grid."""
    spm = data / "brain-templates-2mm"

    def build(work: Path) -> Pair:
        from carctl.io import Image, read_image, write_image

        template = read_image(spm / "avg152T1.nii")
        brain = sum(read_image(spm / f"{t}.nii").array for t in ("grey", "white", "csf")) > 0.5
        write_image(Image(template.array * brain, template.grid), work / "moving.nii.gz")
        atlas = read_image(spm / "labels_Neuromorphometrics.nii")
        values = np.rint(atlas.array).astype(np.int64)
        common = np.zeros(values.shape, np.uint16)
        common[(values >= 100) & (values % 2 == 1)] = CORTEX[0]
        common[(values >= 100) & (values % 2 == 0)] = CORTEX[1]
        subject = oasis_oriented(data / "oasis-t1-a" / "labels.nii.gz")
        aseg = np.rint(subject.array).astype(np.int64)
        kept = np.where(np.isin(aseg, CORTEX), aseg, 0)
        for sides in ATLAS_STRUCTURES.values():
            for freesurfer, neuro in sides:
                common[values == neuro] = freesurfer
                kept[aseg == freesurfer] = freesurfer
        write_image(Image(common, atlas.grid), work / "moving_labels.nii.gz")
        write_image(oasis_oriented(data / "oasis-t1-a" / "t1.nii.gz"), work / "fixed.nii.gz")
        return Pair(
            "brain-atlas",
            work / "moving.nii.gz",
            work / "fixed.nii.gz",
            {MAIN: work / "moving_labels.nii.gz"},
            {MAIN: kept},
        )

    return PairSpec("brain-atlas", build)


# Thick-slice stacks: the slice thickness of clinical 2-D acquisitions (axial FLAIR, T2).
THICK_FACTOR = 5


def thick_slices(image, factor: int = THICK_FACTOR):
    """``image`` as a stack of slices ``factor`` times thicker along its third index axis,
    each the mean of ``factor`` of its slices (a thick slice's profile), centred where the
    middle one was; a remainder of slices is dropped."""
    from carctl.io import Image
    from carctl.spatial.grid import Grid

    count = image.array.shape[0] // factor
    array = image.array[: count * factor].astype(np.float32)
    array = array.reshape(count, factor, *array.shape[1:]).mean(axis=1)
    first = image.grid.index_to_physical @ np.array([0.0, 0.0, (factor - 1) / 2, 1.0])
    spacing = (*image.grid.spacing[:2], image.grid.spacing[2] * factor)
    grid = Grid((*image.grid.size[:2], count), spacing, tuple(first[:3]), image.grid.direction)
    return Image(array, grid)


def brats_known_pair(data: Path, a: str, b: str, rms_mm: float, degrees: float, seed: int):
    """BraTS contrast ``a`` deformed (``rms_mm``), turned by up to ``degrees`` and moved by as
    many mm (carctl.synthetic.known_pair), and contrast ``b`` as it is, the moving image."""
    from carctl.io import read_image
    from carctl.synthetic import known_pair

    a_image = read_image(brats_contrast(data, a))
    b_image = read_image(brats_contrast(data, b))
    mask = a_image.array > 0
    return known_pair(a_image, b_image, mask, rms_mm, degrees, degrees, seed)


def thick_pairs(data: Path, seed: int, first: int, scale: float = 1.0) -> list[PairSpec]:
    """A clinical thick-slice stack against a 1 mm volume, both ways, with a known deformation
    (as :func:`known_pairs`'): ``thick-t2f5-t1n``, the FLAIR in 5 mm axial slices onto the
    deformed T1n; ``thick-t1n-t2f5``, the T1n onto the deformed FLAIR in 5 mm slices (the
    truth and its mask read at the thick slices' centres)."""

    def spec(index: int, name: str, a: str, b: str, thick_fixed: bool) -> PairSpec:
        def build(work: Path) -> Pair:
            from carctl.io import Image, write_image
            from carctl.spatial.transform import DisplacementField

            made = brats_known_pair(data, a, b, 5.0 * scale, 4.0 * scale, seed + index)
            b_image = made.moving
            truth, mask, fixed, moving = made.truth, made.mask, made.fixed, b_image
            if thick_fixed:
                fixed = thick_slices(made.fixed)
                middle = slice((THICK_FACTOR - 1) // 2, None, THICK_FACTOR)
                count = fixed.grid.shape[0]
                truth = DisplacementField(fixed.grid, truth.data[:, middle][:, :count])
                mask = mask[middle][:count]
                # a thick voxel's intensity is the mean over its slab: where the slab leaves
                # the anatomy, so does the mask
                mask &= (
                    thick_slices(Image(made.mask.astype(np.float32), made.fixed.grid)).array > 0.5
                )
            else:
                moving = thick_slices(b_image)
            write_image(fixed, work / "fixed.nii.gz")
            write_image(moving, work / "moving.nii.gz")
            return Pair(name, work / "moving.nii.gz", work / "fixed.nii.gz", {}, {}, truth, mask)

        return PairSpec(name, build)

    return [
        spec(first, "thick-t2f5-t1n", "t1n", "t2f", thick_fixed=False),
        spec(first + 1, "thick-t1n-t2f5", "t2f", "t1n", thick_fixed=True),
    ]


def half_pairs(data: Path, seed: int, first: int, scale: float = 1.0) -> list[PairSpec]:
    """A moving image of part of the fixed one's anatomy: the upper (``half-top``) or lower
    (``half-bottom``) half of the BraTS T2w onto the T1n turned by 20 degrees, moved by 20 mm
    and deformed by 3 mm RMS. The end-point error counts the brain where the truth lands
    inside the half (the rest has no answer)."""

    def spec(index: int, name: str, upper: bool) -> PairSpec:
        def build(work: Path) -> Pair:
            import torch

            from carctl.io import Image, write_image

            made = brats_known_pair(data, "t1n", "t2w", 3.0 * scale, 20.0 * scale, seed + index)
            b_image = made.moving
            half = b_image.grid.size[2] // 2
            low, high = (half, b_image.grid.size[2]) if upper else (0, half)
            grid = b_image.grid.slab(low, high)
            moving = Image(np.ascontiguousarray(b_image.array[low:high]), grid)
            truth = made.truth
            landed = grid.to_index(truth.grid.points() + truth.data.double().movedim(0, -1))
            inside = ((landed >= 0) & (landed <= torch.tensor(grid.size) - 1)).all(dim=-1)
            write_image(made.fixed, work / "fixed.nii.gz")
            write_image(moving, work / "moving.nii.gz")
            mask = made.mask & inside.numpy()
            return Pair(name, work / "moving.nii.gz", work / "fixed.nii.gz", {}, {}, truth, mask)

        return PairSpec(name, build)

    return [spec(first, "half-top", True), spec(first + 1, "half-bottom", False)]


def all_pairs(data: Path, seed: int, scale: float = 1.0) -> list[PairSpec]:
    known = known_pairs(data, seed, scale)
    return [
        spine_pair(data),
        *known,
        atlas_pair(data),
        chest_ct_pair(data, seed, len(known), scale),
        chest_ct_pair(data, seed, len(known), scale, padded=True),
        breathing_pair(data, seed, len(known), scale),
        *prostate_pairs(data),
        *thick_pairs(data, seed, len(known) + 1, scale),
        *half_pairs(data, seed, len(known) + 3, scale),
    ]


def select_pairs(specs: list[PairSpec], args: argparse.Namespace) -> list[PairSpec]:
    """``--quick``: spine and one prostate case; ``--pairs``: names or name prefixes."""
    if args.quick:
        wanted = ["spine", next(s.name for s in specs if s.name.startswith("prostate-"))]
    else:
        wanted = args.pairs or [s.name for s in specs]
    chosen = [s for s in specs if any(s.name == w or s.name.startswith(f"{w}-") for w in wanted)]
    unknown = [
        w for w in wanted if not any(s.name == w or s.name.startswith(f"{w}-") for s in specs)
    ]
    if unknown:
        names = ", ".join(s.name for s in specs)
        raise SystemExit(f"unknown pair(s) {', '.join(unknown)}; choose from {names}")
    prostate = [s for s in chosen if s.name.startswith("prostate-")]
    if args.prostate_cases is not None:
        chosen = [s for s in chosen if s not in prostate[args.prostate_cases :]]
    return chosen


# --- scoring ----------------------------------------------------------------------------------


@dataclass
class Result:
    pair: str
    method: str
    dice: float | None = None  # mean Dice of the MAIN label map's labels
    landmark_dice: float | None = None  # mean Dice of the landmark maps
    epe_mm: float | None = None
    folding_percent: float | None = None
    registration_s: float | None = None
    process_s: float | None = None
    rss_mb: float | None = None
    field_check: float | None = None  # correlation of the method's warp and the field's warp
    error: str | None = None


def mean_dice(fixed: np.ndarray, warped: np.ndarray) -> float:
    from carctl.metrics import dice

    scores = dice(fixed, warped)
    present = [int(k) for k in np.unique(fixed) if k != 0]
    return float(np.mean([scores.get(k, 0.0) for k in present]))


def score(pair: Pair, result: Result, mapping, warped_labels: dict[str, np.ndarray]) -> None:
    """Fill ``result``'s accuracy from the ``mapping`` (a field) and the warped label maps."""
    from carctl.metrics import jacobian_summary
    from carctl.spatial.transform import jacobian_determinant
    from carctl.synthetic import end_point_error

    jacobian = jacobian_determinant(mapping).numpy()
    result.folding_percent = jacobian_summary(jacobian)["folding_percent"]
    if pair.truth is not None:
        result.epe_mm = end_point_error(mapping, pair.truth, pair.mask)
    if MAIN in pair.fixed_labels:
        result.dice = mean_dice(pair.fixed_labels[MAIN], warped_labels[MAIN])
    landmarks = [
        mean_dice(pair.fixed_labels[n] > 0, warped_labels[n] > 0)
        for n in pair.fixed_labels
        if n != MAIN
    ]
    if landmarks:
        result.landmark_dice = float(np.mean(landmarks))


def score_header(pair: Pair) -> Result:
    """The identity mapping (images aligned through their headers only)."""
    import torch

    from carctl.io import read_image
    from carctl.resample import resample_image
    from carctl.spatial.transform import DisplacementField

    fixed = read_image(pair.fixed).grid
    identity = DisplacementField(fixed, torch.zeros((3, *fixed.shape), dtype=torch.float32))
    warped = {
        name: resample_image(read_image(path), fixed, [], "label").array.astype(np.int64)
        for name, path in pair.moving_labels.items()
    }
    result = Result(pair.name, "header")
    score(pair, result, identity, warped)
    return result


def field_check(pair: Pair, mapping, out: Path) -> float:
    """Correlation between the method's own warped image and the moving image warped through
    the converted field (near 1 when the conversion is right), where both are non-zero."""
    from carctl.io import read_image
    from carctl.resample import resample_image

    mine = resample_image(read_image(pair.moving), mapping.grid, [mapping]).array
    theirs = read_image(out / WARPED).array
    both = (mine != 0) & (theirs != 0)
    return float(np.corrcoef(mine[both], theirs[both])[0, 1])


def one_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return (lines[-1] if lines else "no output")[:200]


def run_method(
    method: str, pair: Pair, case_file: Path, out: Path, args: argparse.Namespace
) -> Result:
    """Run ``method`` in a process of its own on ``pair`` and score what it wrote."""
    result = Result(pair.name, method)
    out.mkdir(parents=True)
    command = [sys.executable, str(Path(__file__).resolve()), "--one", method, str(case_file)]
    command += [str(out), "--threads", str(args.threads)]
    start = time.perf_counter()
    try:
        process = subprocess.run(
            command,
            capture_output=True,
            text=True,
            env=dict(os.environ, **thread_environment(args.threads)),
            timeout=args.timeout,
            cwd=out,  # where transformix and ANTs leave their files
        )
    except subprocess.TimeoutExpired:
        result.error = f"timed out after {args.timeout} s"
        return result
    result.process_s = time.perf_counter() - start
    if process.returncode != 0:
        signal = f"killed by signal {-process.returncode}" if process.returncode < 0 else ""
        result.error = signal or one_line(process.stderr)
        return result
    try:
        summary = json.loads(process.stdout.strip().splitlines()[-1])
        result.registration_s, result.rss_mb = summary["seconds"], summary["rss_mb"]
        collect(pair, result, out)
    except Exception as error:  # a crash in scoring is reported like a crash in the method
        result.error = f"{type(error).__name__}: {one_line(str(error))}"
    return result


def collect(pair: Pair, result: Result, out: Path) -> None:
    """Score the field and label maps that a worker wrote into ``out``."""
    from carctl.io import read_grid
    from carctl.spatial.files import read_field

    mapping = read_field(out / FIELD)
    fixed = read_grid(pair.fixed)
    if not mapping.grid.same_as(fixed, tolerance=1e-3):
        raise ValueError(f"field grid {mapping.grid} is not the fixed grid {fixed}")
    mapping.grid = fixed  # the same within the tolerance
    warped = {name: label_array(label_output(out, name)) for name in pair.moving_labels}
    score(pair, result, mapping, warped)
    result.field_check = field_check(pair, mapping, out)


# --- report -----------------------------------------------------------------------------------

COLUMNS = (
    ("pair", None),
    ("method", None),
    ("Dice", "dice"),
    ("landmark Dice", "landmark_dice"),
    ("EPE (mm)", "epe_mm"),
    ("folding (%)", "folding_percent"),
    ("registration (s)", "registration_s"),
    ("process (s)", "process_s"),
    ("peak RSS (MB)", "rss_mb"),
)
FORMATS = {
    "dice": "{:.3f}",
    "landmark_dice": "{:.3f}",
    "epe_mm": "{:.2f}",
    "folding_percent": "{:.3f}",
    "registration_s": "{:.1f}",
    "process_s": "{:.1f}",
    "rss_mb": "{:.0f}",
}


def table_header() -> str:
    names = [name for name, _ in COLUMNS]
    return "| " + " | ".join(names) + " |\n|" + "---|" * len(names)


def table_row(result: Result) -> str:
    cells = [result.pair, result.method]
    for _, key in COLUMNS[2:]:
        value = getattr(result, key)
        cells.append("-" if value is None else FORMATS[key].format(value))
    if result.error:
        cells[2] = f"error: {result.error.replace('|', '/')}"
    return "| " + " | ".join(cells) + " |"


def mean_rows(results: list[Result], prefix: str) -> list[Result]:
    """Per method, the mean over the pairs named ``prefix-*`` of every reported number."""
    rows = []
    group = [r for r in results if r.pair.startswith(f"{prefix}-")]
    pairs = len({r.pair for r in group})
    for method in dict.fromkeys(r.method for r in group):
        done = [r for r in group if r.method == method and not r.error]
        row = Result(f"{prefix} (mean of {len(done)}/{pairs})", method)
        if not done:
            row.error = "every pair failed"
        for name in [*FORMATS, "field_check"]:
            values = [getattr(r, name) for r in done if getattr(r, name) is not None]
            setattr(row, name, float(np.mean(values)) if values else None)
        rows.append(row)
    return rows


def machine() -> str:
    def version(package: str) -> str:
        try:
            return metadata.version(package)
        except metadata.PackageNotFoundError:
            return "absent"

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as info:
            cpu = next(line.split(":", 1)[1].strip() for line in info if "model name" in line)
    except (OSError, StopIteration):
        pass

    def git(*command: str) -> str:
        return subprocess.run(
            ["git", "-C", str(HERE.parent), *command], capture_output=True, text=True, check=True
        ).stdout.strip()

    try:
        revision = git("describe", "--always")
        if git("status", "--porcelain", "--", "carctl"):
            revision += " + uncommitted changes in carctl/"
    except (OSError, subprocess.CalledProcessError):
        revision = "unknown"
    packages = ", ".join(
        f"{name} {version(name)}" for name in ("torch", "SimpleITK", "antspyx", "itk-elastix")
    )
    return (
        f"{os.cpu_count()} CPU cores ({cpu}), Python {platform.python_version()}, {packages}, "
        f"convexAdam {version('convexAdam')}; carctl {version('carctl')} at {revision}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=HERE.parent.parent / "shared" / "data")
    parser.add_argument("--pairs", nargs="+", help="pair names or prefixes (default: all)")
    peers = [m for m in METHODS if not m.startswith("carctl-")]
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=peers)
    parser.add_argument("--prostate-cases", type=int, help="at most this many prostate cases")
    parser.add_argument("--quick", action="store_true", help="spine and one prostate case only")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--carctl-loss", default="mind", help="carctl's --loss (default mind)")
    parser.add_argument(
        "--carctl-regularization", type=float, help="carctl's --regularization (default: its own)"
    )
    parser.add_argument(
        "--carctl-resolution", type=float, help="carctl's --resolution (default: its own)"
    )
    parser.add_argument("--seed", type=int, default=0, help="of the known deformations")
    parser.add_argument(
        "--deformation-scale",
        type=float,
        default=1.0,
        help="size of the known deformations, chest CT's included (0: the contrasts as the "
        "dataset aligns them)",
    )
    parser.add_argument("--timeout", type=float, default=3600.0, help="per method and pair (s)")
    parser.add_argument("--json", type=Path, help="also write every number to this file")
    parser.add_argument("--keep", type=Path, help="keep pairs and outputs in this new folder")
    parser.add_argument("--list", action="store_true", help="list the pairs and exit")
    parser.add_argument("--one", nargs=3, metavar=("METHOD", "CASE", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        method, case_file, out = args.one
        worker(method, Path(case_file), Path(out), args.threads)
        # leave as the carctl program does, without the interpreter's teardown (unloading
        # torch alone takes 0.4 s), for every method alike: the "process" column is then
        # what a command line of each would take
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    specs = all_pairs(args.data, args.seed, args.deformation_scale)
    if args.list:
        print("\n".join(s.name for s in specs))
        return
    chosen = select_pairs(specs, args)
    command = shlex.join(["python", os.path.relpath(__file__), *sys.argv[1:]])
    print(f"Command: `{command}`\n\nMachine: {machine()}; {args.threads} threads per method.\n")
    print(table_header(), flush=True)
    results = []
    with tempfile.TemporaryDirectory(prefix="bench_register_") as tmp:
        root = args.keep or Path(tmp)
        for spec in chosen:
            work = root / spec.name
            work.mkdir(parents=True)
            print(f"building {spec.name} ...", file=sys.stderr, flush=True)
            pair = spec.build(work)
            case_file = work / "case.json"
            labels = {name: str(path) for name, path in pair.moving_labels.items()}
            case = {"moving": str(pair.moving), "fixed": str(pair.fixed), "labels": labels}
            case["carctl_loss"] = args.carctl_loss
            case["carctl_regularization"] = args.carctl_regularization
            case["carctl_resolution"] = args.carctl_resolution
            case_file.write_text(json.dumps(case, indent=1))
            rows = [score_header(pair)]
            print(table_row(rows[0]), flush=True)
            for method in args.methods:
                print(f"{method} on {spec.name} ...", file=sys.stderr, flush=True)
                rows.append(run_method(method, pair, case_file, work / method, args))
                print(table_row(rows[-1]), flush=True)
            results += rows
        for row in mean_rows(results, "prostate"):
            print(table_row(row), flush=True)
            results.append(row)
    print(
        "\nDice: spine cord / prostate gland / mean of the OASIS labels; landmark Dice: mean "
        "over the prostate landmark blobs; EPE: mean end-point error inside the mask of a known "
        "deformation; folding: voxels with det J <= 0; registration: the registration call; "
        "process: the whole worker process; peak RSS: the worker's, after registration."
    )
    suspicious = [r for r in results if r.field_check is not None and r.field_check < 0.95]
    for r in suspicious:
        print(
            f"warning: {r.method} on {r.pair}: its own warped image and the warp through the "
            f"converted field correlate only {r.field_check:.3f}",
        )
    if args.json:
        report = {"command": command, "machine": machine(), "threads": args.threads}
        report["results"] = [asdict(r) for r in results]
        args.json.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
