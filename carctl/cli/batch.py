"""``carctl batch``: register every pair of a list in one process (clinic pipelines)."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from carctl.cli import register

if TYPE_CHECKING:
    from carctl.batch import Pair
    from carctl.config import RegistrationOptions

NAME = "batch"
SUMMARY = "summary.json"  # in each pair's folder, written last: the pair is done
RECORD = "batch.csv"  # in the output folder, rewritten after every pair
RECORD_COLUMNS = (
    "name",
    "status",
    "seconds",
    "folding_percent",
    "jacobian_min",
    "jacobian_max",
    "qa_before",
    "qa_after",
    "qa_verdict",
    "folder",
    "moving",
    "fixed",
    "error",
)


def command(
    pairs: Annotated[
        str,
        typer.Argument(
            help="CSV (or .tsv) list with a header row: moving, fixed, and optionally name, "
            "labels, fixed_mask, moving_mask, initial_affine. Paths relative to the list."
        ),
    ],
    out_dir: Annotated[
        Path, typer.Option("--out-dir", "-o", help="Folder for the pairs' folders and batch.csv.")
    ] = Path("."),
    method: register.Method = "auto",
    loss: register.Loss = "mind",
    diffeomorphic: register.Diffeomorphic = False,
    regularization: register.Regularization = None,
    iterations: register.Iterations = None,
    resolution: register.Resolution = None,
    search: register.Search = "default",
    inverse: Annotated[
        bool, typer.Option("--inverse", help="Also write each inverse field (moving grid).")
    ] = False,
    device: register.Device = "auto",
    threads: register.Threads = None,
    seed: register.Seed = 0,
    qa: Annotated[
        bool,
        typer.Option("--qa/--no-qa", help="Score each alignment before and after (as register)."),
    ] = False,
    stop_on_error: Annotated[
        bool,
        typer.Option("--stop-on-error", help="Stop at the first pair that fails (default: go on)."),
    ] = False,
    force: Annotated[
        bool, typer.Option("--force", help="Redo pairs already done (default: skip them).")
    ] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No line per pair.")] = False,
) -> None:
    """Register every pair of a list in one process: the list and every input are checked
    first, then each pair gets a folder of outputs (as register writes them, and its summary
    as summary.json); batch.csv records every pair's status, time and folding.

    Pairs done before with the same options (their summary.json says so) are skipped, so an
    interrupted batch goes on where it stopped. A pair that fails is recorded and the batch
    goes on; the exit status is 1 when any pair failed.
    """
    from carctl.batch import read_pairs
    from carctl.config import RegistrationOptions
    from carctl.errors import InputError, OutputError
    from carctl.io import LOCK_NAME, check_output, folder_lock
    from carctl.runtime import check_threads

    started = time.perf_counter()
    settings = RegistrationOptions(  # checks every value before the list is read
        method=method,
        loss=loss,
        diffeomorphic=diffeomorphic,
        regularization=regularization,
        iterations=iterations,
        resolution=resolution,
        device=device,
        seed=seed,
        search=search,
    )
    from carctl.cli.register import warn_unused

    warn_unused(settings)
    check_threads(threads)
    listed = read_pairs(pairs)
    for name, what in ((RECORD, "the record's"), (LOCK_NAME, "the folder's lock's")):
        if any(pair.name == name for pair in listed):  # its folder would stop the batch
            raise InputError(f"a pair named '{name}' would take {what} place: rename it")
    if out_dir.exists() and not out_dir.is_dir():
        raise OutputError(f"cannot write into '{out_dir}': it is a file")
    for pair in listed:
        folder = out_dir / pair.name
        if folder.exists() and not folder.is_dir():
            raise OutputError(
                f"{pairs}:{pair.line}: the pair's output folder '{folder}' is a file; give the "
                "pair another name (the 'name' column)"
            )
    everything = [pairs] + [path for pair in listed for path in pair.inputs()]
    check_output(out_dir / RECORD, force=True, inputs=everything, extensions=(".csv",))
    protected = _refuse_outputs_over_inputs(listed, out_dir, everything, pairs, inverse)
    # the list is never written over, as no input is
    options = {"threads": threads, "qa": qa, "inverse": inverse, "force": force, "list": pairs}
    options["protected"] = protected  # never removed as a stale output either
    with folder_lock(out_dir, "carctl batch"):  # two batches in one folder: one record
        counts = _run_all(listed, out_dir, settings, options, stop_on_error, quiet)
    if not quiet:
        from carctl.cli.console import stderr

        done, skipped, failed = (counts[k] for k in ("done", "skipped", "failed"))
        stderr().print(
            f"batch: {done} registered, {skipped} skipped, {failed} failed in "
            f"{time.perf_counter() - started:.1f} s; record: {out_dir / RECORD}"
        )
    if counts["failed"]:
        raise typer.Exit(1)


def _run_all(
    listed: list[Pair],
    out_dir: Path,
    settings: RegistrationOptions,
    options: dict,
    stop_on_error: bool,
    quiet: bool,
) -> dict[str, int]:
    """Each pair in turn (:func:`_one`), the record rewritten after each; the counts of
    pairs done, skipped and failed."""
    from carctl.cli.console import stderr

    console = None if quiet else stderr()
    rows: list[dict] = []
    counts = {"done": 0, "skipped": 0, "failed": 0}
    for number, pair in enumerate(listed, start=1):
        row = _one(pair, out_dir, settings, options)
        rows.append(row)
        counts[row["status"]] += 1
        if console is not None:
            console.print(f"[{number}/{len(listed)}] {pair.name}  {_said(row)}")
        # after every pair: an interrupted batch leaves the record of what it did
        _write_record(rows, out_dir, options["list"])
        if row["status"] == "failed" and stop_on_error:
            break
    return counts


def _chosen(settings: RegistrationOptions) -> dict:
    """The options that make a pair's result what it is (summary.json keeps them); the
    default ``search`` left out: summaries written before the option existed lack it, and
    their pairs are not redone for it."""
    import dataclasses

    chosen = dataclasses.asdict(settings)
    if chosen["search"] == "default":
        del chosen["search"]
    return {k: v for k, v in chosen.items() if k != "device"}


def _recipe(pair: Pair, settings: RegistrationOptions, options: dict) -> dict:
    """What makes a pair's folder what it is: the options, every input file (path, size and
    modification time: a file replaced at the same path counts as another input) and the
    outputs asked for. summary.json keeps it; a pair done before is skipped only when it is
    the same and every output it lists is there."""
    from carctl.io import input_files

    files = {}
    for key, path in pair.files().items():  # a DICOM folder's files summed up
        stats = [p.stat() for p in input_files(path) if p.is_file()]
        size = sum(st.st_size for st in stats)
        files[key] = [path, len(stats), size, max((st.st_mtime_ns for st in stats), default=0)]
    return {
        "options": _chosen(settings),
        "inputs": files,
        "outputs": {"inverse": options["inverse"], "qa": options["qa"]},
    }


def _outputs(pair: Pair, out_dir: Path, inverse: bool) -> dict[str, str]:
    """The files a pair writes into its folder (as ``register`` names them)."""
    from carctl.cli.register import _default_names

    folder = out_dir / pair.name
    names = _default_names(pair.moving)
    outputs = {key: str(folder / names[key]) for key in ("warped", "field", "affine")}
    if pair.labels:
        outputs["warped_labels"] = str(folder / names["warped_labels"])
    if inverse:
        outputs["inverse_field"] = str(folder / f"{Path(names['field']).stem}_inverse.nii")
    return outputs


def _refuse_outputs_over_inputs(
    listed: list[Pair], out_dir: Path, inputs: list[str], listing: Path, inverse: bool
) -> set[str]:
    """Refuse, before any work, a pair whose outputs would replace an input of the list
    (another pair's image, chained onto an earlier pair's warped image): each pair checked
    its own inputs only, and wrote over the other's (its folder is written with force).
    Returns the real paths of every file the inputs read."""
    from carctl.errors import OutputError
    from carctl.io import input_paths, over_input

    protected = input_paths(inputs)
    for pair in listed:
        for path in _outputs(pair, out_dir, inverse).values():
            if (target := over_input(path, protected)) is not None:
                raise OutputError(
                    f"{listing}:{pair.line}: the pair would write '{target}', an input of "
                    "the list; give the pair another name or -o another folder"
                )
    return protected


def _one(pair: Pair, out_dir: Path, settings: RegistrationOptions, options: dict) -> dict:
    """Register one pair into its folder (or skip it when done before); its record row."""
    import json

    from carctl.cli.console import emit_json, is_debug, out_of_memory
    from carctl.cli.register import run
    from carctl.errors import CarctlError

    folder = out_dir / pair.name
    summary_path = folder / SUMMARY
    row = {"name": pair.name, "folder": str(folder), "moving": pair.moving, "fixed": pair.fixed}
    recipe = _recipe(pair, settings, options)
    if summary_path.is_file() and not options["force"]:
        try:
            before = json.loads(summary_path.read_text())
        except (OSError, ValueError):
            before = None  # an unreadable summary: the pair is done again
        done = (before or {}).get("batch")
        if isinstance(done, dict) and done == recipe:
            if all(Path(p).is_file() for p in before.get("outputs", {}).values()):
                return row | {"status": "skipped"} | _measures(before)
            # an output gone: the pair is done again, over its own folder
        elif before is not None:  # never overwrite results of another recipe unasked
            what = _differences(done, recipe) or "options"
            error = f"done before with other {what} ({folder / SUMMARY}); --force redoes it"
            return row | {"status": "failed", "error": error}
    # whole paths, as the inputs': summary.json lists them, and a batch resumed from another
    # working directory found none of them there and redid every pair
    outputs = _outputs(pair, out_dir.absolute(), options["inverse"])
    earlier = _listed_outputs(summary_path)
    started = time.perf_counter()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        summary = run(
            pair.moving,
            pair.fixed,
            outputs,
            settings,
            inputs=pair.inputs(),
            labels=pair.labels,
            fixed_mask=pair.fixed_mask,
            moving_mask=pair.moving_mask,
            initial_affine=pair.initial_affine,
            threads=options["threads"],
            quiet=True,
            force=True,  # the pair's own folder: what an interrupted run left is redone
            started=started,
            qa=options["qa"],
        )
        summary["name"], summary["options"] = pair.name, _chosen(settings)
        summary["batch"] = recipe
        emit_json(summary, str(summary_path), force=True, inputs=pair.inputs())
        now = list(summary["outputs"].values())
        _remove_stale(earlier, now, folder, options.get("protected", set()))
    except (CarctlError, OSError) as error:
        return row | {"status": "failed", "error": " ".join(str(error).split())}
    except Exception as error:  # a bug: recorded in one line like the rest (--debug: traced)
        memory = out_of_memory(error)  # MemoryError was recorded with no words at all
        if memory:
            return row | {"status": "failed", "error": memory}
        if is_debug():
            import traceback

            traceback.print_exc()
        message = " ".join(str(error).split())
        return row | {
            "status": "failed",
            "error": f"internal error: {type(error).__name__}: {message}",
        }
    return row | {"status": "done"} | _measures(summary)


def _differences(done, recipe: dict) -> str:
    """What differs between an earlier run's recipe and this one, named down to the option or
    input ("options (method, seed) and inputs (fixed)"); the error named the category only."""
    parts = []
    for key, now in recipe.items():
        before = done.get(key) if isinstance(done, dict) else None
        if before == now:
            continue
        if isinstance(before, dict) and isinstance(now, dict):
            names = sorted(n for n in before.keys() | now.keys() if before.get(n) != now.get(n))
            parts.append(f"{key} ({', '.join(names)})")
        else:
            parts.append(key)
    return " and ".join(parts)


def _listed_outputs(summary_path: Path) -> list[str]:
    """The outputs an earlier run of the pair listed in its summary (none when unreadable)."""
    import json

    try:
        listed = json.loads(summary_path.read_text()).get("outputs", {})
    except (OSError, ValueError, AttributeError):
        return []
    return [p for p in listed.values() if isinstance(p, str)] if isinstance(listed, dict) else []


def _remove_stale(earlier: list[str], now: list[str], folder: Path, inputs: set[str]) -> None:
    """Remove from the pair's ``folder`` what an earlier run wrote and this one did not (with
    fewer outputs asked for, e.g. no --inverse: the old inverse field stayed beside the new
    results), with the data files of its format; nothing outside the folder, and no file
    among ``inputs`` (real paths of the list's inputs)."""
    from carctl.io import input_files, input_paths

    keep = inputs | input_paths(now)
    home = os.path.realpath(folder)
    for path in earlier:
        for stale in input_files(path):
            where = os.path.realpath(stale)
            if where not in keep and os.path.dirname(where) == home and os.path.isfile(where):
                os.remove(where)


def _measures(summary: dict) -> dict:
    """The record's numbers from a pair's summary."""
    out = {key: summary.get(key) for key in ("folding_percent", "jacobian_min", "jacobian_max")}
    out["seconds"] = summary.get("total_seconds")
    quality = summary.get("qa") or {}
    if "after" in quality:
        out |= {
            "qa_before": quality["before"]["score"],
            "qa_after": quality["after"]["score"],
            "qa_verdict": quality["after"]["verdict"],
        }
    from carctl.cli.console import numbers_or_none

    # no number (a score over no overlap) is an empty cell, as in summary.json's null
    return numbers_or_none(out)


def _said(row: dict) -> str:
    """One line on a pair's outcome."""
    if row["status"] == "failed":
        return f"failed: {row['error']}"
    words = "done" if row["status"] == "done" else "skipped (done before)"
    if row.get("seconds") is not None:
        words += f"  {row['seconds']:.1f} s"
    if row.get("folding_percent") is not None:
        words += f", folding {row['folding_percent']:.3f} %"
    if row.get("qa_verdict"):
        words += f", quality {row['qa_after']:.2f} ({row['qa_verdict']})"
    return words


def _write_record(rows: list[dict], out_dir: Path, listing: str) -> None:
    import csv
    import io

    from carctl.io import write_text

    text = io.StringIO()
    writer = csv.DictWriter(text, RECORD_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({key: _cell(row.get(key)) for key in RECORD_COLUMNS})
    out_dir.mkdir(parents=True, exist_ok=True)
    record = out_dir / RECORD
    write_text(text.getvalue(), record, force=True, inputs=[listing], extensions=(".csv",))


def _cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)
