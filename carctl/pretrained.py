"""Shipped network weights: safetensors files with a JSON model card each.

A card ``<name>.json`` beside ``<name>.safetensors`` records the architecture (enough to
rebuild the network), the training data and command, the steps, the validation metrics and
the file's sha256. :func:`load` checks the hash before reading a byte of the weights and
rebuilds the architecture from the card. No pickles, no network access.

Weights are looked for in ``$CARCTL_WEIGHTS``, then in the ``weights/`` folder beside the
package (a source checkout or editable install), then in ``<prefix>/share/carctl/weights``
(a regular install).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from carctl.errors import CarctlError

CARD_SUFFIX, WEIGHTS_SUFFIX = ".json", ".safetensors"


class WeightsError(CarctlError):
    """Weights are missing, corrupted, or do not match their card."""


def search_path() -> list[Path]:
    """The folders weights are looked for in, in order (see the module docstring); a
    ``$CARCTL_WEIGHTS`` that is not a folder is refused rather than passed over."""
    folders = []
    if os.environ.get("CARCTL_WEIGHTS"):
        given = Path(os.environ["CARCTL_WEIGHTS"])
        if not given.is_dir():
            raise WeightsError(f"$CARCTL_WEIGHTS: '{given}' is not a folder")
        folders.append(given)
    folders.append(Path(__file__).resolve().parent.parent / "weights")
    folders.append(Path(sys.prefix) / "share" / "carctl" / "weights")
    return folders


@dataclass(frozen=True)
class Card:
    name: str
    path: Path  # the card file
    data: dict

    @property
    def weights(self) -> Path:
        return self.path.with_name(self.data["file"])

    @property
    def kind(self) -> str:
        return self.data["architecture"]["kind"]


# What a card must hold, and of which type.
_CARD_FIELDS = {"file": str, "sha256": str, "architecture": dict}


def read_card(path: Path) -> Card | None:
    """The model card at ``path``; None when it is missing, unreadable or not a card."""
    try:
        return _checked_card(path)
    except WeightsError:
        return None


def _checked_card(path: Path) -> Card:
    """The model card at ``path``, or :class:`WeightsError` saying what is wrong with it (a
    card whose sha256 was null stopped `weights verify` and `register --method net` with an
    internal error)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise WeightsError(f"model card {path} is unreadable: {error}") from error
    if not isinstance(data, dict):
        raise WeightsError(f"model card {path} is not a JSON object")
    problems = [key for key, kind in _CARD_FIELDS.items() if not isinstance(data.get(key), kind)]
    if not problems and not isinstance(data["architecture"].get("kind"), str):
        problems = ["architecture.kind"]
    if problems:
        raise WeightsError(f"model card {path}: {', '.join(problems)} missing or malformed")
    return Card(path.stem, path, data)


def _folder_cards(folder: Path) -> dict[str, Card | WeightsError]:
    """The cards of one folder by name, or the error of each broken one: a card that cannot
    be read, or a weights file without its card. Other JSON files are not cards."""
    found: dict[str, Card | WeightsError] = {}
    for path in sorted(folder.glob(f"*{CARD_SUFFIX}")):
        try:
            found[path.stem] = _checked_card(path)
        except WeightsError as error:
            if path.with_suffix(WEIGHTS_SUFFIX).is_file():
                found[path.stem] = error
    for path in sorted(folder.glob(f"*{WEIGHTS_SUFFIX}")):
        if path.stem not in found and not path.with_suffix(CARD_SUFFIX).is_file():
            found[path.stem] = WeightsError(f"{path} has no model card {path.stem}{CARD_SUFFIX}")
    return found


def cards() -> list[Card]:
    """Every model card found, first folder of :func:`search_path` winning per name; a broken
    one that would win is refused (:class:`WeightsError`), not passed over for another
    folder's."""
    found: dict[str, Card | WeightsError] = {}
    for folder in search_path():
        if folder.is_dir():
            for name, c in _folder_cards(folder).items():
                found.setdefault(name, c)
    for c in found.values():
        if isinstance(c, WeightsError):
            raise c
    return list(found.values())


