"""``carctl translate`` (experimental): an image in another image's contrast, with IMSE."""

from __future__ import annotations

from typing import Annotated

import typer

NAME = "translate"


def command(
    image: Annotated[str, typer.Argument(help="The image whose anatomy is kept.")],
    reference: Annotated[
        str, typer.Option("--reference", "-r", help="The image whose contrast is taken.")
    ],
    out: Annotated[
        str | None, typer.Option("--out", "-o", help="Output image (default IMAGE_translated).")
    ] = None,
    device: Annotated[str, typer.Option("--device", help="auto | cpu | cuda.")] = "auto",
    threads: Annotated[int | None, typer.Option("--threads", help="CPU threads.")] = None,
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing output.")] = False,
) -> None:
    """EXPERIMENTAL: IMAGE in the contrast of REFERENCE, as REFERENCE - E(REFERENCE, IMAGE).

    IMSE's evaluator predicts the error map between the two in the reference's contrast;
    subtracting it from the reference gives IMAGE's anatomy in that contrast (the IMSE
    paper, section 4.4). The two should be roughly aligned (their headers are trusted). The
    result is on the reference's working grid (isotropic, cropped to its anatomy).
    """
    import numpy as np

    from carctl.io import (
        Image,
        check_output,
        output_stem,
        read_image,
        require_same_dimension,
        write_image,
    )
    from carctl.runtime import check_threads

    out = out or f"{output_stem(image, 'image')}_translated.nii.gz"
    check_output(out, force=force, inputs=[image, reference])
    check_threads(threads)
    source, target = read_image(image), read_image(reference)  # refused before torch loads
    require_same_dimension(input=source, reference=target)

    import torch

    from carctl import pretrained, qa
    from carctl.registration.levels import require_contrast
    from carctl.runtime import resolve_device, set_threads

    set_threads(threads)
    device = resolve_device(device)
    model, _ = pretrained.load(qa.WEIGHTS, device=device)
    require_contrast("reference", target.array)
    require_contrast("input", source.array)
    ref = qa.reference_of(target, device=device)
    pair = qa.pair_with(ref, source, device=device)
    with torch.no_grad():
        translated = (pair.reference - model(pair.reference, pair.other)).clamp(-1, 1)
    low, high = ref.range  # back to the reference's intensities
    values = low + (translated[0, 0].cpu().numpy() + 1) / 2 * (high - low)
    write_image(
        Image(values.astype(np.float32), pair.grid), out, force=force, inputs=[image, reference]
    )
    from carctl.cli.console import stderr

    stderr().print(f"wrote {out} ({pair.grid.describe()})")
