"""Scoring a label mask against ground truth: per-class IoU and Dice, streamed slab by slab.

Both masks are read region by region through :func:`~tilesegment.volume.open_volume` (an MRC file, a Zarr array or an
OME-Zarr group, level 0), and only a confusion matrix survives from one slab to the next, so memory stays at about one
slab whatever the size of the tomogram. Rows of the matrix are truth labels, columns predicted labels.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import numpy as np
import zarr

from .errors import InputError, OptionError
from .geometry import Box, Shape
from .ome import read_ome_attrs
from .volume import VolumeSource, read_native, open_volume

__all__ = ["ClassScore", "EvaluationReport", "evaluate", "SLAB_VOXELS", "MAX_LABELS"]

SLAB_VOXELS = 16_000_000  # voxels read per mask and step: about 100 MB in all for 8-bit masks
BINCOUNT_VOXELS = 1 << 21  # np.bincount widens its input to intp: count a slab in pieces of this many voxels
MAX_LABELS = 1024  # label values 0..MAX_LABELS-1; the confusion matrix has MAX_LABELS² cells at most (8 MiB)


@dataclass(frozen=True)
class ClassScore:
    """Overlap of one label (or, with ``label`` None, of all foreground) with the voxel counts behind it.

    ``iou`` and ``dice`` are None when the class is in neither mask: 0/0 has no score, and NaN is not valid JSON.
    """

    label: int | None
    name: str
    iou: float | None
    dice: float | None
    true_positives: int
    false_positives: int
    false_negatives: int
    support: int  # voxels of this class in the truth

    @classmethod
    def from_counts(cls, label: int | None, name: str, tp: int, fp: int, fn: int) -> "ClassScore":
        union = tp + fp + fn
        iou = tp / union if union else None
        dice = 2 * tp / (union + tp) if union else None
        return cls(label, name, iou, dice, int(tp), int(fp), int(fn), int(tp + fn))

    @property
    def present(self) -> bool:
        """Whether the class occurs in either mask (and so has a score)."""
        return self.iou is not None

    def to_dict(self) -> dict[str, Any]:
        return {
            "label": self.label, "name": self.name, "iou": self.iou, "dice": self.dice,
            "true_positives": self.true_positives, "false_positives": self.false_positives,
            "false_negatives": self.false_negatives, "support": self.support,
        }


@dataclass(frozen=True)
class EvaluationReport:
    """Scores of a prediction against the truth: per class, mean over foreground classes, and binary foreground.

    ``mean_iou``/``mean_dice`` average the foreground classes (label != 0) that occur in either mask; ``foreground``
    scores "any non-zero label" against 0, which is what counts for a model that marks every macromolecule.
    ``confusion[t][p]`` counts voxels with truth ``t`` and prediction ``p`` (ignored truth labels zeroed).
    """

    prediction: str
    truth: str
    shape: Shape
    voxels: int  # voxels scored: the volume less those whose truth label is ignored
    classes: tuple[ClassScore, ...]
    foreground: ClassScore
    mean_iou: float | None
    mean_dice: float | None
    ignore: tuple[int, ...] = ()
    confusion: tuple[tuple[int, ...], ...] = ()

    def score(self, key: int | str) -> ClassScore:
        """The score of a class by label value or by name."""
        for entry in self.classes:
            if entry.label == key or entry.name == key:
                return entry
        raise KeyError(key)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-serialisable data (None where there is no score)."""
        return {
            "prediction": self.prediction,
            "truth": self.truth,
            "shape": list(self.shape),
            "voxels": self.voxels,
            "ignore": list(self.ignore),
            "classes": [c.to_dict() for c in self.classes],
            "foreground": self.foreground.to_dict(),
            "mean_iou": self.mean_iou,
            "mean_dice": self.mean_dice,
            "confusion": [list(row) for row in self.confusion],
        }

    def to_table(self) -> str:
        """A fixed-width table for a terminal: one row per class, then foreground and the foreground mean."""
        def number(value: float | None) -> str:
            return "n/a" if value is None else f"{value:.4f}"

        rows = [(str(c.label), c.name, number(c.iou), number(c.dice), str(c.support)) for c in self.classes]
        rows.append(("", "foreground", number(self.foreground.iou), number(self.foreground.dice), str(self.foreground.support)))
        rows.append(("", "mean (label != 0)", number(self.mean_iou), number(self.mean_dice), ""))
        header = ("label", "class", "IoU", "Dice", "support")
        rows = [(label, name if len(name) <= 32 else name[:31] + "~", *rest) for label, name, *rest in rows]
        widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
        align = ["<", "<", ">", ">", ">"]

        def line(cells: Sequence[str]) -> str:
            return "  ".join(f"{cell:{a}{w}}" for cell, a, w in zip(cells, align, widths)).rstrip()

        rule = "  ".join("-" * w for w in widths)
        body = [line(r) for r in rows]
        return "\n".join([line(header), rule, *body[:-2], rule, *body[-2:]])


