"""The segmentation output's life cycle: what is at the path now, what to do with it, lay it out,
and mark it complete.

An output is *incomplete* from the moment it is created until every block and pyramid level is
written: its root attribute ``tilesegment.status`` reads ``incomplete`` and it carries no OME
``multiscales``/``image-label`` metadata, so viewers and readers do not take a half-written mask
for a finished one. ``finish_output`` adds the OME metadata and sets ``complete`` in one update.
The run's settings that decide the output's bytes are kept under ``tilesegment.run``, so a resumed
run can refuse settings that would mix two different segmentations in one store.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Sequence

from .errors import InputError, OptionError, OutputError
from .geometry import Shape
from .journal import BlockJournal
from .lock import lock_holder
from .ome import image_label, multiscales, ome_attrs
from .storage import describe_failure, exists, is_url, remedy
from .zarr_io import (LABEL_COMPRESSION, PROBABILITY_COMPRESSION, ArraySpec, a_file_in_the_way, create_array, create_group, read_attrs,
                      tileseg_meta, update_attrs)

__all__ = ["OutputLayout", "OutputStatus", "describe_output", "output_state", "decide", "check_same_run", "create_output", "finish_output",
           "CREATE", "CONTINUE", "FINISHED"]

CREATE, CONTINUE, FINISHED = "create", "continue", "finished"


@dataclass(frozen=True)
class OutputLayout:
    """How the output's arrays look: levels, dtypes, chunks, metadata."""

    ngff: str
    spec: ArraySpec
    shapes: Sequence[Shape]
    voxel_size: Sequence[float]
    class_names: tuple[str, ...]
    label_dtype: str
    channels: int
    probability_dtype: str | None  # None: no probabilities group
    translation: Sequence[float] = (0.0, 0.0, 0.0)  # (z, y, x) Å of level 0's first voxel centre: the input's

    @property
    def paths(self) -> list[str]:
        return [str(i) for i in range(len(self.shapes))]

    @property
    def factors(self) -> list[int]:
        return [2**i for i in range(len(self.shapes))]


def output_state(output: str) -> str | None:
    """``None`` (nothing there), ``complete``, ``incomplete``, or ``foreign`` (not a tileseg output);
    a local file there is refused, before the cluster starts."""
    try:
        if not exists(output):
            return None
    except Exception as exc:  # only URLs get here: no credentials, endpoint unreachable, ...
        raise OutputError(f"{output}: cannot be reached: {describe_failure(exc)}.", remedy(output, exc)) from None
    if not is_url(output) and not os.path.isdir(output):
        raise a_file_in_the_way(output)
    info = read_attrs(output).get("tilesegment")
    if not isinstance(info, dict) or "run" not in info:
        return "foreign"
    return "complete" if info.get("status") == "complete" else "incomplete"


def decide(output: str, state: str | None, resume: bool, overwrite: bool) -> str:
    """What a run does with ``output`` in ``state``, or a one-line refusal naming the way on."""
    if resume and overwrite:
        raise OptionError("--resume and --overwrite contradict each other.", "Use --resume to finish a stopped run, --overwrite to start again.")
    if state is None or overwrite:
        return CREATE
    if state == "incomplete":
        if resume:
            return CONTINUE
        raise OutputError(f"{output} is an incomplete segmentation (a run was stopped, or is still running).",
                          "Pass --resume to finish it, or --overwrite to start again.")
    if state == "complete":
        if resume:
            return FINISHED
        raise OutputError(f"{output} already exists (a complete segmentation).", "Choose another output path, or pass --overwrite to replace it.")
    what = "cannot be resumed: it is not a tileseg segmentation" if resume else "already exists and is not a tileseg segmentation"
    raise OutputError(f"{output} {what}.", "Choose another output path, or pass --overwrite to replace it.")


def recorded_run(output: str) -> dict[str, Any]:
    return dict(read_attrs(output).get("tilesegment", {}))


