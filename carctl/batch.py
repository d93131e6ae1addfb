"""Pair lists for ``carctl batch``: which images to register, read and checked before any work.

A list is a CSV file (a TSV file when it ends in ``.tsv`` or its header has tabs and no
commas) with a header row naming its columns: ``moving`` and ``fixed`` always, and any of
``name``, ``labels``, ``fixed_mask``, ``moving_mask`` and ``initial_affine`` (``register``'s
options of those names; ``-`` and ``_`` alike, any case). Blank lines and lines starting with
``#`` are skipped; an empty cell is an option not given. Relative paths are relative to the
list's own folder, so a list that lives beside its data works from anywhere.

Each pair's outputs go to a folder of its own, named by ``name`` or else by the moving
image's stem (``sub-01_T1w.nii.gz`` -> ``sub-01_T1w``); two pairs may not share one.
Reads no image and loads neither torch nor SimpleITK.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path

from carctl.errors import InputError
from carctl.io import output_stem, split_volume

REQUIRED = ("moving", "fixed")
OPTIONAL = ("name", "labels", "fixed_mask", "moving_mask", "initial_affine")
# the columns that name input files (checked to exist before any work)
_FILES = ("moving", "fixed", "labels", "fixed_mask", "moving_mask", "initial_affine")


@dataclass(frozen=True)
class Pair:
    """One row of a pair list: its line in the file, its output folder's name and its inputs
    (paths resolved; None where not given)."""

    line: int
    name: str
    moving: str
    fixed: str
    labels: str | None = None
    fixed_mask: str | None = None
    moving_mask: str | None = None
    initial_affine: str | None = None

    def inputs(self) -> list[str]:
        """Every input file of the pair (outputs must not overwrite them)."""
        return list(self.files().values())

    def files(self) -> dict[str, str]:
        """The pair's inputs by column (those given)."""
        return {key: value for key in _FILES if (value := getattr(self, key))}


def _column(title: str) -> str:
    return title.strip().lower().replace("-", "_")


def _delimiter(path: Path, header: str) -> str:
    if path.suffix.lower() == ".tsv" or ("\t" in header and "," not in header):
        return "\t"
    return ","


def _resolve(value: str, folder: Path) -> str:
    """A cell's path, relative to the list's ``folder`` unless absolute (``~`` expanded);
    a ``FILE:N`` volume suffix is kept."""
    path, volume = split_volume(os.path.expanduser(value))
    path = path if path.is_absolute() else folder / path
    return f"{path}:{volume}" if volume is not None else str(path)


def _check_name(name: str, where: str) -> None:
    if name in (".", "..") or "/" in name or "\\" in name or name != name.strip():
        raise InputError(f"{where}: name '{name}' must be a plain folder name")


def read_pairs(path: str | os.PathLike) -> list[Pair]:
    """The pairs of the list at ``path`` (see the module docstring); refuses in one line a
    missing or malformed list, an unknown column, a missing input file and two pairs with
    one output folder."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"no such pair list: '{path}'")
    try:
        text = path.read_text(encoding="utf-8-sig")  # a byte-order mark from spreadsheets
    except (OSError, UnicodeDecodeError) as error:
        raise InputError(f"cannot read pair list '{path}': {error}") from error
    lines = [
        (number, line)
        for number, line in enumerate(text.splitlines(), start=1)
        if line.strip() and not line.lstrip().startswith("#")
    ]
    if not lines:
        raise InputError(f"pair list '{path}' is empty (a header row 'moving,fixed' comes first)")
    number, header = lines[0]
    rows = list(csv.reader([line for _, line in lines], delimiter=_delimiter(path, header)))
    columns = [_column(title) for title in rows[0]]
    known = REQUIRED + OPTIONAL
    for title in columns:
        if title not in known:
            raise InputError(
                f"{path}:{number}: unknown column '{title}' (columns: {', '.join(known)})"
            )
    for title in REQUIRED:
        if title not in columns:
            raise InputError(f"{path}:{number}: no '{title}' column in the header row")
    if len(set(columns)) != len(columns):
        raise InputError(f"{path}:{number}: a column is named twice")
    folder = Path(os.path.abspath(path.parent))  # recorded paths are whole
    pairs, folders = [], {}
    for (number, _), cells in zip(lines[1:], rows[1:], strict=True):
        where = f"{path}:{number}"
        if len(cells) != len(columns):
            raise InputError(f"{where}: {len(cells)} cells for {len(columns)} columns")
        row = {title: cell.strip() for title, cell in zip(columns, cells, strict=True)}
        for title in REQUIRED:
            if not row[title]:
                raise InputError(f"{where}: the '{title}' cell is empty")
        values = {key: _resolve(row[key], folder) if row.get(key) else None for key in _FILES}
        name = row.get("name") or output_stem(values["moving"])
        _check_name(name, where)
        if name in folders:
            fix = "give each pair its own name" if "name" in columns else "add a 'name' column"
            raise InputError(
                f"{where}: its outputs would go to '{name}' as those of line {folders[name]}; {fix}"
            )
        folders[name] = number
        for key in _FILES:
            value = values[key]
            if value is not None and not split_volume(value)[0].exists():
                raise InputError(f"{where}: no such {key.replace('_', ' ')}: '{value}'")
        pairs.append(Pair(number, name, **values))
    if not pairs:
        raise InputError(f"pair list '{path}' names no pair (only its header row)")
    return pairs
