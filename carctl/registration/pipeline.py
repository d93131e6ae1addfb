"""What ``carctl register`` runs: a sequence of stages over shared state, with reports.

Stages: ``initialise`` (header, centres, rotation search), ``rigid``, ``affine``,
``network`` (CAR's pretrained network, :mod:`carctl.registration.network`) and
``deformable`` (instance optimisation, started from the network's field when it ran, with
fewer iterations). ``--method`` picks stages through :data:`METHODS`.

The result maps fixed to moving physical points: ``T(x) = A(x + u(x))``. It is returned as
the affine ``A`` alone and as one displacement field on the fixed grid for the whole of ``T``
(what ``--field`` writes, so that the field alone reproduces the warped image).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch

from carctl.config import RegistrationOptions
from carctl.io import Image, require_same_dimension
from carctl.losses import LOSSES, REGULARISERS, LossSpec, loss_spec
from carctl.padding import as_air, summarised
from carctl.registration import affine as affine_stage
from carctl.registration import initialise as init_stage
from carctl.registration import optimize, planar
from carctl.registration.levels import (
    OVERSAMPLE,
    Level,
    build_level,
    foreground,
    foreground_box,
    hounsfield,
    intensity_range,
    normalise,
    require_contrast,
    require_size,
)
from carctl.runtime import resolve_device
from carctl.spatial.grid import Grid, apply_homogeneous, slabs
from carctl.spatial.transform import Affine, DisplacementField

# Fixed-point iterations of the field inversion.
INVERSE_ITERATIONS = 20
# Default regularisation weight per loss (their scales differ).
DEFAULT_REGULARIZATION = {
    "mind": 0.2,
    "mi": 10.0,
    "lncc": 1.0,
    "ncc": 1.0,
    "mse": 0.1,
    "imse": 0.2,
    "mind+imse": 0.2,
}
# The defaults on 2-D images where they differ: MIND compares four neighbours there instead of
# six, and its noisier descriptors bent cross-contrast slices under the 3-D weight
# (benchmarks/bench_2d.py, BraTS slices with a known deformation: mean end-point error 1.41
# -> 1.26 mm over 15 contrast pairs, better on 11; the same contrast 0.225 -> 0.254 mm).
DEFAULT_REGULARIZATION_2D = {"mind": 0.5}
# ... and between two CT images (both in Hounsfield units, levels.hounsfield) in 3-D, the
# most weight of the levels after the coarsest (which runs with the loss's default, as the
# motion rule below measures there). Breathing moves the lungs, heart and liver along the
# chest wall, which stays: a displacement that jumps at the pleura, which the brains' weight
# smoothed over. Mean end-point error (mm) of `io`, 0.2 -> 0.1 at every level (scaled by the
# motion rule either way): the benchmark's `ct-breath` (the chest CT, the inside of its rib
# cage moved down by up to 12 mm, the most at the diaphragm, and outwards; the wall still),
# seeds 0 / 1: 1.41 / 1.23 -> 1.08 / 0.97; the same with another mask of the rib cage and
# 8 / 12 / 20 / 28 mm: 0.69 / 1.30 / 2.30 / 4.10 -> 0.64 / 1.02 / 2.00 / 3.09; `ct-chest`
# (8 mm RMS, smooth), seeds 0-2: 0.885 / 0.968 / 1.443 -> 0.876 / 0.952 / 1.461. But with the
# CT turned by 15 / 20 degrees and moved 15 / 20 mm (3 mm RMS deformation) the coarsest
# level at 0.1 found more motion, the rule cut the weight to 0.03-0.04 and the result was
# noisy: 0.66 / 1.12 -> 1.17 / 1.81 (with DEFAULT_ITERATIONS_CT). With the coarsest level at
# 0.2 and the others at most 0.1 (and 80 iterations at the finest, below): `ct-breath` 1.01
# / 0.89, `ct-chest` 0.79 / 0.84, turned 0.59 / 1.00, `ct-chest` at 16 mm RMS 5.41 -> 5.20
# (every level at 0.1: 4.10-4.42, the one case that gained from it). No folding. On the
# brain pairs half the weight lost 0.01-0.13 mm (all six), so brains keep 0.2.
# Then at most 0.05 after the coarsest level (still 0.2 there): breathing went on gaining,
# the more so the larger it was, and the pairs it cost lost less. `auto`, seeds 0 / 1:
# `ct-breath` 1.003 / 0.881 -> 0.850 / 0.808, at 20 mm at the diaphragm 2.107 / 1.985 ->
# 1.958 / 1.807 (ConvexAdam 1.86 / 1.92, with 0.35 / 0.56 % folding, in 150-180 s), at 28 mm 3.049 /
# 3.175 -> 2.860 / 2.958; `ct-chest` 0.780 / 0.834 -> 0.799 / 0.858; turned by 15 / 20
# degrees 0.572 / 0.969 -> 0.737 / 1.049; `ct-chest` at 16 mm RMS 5.01 -> 4.99. (0.03:
# breathing alike, turned 0.94 / 1.25, `ct-chest` 0.87 / 0.95; 0.05 at every level too:
# turned 1.68 / 2.15; 0.02 there: 2.64 / 2.97.)
# With a fixed mask (a lung mask: usage.md advises one) the chest wall no longer holds the
# field back and the lower weight only made it noisier: `ct-breath` with its rib cage as
# fixed mask 0.66 / 0.69 mm at 0.1, 0.735 / 0.758 at 0.05; there the cap stays 0.1.
DEFAULT_REGULARIZATION_CT = {"mind": 0.05}
DEFAULT_REGULARIZATION_CT_MASKED = {"mind": 0.1}
# The finest level has 2 mm voxels, or this many voxels across a small image (never finer
# than the image's own).
FINEST_VOXELS = 96
# Deformable iterations per level, coarse to fine.
DEFAULT_ITERATIONS = (80, 60, 40)
# ... between two 3-D CT images (see DEFAULT_REGULARIZATION_CT): their finest level went on
# gaining. Mean end-point error (mm) of `auto` with 40 / 60 / 80 iterations there, on
# `ct-breath` seeds 0 and 1: 1.077 / 1.028 / 0.996 and 0.969 / 0.916 / 0.884; on `ct-chest`
# seeds 0 and 1: 0.876 / 0.816 / 0.786 and 0.952 / 0.880 / 0.843; 1-1.5 s more on 10-12 s.
# With the weight at most 0.05 it gained again, on every pair tried, with 80 / 120 / 160:
# `ct-breath` 0.850 / 0.813 / 0.792 and 0.808 / 0.775 / 0.767, at 20 mm 1.958 / 1.906 / 1.888
# and 1.807 / 1.746 / 1.730, `ct-chest` 0.799 / 0.772 / 0.756 and 0.858 / 0.822 / 0.796, the
# turned CT 0.737 / 0.682 / 0.649 and 1.049 / 1.007 / 0.970; the deformable stage of
# `ct-breath` 10.7 / 12.0 / 12.6 s (median of three, on a slower machine than the figures
# above). 120: most of the gain, for two thirds of the time 160 adds.
DEFAULT_ITERATIONS_CT = (80, 60, 120)
# Iterations of the rigid refinement of initial candidates, rigid and affine stages per level.
INIT_ITERATIONS, RIGID_ITERATIONS, AFFINE_ITERATIONS = 20, 60, 60
# ... and of the rigid and affine stages per level when the network follows (``net``, and
# ``auto`` on 3-D images but thick moving stacks, see NETWORK_THICK): the network takes what
# the linear stages leave, so they stop earlier. ``net`` in-process, mean end-point error
# over the five known contrast pairs (seeds 0 and 1) 1.689 -> 1.692 mm, over the thick and
# half pairs 1.778 -> 1.750, 0.7-0.9 s less on a 1 mm brain (80 steps instead of 200); the
# whole benchmark, ``auto`` and ``net``, no pair worse by more than 0.03 mm / 0.004 Dice but
# the prostate cases, which swing either way under any change to these stages (docs/benchmarks.md).
NETWORK_RIGID_ITERATIONS, NETWORK_AFFINE_ITERATIONS = 20, 30
# Features of the initialisation and the linear stages are computed at their level's spacing
# (oversampling them, as the deformable stage's are, cost 3-5 s on a 1 mm brain and changed
# the network's end-point error by less than 0.02 mm on BraTS and SPM pairs).
LINEAR_OVERSAMPLE = 1
# The initialisation and the linear stages never compare MIND descriptors with a constant
# where the moving image is absent, as the deformable stage does (LossSpec.fills_outside):
# they compare where both images are present, away from the edges of the moving image and
# of its working grid by the descriptors' reach (LossSpec.reach). The constant made the
# moving image's field of view a feature: where it cuts the anatomy (thick-slice clinical
# stacks at another angle) the rigid stage turned the stack to line it up with the fixed
# one: 8.6 mm off (7.1 mm before it) for a 15 degree tilt between two 5 mm stacks of one
# brain, 0.24 mm now. The deformable stage keeps the constant, away from the edges by the
# same reach, but below its coarsest level the constant pulls nothing (Level.loss): comparing
# the overlap only cost the prostate pairs' landmarks (landmark Dice 0.078 against 0.127),
# and a constant that pulled made the edge of the moving field of view a feature there too
# (see EDGE_PULL_LEVELS and docs/benchmarks.md).
# The deformable stage's coarsest level (this many coarsest levels) lets the constant pull:
# where its points read beyond the moving image, MIND is compared with the constant with a
# gradient, and the moving support is not eroded. There, on a short volume, the band along
# the field of view's edge is a large part of the image and what pulls the large motion in
# (chest CT, 80 mm tall, with a known 8 / 12 / 16 mm RMS deformation: 0.87 / 1.93 / 4.24 mm
# with every level pulling, 1.00 / 2.55 / 5.05 with none, 0.91 / 2.06 / 4.34 with the
# coarsest only; the network's check, which runs on that level, keeps its calibration). On
# the finer levels the pull only dragged the edge of a moving stack over the fixed image.
EDGE_PULL_LEVELS = 1
# Under ``auto`` the network's field is kept as the deformable stage's start only when it
# lowers the linear stages' similarity loss by at least this fraction; otherwise the stage
# runs its whole pyramid from the affine, as ``io`` does. Measured (MIND): 13-60 % on the
# BraTS, SPM and OASIS brain pairs (where the start saves iterations and gains accuracy),
# 2-3 % on prostate MR->ultrasound (where starting from it lost up to 0.2 gland Dice
# against io) and -8 % on the spinal cord pair. Where the finest linear level's gain falls
# short, the linear stages' coarser level's (4 mm on a brain) may meet it instead: noise
# lowers the finer level's gain more (BraTS T2w with noise at SNR 20: 4 % there, 16 % at 4
# mm; the SPM T2 template at SNR 40: 9.4 / 10.1 %); the prostate cases (0.5-3.4 %) and the
# spine (-1.4 %), whose linear stages run one level, stay under it.
NETWORK_MIN_GAIN = 0.1
# A kept network field is checked at the coarsest deformable level: a correction optimised on
# top of it (the field itself untouched). When that correction moves the fixed grid's points
# by more than this (mm, mean over the control grid), the network was far off (its training
# saw displacements of a few mm): its field is discarded and io's whole pyramid runs from the
# affine; otherwise the correction is dropped and only the finest level runs from the
# network's field. Measured (MIND): 2.1-3.8 mm on BraTS, SPM and OASIS pairs, 4.9-6.5 mm on
# the 8 mm RMS chest CT pair. Far off, starting over beat correcting the network's field
# through the pyramid on every pair tried: chest CT 8 / 12 / 16 mm RMS 1.02 / 2.39 / 5.22 ->
# 0.92 / 2.11 / 4.70 mm, brains deformed twice the benchmark's size 0.01-0.54 mm on all six.
NETWORK_MAX_CORRECTION_MM = 4.0
# Under ``auto`` the network is not run when the moving image's coarsest voxel spacing is over
# this many times both the fixed image's and the network's working grid's (thick slices onto a
# finer image: 3 mm and more onto a 1 mm brain, whose working grid is about 2 mm). It was trained
# on images of near-isotropic voxels; from its field the deformable stage ended 0-0.11 mm behind
# its whole pyramid on every thick moving stack tried (BraTS contrasts in 3, 5 and 7 mm slices,
# axial, coronal, sagittal and oblique, onto a deformed 1 mm contrast; 5 mm FLAIR onto T1n 1.53 /
# 1.48 mm, coronal 1.63 / 1.52, sagittal 1.73 / 1.63, 0.45 x 0.45 x 6 mm at 20 degrees 1.77 /
# 1.66) in about the same time, while on a 2 mm stack it helped (1.41 / 1.43). It still runs when
# the fixed image's voxels are about as coarse as the moving image's: where both are thick, or
# the fixed one only, the network helped (5 mm FLAIR onto the T1n in 5 mm slices 1.78 / 1.87
# mm, tilted 30 degrees 1.90 / 2.04; 1 mm FLAIR onto it 1.77 / 1.84). Only stacks count:
# the moving image's coarsest spacing must also be over this many times its own finest. A
# coarse image of near-isotropic voxels (3 or 4 mm onto a 1 mm brain, as PET or EPI) was
# skipped too, though the network helped there: `auto` on the BraTS and SPM contrast pairs
# with the moving image at 3 and 4 mm, mean end-point error over the ten 1.809 -> 1.786 mm,
# nine of ten better or alike (one 0.06 mm worse), in less time.
NETWORK_THICK = 1.25
# Nor between two CT images (levels.hounsfield; ``net`` runs it): its start was never better
# than io's pyramid there. Under the benchmark's smooth 8 mm RMS deformation of the chest CT
# the check always discarded its field (a large motion), after the network's second or so;
# under a breathing motion (see DEFAULT_REGULARIZATION_CT), which moves the inside of the
# rib cage only, the motion averaged over the whole image stays under NETWORK_MAX_MOTION_MM,
# the field was kept, and the finest level alone could not finish it: `ct-breath` seeds 0 / 1
# 1.50 / 1.59 mm where the whole pyramid ended 1.41 / 1.23 (weight 0.2 in both), with another
# mask of the rib cage and 12 / 20 / 8 mm at the diaphragm 1.69 / 4.43 / 0.74 against 1.30 /
# 2.30 / 0.69.
# The check runs this many iterations (or the coarsest level's count, when fewer): half the
# level's default. It decides, it does not register (its correction is dropped either way),
# and half the iterations found corrections within 0.4 mm of the whole level's (BraTS 2.87 /
# 2.06 / 2.56 mm against 2.71 / 1.96 / 2.45; chest CT 3.6-4.5 mm, seeds 0-3), so the same
# starts were kept or discarded on every benchmark pair and seeds 1-3 of the chest CT, for
# 0.2 s less on a 1 mm brain (0.4 -> 0.2 s).
NETWORK_CHECK_ITERATIONS = 40
# The default regularisation weight follows the motion: when the coarsest level of a pyramid
# run from the affine finds that the moving image must move more than MOTION_SCALE_MM on
# average (the mean length of its field), the levels that follow run with the weight scaled
# by MOTION_SCALE_MM / that length. The diffusion penalty of a field grows with the square of
# its size and its pull with the size, so one weight for every size held large motion back.
# Measured with `io` (chest CT with a known 8 / 12 / 16 mm RMS deformation, mm left): 1.07 /
# 2.79 / 6.50 -> 0.92 / 2.10 / 4.84; brains deformed twice the benchmark's size 0.07-0.41 mm
# better on all six pairs; the benchmark's own pairs: SPM 1.43 / 1.66 -> 1.44 / 1.68, others
# unchanged. An explicit --regularization is kept as given.
# Beyond that motion the network's field is not the start either: when the field and the
# check's correction (above) together move the coarsest control grid's points by more than
# NETWORK_MAX_MOTION_MM on average, io's whole pyramid runs from the affine, even where the
# correction was small. The finest level alone cannot finish a large motion: the chest CT
# pair with other random deformations of the same size (seeds 2 and 3: motion 7.1 and 6.8 mm,
# corrections 3.7 mm, under NETWORK_MAX_CORRECTION_MM) ended 1.86 / 2.02 mm from the finest
# level, 1.43 / 1.15 from the pyramid; brains moved 1.25-1.5 times the benchmark's size
# (motion 4.0-4.7 mm) 0.06-0.35 mm better on four of six pairs. The price: the blurry 2 mm
# SPM templates (motion 4.8-7.6 mm) end 0.01-0.09 mm worse on seven of eight pairs tried.
# When the network's field alone already moves them by more than that, the check is not
# run: the pyramid runs from the affine at once. Measured (mean length on the coarsest
# control grid, seeds 0 and 2): the network's field alone 1.5-2.2 mm on the BraTS and OASIS
# pairs, 1.6 on the atlas pair, 2.6-3.4 on the SPM templates, 4.4-4.7 on the chest CT, and
# with the check's correction more on all sixteen (2.3-7.7 mm): the chest CT, whose check
# always discarded the field (motion 6.8-7.7 mm), saves the check (about 1 s of 8.6-8.9).
MOTION_SCALE_MM = 4.0
NETWORK_MAX_MOTION_MM = MOTION_SCALE_MM
# Once the initialisation has chosen (or been given) a start turned by this many degrees or
# more, the moving image's features are computed along the fixed image's axes turned by that
# rotation (see levels.build_level): MIND-SSC's neighbours then mean the same in both images.
# Without it the rigid stage left the truth it started from on a phantom turned by 15 / 40 /
# 60 degrees by 1.0 / 4.5 / 7.5 mm (0.4 / 0.1 / 0.1 mm with it), and on the SPM T2 template
# turned by 30 / 45 degrees, from a start 5 degrees off, ended 2.1 / 18.8 mm off (0.4 / 0.4).
# Below 25 degrees it is not used: from 5 degrees it moved the clinical TCGA stacks (starts
# turned by about 10-17 degrees) both ways, better on two pairs' inverse consistency and worse
# on one (FLAIR <-> T2, rigid, 0.31 -> 1.48 mm); following every rotation the later stages
# find (from half a degree) cost the prostate MR->ultrasound pairs (0.570 -> 0.519 mean gland
# Dice). Larger rotations the linear stages find are followed: FOLLOW_DEGREES.
FRAME_DEGREES = 25.0
# After the rigid and the affine stage, once the rotation found is this many degrees or more
# from the axes the moving features are taken along, the later stages take them along it
# (rebuilding their levels; see _follow_frame). The initialisation's starts come in steps of
# 20 degrees and turn the features from 25; below that, and for rotations the linear stages
# find themselves, the descriptors were compared turned against each other: the rigid stage
# stopped short (16.6 degrees of a phantom's 20) and every later stage paid for it. `auto`
# on the SPM T2 and PD templates onto the T1 under a known rotation (about all three axes),
# 20 mm and 3 mm RMS, mean end-point error over the two contrasts and seeds 0 and 1 (mm):
#   degrees              8     10    12    15    20    25    30
#   not following      1.22  1.40  1.53  1.81  2.51  3.53  3.67
#   following from 8   1.12  1.08  1.11  1.09  1.12  1.19  1.30
# (following from 15 degrees: 12 degrees as not following, 15 degrees 1.51; the rigid
# stage's short rotation often stays under it); BraTS T2w / T1c at 10 degrees 1.563 /
# 0.966 -> 1.489 / 0.944, T2w / T2-FLAIR at 20 1.695 / 1.264 -> 1.541 / 1.124. The
# benchmark's pairs turn by less, but for two prostate MR -> ultrasound cases (9.8 and 12.3
# degrees: gland Dice 0.707 -> 0.701, 0.495 -> 0.407; these cases move either way under any
# change to the linear stages); every other pair is unchanged. Where the rigid stage is the
# last (`--method rigid`) and has turned the features, it runs its finest level once more
# along them: with a rigid truth (SPM T2 / PD and BraTS T2w onto T1, seeds 0 and 1, mean
# mm) at 10 / 15 / 20 degrees 0.56 / 0.70 / 0.90 -> 0.45 / 0.44 / 0.46, for 0.3-1.3 s more.
# Repeating both linear stages wherever they turn the features changed `auto` on the SPM
# pairs by at most 0.005 mm (10-30 degrees) and moved the prostate cases, whose affine stage
# turns by 11-13 degrees (`--method affine` gland Dice 0.517 -> 0.481, `auto` 0.568 ->
# 0.575). Moving stacks of slices (coarsest spacing over NETWORK_THICK times the finest)
# keep their axes: their voxels would be resampled across the slices along turned axes, and
# the levels' thick-slice handling (levels.MOVING_GROWTH) reads the spacing along each axis
# (the clinical TCGA FLAIR <-> T2 stacks, turned by 10-17 degrees: inverse consistency 0.87
# -> 1.20 mm when they followed from 15).
FOLLOW_DEGREES = 8.0
# Voxels read per stochastic step (losses that compare voxel by voxel).
INIT_VOXELS, LINEAR_VOXELS, DEFORMABLE_VOXELS = 1 << 13, 1 << 13, 1 << 15


class Progress(Protocol):
    def start(self, stage: str, total: int) -> None: ...

    def advance(self, steps: int = 1) -> None: ...


class _Silent:
    def start(self, stage: str, total: int) -> None:
        pass

    def advance(self, steps: int = 1) -> None:
        pass


@dataclass
class StageReport:
    """One stage's time and similarity loss before and after it, both measured at the stage's
    last (finest) level so that they compare (initialise: MIND scores of the header and the
    chosen start)."""

    name: str
    seconds: float
    loss_before: float | None = None
    loss_after: float | None = None
    detail: dict = field(default_factory=dict)


@dataclass(eq=False)
class Registration:
    """The answer: ``affine`` (ITK centre convention) and ``field`` = the whole mapping."""

    affine: Affine
    field: DisplacementField
    stages: list[StageReport]
    levels: list[dict]
    # the deformable part u (on its control grid, (1, D, *shape) mm), None without one
    displacement: tuple[Grid, torch.Tensor] | None = None

    def inverse(self, grid: Grid, iterations: int = INVERSE_ITERATIONS) -> DisplacementField:
        """The inverse mapping as a field on ``grid`` (the moving grid): moving -> fixed."""
        return invert(grid, self.affine.homogeneous, self.displacement, iterations)


@dataclass(eq=False)
class _State:
    fixed: Image
    moving: Image
    fixed_norm: np.ndarray
    moving_norm: np.ndarray
    fixed_mask: np.ndarray | None
    moving_mask: np.ndarray | None
    options: RegistrationOptions
    spec: LossSpec
    device: torch.device
    box: tuple[np.ndarray, np.ndarray]
    moving_box: tuple[np.ndarray, np.ndarray]
    center: np.ndarray
    radius: float
    schedule: dict
    affine: np.ndarray
    displacement: tuple[Grid, torch.Tensor] | None = None
    initial: np.ndarray | None = None  # a given start (--initial-affine) instead of a search
    frame: np.ndarray | None = None  # the start's rotation, for the moving features' axes
    followed: bool = False  # a linear stage has set (or kept) the frame
    masked: bool = False  # masks were given (the two above hold scanner padding too)
    ct: bool = False  # two 3-D images, both CT in Hounsfield units (levels.hounsfield)
    generator: torch.Generator = field(default_factory=torch.Generator)
    _levels: dict = field(default_factory=dict)

    def budget(self, voxels: int, spec: LossSpec | None = None) -> int | None:
        """Voxels per stochastic step for the chosen loss or ``spec`` (None: every voxel)."""
        return voxels if (spec or self.spec).pointwise else None

    @property
    def linear_spec(self) -> LossSpec:
        """The loss of the initialisation and the linear stages (MIND for learned losses)."""
        return loss_spec(self.spec.linear) if self.spec.linear else self.spec

    def level(self, spacing: float, loss: str | None = None, linear: bool = False) -> Level:
        """The level of ``spacing`` for ``loss`` (the chosen one by default; built once, then
        cached): the deformable stage's, its features computed at ``spacing / OVERSAMPLE``,
        or with ``linear`` the initialisation's and the linear stages', computed at
        ``spacing / LINEAR_OVERSAMPLE`` and compared only where both images are present
        (see the note after :data:`LINEAR_OVERSAMPLE`)."""
        spec = loss_spec(loss) if loss else self.spec
        key = (round(spacing, 6), spec.name, linear)
        if key not in self._levels:
            self._levels[key] = self._build(spacing, spec, linear, self.frame)
        return self._levels[key]

    def turned(self, spacing: float, frame: np.ndarray, memo: dict | None = None) -> Level:
        """The initialisation's level of ``spacing`` (MIND, ``linear``) with the moving
        features taken along ``frame`` (not cached; the fixed side is the cached level's;
        ``memo``: the moving image's, see :func:`~carctl.registration.levels.build_level`)."""
        like = self.level(spacing, "mind", linear=True)
        return self._build(spacing, loss_spec("mind"), True, frame, like, memo)

    def _build(
        self,
        spacing: float,
        spec: LossSpec,
        linear: bool,
        frame: np.ndarray | None,
        like: Level | None = None,
        memo: dict | None = None,
    ) -> Level:
        # the deformable pyramid's coarsest level lets the fill pull (EDGE_PULL_LEVELS)
        coarsest = self.schedule["deformable"][:EDGE_PULL_LEVELS]
        pulls = not linear and any(abs(spacing - s) < 1e-6 for s in coarsest)
        return build_level(
            self.fixed_norm,
            self.fixed.grid,
            self.moving_norm,
            self.moving.grid,
            spacing,
            spec.features,
            self.box,
            self.fixed_mask,
            self.moving_mask,
            spec.fills_outside and not linear,
            self.device,
            self.moving_box,
            LINEAR_OVERSAMPLE if linear else OVERSAMPLE,
            spec.reach,
            pulls,
            frame,
            spec.match_resolution,
            like,
            memo,
        )


def rotation_frame(affine: np.ndarray, least: float = FRAME_DEGREES) -> np.ndarray | None:
    """The rotation of ``affine``'s linear part (its polar factor), or None when it turns
    by less than ``least`` degrees or mirrors (the moving features keep the fixed axes)."""
    d = affine.shape[0] - 1
    u, _, vt = np.linalg.svd(np.asarray(affine, float)[:d, :d])
    rotation = u @ vt
    if np.linalg.det(rotation) < 0:
        return None  # a mirror: no rotation takes one frame to the other
    return rotation if degrees(rotation) >= least else None


def degrees(rotation: np.ndarray) -> float:
    """The angle (degrees) a rotation matrix turns by."""
    d = rotation.shape[0]
    cosine = (np.trace(rotation) - 1) / 2 if d == 3 else rotation[0, 0]
    return float(np.degrees(np.arccos(np.clip(cosine, -1.0, 1.0))))


def _schedule(fixed: Grid, options: RegistrationOptions) -> dict:
    """Level spacings (mm) of every stage, from the fixed image's size and spacing. The
    linear stages use levels of the deformable pyramid, so each level is built once."""
    spacing = np.asarray(fixed.spacing)
    extent = float(((np.asarray(fixed.size) - 1) * spacing).max())
    native = float(spacing.min())
    finest = max(native, min(2.0, extent / FINEST_VOXELS))
    # a given resolution, never finer than the fixed image's voxels: 0.001 on a 1 mm image
    # ran three 1 mm levels (twice the time), reported as 0.004, 0.002, 0.001
    if options.resolution:
        finest = max(options.resolution, native)
    deformable = [finest * 4, finest * 2, finest]
    # keep levels with at least 12 voxels across the image
    deformable = [s for s in deformable if extent / s >= 12] or [finest]
    # the linear stages start at 40 or more voxels across and refine once; the rigid stage
    # refines only when it is the last (before the affine stage, its finer level changed
    # the network's and auto's end-point error by at most 0.01 mm on BraTS and SPM pairs
    # and cost 1.5 s on a 1 mm brain)
    coarse = max((s for s in deformable if s <= extent / 40), default=deformable[-1])
    linear = deformable[deformable.index(coarse) :][:2]
    rigid = linear if "affine" not in METHODS[options.method] else linear[:1]
    return {"initialise": coarse, "rigid": rigid, "affine": linear, "deformable": deformable}


def _stage_initialise(state: _State, progress: Progress) -> StageReport:
    level = state.level(state.schedule["initialise"], "mind", linear=True)
    if state.initial is not None:  # given: the later stages start from it as it is
        function = LOSSES["mind"].function
        header = optimize.similarity(level, np.eye(level.ndim + 1), None, function, INIT_VOXELS)
        state.affine = np.array(state.initial, dtype=float)
        with torch.no_grad():  # every voxel: a subset misjudges a small overlap
            overlap = affine_stage.level_overlap(level, torch.as_tensor(state.affine))
        init_stage.require_overlap(
            level, float(overlap), "under the given initial affine", state.masked
        )
        given = optimize.similarity(level, state.affine, None, function, INIT_VOXELS)
        detail = {"start": "given", "candidates": 0, "spacing_mm": level.spacing}
        _turn_frame(state, detail)
        return StageReport("initialise", 0.0, header, given, detail)
    wide = state.options.search == "wide"
    # each start scored along its own rotation: in 2-D (along the fixed axes a start near a
    # large rotation scored worse than the header, and a level costs little there), and in
    # 3-D when asked (--search wide: 124 levels, each dropped once it has scored)
    planar = state.fixed.grid.ndim == 2
    own = wide or planar
    # in 2-D more finalists, judged on the linear stages' finest level (REFINED_2D)
    refined = init_stage.REFINED_2D if planar else init_stage.REFINED
    starts = init_stage.candidates(
        state.fixed_norm,
        state.fixed.grid,
        state.moving_norm,
        state.moving.grid,
        state.center,
        wide,
    )
    steps = (refined + 1) * INIT_ITERATIONS
    if own:  # and one per rotation scored
        steps += len(init_stage.by_rotation(starts))
    progress.start("initialise", steps)
    best, scored = init_stage.initialise(
        level,
        starts,
        LOSSES["mind"].function,
        state.center,
        state.radius,
        INIT_ITERATIONS,
        progress.advance,
        INIT_VOXELS,
        state.masked,
        _turned_levels(state, state.schedule["initialise"], keep=not wide),
        own=own,
        refined=refined,
        judge=_judge(state, state.schedule["affine"][-1]) if planar else None,
    )
    header = next(s for s in scored if s.name == "header")
    state.affine = best.matrix
    detail = {
        "start": best.name,
        "candidates": len(scored),
        "spacing_mm": level.spacing,
        "search": state.options.search,
    }
    if header.overlap < init_stage.least_overlap(scored):
        detail["set_aside"] = (
            f"the header: the images overlap on {100 * header.overlap:.1f} % of the fixed "
            "level under it"
        )
        # said even with --quiet: a start found without the headers can be far off (images
        # 10 m apart: a rotated start won, 11 mm off, in silence)
        detail["warning"] = (
            f"the scanner headers leave the images apart ({100 * header.overlap:.1f} % "
            f"overlap); the registration started from {best.name}: check the result (--qa)"
        )
    _turn_frame(state, detail)
    return StageReport("initialise", 0.0, header.score, best.score, detail)


def _judge(state: _State, spacing: float) -> Callable[[list[np.ndarray]], list[float]]:
    """For the initialisation: MIND under each of the refined starts' matrices on the
    (linear) level of ``spacing``, the moving features along each one's rotation as at the
    initialisation's level (:func:`_turned_levels`), on a fixed subset of its voxels."""
    turned = _turned_levels(state, spacing)
    function = LOSSES["mind"].function

    def judge(matrices: list[np.ndarray]) -> list[float]:
        losses = []
        with torch.no_grad():
            for matrix in matrices:
                level = turned(matrix) or state.level(spacing, "mind", linear=True)
                index = level.report_index(init_stage.SCORE_VOXELS)
                loss = affine_stage.level_loss(level, torch.as_tensor(matrix), function, index)
                losses.append(float(loss))
        return losses

    return judge


def _turned_levels(
    state: _State, spacing: float, keep: bool = True
) -> Callable[[np.ndarray], Level | None]:
    """For the initialisation: the level of ``spacing`` whose moving features are taken along
    a start's rotation when it turns by :data:`FRAME_DEGREES` or more (not for a moving stack
    of slices, see :data:`FOLLOW_DEGREES`), else None; each built once, or with ``keep``
    False only the last one kept (``--search wide`` scores 124 of them: all kept, 3.8 GB at
    the peak on a 1 mm brain instead of 0.85). The moving image is blurred for them once
    (``memo``: on a 1 mm brain the wide search 11.8-12.5 -> 7.2-7.6 s, see docs/benchmarks.md)."""
    built: dict[bytes, Level] = {}
    memo: dict = {}

    def level(matrix: np.ndarray) -> Level | None:
        frame = rotation_frame(matrix, FRAME_DEGREES)
        if frame is None or _stack(state.moving.grid):
            return None
        key = np.round(frame, 9).tobytes()
        if key not in built:
            if not keep:
                built.clear()
            built[key] = state.turned(spacing, frame, memo)
        return built[key]

    return level


def _follow_frame(state: _State, detail: dict) -> bool:
    """After a linear stage: when the rotation it found is :data:`FOLLOW_DEGREES` or more
    from the axes the moving features are taken along (the fixed image's, or the start's
    frame), the levels built from now on take them along that rotation (along the fixed
    axes again when it turns by less than that); the levels built so far are dropped. The
    start's frame gives way to the first linear stage's rotation however close. Not for a
    moving stack of slices (see :data:`FOLLOW_DEGREES`). Whether the frame changed."""
    if _stack(state.moving.grid):
        return False
    rotation = rotation_frame(state.affine, 0.0)
    if rotation is None:
        return False  # a mirror
    current = np.eye(state.moving.grid.ndim) if state.frame is None else state.frame
    # the start's frame (a candidate's rotation, briefly refined) gives way to the first
    # linear stage's rotation however close
    least = FOLLOW_DEGREES if state.frame is None or state.followed else 0.0
    state.followed = True
    if degrees(rotation @ current.T) < least:
        return False
    turned = degrees(rotation)
    state.frame = rotation if turned >= FOLLOW_DEGREES else None
    state._levels.clear()
    detail["frame_degrees"] = turned if state.frame is not None else 0.0
    return True


def _turn_frame(state: _State, detail: dict) -> None:
    """After the initialisation: the start's rotation, when it turns (see
    :data:`FRAME_DEGREES`), becomes the frame of the moving features of every level built
    from now on; the levels built so far (at the fixed axes) are dropped."""
    state.frame = rotation_frame(state.affine)
    if state.frame is not None:
        state._levels.clear()
        detail["frame_degrees"] = degrees(state.frame)


def _linear_stage(name: str, affine: bool) -> Callable[[_State, Progress], StageReport]:
    def run(state: _State, progress: Progress) -> StageReport:
        spacings = state.schedule[name]
        # the last linear level reads between voxels (Level.sample): where the images' voxels
        # line up, the earlier levels' pull towards half a voxel off ends there (the affine
        # stage on the aligned BraTS and SPM contrasts 0.8-1.2 -> 0.3-0.75 mm, as with every
        # linear level reading between voxels, which took 0.5-0.9 s more on a 1 mm brain).
        # A point read there costs twice (both images interpolated): that level reads half
        # as many, the stage's time as before (with as many: 0.2-0.3 s more on a 1 mm
        # brain), the end-point errors within 0.05 mm of reading as many on the BraTS, SPM
        # contrast pairs, deformed or not (0.1 mm on spm-T2-T1, 3.82 against 3.72 mm; 4.20
        # before)
        last = name == ("rigid" if state.options.method == "rigid" else "affine")
        if _network_follows(state):
            iterations = NETWORK_AFFINE_ITERATIONS if affine else NETWORK_RIGID_ITERATIONS
        else:
            iterations = AFFINE_ITERATIONS if affine else RIGID_ITERATIONS
        progress.start(name, iterations * len(spacings))
        start = state.affine
        spec = state.linear_spec
        losses = []

        def optimise(spacing: float, between: bool) -> None:
            level = state.level(spacing, spec.name, linear=True)
            params = affine_stage.AffineParameters(state.affine, state.center, affine=affine)
            losses.append(
                affine_stage.optimise(
                    level,
                    params,
                    spec.function,
                    iterations,
                    state.radius,
                    progress.advance,
                    state.budget(LINEAR_VOXELS // (2 if between else 1), spec),
                    state.generator,
                    between=between,
                )
            )
            state.affine = params.homogeneous().detach().numpy()

        for spacing in spacings:
            optimise(spacing, last and spacing == spacings[-1])
        # both at the finest level; the last level's optimisation measured the loss after
        before = _similarity(state, spacings[-1], start, linear=True)
        detail = {"levels_mm": list(spacings)}
        if _follow_frame(state, detail) and last and not affine:
            # `--method rigid`: the finest level once more, its features along the rotation
            # found (see FOLLOW_DEGREES); turned against each other, they had stopped the
            # stage short
            progress.start(f"{name}, turned", iterations)
            optimise(spacings[-1], last)
            detail["levels_mm"].append(spacings[-1])
            before = _similarity(state, spacings[-1], start, linear=True)  # turned, as after
        detail["level_losses"] = [list(pair) for pair in losses]
        return StageReport(name, 0.0, before, losses[-1][1], detail)

    return run


def _similarity(
    state: _State,
    spacing: float,
    affine: np.ndarray,
    displacement: tuple[Grid, torch.Tensor] | None = None,
    linear: bool = False,
) -> float:
    """The chosen loss at the level of ``spacing`` for ``A(x + u(x))`` (with ``linear``: the
    linear stages' loss on their level)."""
    spec = state.linear_spec if linear else state.spec
    level = state.level(spacing, spec.name, linear=linear)
    budget = state.budget(LINEAR_VOXELS, spec)  # None for losses that need every voxel
    return optimize.similarity(level, affine, displacement, spec.function, budget)


def after_network(counts: list[int]) -> list[int]:
    """Iterations per level when the network's field is the start: the finest level only,
    with one and a half times its own count, at most half the total (a third of the default
    three levels' total). The network has done the coarse levels' work: on BraTS and SPM
    pairs this matched or beat the whole pyramid's end-point error (within 0.01 mm) in 55-75 %
    of its time, while half the total spread over the two finer levels cost as much time as
    the whole pyramid."""
    return [0] * (len(counts) - 1) + [min(counts[-1] * 3 // 2, sum(counts) // 2)]


def _regularization(state: _State) -> float:
    """The deformable stage's regularisation weight (its first level's): the option, or the
    loss's default (on 2-D images, :data:`DEFAULT_REGULARIZATION_2D` where it names the
    loss)."""
    given = state.options.regularization
    if given is not None:
        return given
    name = state.spec.name
    if state.fixed.grid.ndim == 2 and name in DEFAULT_REGULARIZATION_2D:
        return DEFAULT_REGULARIZATION_2D[name]
    return DEFAULT_REGULARIZATION[name]


def _optimise_levels(
    state: _State,
    spacings: list[float],
    counts: list[int],
    progress: Progress,
    start: tuple[Grid, torch.Tensor] | None = None,
    offset: tuple[Grid, torch.Tensor] | None = None,
) -> tuple[Grid | None, torch.Tensor | None, list[float], list[list[float]], list[float]]:
    """The deformable optimisation over ``spacings`` (coarse to fine; a level with no
    iterations is skipped unless it is the last), each level starting from the previous one
    (the first from ``start``, a displacement ``(grid, (1, D, *shape))``, or zero). With
    ``offset`` (same form) the optimised field is a correction added to it, which stays as it
    is. The regularisation weight is :func:`_regularization`'s; from the affine alone (no
    ``start``, no ``offset``) it follows the first level's motion (:data:`MOTION_SCALE_MM`).
    Returns the last control grid and field ``(*shape, D)`` (the correction alone, with
    ``offset``), the levels run, their losses before and after, and their weights."""
    options = state.options
    follows = start is None and offset is None
    weight = _regularization(state)
    u, grid = None, None
    losses, ran, weights = [], [], []
    for spacing, iterations in zip(spacings, counts, strict=True):
        if iterations == 0 and spacing != spacings[-1]:
            continue
        ran.append(spacing)
        level = state.level(spacing)
        control = optimize.control_grid(level.grid)
        if u is None and start is None:
            u = torch.zeros((*control.shape, level.ndim), device=state.device)
        else:
            # from the previous level or the start; a velocity starts from the network's
            # displacement (exp(v) = id + v to first order)
            source, field = (grid, u.movedim(-1, 0)[None]) if u is not None else start
            u = optimize.field_on_grid(field.to(state.device), source, control).movedim(0, -1)
        at_points = None
        if offset is not None:
            source, field = offset
            points = level.points.reshape(-1, level.ndim)
            at_points = optimize.field_at(field.to(state.device), source, points).T.contiguous()
        u, before, after = optimize.optimise_level(
            level,
            state.affine,
            u.contiguous(),
            control,
            state.spec.function,
            REGULARISERS[options.regulariser],
            weight,
            iterations,
            options.diffeomorphic,
            step=0.5 * float(np.mean(level.spacing)),
            progress=progress.advance,
            budget=state.budget(DEFORMABLE_VOXELS),
            generator=state.generator,
            offset=at_points,
        )
        grid = control
        losses.append([before, after])
        weights.append(weight)
        if follows and len(ran) == 1:
            weight = _following(state, weight, _mean_length(u))
    return grid, u, ran, losses, weights


def _mean_length(u: torch.Tensor) -> float:
    """The motion a field ``(*shape, D)`` (mm, on a control grid) describes: the mean length
    of its vectors (what MOTION_SCALE_MM and the network's check compare)."""
    return float(u.norm(dim=-1).mean())


def _following(state: _State, weight: float, motion_mm: float) -> float:
    """The weight for the levels after one that found ``motion_mm`` (see
    :data:`MOTION_SCALE_MM`), at most :data:`DEFAULT_REGULARIZATION_CT` between two 3-D CT
    images (:data:`DEFAULT_REGULARIZATION_CT_MASKED` with a fixed mask); a weight given as an
    option stays."""
    if state.options.regularization is not None:
        return weight
    if motion_mm > MOTION_SCALE_MM:
        weight = weight * MOTION_SCALE_MM / motion_mm
    if state.ct:
        masked = state.fixed_mask is not None
        caps = DEFAULT_REGULARIZATION_CT_MASKED if masked else DEFAULT_REGULARIZATION_CT
        weight = min(weight, caps.get(state.spec.name, weight))
    return weight


def _stage_deformable(state: _State, progress: Progress) -> StageReport:
    options = state.options
    spacings = state.schedule["deformable"]
    network = state.displacement  # the network's field, when it ran and was kept
    if options.iterations is not None:
        counts = [options.iterations] * len(spacings)
    else:
        default = DEFAULT_ITERATIONS_CT if state.ct else DEFAULT_ITERATIONS
        counts = list(default[-len(spacings) :])
    detail: dict = {}
    if network is None or len(spacings) < 2:
        if network is not None and options.iterations is None:
            counts = after_network(counts)
        progress.start("deformable", sum(counts))
        grid, u, ran, losses, weights = _optimise_levels(state, spacings, counts, progress, network)
        used = counts
    else:
        # check the network's field with a correction at the coarsest level (see
        # NETWORK_MAX_CORRECTION_MM and NETWORK_MAX_MOTION_MM), then either start over
        # without it or run the finest level alone from it
        short = counts if options.iterations is not None else after_network(counts)
        check = min(NETWORK_CHECK_ITERATIONS, counts[0])
        coarsest = optimize.control_grid(state.level(spacings[0]).grid)
        network_field = optimize.field_on_grid(network[1].to(state.device), network[0], coarsest)
        alone = _mean_length(network_field.movedim(0, -1))
        why = None  # why the network's field is not the start, if it is not
        if alone > NETWORK_MAX_MOTION_MM:  # a large motion already: no check
            detail["network_motion_mm"] = alone
            why = "a large motion in the network's own field"
        else:
            progress.start("deformable", check + sum(short))
            grid, u, ran, losses, weights = _optimise_levels(
                state, spacings[:1], [check], progress, offset=network
            )
            correction = _mean_length(u)
            # the motion found: the network's field and the correction together
            motion = _mean_length(network_field.movedim(0, -1) + u)
            detail["network_check_iterations"] = check
            detail["network_correction_mm"] = correction
            detail["network_motion_mm"] = motion
            if correction > NETWORK_MAX_CORRECTION_MM:
                why = "far off"
            elif motion > NETWORK_MAX_MOTION_MM:
                why = "a large motion"
        if why is not None:  # io's whole pyramid instead
            progress.start("deformable", sum(counts))
            grid, u, ran, losses, weights = _optimise_levels(state, spacings, counts, progress)
            used = counts
            detail["network_start"] = f"discarded: {why} (the whole pyramid ran from the affine)"
        else:
            grid, u, ran, losses, weights = _optimise_levels(
                state, spacings, short, progress, network
            )
            used = short
            detail["network_start"] = "finest level only"
    if options.diffeomorphic:
        u = optimize.integrate(u, grid)
    # where the optimised field folds (rare, mostly where one image shows nothing), smooth it
    # until it no longer does
    u, detail["folded_cells"] = optimize.unfold(u, grid)
    state.displacement = (grid, u.movedim(-1, 0)[None])
    before = _similarity(state, spacings[-1], state.affine, network)
    after = _similarity(state, spacings[-1], state.affine, state.displacement)
    return StageReport(
        "deformable",
        0.0,
        before,
        after,
        {
            "levels_mm": ran,
            "iterations": [c for s, c in zip(spacings, used, strict=True) if s in ran],
            "regularization": _regularization(state),
            "level_regularization": weights,
            "level_losses": losses,
            **detail,
        },
    )


def _stack(grid: Grid) -> bool:
    """Whether ``grid`` is a stack of slices: its coarsest spacing over
    :data:`NETWORK_THICK` times its finest."""
    return max(grid.spacing) > NETWORK_THICK * min(grid.spacing)


def _network_skipped(state: _State) -> str | None:
    """Why ``auto`` skips the network, or None: for two CT images, or a moving stack of
    slices thicker than the fixed image's voxels and the network's grid
    (:data:`NETWORK_THICK` and the note after it)."""
    from carctl.registration import network

    if state.options.method != "auto":
        return None
    if state.ct:
        return (
            "both images are CT, where the network's start ended behind the whole pyramid "
            "(docs/benchmarks.md); the deformable stage runs its whole pyramid"
        )
    if not _stack(state.moving.grid):
        return None  # near-isotropic voxels, however coarse: no stack
    coarsest = max(state.moving.grid.spacing)
    working = network.working_grid(state.fixed.grid, state.box).spacing[0]
    if coarsest <= NETWORK_THICK * max(working, *state.fixed.grid.spacing):
        return None
    return (
        f"the moving image's voxels ({coarsest:g} mm) are coarser than the fixed image's and "
        f"the network's working grid ({working:.2g} mm); the deformable stage runs its whole "
        "pyramid"
    )


def _network_follows(state: _State) -> bool:
    """Whether the network stage will run after the linear stages (its weights aside)."""
    return (
        "network" in METHODS[state.options.method]
        and state.fixed.grid.ndim == 3
        and _network_skipped(state) is None
    )


def short_of_gain(gain: float, loss: str) -> str:
    """Why ``auto`` drops a network field that lowers ``loss`` by the fraction ``gain``, under
    :data:`NETWORK_MIN_GAIN`: the gain to a tenth of a percent, rounded down (a gain of
    0.0999 read "lowered mind by 10 % (a start must lower it by 10 %)")."""
    verb = "lowered" if gain >= 0 else "raised"
    percent = math.floor(1000 * gain) / 10 if gain >= 0 else -100 * gain
    return (
        f"the network's field {verb} {loss} by {percent:.1f} % (a start must lower it by "
        f"{100 * NETWORK_MIN_GAIN:g} %): not used"
    )


def _with_network(state: _State, spacing: float) -> tuple[float, float, float]:
    """The linear stages' loss at the level of ``spacing`` under the affine alone and with
    the network's field (``state.displacement``), and the fraction by which the field lowers
    it (its gain)."""
    before = _similarity(state, spacing, state.affine, linear=True)
    after = _similarity(state, spacing, state.affine, state.displacement, linear=True)
    return before, after, (before - after) / abs(before) if before else 0.0


def _stage_network(state: _State, progress: Progress) -> StageReport:
    from carctl.errors import InputError
    from carctl.pretrained import WeightsError, load
    from carctl.registration import network

    if state.fixed.grid.ndim != 3:
        if state.options.method == "net":
            raise InputError("carctl ships a 3-D network only; use --method io for 2-D images")
        return StageReport("network", 0.0, detail={"skipped": "2-D images (3-D weights only)"})
    reason = _network_skipped(state)
    if reason:
        return StageReport("network", 0.0, detail={"skipped": reason})
    try:
        model, card = load(network.WEIGHTS, str(state.device))
    except WeightsError as error:
        if state.options.method == "net":
            raise
        # auto without its network is io: say so in the report (and as a warning) rather
        # than fail
        warning = f"the network was skipped ({error}); the registration went on without it"
        return StageReport("network", 0.0, detail={"skipped": str(error), "warning": warning})
    progress.start("network", 1)
    last = state.schedule["affine"][-1]  # a level the affine stage has built
    # a finer grid and mirrored passes improve the network's answer but not the deformable
    # stage's from it
    answer = "deformable" not in METHODS[state.options.method]
    mirrors = network.MIRRORS if answer else ()
    grid, u = network.predict(
        model,
        state.fixed_norm,
        state.fixed.grid,
        state.moving_norm,
        state.moving.grid,
        state.affine,
        state.box,
        state.device,
        network.PASSES,
        mirrors,
        network.ANSWER_VOXELS if answer else None,
    )
    progress.advance()
    if not bool(u.isfinite().all()):  # never hand on NaN: it wiped out the affine too
        if state.options.method == "net":
            raise InputError("the network's field is not finite (NaN): its weights are unusable")
        warning = "the network's field was not finite (NaN); the registration went on without it"
        return StageReport(
            "network", 0.0, detail={"skipped": "a non-finite field", "warning": warning}
        )
    state.displacement = (grid, u)
    before, after, gain = _with_network(state, last)
    detail = {"gain": gain}
    coarse = state.schedule["affine"][0]
    if state.options.method == "auto" and gain < NETWORK_MIN_GAIN and coarse != last:
        # noise lowers the finer level's gain more (NETWORK_MIN_GAIN): the coarser level's
        detail["coarse_gain"] = _with_network(state, coarse)[2]
        gain = max(gain, detail["coarse_gain"])
    if state.options.method == "auto" and gain < NETWORK_MIN_GAIN:
        state.displacement = None  # the deformable stage starts from the affine
        detail["discarded"] = short_of_gain(gain, state.linear_spec.name)
    detail |= {
        "weights": card.name,
        "steps_trained": card.data.get("training", {}).get("steps_done"),
        "grid_size": list(grid.size),
        "spacing_mm": grid.spacing[0],
        "passes": network.PASSES,
        "mirrors": list(mirrors),
    }
    return StageReport("network", 0.0, before, after, detail)


STAGES: dict[str, Callable[[_State, Progress], StageReport]] = {
    "initialise": _stage_initialise,
    "rigid": _linear_stage("rigid", affine=False),
    "affine": _linear_stage("affine", affine=True),
    "network": _stage_network,
    "deformable": _stage_deformable,
}

METHODS: dict[str, tuple[str, ...]] = {
    "auto": ("initialise", "rigid", "affine", "network", "deformable"),
    "net": ("initialise", "rigid", "affine", "network"),
    "io": ("initialise", "rigid", "affine", "deformable"),
    "affine": ("initialise", "rigid", "affine"),
    "rigid": ("initialise", "rigid"),
}


def register(
    moving: Image,
    fixed: Image,
    options: RegistrationOptions | None = None,
    fixed_mask: Image | None = None,
    moving_mask: Image | None = None,
    progress: Progress | None = None,
    initial: np.ndarray | None = None,
) -> Registration:
    """Align ``moving`` to ``fixed``; see the module docstring for what is returned.
    ``initial`` (a homogeneous fixed -> moving physical matrix) replaces the initialisation's
    search: the stages that follow start from it."""

    options = options or RegistrationOptions()
    # numpy computes its float limits once; let it do so before denormals are flushed
    np.finfo(np.float32), np.finfo(np.float64)
    flushed = torch.set_flush_denormal(True)  # tiny floats would slow every step down
    try:
        plane = planar.plane_of(moving.grid, fixed.grid)
        masks = [m for m in (fixed_mask, moving_mask) if m is not None]
        if plane is not None and all(planar.thin_axis(m.grid) is not None for m in masks):
            # single slices on parallel planes: in 2-D (see carctl.registration.planar)
            flat = [None if m is None else plane.image(m) for m in (fixed_mask, moving_mask)]
            start = None if initial is None else planar.flatten(initial, plane)
            inside = _register(
                plane.image(moving), plane.image(fixed), options, *flat, progress, start
            )
            inside.stages[0].detail["in_plane"] = True
            return planar.lift(inside, plane, fixed.grid)
        return _register(moving, fixed, options, fixed_mask, moving_mask, progress, initial)
    finally:
        if flushed:
            torch.set_flush_denormal(False)


def _register(
    moving: Image,
    fixed: Image,
    options: RegistrationOptions,
    fixed_mask: Image | None,
    moving_mask: Image | None,
    progress: Progress | None,
    initial: np.ndarray | None = None,
) -> Registration:
    from carctl.errors import InputError
    from carctl.resample import resample_image

    spec = loss_spec(options.loss)
    require_same_dimension(moving=moving, fixed=fixed)
    d = fixed.grid.ndim
    if initial is not None:
        initial = np.asarray(initial, dtype=float)
        if initial.shape != (d + 1, d + 1):
            raise InputError(f"the initial affine is {initial.shape[0] - 1}-D; the images {d}-D")
        if not np.isfinite(initial).all() or abs(np.linalg.det(initial[:d, :d])) < 1e-6:
            raise InputError("the initial affine is singular or not finite")
    progress = progress or _Silent()
    torch.manual_seed(options.seed)
    device = torch.device(resolve_device(options.device))

    def mask_on(mask: Image | None, grid: Grid, name: str) -> np.ndarray | None:
        if mask is None:
            return None
        if mask.grid.ndim != grid.ndim:
            raise InputError(
                f"the {name} mask is {mask.grid.ndim}-D and the {name} image {grid.ndim}-D"
            )
        given = int((mask.array > 0).sum())
        if given and not mask.grid.same_as(grid):
            mask = resample_image(mask, grid, interpolation="nearest")
        inside = mask.array > 0
        if given and not inside.any():
            raise InputError(
                f"the {name} mask's {given} voxel{'s' * (given > 1)} above zero fall outside "
                f"or between the {name} image's voxels (read there by nearest neighbour); "
                f"give the mask on the {name} image's grid"
            )
        if not inside.any():
            raise InputError(f"the {name} mask has no voxel above zero")
        return inside.astype(np.float32)

    # scanner padding (see carctl.padding) counts as beyond the image: filled with air
    # for the descriptors and left out by the masks
    paddings, normalised, ct = {}, {}, []
    for name, image in (("moving", moving), ("fixed", fixed)):
        array, found = as_air(image.array)
        paddings[name] = found
        bounds = intensity_range(array)
        normalised[name] = normalise(array, bounds=bounds)
        ct.append(hounsfield(bounds))
        require_size(name, image.grid)
        require_contrast(name, array, normalised[name], None if found is None else found[0])
    fixed_norm, moving_norm = normalised["fixed"], normalised["moving"]
    f_mask = _leave_out(mask_on(fixed_mask, fixed.grid, "fixed"), paddings["fixed"], "fixed")
    m_mask = _leave_out(mask_on(moving_mask, moving.grid, "moving"), paddings["moving"], "moving")
    box = foreground_box(fixed_norm, f_mask)
    center = init_stage.centre_of_mass(foreground(fixed_norm, f_mask), fixed.grid)
    extent = (np.asarray(box[1]) - np.asarray(box[0]) + 1) * np.asarray(fixed.grid.spacing)
    radius = max(float(np.linalg.norm(extent)) / 2, 1.0)
    state = _State(
        fixed=fixed,
        moving=moving,
        fixed_norm=fixed_norm,
        moving_norm=moving_norm,
        fixed_mask=f_mask,
        moving_mask=m_mask,
        options=options,
        spec=spec,
        device=device,
        box=box,
        moving_box=foreground_box(moving_norm, m_mask),
        center=center,
        radius=radius,
        schedule=_schedule(fixed.grid, options),
        affine=np.eye(fixed.grid.ndim + 1),
        initial=initial,
        masked=fixed_mask is not None or moving_mask is not None,
        ct=all(ct) and fixed.grid.ndim == 3,
    )
    state.generator.manual_seed(options.seed)
    reports = []
    for name in METHODS[options.method]:
        start = time.perf_counter()
        report = STAGES[name](state, progress)
        report.seconds = time.perf_counter() - start
        reports.append(report)
    found = {name: value for name, value in paddings.items() if value is not None}
    if found:  # what was left out, in the initialisation's report
        reports[0].detail["padding"] = {name: summarised(value) for name, value in found.items()}
    start = time.perf_counter()
    result_affine = Affine.from_homogeneous(state.affine, center)
    whole = compose(fixed.grid, state.affine, state.displacement)
    reports.append(StageReport("compose", time.perf_counter() - start))
    levels = [
        {"spacing_mm": list(level.spacing), "size": list(level.grid.size), "loss": key[1]}
        for key, level in state._levels.items()
    ]
    return Registration(result_affine, whole, reports, levels, state.displacement)


def _leave_out(
    mask: np.ndarray | None, found: tuple[float, np.ndarray] | None, name: str
) -> np.ndarray | None:
    """``mask`` (float32 0/1, or None: everything) without the padding ``found`` of the
    ``name`` image."""
    from carctl.errors import InputError

    if found is None:
        return mask
    keep = (~found[1]).astype(np.float32)
    left = keep if mask is None else mask * keep
    if not left.any():
        what = "the image" if mask is None else f"the {name} mask"
        raise InputError(
            f"{what} covers scanner padding ({found[0]:g}) only: nothing of the {name} "
            "image is left to compare"
        )
    return left


def compose(
    grid: Grid, affine: np.ndarray, displacement: tuple[Grid, torch.Tensor] | None
) -> DisplacementField:
    """The field ``d(x) = A(x + u(x)) - x = (L - I) x + t + L u(x)`` on ``grid`` (float32 mm,
    ``A = (L, t)``). Both terms are built from voxel indices by broadcasting (the affine term
    is affine in the index; ``u`` is read at indices of its own grid, also affine in ``grid``'s
    index), never as a float64 array of points."""
    d = grid.ndim
    linear = np.asarray(affine, float)[:d, :d]
    part = np.eye(d + 1)
    part[:d, :d] = linear - np.eye(d)
    part[:d, d] = np.asarray(affine, float)[:d, d]
    data = grid.map_indices(part @ grid.index_to_physical, torch.float32, channels_first=True)
    if displacement is None:
        return DisplacementField(grid, data)
    source, u = displacement
    # L u(x) interpolated is L applied to u's own (smaller) grid, then interpolated; in
    # place where it can: each whole-grid array is 100+ MB on a 1 mm brain
    step = torch.as_tensor(linear, dtype=torch.float32)
    u = torch.einsum("ab,nb...->na...", step, u.float().cpu())
    return DisplacementField(grid, optimize.field_on_grid(u, source, grid).add_(data))


def invert(
    grid: Grid,
    affine: np.ndarray,
    displacement: tuple[Grid, torch.Tensor] | None,
    iterations: int = INVERSE_ITERATIONS,
) -> DisplacementField:
    """``T^-1`` for ``T(x) = A(x + u(x))`` as a field on ``grid``: for each point ``y``,
    ``z = A^-1 y`` and ``x`` solves ``x + u(x) = z`` by the fixed-point iteration
    ``x <- z - u(x)`` (converges where ``u`` is smooth, i.e. ``|grad u| < 1``).

    Solved by slabs of about :data:`_INVERT_SLAB_VOXELS` voxels (planes of the last index
    axis; every point's iteration is its own), written into the float32 output: whole-grid
    float64 points, their images and copies took 13 GB and 32 s for a 512 x 512 x 400 CT."""
    inverse = np.linalg.inv(affine)
    u = None if displacement is None else displacement[1].float().cpu()
    d = grid.ndim
    out = torch.empty((d, *grid.shape), dtype=torch.float32)
    for start, stop in slabs(grid.shape, _INVERT_SLAB_VOXELS):
        points = grid.slab(start, stop).points(dtype=torch.float64)
        z = apply_homogeneous(inverse, points)
        x = z
        if u is not None:
            source = displacement[0]
            for _ in range(iterations):
                x = z - optimize.field_at(u, source, x).movedim(0, -1).to(torch.float64)
        out[:, start:stop] = (x - points).movedim(-1, 0)
    return DisplacementField(grid, out)


# Voxels per slab of :func:`invert`.
_INVERT_SLAB_VOXELS = 1 << 20