def check_same_run(output: str, run: dict[str, Any]) -> dict[str, Any]:
    """Refuse to resume ``output`` with settings that differ from the first run's; return its info."""
    info = recorded_run(output)
    before = info.get("run", {})
    differ = [key for key in sorted(set(before) | set(run)) if before.get(key) != run.get(key)]
    if differ:
        changes = "; ".join(f"{key} was {before.get(key)!r}, now {run.get(key)!r}" for key in differ[:3])
        raise OptionError(f"cannot resume {output} with other settings ({changes}).",
                          "Repeat the first run's input, model and options, or pass --overwrite to start again.")
    return info


def create_output(output: str, layout: OutputLayout, info: dict[str, Any], overwrite: bool) -> None:
    """Lay out every level of labels (and probabilities), marked ``incomplete``, with no OME metadata yet."""
    group = create_group(output, layout.ngff, overwrite=overwrite)
    for path, shape in zip(layout.paths, layout.shapes):
        create_array(group, path, shape, layout.label_dtype, layout.spec, compression=LABEL_COMPRESSION)
    if layout.probability_dtype:
        probabilities = group.create_group("probabilities")
        for path, shape in zip(layout.paths, layout.shapes):
            create_array(probabilities, path, shape, layout.probability_dtype, layout.spec, channels=layout.channels,
                         compression=PROBABILITY_COMPRESSION[layout.probability_dtype])
    group.attrs.update({"tilesegment": {**info, "status": "incomplete"}})


def finish_output(output: str, layout: OutputLayout, info: dict[str, Any]) -> None:
    """Add the OME metadata and mark ``output`` complete (after every chunk is written)."""
    ngff = layout.ngff
    if layout.probability_dtype:
        update_attrs(f"{output}/probabilities", ome_attrs(ngff, multiscales=[
            multiscales("probabilities", layout.paths, layout.voxel_size, layout.factors, ngff, channel=True,
                        translation=layout.translation)]))
    update_attrs(output, {
        **ome_attrs(ngff, multiscales=[multiscales("segmentation", layout.paths, layout.voxel_size, layout.factors, ngff, method="nearest",
                                                 translation=layout.translation)],
                    **{"image-label": image_label(layout.class_names, ngff)}),
        "tilesegment": {**info, "status": "complete"},
    })


@dataclass(frozen=True)
class OutputStatus:
    """What ``tileseg status`` reports about an output."""

    output: str
    complete: bool
    blocks_done: int
    blocks: int
    input: str | None
    writer: dict[str, Any] | None  # who holds the lock now, if anyone

    def describe(self) -> str:
        if self.complete:
            return f"{self.output}: complete ({self.blocks} block{'s' if self.blocks != 1 else ''})."
        done = f"{self.output}: incomplete, {self.blocks_done} of {self.blocks} blocks done"
        if self.writer is not None:
            return f"{done}; being written by pid {self.writer.get('pid')} on {self.writer.get('host')}."
        return f"{done}; no run is writing it. Finish it with: tileseg run {self.input or 'INPUT'} {self.output} --resume (and the first run's options)."


def describe_output(output: str) -> OutputStatus:
    """The state of a segmentation output, for people and scripts."""
    state = output_state(output)
    if state is None:
        raise InputError(f"{output}: no such file or directory.", "Check the path.")
    if state == "foreign":
        _, source, _ = tileseg_meta(read_attrs(output))  # a foreign store records no run: a source is convert's
        what = f"a tomogram 'tileseg convert' made from {source}, not a segmentation" if source else "not a tileseg segmentation"
        raise InputError(f"{output} is {what}.", "Give an OUTPUT.zarr written by 'tileseg run'.")
    info = recorded_run(output)
    blocks = int(info.get("blocks", 0))
    done = blocks if state == "complete" else len(list(BlockJournal(output).done()))
    return OutputStatus(output, state == "complete", done, blocks, info.get("input"), lock_holder(output))
