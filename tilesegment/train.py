"""Training the segmentation networks on (simulated) tomograms with per-voxel ground truth.

Random subtomogram crops (the paper's setting: the network sees a crowded neighbourhood and labels
each voxel) are drawn from whole training tomograms, half of them centred on a labelled voxel so a
rare macromolecule of interest is seen as often as the background around it, each normalised with its own whole-volume
mean and standard deviation exactly as ``tileseg run`` normalises. Validation uses a fixed set of
crops from held-out tomograms; training stops early when the validation IoU has not improved for
``patience`` validations, and the best weights are saved in the checkpoint format of
:mod:`tilesegment.model`. Augmentation is flips only: rotations that mix z with x or y would turn
the missing wedge (about the y axis) into one the microscope never makes.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn

from .errors import OptionError
from .model import ARCHITECTURES, ModelConfig, build_model, save_checkpoint
from .predict import resolve_device

__all__ = ["TrainConfig", "TrainReport", "Volume", "train", "label_targets", "confusion", "scores"]


@dataclass(frozen=True)
class Volume:
    """One training tomogram and its per-voxel labels (0 = background, k = kind k)."""

    tomogram: np.ndarray
    labels: np.ndarray
    name: str = ""


@dataclass(frozen=True)
class TrainConfig:
    architecture: str = "ssn3d-encdec"
    channels: tuple[int, int, int] = (8, 16, 32)
    crop: int = 48  # voxels per side of a training subtomogram
    batch: int = 4
    learning_rate: float = 2e-3
    max_steps: int = 2000
    validate_every: int = 100
    validation_crops: int = 32
    patience: int = 6  # validations without improvement before stopping
    centred_crops: float = 0.5  # share of training crops centred on a labelled voxel (rare targets get seen)
    seed: int = 0
    device: str = "cpu"
    voxel_size: float = 10.0
    class_names: tuple[str, ...] = ("background", "macromolecule")
    description: str = ""
    extra: dict = field(default_factory=dict)

    def check(self) -> None:
        if self.architecture not in ARCHITECTURES or self.architecture == "identity":
            raise OptionError(f"--architecture {self.architecture} cannot be trained.", "Use ssn3d-encdec or ssn3d-fcn.")
        multiple = ModelConfig(architecture=self.architecture).size_multiple
        if self.crop % multiple or self.crop < 2 * multiple:
            raise OptionError(f"--crop {self.crop} does not fit {self.architecture}.", f"Use a multiple of {multiple}, at least {2 * multiple}.")
        for name, option in (("batch", "--batch"), ("max_steps", "--steps"), ("validate_every", "--validate-every"),
                             ("validation_crops", "validation_crops"), ("patience", "--patience")):
            if getattr(self, name) < 1:
                raise OptionError(f"{option} {getattr(self, name)} must be at least 1.", "Give a positive number.")
        if not self.learning_rate > 0:
            raise OptionError(f"--lr {self.learning_rate} must be positive.", "Try 1e-3.")


@dataclass(frozen=True)
class TrainReport:
    checkpoint: str
    steps: int
    best_step: int
    best_validation_iou: float
    history: tuple[dict, ...]
    seconds: float
    stopped_early: bool


def label_targets(labels: np.ndarray, mode: str, kinds: Sequence[str]) -> tuple[np.ndarray, tuple[str, ...]]:
    """Map a simulator label map to training targets and class names.

    ``foreground``: every macromolecule vs background; ``kinds``: one class per kind;
    ``target:ID``: the kind ``ID`` vs everything else (the paper's setting).
    """
    if mode == "foreground":
        return (labels > 0).astype(np.int64), ("background", "macromolecule")
    if mode == "kinds":
        return labels.astype(np.int64), ("background", *kinds)
    if mode.startswith("target:"):
        target = mode.split(":", 1)[1]
        if target not in kinds:
            raise OptionError(f"--classes {mode}: {target} is not one of the kinds {', '.join(kinds)}.", "Name a kind that the data contain.")
        return (labels == kinds.index(target) + 1).astype(np.int64), ("background", target)
    raise OptionError(f"--classes {mode!r} is not a class mode.", "Use foreground, kinds or target:ID.")


def _normalised(volume: np.ndarray) -> np.ndarray:
    volume = volume.astype(np.float32)
    mean, std = float(volume.mean(dtype=np.float64)), max(float(volume.std(dtype=np.float64)), 1e-12)
    return ((volume - np.float32(mean)) / np.float32(std)).astype(np.float32)


def _crop_origin(rng: np.random.Generator, shape: Sequence[int], crop: int) -> tuple[int, int, int]:
    return tuple(int(rng.integers(0, max(1, n - crop + 1))) for n in shape)  # type: ignore[return-value]


def _foreground_points(target: np.ndarray, rng: np.random.Generator, limit: int = 200_000) -> np.ndarray:
    points = np.flatnonzero(target)
    return points if len(points) <= limit else rng.choice(points, limit, replace=False)


def _crops(volumes: list[tuple[np.ndarray, np.ndarray]], rng: np.random.Generator, count: int, crop: int, flip: bool,
           centres: list[np.ndarray] | None = None, centred: float = 0.0):
    """``count`` random crops; a share ``centred`` of them centred on a labelled voxel."""
    xs, ys = [], []
    for _ in range(count):
        which = int(rng.integers(len(volumes)))
        image, target = volumes[which]
        if centres is not None and len(centres[which]) and rng.random() < centred:
            centre = np.unravel_index(int(rng.choice(centres[which])), target.shape)
            z, y, x = (int(np.clip(c - crop // 2, 0, max(0, n - crop))) for c, n in zip(centre, target.shape))
        else:
            z, y, x = _crop_origin(rng, image.shape, crop)
        sl = (slice(z, z + crop), slice(y, y + crop), slice(x, x + crop))
        a, b = image[sl], target[sl]
        if flip:
            for axis in range(3):
                if rng.random() < 0.5:
                    a, b = np.flip(a, axis), np.flip(b, axis)
        xs.append(np.ascontiguousarray(a))
        ys.append(np.ascontiguousarray(b))
    return torch.from_numpy(np.stack(xs))[:, None], torch.from_numpy(np.stack(ys))


def confusion(pred: np.ndarray, truth: np.ndarray, classes: int) -> np.ndarray:
    return np.bincount(truth.ravel() * classes + pred.ravel(), minlength=classes * classes).reshape(classes, classes)


def scores(matrix: np.ndarray) -> dict[str, float]:
    """Mean IoU over foreground classes (present in truth or prediction) from a confusion matrix."""
    ious = []
    for k in range(1, matrix.shape[0]):
        tp = matrix[k, k]
        denominator = matrix[k, :].sum() + matrix[:, k].sum() - tp
        if denominator:
            ious.append(tp / denominator)
    return {"iou": float(np.mean(ious)) if ious else float("nan")}


def _pad_to(volume: np.ndarray, crop: int) -> np.ndarray:
    pad = [(0, max(0, crop - n)) for n in volume.shape]
    return np.pad(volume, pad, mode="reflect") if any(p[1] for p in pad) else volume


def train(
    train_volumes: Sequence[Volume],
    validation_volumes: Sequence[Volume],
    checkpoint: str,
    config: TrainConfig,
    classes: str = "foreground",
    kinds: Sequence[str] = (),
    progress: Callable[[int, dict], None] | None = None,
) -> TrainReport:
    """Train a network and write the best (by validation IoU) weights to ``checkpoint``."""
    config.check()
    if not train_volumes or not validation_volumes:
        raise OptionError("training needs at least one training and one validation tomogram.", "Give more data (or --simulate 2 or more).")
    largest = max(max(v.tomogram.shape) for v in train_volumes)
    if config.crop > largest:  # smaller volumes are padded to the crop, but these crops would be mostly padding
        raise OptionError(f"--crop {config.crop} is larger than every training tomogram (the longest edge is {largest} voxels).",
                          f"Use --crop {largest} or less (the default is {TrainConfig.crop}).")
    started = time.perf_counter()
    device = resolve_device(config.device)
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    prepared = {}
    names: tuple[str, ...] = ()
    for split, volumes in (("train", train_volumes), ("validation", validation_volumes)):
        prepared[split] = []
        for v in volumes:
            target, names = label_targets(v.labels, classes, list(kinds))
            prepared[split].append((_pad_to(_normalised(v.tomogram), config.crop), _pad_to(target, config.crop)))
    model_config = ModelConfig(architecture=config.architecture, channels=tuple(config.channels), class_names=names,
                               voxel_size=config.voxel_size, normalization="zscore", output="softmax",
                               description=config.description, extra=dict(config.extra))
    model = build_model(model_config).to(device)
    optimiser = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, T_max=config.max_steps)
    loss_fn = nn.CrossEntropyLoss()
    centres = [_foreground_points(target, rng) for _, target in prepared["train"]]
    val_rng = np.random.default_rng(config.seed + 1)
    val_centres = [_foreground_points(target, val_rng) for _, target in prepared["validation"]]
    val_x, val_y = _crops(prepared["validation"], val_rng, config.validation_crops, config.crop, flip=False,
                          centres=val_centres, centred=config.centred_crops)
    best_iou, best_step, best_state, waited = -math.inf, 0, None, 0
    history: list[dict] = []
    step = 0
    stopped_early = False
    for step in range(1, config.max_steps + 1):
        model.train()
        x, y = _crops(prepared["train"], rng, config.batch, config.crop, flip=True, centres=centres, centred=config.centred_crops)
        loss = loss_fn(model(x.to(device)), y.to(device))
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        schedule.step()
        if step % config.validate_every and step != config.max_steps:
            continue
        model.eval()
        matrix = np.zeros((len(names), len(names)), np.int64)
        with torch.inference_mode():
            for start in range(0, len(val_x), config.batch):
                pred = model(val_x[start : start + config.batch].to(device)).argmax(1).cpu().numpy()
                matrix += confusion(pred, val_y[start : start + config.batch].numpy(), len(names))
        iou = scores(matrix)["iou"]
        record = {"step": step, "loss": round(loss.item(), 5), "validation_iou": round(iou, 5)}
        history.append(record)
        if progress:
            progress(step, record)
        if iou > best_iou:
            best_iou, best_step, waited = iou, step, 0
            best_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        else:
            waited += 1
            if waited >= config.patience:
                stopped_early = True
                break
    assert best_state is not None
    model.load_state_dict(best_state)
    final_config = replace(model_config, extra={**model_config.extra, "trained_steps": best_step,
                                                "validation_iou": round(best_iou, 5), "classes_mode": classes})
    save_checkpoint(checkpoint, model.cpu(), final_config)
    return TrainReport(str(checkpoint), step, best_step, best_iou, tuple(history), time.perf_counter() - started, stopped_early)
