"""Segment a tomogram of a copick project and file the mask where copick lists it.

copick (https://github.com/copick/copick) organises tomograms and annotations, including those
of the CryoET Data Portal, as plain folders. For a ``filesystem`` project:

    {static or overlay root}/ExperimentRuns/{run}/VoxelSpacing{vs:.3f}/{tomo_type}.zarr
    {overlay root}/ExperimentRuns/{run}/Segmentations/{vs:.3f}_{user}_{session}_{name}-multilabel.zarr

Tomograms are OME-NGFF 0.4 on Zarr v2 in ångström, which :func:`tilesegment.pipeline.segment`
reads as it is. This module reads that layout itself and does not import copick: copick 1.x pins
``zarr<3`` (and ``numcodecs<0.16``), so it cannot share an environment with tileseg, which needs
Zarr 3. The tests check the result with copick itself, in copick's own environment.

The mask is written by ``segment`` (streamed, resumable) under a hidden staging name beside its
final one. copick skips names that start with a dot, so it never lists a half-written mask; the
store is renamed into place only once complete.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from typing import Any

from .errors import InputError, OptionError, OutputError, VoxelSizeError
from .lock import OutputLock

__all__ = ["CopickProject", "CopickResult", "load_project", "find_tomogram", "store_name", "check_name", "segment_copick",
           "spacing_notes", "label_notes"]

# what copick's sanitize_name refuses in object names, user and session ids: it would rewrite them
_BAD_NAME = re.compile(r'[<>:"/\\|?*\x00-\x1F\x7F\s_]')


@dataclass(frozen=True)
class CopickProject:
    """A local ``filesystem`` copick project: where it reads from and where it writes to."""

    config: str
    static_root: str  # tomograms shipped with the project (read-only to copick); the overlay root when unset
    overlay_root: str  # where copick writes new segmentations, picks and meshes
    objects: dict[str, int]  # pickable object name -> its label in multilabel masks

    def run_dirs(self, run: str) -> list[str]:
        roots = dict.fromkeys([self.static_root, self.overlay_root])  # static first, as copick lists them
        return [p for p in (os.path.join(r, "ExperimentRuns", run) for r in roots) if os.path.isdir(p)]

    def runs(self) -> list[str]:
        names = set()
        for root in {self.static_root, self.overlay_root}:
            base = os.path.join(root, "ExperimentRuns")
            if os.path.isdir(base):
                names.update(n for n in os.listdir(base) if not n.startswith(".") and os.path.isdir(os.path.join(base, n)))
        return sorted(names)


@dataclass(frozen=True)
class CopickResult:
    """Where the segmentation went, under which copick identity, and the run's report."""

    path: str
    run: str
    voxel_spacing: float
    tomogram: str
    name: str
    user_id: str
    session_id: str
    report: Any = None  # tilesegment.pipeline.RunReport; None if the segmentation was already complete
    notes: tuple[str, ...] = ()  # mismatches worth a look (voxel size, label values), for the CLI to print

    @property
    def store(self) -> str:
        return os.path.basename(self.path)


def _listing(items: list[str], limit: int = 12) -> str:
    if not items:
        return "none"
    shown = ", ".join(items[:limit])
    return shown + (f", … ({len(items)} in all)" if len(items) > limit else "")


