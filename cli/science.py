"""The science commands: ``simulate``, ``train`` and ``evaluate``."""

from __future__ import annotations

import json
import sys
from typing import Any

import click

from .common import handle_errors, parse_shape, show_progress


@click.command()
@click.argument("prediction", metavar="PRED")
@click.argument("truth", metavar="TRUTH")
@click.option("--classes", default=None, help="Class names for labels 0, 1, ... (comma separated); default: from the prediction's metadata.")
@click.option("--ignore", default=None, help="Truth labels to leave out of every count (comma separated).")
@click.option("--json", "as_json", is_flag=True, help="Print the scores as JSON.")
@handle_errors
def evaluate(prediction: str, truth: str, classes: str | None, ignore: str | None, as_json: bool) -> None:
    """Score a predicted label mask against the truth: per-class IoU and Dice.

    PRED and TRUTH are MRC files, Zarr arrays or OME-Zarr label images of the same shape.

    \b
    Example:
      tileseg evaluate seg.zarr sim/labels.mrc
      tileseg evaluate seg.zarr sim/labels.mrc --json > scores.json
    """
    from tilesegment.evaluate import evaluate as run_evaluate

    names = [c.strip() for c in classes.split(",")] if classes else None
    try:
        ignored = [int(v) for v in ignore.split(",")] if ignore else []
    except ValueError:
        raise click.BadParameter(f"--ignore {ignore!r}: give label values such as 255 or 3,4.") from None
    report = run_evaluate(prediction, truth, classes=names, ignore=ignored)
    click.echo(json.dumps(report.to_dict(), indent=2) if as_json else report.to_table())