def evaluate(prediction: str | os.PathLike, truth: str | os.PathLike, classes: Sequence[str] | None = None,
             ignore: Sequence[int] = ()) -> EvaluationReport:
    """Score the label mask ``prediction`` against ``truth`` (each an MRC file, Zarr array or OME-Zarr group).

    Class names come from ``classes``, else from the ``image-label`` metadata of the prediction (then the truth),
    else "class N". Truth voxels whose label is in ``ignore`` (e.g. an "unlabelled" value) are left out of every count
    and those labels get no row. Raises :class:`InputError` for masks of different shapes, float masks, negative labels
    or label values of :data:`MAX_LABELS` and above.
    """
    ignored = tuple(sorted({_ignore_value(v) for v in ignore}))
    if classes is not None and len(classes) > MAX_LABELS:
        raise OptionError(f"{len(classes)} class names given; at most {MAX_LABELS} label values are supported.",
                          "Give one name per label value, background (0) first.")
    pred_source, truth_source = open_volume(prediction), open_volume(truth)
    for source, role in ((pred_source, "prediction"), (truth_source, "truth")):
        if np.dtype(source.dtype).kind not in "iub":
            raise InputError(f"{role} {source.path}: dtype {np.dtype(source.dtype)} is not an integer label mask.",
                             "Give integer labels (0 background, 1.. classes); threshold or argmax probabilities first, "
                             "and store whole-number float masks as integers (e.g. IMOD 'newstack -mode 1').")
    if pred_source.shape != truth_source.shape:
        raise InputError(f"prediction {pred_source.path} has shape {_zyx(pred_source.shape)} but truth {truth_source.path} "
                         f"has shape {_zyx(truth_source.shape)}.",
                         "Compare a segmentation of the same tomogram, at the same binning and crop, as the ground truth.")
    names = {**_metadata_names(truth_source), **_metadata_names(pred_source)}
    names.update(enumerate(classes or ()))
    declared = 1 + max((label for label in names if label < MAX_LABELS), default=0)
    counts = _confusion(pred_source, truth_source, declared)
    for label in ignored:
        if label < len(counts):
            counts[label, :] = 0
    # rows for every named label and every label seen, not for the gap up to an ignored value such as 255
    seen = np.flatnonzero(counts.sum(axis=0) + counts.sum(axis=1))
    top = max(declared, 1 + int(seen.max()) if seen.size else 1)
    counts = counts[:top, :top]
    return _report(pred_source.path, truth_source.path, pred_source.shape, counts, names, ignored)