def _local_root(url: Any, key: str, config: str) -> str:
    if not isinstance(url, str) or not url:
        raise InputError(f"{config}: copick config has no usable {key!r}.", "Give the project's folder, e.g. \"local:///data/project\".")
    match = re.match(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://(.*)$", url)
    if match and match.group(1).lower() not in ("local", "file"):
        raise InputError(f"{config}: {key} {url} is not on a local file system; tileseg copick reads and writes local projects only.",
                         "Copy or mount the project locally (e.g. 'copick sync') and point the config at that folder.")
    path = match.group(2) if match else url
    return os.path.abspath(os.path.expanduser(path)).rstrip(os.sep) or os.sep  # relative to the working folder, as copick does


def load_project(config: str | os.PathLike) -> CopickProject:
    """Read a copick config JSON; refuse anything but a local ``filesystem`` project, saying why."""
    config = os.fspath(config)
    try:
        with open(config, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise InputError(f"{config}: no such copick config.", "Give the project's config JSON (copick's --config).") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{config}: not a readable copick config ({type(exc).__name__}: {exc}).", "Give the project's config JSON.") from None
    if not isinstance(data, dict):
        raise InputError(f"{config}: not a copick config (a JSON object is expected).", "Give the project's config JSON.")
    kind = data.get("config_type", "filesystem")
    if kind != "filesystem":
        raise InputError(f"{config}: copick config_type {kind!r}; tileseg copick reads local 'filesystem' projects only.",
                         "Download the tomograms into a filesystem project (e.g. 'copick sync' or the portal's download tools) and use its config.")
    overlay = _local_root(data.get("overlay_root"), "overlay_root", config)
    static = _local_root(data["static_root"], "static_root", config) if data.get("static_root") else overlay
    objects = {}
    for item in data.get("pickable_objects") or []:
        if isinstance(item, dict) and isinstance(item.get("name"), str):
            label = item.get("label", 1)  # copick's default
            objects[item["name"]] = label if isinstance(label, int) else 1
    return CopickProject(config, static, overlay, objects)


def _spacing_dirs(run_dirs: list[str]) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for run_dir in run_dirs:
        for entry in sorted(os.listdir(run_dir)):
            if entry.startswith("VoxelSpacing") and os.path.isdir(os.path.join(run_dir, entry)):
                try:
                    key = f"{float(entry[len('VoxelSpacing'):]):.3f}"
                except ValueError:
                    continue
                found.setdefault(key, []).append(os.path.join(run_dir, entry))
    return found


def find_tomogram(project: CopickProject, run: str, voxel_spacing: float, tomo_type: str) -> tuple[str, float]:
    """``(path, voxel spacing)`` of a run's tomogram, or an error listing what the project has instead."""
    run_dirs = project.run_dirs(run) if _plain(run) else []
    if not run_dirs:
        raise InputError(f"copick project {project.config} has no run {run!r} (runs: {_listing(project.runs())}).", "Pass one of them to --run.")
    spacings = _spacing_dirs(run_dirs)
    key = f"{voxel_spacing:.3f}"
    if key not in spacings:
        raise InputError(f"run {run} has no voxel spacing {key} Å (voxel spacings: {_listing(sorted(spacings, key=float))}).",
                         "Pass one of them to --voxel-spacing.")
    types: list[str] = []
    for vs_dir in spacings[key]:  # static first, as copick lists them
        path = os.path.join(vs_dir, f"{tomo_type}.zarr")
        if _plain(tomo_type) and not tomo_type.startswith(".") and os.path.isdir(path):
            return path, float(key)
        types += [e[:-5] for e in sorted(os.listdir(vs_dir)) if e.endswith(".zarr") and not e.startswith(".")
                  and "features" not in e and os.path.isdir(os.path.join(vs_dir, e))]
    raise InputError(f"run {run} has no {tomo_type!r} tomogram at {key} Å (tomogram types: {_listing(sorted(set(types)))}).",
                     "Pass one of them to --tomo-type.")


def _plain(name: str) -> bool:
    """A single folder name: nothing that would lead out of the project."""
    return bool(name) and name not in (".", "..") and "/" not in name and os.sep not in name


def check_name(value: str, option: str) -> str:
    """copick rewrites names with ``_``, spaces or path characters, which would break its store names; refuse them."""
    if not value or _BAD_NAME.search(value) or value.strip("-") != value:
        fixed = _BAD_NAME.sub("-", value or "").strip("-") or "tileseg"
        raise OptionError(f"{option} {value!r} is not a valid copick name (no '_', spaces, path characters or leading/trailing '-').",
                          f"Use e.g. {option} {fixed}.")
    return value


def _resample_into_project(error: VoxelSizeError, project: CopickProject, run: str, tomogram: str, tomo_type: str, name: str) -> InputError:
    """A copick project holds a run's tomogram at several voxel spacings: name the copy at the model's
    that 'tileseg convert' writes into the overlay, and the command that segments it there."""
    if error.model_voxel is None:
        return error
    target = error.model_voxel
    copy = os.path.join(project.overlay_root, "ExperimentRuns", run, f"VoxelSpacing{target:.3f}", f"{tomo_type}.zarr")
    return InputError(error.what, f"Resample it into the project at the model's voxel size ('tileseg convert {tomogram} {copy} "
                                  f"--voxel-size {target:g}'), then segment that ('tileseg copick {project.config} --run {run} "
                                  f"--voxel-spacing {target:g} --tomo-type {tomo_type} --name {name}'); or pass --ignore-voxel-size.")


def store_name(voxel_spacing: float, user_id: str, session_id: str, name: str) -> str:
    """copick's name for a multilabel segmentation store (``copick.util.segmentation.segmentation_store_name``)."""
    return f"{voxel_spacing:.3f}_{user_id}_{session_id}_{name}-multilabel.zarr"


def segment_copick(config: str | os.PathLike, run: str, voxel_spacing: float, tomo_type: str, name: str, *,
                   user_id: str = "tileseg", session_id: str = "0", overwrite: bool = False, resume: bool = False,
                   **segment_options: Any) -> CopickResult:
    """Segment ``run``'s ``tomo_type`` tomogram at ``voxel_spacing`` Å into a copick multilabel segmentation.

    The mask (0 background, 1.. the model's classes, named in its ``image-label`` metadata) lands in
    the project's overlay as ``{vs}_{user_id}_{session_id}_{name}-multilabel.zarr``; session ``"0"``
    marks it as made by a tool in copick. Other keyword arguments go to
    :func:`tilesegment.pipeline.segment` (``model``, ``tile``, ``device``, ``scheduler``, ``client``, ...).
    """
    from .pipeline import segment

    for option, value in (("--name", name), ("--user-id", user_id), ("--session-id", session_id)):
        check_name(value, option)
    if segment_options.pop("ngff", "0.4") != "0.4" or segment_options.pop("shard", None) is not None:
        raise OptionError("copick reads OME-NGFF 0.4 on Zarr v2 only.", "Leave out --ngff and --shard for tileseg copick.")
    project = load_project(config)
    tomogram, spacing = find_tomogram(project, run, voxel_spacing, tomo_type)
    notes = spacing_notes(tomogram, spacing)
    folder = os.path.join(project.overlay_root, "ExperimentRuns", run, "Segmentations")
    final = os.path.join(folder, store_name(spacing, user_id, session_id, name))
    staging = os.path.join(folder, "." + os.path.basename(final))
    result = CopickResult(final, run, spacing, tomogram, name, user_id, session_id, notes=notes)
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create {folder}: {exc.strerror or exc}.", "Make the copick project's overlay_root writable.") from None
    with OutputLock(final):  # one writer per copick segmentation, including the final rename
        # a staging store beside a final one is a stopped --overwrite run: --resume finishes it
        if os.path.exists(final) and not overwrite and not (resume and os.path.exists(staging)):
            if resume:
                return result  # complete already: only complete stores are renamed into place
            raise OutputError(f"copick already lists {os.path.basename(final)} in run {run} ({final}).",
                              "Pass --overwrite to replace it, or choose another --session-id or --name.")
        try:
            report = segment(tomogram, staging, ngff="0.4", overwrite=overwrite, resume=resume, **segment_options)
        except VoxelSizeError as exc:
            raise _resample_into_project(exc, project, run, tomogram, tomo_type, name) from None
        if os.path.exists(final):
            shutil.rmtree(final)
        os.rename(staging, final)
    notes += label_notes(project, report.class_names)
    return CopickResult(final, run, spacing, tomogram, name, user_id, session_id, report, notes)


def spacing_notes(tomogram: str, spacing: float) -> tuple[str, ...]:
    """copick files the mask under the voxel spacing folder; note it if the tomogram's own metadata disagrees."""
    from .zarr_io import describe_zarr_input

    voxel = describe_zarr_input(tomogram).voxel_size
    if voxel is None or abs(max(voxel) / spacing - 1) <= 0.01:
        return ()
    return (f"{tomogram} records {max(voxel):.4g} Å/voxel but lies in VoxelSpacing{spacing:.3f}; the mask is filed under "
            f"{spacing:.3f} and keeps the tomogram's own scale.",)


def label_notes(project: CopickProject, class_names: tuple[str, ...]) -> tuple[str, ...]:
    """copick reads multilabel values as pickable objects' labels: note classes whose value differs from their object's."""
    notes = []
    for value, cls in enumerate(class_names[1:], start=1):
        label = project.objects.get(cls)
        if label is not None and label != value:
            notes.append(f"class {cls!r} is value {value} in the mask, but pickable object {cls!r} has label {label} in "
                         f"{project.config}; copick tools that map values to objects will misname it.")
    return tuple(notes)
