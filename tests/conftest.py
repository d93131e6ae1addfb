"""Shared fixtures: tiny synthetic images with known geometry, the shared real data, the CLI."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

sitk.ProcessObject.SetGlobalWarningDisplay(False)  # e.g. "Analyze file is deprecated"

_DEFAULT_SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
SHARED_DATA = Path(os.environ.get("CARCTL_SHARED_DATA", _DEFAULT_SHARED))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data`` beside the repository (or $CARCTL_SHARED_DATA); skip when absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture
def two_series(shared_data, tmp_path) -> Path:
    """A directory holding two DICOM series: 3 MR slices and 3 CT slices."""
    import shutil

    folder = tmp_path / "two-series"
    folder.mkdir()
    for source in ("mr-3slice", "ct-chest-40"):
        for i, f in enumerate(sorted((shared_data / "dicom" / source).iterdir())[:3]):
            shutil.copy(f, folder / f"{source}-{i}.dcm")
    return folder


def rotation(ax: float, ay: float, az: float) -> np.ndarray:
    """Rotation matrix from angles (radians) about x, then y, then z."""
    cx, sx, cy, sy, cz, sz = np.cos(ax), np.sin(ax), np.cos(ay), np.sin(ay), np.cos(az), np.sin(az)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


def smooth_volume(size, seed: int = 0, sigma: float = 2.0) -> np.ndarray:
    """A smooth random float32 array in [0, 100] of ITK ``size``, in (Z, Y, X) order."""
    rng = np.random.default_rng(seed)
    noise = sitk.GetImageFromArray(rng.normal(size=tuple(reversed(size))).astype(np.float32))
    variance = [sigma**2 if n > 3 else 0.0 for n in size]
    array = sitk.GetArrayFromImage(
        sitk.DiscreteGaussian(noise, variance=variance, useImageSpacing=False)
    )
    return (100.0 * (array - array.min()) / np.ptp(array)).astype(np.float32)


def make_image(
    size, spacing=None, origin=None, direction=None, seed: int = 0, array=None
) -> sitk.Image:
    """A SimpleITK float32 image with a smooth random pattern and the given geometry."""
    d = len(size)
    image = sitk.GetImageFromArray(smooth_volume(size, seed) if array is None else array)
    image.SetSpacing(tuple(float(s) for s in (spacing or (1.0,) * d)))
    image.SetOrigin(tuple(float(o) for o in (origin or (0.0,) * d)))
    image.SetDirection(
        tuple(
            float(c) for c in np.asarray(direction if direction is not None else np.eye(d)).ravel()
        )
    )
    return image


def centred_on(image: sitk.Image, size, spacing, direction) -> sitk.Image:
    """An empty image of the given size/spacing/direction whose centre is ``image``'s centre."""
    d = len(size)
    direction = np.asarray(direction, dtype=float).reshape(d, d)
    centre_index = (np.asarray(image.GetSize()) - 1) / 2.0
    centre = np.asarray(image.TransformContinuousIndexToPhysicalPoint(tuple(centre_index)))
    half = direction @ (np.asarray(spacing) * (np.asarray(size) - 1) / 2.0)
    out = sitk.Image([int(s) for s in size], sitk.sitkFloat32)
    out.SetSpacing(tuple(float(s) for s in spacing))
    out.SetDirection(tuple(direction.ravel()))
    out.SetOrigin(tuple(centre - half))
    return out


def bspline_transform(reference: sitk.Image, magnitude: float = 3.0, mesh: int = 3, seed: int = 0):
    """A random B-spline transform over ``reference``'s grid (coefficients ~ N(0, magnitude) mm)."""
    transform = sitk.BSplineTransformInitializer(reference, [mesh] * reference.GetDimension())
    rng = np.random.default_rng(seed)
    transform.SetParameters(tuple(rng.normal(0.0, magnitude, len(transform.GetParameters()))))
    return transform