def card(name: str) -> Card:
    """The card named ``name`` that :func:`search_path` finds first (a broken one refused)."""
    for folder in search_path():
        c = _folder_cards(folder).get(name) if folder.is_dir() else None
        if isinstance(c, WeightsError):
            raise c
        if c is not None:
            return c
    where = ", ".join(str(p) for p in search_path())
    raise WeightsError(f"no weights named {name!r} (looked in {where})")


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verify(c: Card) -> None:
    """Raise :class:`WeightsError` unless the weights file exists and matches the card."""
    if not c.weights.is_file():
        raise WeightsError(f"{c.name}: weights file {c.weights} is missing")
    actual = sha256(c.weights)
    if actual != c.data["sha256"]:
        raise WeightsError(
            f"{c.name}: {c.weights.name} is corrupted or not the file of its card "
            f"(sha256 {actual[:12]}..., card says {c.data['sha256'][:12]}...)"
        )


def build(architecture: dict):
    """The network described by a card's ``architecture``."""
    kind = architecture["kind"]
    if kind == "imse-evaluator":
        from carctl.networks.evaluator import Evaluator, EvaluatorConfig

        config = architecture["config"]
        if "lookup" not in config:  # every card since the design of 2026-12-06 says it
            raise WeightsError(
                "these IMSE weights have the evaluator design of before 2026-12-06, which "
                "carctl no longer builds: train new ones with 'carctl train imse'"
            )
        return Evaluator(EvaluatorConfig(**config))
    if kind == "car-registration":
        from carctl.networks.car import CarConfig, CarNet

        return CarNet(CarConfig(**architecture["config"]))
    raise WeightsError(f"unknown architecture {kind!r}")


def load(name: str, device: str = "cpu"):
    """The network ``name``, checked against its card, in eval mode, in the faster layout
    (:func:`carctl.networks.channels_last`); returns (model, card)."""
    from carctl.networks import channels_last

    c = card(name)
    verify(c)
    model = build(c.data["architecture"])
    load_weights(model, c.weights, f"{c.name}: weights do not fit the card's architecture", device)
    return channels_last(model.to(device).eval()), c


def load_weights(model, path: Path, refusal: str, device: str = "cpu") -> None:
    """The safetensors file at ``path`` into ``model``; :class:`WeightsError` ``refusal
    (reason)`` when it is not a weights file or does not fit the model."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(path), device=device)
        model.load_state_dict(tensors)
    except (SafetensorError, RuntimeError) as error:
        raise WeightsError(f"{refusal} ({_first_reason(error)})") from None
    _require_finite(tensors, path.name)


def _first_reason(error: Exception) -> str:
    """The first informative line of ``error``: torch's state-dict errors open with a line
    that only announces the list below it ("Error(s) in loading state_dict for CarNet:")."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if len(lines) > 1 and lines[0].endswith(":"):
        return lines[1].rstrip(".")
    return lines[0] if lines else ""


def _require_finite(tensors: dict, name: str) -> None:
    """Refuse weights holding NaN or infinite values (a diverged training's): a network of
    them gave no displacement at all, and register wrote the identity with exit status 0."""
    bad = [k for k, v in tensors.items() if v.is_floating_point() and not bool(v.isfinite().all())]
    if bad:
        raise WeightsError(
            f"{name} holds NaN or infinite values in {len(bad)} of {len(tensors)} tensors "
            f"({bad[0]}, ...): the training that wrote it diverged"
        )


def save_tensors(tensors: dict, path: Path) -> None:
    """``tensors`` as a safetensors file at ``path``, written atomically."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    from carctl.errors import OutputError

    tmp = path.with_name(f".{path.name}.tmp")
    try:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp))
        # safetensors writes its files for their owner alone (0600): weights copied into a
        # shared weights/ folder were unreadable to others; the usual mode, as for the cards
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o666 & ~umask)
        tmp.replace(path)
    except (SafetensorError, OSError) as error:  # a full disk was an internal error
        tmp.unlink(missing_ok=True)
        reason = str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__
        raise OutputError(f"cannot write '{path}': {reason}") from error


def write(model, folder: Path, name: str, card_data: dict) -> Card:
    """Save ``model``'s weights as ``folder/name.safetensors`` with its card (sha256 added)."""
    folder.mkdir(parents=True, exist_ok=True)
    weights = folder / f"{name}{WEIGHTS_SUFFIX}"
    tensors = model.state_dict()
    _require_finite(tensors, weights.name)
    save_tensors(tensors, weights)
    data = {"name": name, "file": weights.name, "sha256": sha256(weights), **card_data}
    path = folder / f"{name}{CARD_SUFFIX}"
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(path)
    return Card(name, path, data)