def _ignore_value(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise OptionError(f"--ignore {value!r} is not a label value.", "Give the truth's label values to leave out, non-negative integers (e.g. --ignore 0 or --ignore 3,4).")
    return int(value)


def _zyx(shape: Sequence[int]) -> str:
    return "×".join(str(n) for n in shape) + " (z×y×x)"


def _metadata_names(source: VolumeSource) -> dict[int, str]:
    """Label value -> class name from OME-Zarr ``image-label`` properties (the group's, or an array's parent group's)."""
    if source.zarr is None:
        return {}
    path = source.path.rstrip("/")
    candidates = [path]
    if source.zarr.array_path.rstrip("/") == path:  # an array: the metadata live on its group
        candidates = [os.path.dirname(path)] if os.path.dirname(path) else []
    for candidate in candidates:
        try:
            attrs = dict(zarr.open_group(candidate, mode="r").attrs)
        except Exception:  # no group there: a bare array has no class names
            continue
        label_meta = read_ome_attrs(attrs).get("image-label")
        properties = label_meta.get("properties") if isinstance(label_meta, dict) else None
        names: dict[int, str] = {}
        for entry in properties if isinstance(properties, list) else []:
            try:
                value, name = int(entry["label-value"]), entry["class"]
            except (KeyError, TypeError, ValueError):
                continue
            if value >= 0 and isinstance(name, str):
                names[value] = name
        if names:
            return names
    return {}


def _chunk_alignment(sources: Iterable[VolumeSource]) -> Shape:
    """Slab boundaries on chunk boundaries of every Zarr input, so no chunk is decompressed twice."""
    align = np.ones(3, dtype=np.int64)
    for source in sources:
        if source.zarr is None:
            continue
        try:
            chunks = zarr.open_array(source.zarr.array_path, mode="r").chunks[-3:]
        except Exception:  # odd chunk grids only cost speed, never correctness
            continue
        align = np.lcm(align, np.asarray(chunks, dtype=np.int64))
    return tuple(int(a) for a in align)  # type: ignore[return-value]


def _slab_shape(shape: Shape, align: Shape, voxels: int) -> Shape:
    """The largest chunk-aligned piece of about ``voxels`` voxels: whole planes if they fit, else rows, else runs."""
    nz, ny, nx = (max(1, n) for n in shape)
    az, ay, ax = (max(1, min(a, n)) for a, n in zip(align, (nz, ny, nx)))
    if az * ny * nx <= voxels:
        return (min(nz, voxels // (ny * nx) // az * az), ny, nx)
    if az * ay * nx <= voxels:
        return (az, min(ny, voxels // (az * nx) // ay * ay), nx)
    return (az, ay, min(nx, max(ax, voxels // (az * ay) // ax * ax)))


def _labels(source: VolumeSource, box: Box, role: str) -> np.ndarray:
    """One slab of a mask as non-negative labels below MAX_LABELS, or an InputError saying where it is not."""
    data = read_native(source, box)
    if data.dtype.kind == "b":
        return data.view(np.uint8)
    low, high = int(data.min()), int(data.max())
    if low < 0:
        raise InputError(f"{role} {source.path}: negative label {low} near z={box.start[0]}.",
                         "Labels must be 0 (background) or positive class values; an 8-bit MRC (mode 0) is read as signed, "
                         "so labels above 127 come out negative: store them as mode 6 (uint16).")
    if high >= MAX_LABELS:
        raise InputError(f"{role} {source.path}: label value {high} near z={box.start[0]}; at most {MAX_LABELS} classes "
                         f"(values 0..{MAX_LABELS - 1}) are scored.",
                         "Give a semantic mask (one value per class); an instance mask (one value per particle) must be "
                         "mapped to class values first.")
    return data


def _confusion(prediction: VolumeSource, truth: VolumeSource, labels: int) -> np.ndarray:
    """Accumulate the (truth, prediction) confusion matrix slab by slab; it grows to the largest label seen."""
    n = max(1, labels)
    counts = np.zeros((n, n), dtype=np.int64)
    piece = _slab_shape(truth.shape, _chunk_alignment((prediction, truth)), SLAB_VOXELS)
    for box in Box.from_shape(truth.shape).split(piece):
        t = _labels(truth, box, "truth")
        p = _labels(prediction, box, "prediction")
        top = 1 + max(int(t.max()), int(p.max()))
        if top > n:
            counts = np.pad(counts, ((0, top - n), (0, top - n)))
            n = top
        # truth * n + prediction in a fresh array of the narrowest type that holds n², updated in place (labels are
        # below MAX_LABELS, so the unsafe casts cannot wrap); np.bincount copies its input to intp, hence the pieces
        index = t.astype(np.uint16 if n * n <= 1 << 16 else np.int32).reshape(-1)
        index *= n
        np.add(index, p.reshape(-1), out=index, casting="unsafe")
        for start in range(0, index.size, BINCOUNT_VOXELS):
            counts += np.bincount(index[start:start + BINCOUNT_VOXELS], minlength=n * n).reshape(n, n)
    return counts


def _report(prediction: str, truth: str, shape: Shape, counts: np.ndarray, names: dict[int, str],
            ignored: tuple[int, ...]) -> EvaluationReport:
    tp = np.diag(counts)
    fp = counts.sum(axis=0) - tp
    fn = counts.sum(axis=1) - tp
    rows = tuple(
        ClassScore.from_counts(label, names.get(label, f"class {label}"), int(tp[label]), int(fp[label]), int(fn[label]))
        for label in range(len(counts)) if label not in ignored
    )
    scored = [r for r in rows if r.label != 0 and r.present]
    mean_iou = float(np.mean([r.iou for r in scored])) if scored else None
    mean_dice = float(np.mean([r.dice for r in scored])) if scored else None
    foreground = ClassScore.from_counts(None, "foreground", int(counts[1:, 1:].sum()), int(counts[0, 1:].sum()),
                                        int(counts[1:, 0].sum()))
    return EvaluationReport(
        prediction=prediction, truth=truth, shape=tuple(shape), voxels=int(counts.sum()),  # type: ignore[arg-type]
        classes=rows, foreground=foreground, mean_iou=mean_iou, mean_dice=mean_dice, ignore=ignored,
        confusion=tuple(tuple(int(v) for v in row) for row in counts),
    )
