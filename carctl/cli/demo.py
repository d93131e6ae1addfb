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
    threads: Annotated[
        int | None, typer.Option("--threads", help="CPU threads (default: torch's choice).")
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Overwrite earlier demo outputs.")] = False,
) -> None:
    """Register a bundled real pair: a cervical-spine T1 (RAS) onto a T2 (PSR) of one volunteer.

    Measures the spinal-cord overlap with the T2's manual mask through the scanner headers
    alone, runs `carctl register` (T1 and its cord mask carried onto the T2), and measures it
    again, with the folding of the field.
    """
    import time

    from carctl.cli.console import emit_json, stdout
    from carctl.cli.evaluate import show_report
    from carctl.cli.register import run
    from carctl.config import RegistrationOptions
    from carctl.demo import demo_files
    from carctl.evaluation import evaluate
    from carctl.io import check_output, read_image
    from carctl.metrics import dice
    from carctl.resample import resample_image

    start = time.perf_counter()
    console = stdout()
    files = demo_files()
    outputs = {
        "warped": str(out_dir / "t1w_in_t2.nii.gz"),
        "field": str(out_dir / "t1w_to_t2_field.nii"),
        "affine": str(out_dir / "t1w_to_t2_affine.mat"),
        "warped_labels": str(out_dir / "t1w_cord_in_t2.nii.gz"),
    }
    report_path = out_dir / "evaluation.json"
    check_output(report_path, force=force, extensions=(".json",))

    fixed_labels = read_image(files["fixed_labels"])
    header = resample_image(read_image(files["moving_labels"]), fixed_labels.grid, [], "label")
    before = dice(fixed_labels.array > 0, header.array > 0).get(1, 0.0)  # cord = 1
    console.print(f"Spinal-cord Dice through the scanner headers alone: {before:.3f}")
    moving, fixed = str(files["moving"]), str(files["fixed"])
    run(
        moving,
        fixed,
        outputs,
        RegistrationOptions(),
        inputs=[moving, fixed, str(files["moving_labels"])],
        labels=str(files["moving_labels"]),
        fixed_mask=None,
        moving_mask=None,
        threads=threads,
        quiet=False,
        force=force,
        started=start,
    )
    report = evaluate(
        fixed_labels=files["fixed_labels"],
        warped_labels=outputs["warped_labels"],
        field=outputs["field"],
    )
    report["dice_header"] = before
    show_report(report, console)
    emit_json(report, str(report_path), force=force)
    console.print(
        f"Spinal-cord Dice {before:.3f} through the headers, {report['dice_mean']:.3f} after "
        f"carctl register. Outputs in {out_dir}/ - open t1w_in_t2.nii.gz over the T2 in any "
        "viewer, or apply t1w_to_t2_field.nii with antsApplyTransforms."
    )