def bspline_field(
    reference: sitk.Image, magnitude: float = 3.0, mesh: int = 3, seed: int = 0
) -> sitk.Image:
    """A smooth random displacement field (sitkVectorFloat64) on ``reference``'s grid, made by
    SimpleITK from :func:`bspline_transform`."""
    return sitk.TransformToDisplacementField(
        bspline_transform(reference, magnitude, mesh, seed),
        sitk.sitkVectorFloat64,
        reference.GetSize(),
        reference.GetOrigin(),
        reference.GetSpacing(),
        reference.GetDirection(),
    )


def ants_resample(
    fixed: Path, moving: Path, transforms, interpolator: str = "linear"
) -> np.ndarray:
    """antsApplyTransforms through antspyx (``-t`` in the order given), as a (Z, Y, X) array."""
    import ants

    warped = ants.apply_transforms(
        fixed=ants.image_read(str(fixed)),
        moving=ants.image_read(str(moving)),
        transformlist=[str(t) for t in transforms],
        interpolator=interpolator,
    )
    return np.transpose(warped.numpy())  # ANTs arrays are (X, Y, Z)


@dataclass
class GridPair:
    """A moving image and a fixed (reference) grid that differ in spacing, size and orientation."""

    name: str
    moving: sitk.Image
    fixed: sitk.Image


def grid_pairs() -> list[GridPair]:
    """Moving/fixed pairs covering the geometry cases the Foundation issue names."""
    moving = make_image((28, 24, 20), spacing=(1.0, 1.2, 1.5), origin=(-14.0, 10.0, 3.0), seed=1)
    flipped = np.diag([-1.0, 1.0, -1.0])  # RPI: x and z flipped
    oblique = rotation(0.3, -0.2, 0.5)
    psr = np.array([[0.0, 0.0, -1.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    moving_oblique = make_image(
        (26, 22, 18),
        spacing=(1.3, 1.0, 1.6),
        origin=(5.0, -3.0, 8.0),
        direction=rotation(-0.25, 0.15, 0.1),
        seed=2,
    )
    return [
        GridPair(
            "same-geometry-other-spacing",
            moving,
            centred_on(moving, (20, 18, 15), (1.4, 1.5, 1.9), np.eye(3)),
        ),
        GridPair("flipped", moving, centred_on(moving, (25, 22, 17), (1.1, 1.3, 1.7), flipped)),
        GridPair("oblique", moving, centred_on(moving, (22, 20, 16), (1.2, 1.25, 1.8), oblique)),
        GridPair("permuted-psr", moving, centred_on(moving, (18, 21, 24), (1.5, 1.1, 1.05), psr)),
        GridPair(
            "both-oblique",
            moving_oblique,
            centred_on(moving_oblique, (24, 20, 19), (1.1, 1.35, 1.4), oblique),
        ),
    ]


@pytest.fixture(params=grid_pairs(), ids=lambda p: p.name)
def grid_pair(request) -> GridPair:
    return request.param


@dataclass
class CliResult:
    code: int
    out: str
    err: str


@pytest.fixture
def cli(capsys):
    """Run ``carctl ARGS...`` in-process; returns exit code, stdout and stderr."""
    import signal

    from carctl.cli import main

    def run(*args: str) -> CliResult:
        capsys.readouterr()
        kept = signal.getsignal(signal.SIGTERM)  # main() makes SIGTERM an interrupt
        try:
            main([str(a) for a in args])
            code = 0
        except SystemExit as done:
            code = done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
        finally:
            signal.signal(signal.SIGTERM, kept)
        captured = capsys.readouterr()
        return CliResult(code, captured.out, captured.err)

    yield run
    from carctl.cli.console import set_debug

    set_debug(False)


def write(image: sitk.Image, path: Path) -> Path:
    sitk.WriteImage(image, str(path))
    return path


def pytest_configure(config):
    """One thread per pytest-xdist worker (``-n N``): each test's steps are many short parallel
    operations, and two workers with two threads each on two cores waited on each other (the
    suite took 662 s against 270 s in one process)."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        import torch

        torch.set_num_threads(1)
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)


@pytest.fixture(autouse=True)
def _keep_thread_count():
    """A test that sets the thread count (``--threads``, ``set_threads``) leaves it as it was
    for the next one."""
    import torch

    threads = torch.get_num_threads()
    itk_threads = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    yield
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(itk_threads)


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` run only where CUDA is available."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
