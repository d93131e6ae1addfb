"""``carctl demo``: the main job on the bundled spinal-cord T1/T2 pair."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

NAME = "demo"


def command(
    out_dir: Annotated[
        Path, typer.Option("--out-dir", "-o", help="Folder for the demo's outputs.")
    ] = Path("carctl-demo"),
    force: Annotated[bool, typer.Option("--force", help="Overwrite earlier demo outputs.")] = False,
) -> None:
    """Run carctl on a bundled real pair: a cervical-spine T1 (RAS) and T2 (PSR) of one volunteer.

    The T1 image and its manual spinal-cord mask are resampled onto the T2 grid through
    physical space, and the cord overlap with the T2's own manual mask is measured.
    """
    from carctl.cli.console import emit_json, stdout
    from carctl.cli.evaluate import show_report
    from carctl.demo import demo_files
    from carctl.evaluation import evaluate
    from carctl.io import check_output, read_image, write_image
    from carctl.resample import resample_image

    console = stdout()
    files = demo_files()
    outputs = {
        "warped": out_dir / "t1w_in_t2.nii.gz",
        "warped_labels": out_dir / "t1w_cord_in_t2.nii.gz",
        "report": out_dir / "evaluation.json",
    }
    for path in outputs.values():
        check_output(path, force=force, extensions=(".nii.gz", ".json"))

    moving, fixed = read_image(files["moving"]), read_image(files["fixed"])
    console.print(f"moving  T1 {moving.grid.describe()}   ({files['moving']})")
    console.print(f"fixed   T2 {fixed.grid.describe()}   ({files['fixed']})")
    console.print("Resampling T1 and its cord mask onto the T2 grid through physical space ...")
    write_image(resample_image(moving, fixed.grid), outputs["warped"], force=force)
    labels = resample_image(read_image(files["moving_labels"]), fixed.grid, interpolation="label")
    write_image(labels, outputs["warped_labels"], force=force)

    report = evaluate(fixed_labels=files["fixed_labels"], warped_labels=outputs["warped_labels"])
    show_report(report, console)
    emit_json(report, str(outputs["report"]), force=force)
    console.print(
        f"Spinal-cord Dice through the scanner headers alone: {report['dice_mean']:.3f}. "
        f"Outputs in {out_dir}/ - open t1w_in_t2.nii.gz over the T2 in any viewer."
    )
