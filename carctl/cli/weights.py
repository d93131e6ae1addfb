"""``carctl weights``: the network weights carctl ships, and their integrity."""

from __future__ import annotations

import typer

NAME = "weights"

app = typer.Typer(
    name=NAME, help="List and verify the shipped network weights.", no_args_is_help=True
)


@app.command("list")
def list_() -> None:
    """Every weights file found, with its architecture, training steps and validation."""
    from rich.table import Table

    from carctl import pretrained
    from carctl.cli.console import stdout

    table = Table(title="carctl weights", title_justify="left")
    for column in ("name", "architecture", "steps", "validation", "file"):
        table.add_column(column)
    for card in pretrained.cards():
        data = card.data
        training = data.get("training", {})
        # steps done in all (a fine-tuned card counts its starting weights'), not the last
        # run's setting
        steps = training.get("steps_done", "")
        validation = ", ".join(
            f"{k} {v:.4g}"
            for k, v in data.get("validation", {}).items()
            if isinstance(v, float) and k != "seconds"
        )
        table.add_row(card.name, card.kind, str(steps), validation, str(card.weights))
    stdout().print(table)


@app.command("verify")
def verify() -> None:
    """Check every weights file against the sha256 of its model card (exit 1 on a mismatch)."""
    from carctl import pretrained
    from carctl.cli.console import stdout

    found = pretrained.cards()
    if not found:
        raise pretrained.WeightsError(
            "no weights found (looked in " + ", ".join(map(str, pretrained.search_path())) + ")"
        )
    for card in found:
        pretrained.verify(card)
        pretrained.load(card.name)  # the card's architecture takes the weights
        stdout().print(f"{card.name}: ok ({card.data['sha256'][:12]}..., {card.weights})")
