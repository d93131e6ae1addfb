"""The bundled demo pair: one volunteer's cervical spine, T1 and T2 with manual cord masks.

From spinalcordtoolbox/sct_testing_data (MIT licence, ``carctl/data/demo/LICENSE``).
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

_FILES = {
    "moving": "t1w.nii.gz",
    "fixed": "t2.nii.gz",
    "moving_labels": "t1w_seg-manual.nii.gz",
    "fixed_labels": "t2_seg-manual.nii.gz",
}


def demo_files() -> dict[str, Path]:
    """Paths of the installed demo images: moving, fixed, moving_labels, fixed_labels."""
    folder = resources.files("carctl.data") / "demo"
    return {key: Path(str(folder / name)) for key, name in _FILES.items()}
