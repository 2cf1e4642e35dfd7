"""OME-NGFF metadata as plain dicts (no I/O), for versions 0.4 (Zarr v2) and 0.5 (Zarr v3).

0.4 on Zarr v2 is what the CryoET Data Portal, copick and most napari/neuroglancer set-ups read
today, so it is the default; 0.5 on Zarr v3 adds sharding (far fewer files for big volumes).
"""

from __future__ import annotations

from typing import Any, Sequence

__all__ = ["NGFF_VERSIONS", "zarr_format_for", "multiscales", "image_label", "ome_attrs", "read_ome_attrs", "LABEL_COLORS",
           "UNIT_TO_ANGSTROM", "dataset_voxel_sizes", "dataset_translations", "level_translation", "label_classes", "label_colors"]

NGFF_VERSIONS = ("0.4", "0.5")

# Distinct, colour-blind-friendly label colours (Okabe-Ito), RGBA 0-255; label 0 is transparent.
LABEL_COLORS = [
    (230, 159, 0, 255), (86, 180, 233, 255), (0, 158, 115, 255), (240, 228, 66, 255),
    (0, 114, 178, 255), (213, 94, 0, 255), (204, 121, 167, 255), (128, 128, 128, 255),
]


def zarr_format_for(ngff: str) -> int:
    return 2 if ngff == "0.4" else 3


def _axes(channel: bool) -> list[dict[str, str]]:
    axes = [{"name": "c", "type": "channel"}] if channel else []
    return axes + [{"name": a, "type": "space", "unit": "angstrom"} for a in ("z", "y", "x")]


def level_translation(voxel_size: Sequence[float], factor: int, method: str, translation: Sequence[float] | None = None) -> list[float]:
    """Where the first voxel's centre of a level ``factor``× downsampled by ``method`` lies (z, y, x Å),
    given level 0's at ``translation``. A 2× mean averages voxels 0 and 1, so its first centre lies half
    a level-0 voxel further on, ``(factor - 1) / 2`` voxels at ``factor``; every second voxel
    (nearest) keeps voxel 0. Without it a viewer shows each coarser level of an image shifted."""
    start = translation if translation is not None else (0.0, 0.0, 0.0)
    shift = (factor - 1) / 2 if method == "mean" else 0.0
    return [float(t) + shift * float(v) for t, v in zip(start, voxel_size)]


def multiscales(
    name: str,
    paths: Sequence[str],
    voxel_size: Sequence[float],
    factors: Sequence[int],
    ngff: str,
    channel: bool = False,
    method: str = "mean",
    translation: Sequence[float] | None = None,
) -> dict[str, Any]:
    """A ``multiscales`` entry: level ``i`` at ``paths[i]`` is downsampled ``factors[i]``× in z, y, x;
    ``translation`` places level 0's first voxel centre (z, y, x Å; 0 when None) and each level gets
    its own (:func:`level_translation`), so every level overlays the others and the input's grid."""
    datasets = []
    for path, factor in zip(paths, factors):
        scale = [float(v) * factor for v in voxel_size]
        shift = level_translation(voxel_size, factor, method, translation)
        if channel:
            scale, shift = [1.0] + scale, [0.0] + shift
        datasets.append({"path": path, "coordinateTransformations": [{"type": "scale", "scale": scale},
                                                                     {"type": "translation", "translation": shift}]})
    entry: dict[str, Any] = {
        "name": name,
        "axes": _axes(channel),
        "datasets": datasets,
        "type": method,
        "metadata": {"method": "tilesegment.pyramid", "description": f"2x {method} downsampling"},
    }
    if ngff == "0.4":
        entry = {"version": "0.4", **entry}
    return entry


def image_label(class_names: Sequence[str], ngff: str, source: str | None = None) -> dict[str, Any]:
    """``image-label`` metadata: a colour and a class name for every label value but background 0."""
    colors = [{"label-value": 0, "rgba": [0, 0, 0, 0]}]
    properties = [{"label-value": 0, "class": class_names[0] if class_names else "background"}]
    for value, name in enumerate(class_names[1:], start=1):
        colors.append({"label-value": value, "rgba": list(LABEL_COLORS[(value - 1) % len(LABEL_COLORS)])})
        properties.append({"label-value": value, "class": name})
    entry: dict[str, Any] = {"colors": colors, "properties": properties}
    if source:
        entry["source"] = {"image": source}
    if ngff == "0.4":
        entry = {"version": "0.4", **entry}
    return entry


def ome_attrs(ngff: str, **entries: Any) -> dict[str, Any]:
    """Group attributes holding the OME entries where each version puts them."""
    if ngff == "0.4":
        return dict(entries)
    return {"ome": {"version": "0.5", **entries}}


def read_ome_attrs(attrs: dict[str, Any]) -> dict[str, Any]:
    """The OME entries of a group's attributes, whichever version wrote them."""
    return dict(attrs.get("ome", attrs))


UNIT_TO_ANGSTROM = {"angstrom": 1.0, "nanometer": 10.0, "micrometer": 1e4, "picometer": 0.01}


def dataset_voxel_sizes(entry: dict[str, Any]) -> list[tuple[float, float, float]]:
    """Å per voxel (z, y, x) of every dataset of one ``multiscales`` entry, from its scale and axis units.

    Raises ``KeyError``/``ValueError`` for an entry that has no usable scale; callers say which file.
    """
    units = _spatial_units(entry)
    # a scale for the whole image, after each dataset's (NGFF: "applied after the dataset transformations")
    overall = next((t["scale"] for t in entry.get("coordinateTransformations") or [] if t.get("type") == "scale"), None)
    sizes = []
    for dataset in entry["datasets"]:
        scale = next(t["scale"] for t in dataset["coordinateTransformations"] if t["type"] == "scale")
        if len(scale) < 3 or any(u not in UNIT_TO_ANGSTROM for u in units) or (overall is not None and len(overall) != len(scale)):
            raise ValueError(f"unusable scale {scale} with units {units}")
        factors = overall[-3:] if overall is not None else (1.0, 1.0, 1.0)
        sizes.append(tuple(float(s) * float(f) * UNIT_TO_ANGSTROM[u] for s, f, u in zip(scale[-3:], factors, units)))
    return sizes  # type: ignore[return-value]


def _spatial_units(entry: dict[str, Any]) -> list[str]:
    """The units of the last three axes (ångström where none is given)."""
    return [a.get("unit") or "angstrom" for a in entry.get("axes", [])][-3:] or ["angstrom"] * 3


def _transform(transforms: Sequence[dict[str, Any]] | None, kind: str) -> list[float] | None:
    return next((list(t[kind]) for t in transforms or [] if t.get("type") == kind and kind in t), None)


def dataset_translations(entry: dict[str, Any]) -> list[tuple[float, float, float]]:
    """Where the first voxel's centre of every dataset of one ``multiscales`` entry lies (z, y, x Å):
    its translation, then the whole image's scale and translation (NGFF applies those after).
    Zero where the metadata give none; raises ``KeyError``/``ValueError`` as :func:`dataset_voxel_sizes`."""
    units = _spatial_units(entry)
    if any(u not in UNIT_TO_ANGSTROM for u in units):
        raise ValueError(f"unusable units {units}")
    overall = entry.get("coordinateTransformations")
    overall_scale = (_transform(overall, "scale") or [1.0, 1.0, 1.0])[-3:]
    overall_shift = (_transform(overall, "translation") or [0.0, 0.0, 0.0])[-3:]
    starts = []
    for dataset in entry["datasets"]:
        shift = (_transform(dataset["coordinateTransformations"], "translation") or [0.0, 0.0, 0.0])[-3:]
        if len(shift) < 3 or len(overall_scale) < 3 or len(overall_shift) < 3:
            raise ValueError(f"unusable translation {shift}")
        starts.append(tuple((float(t) * float(s) + float(o)) * UNIT_TO_ANGSTROM[u]
                            for t, s, o, u in zip(shift, overall_scale, overall_shift, units)))
    return starts  # type: ignore[return-value]


def label_classes(entry: dict[str, Any]) -> dict[int, str]:
    """Label value -> class name from ``image-label`` properties (those without a name are left out)."""
    names = {}
    for item in entry.get("properties") or []:
        if "label-value" in item and isinstance(item.get("class"), str):
            names[int(item["label-value"])] = item["class"]
    return names


def label_colors(entry: dict[str, Any]) -> dict[int, tuple[int, int, int, int]]:
    """Label value -> RGBA (0-255) from ``image-label`` colors."""
    colors = {}
    for item in entry.get("colors") or []:
        rgba = item.get("rgba")
        if "label-value" in item and isinstance(rgba, (list, tuple)) and len(rgba) == 4:
            colors[int(item["label-value"])] = tuple(int(c) for c in rgba)
    return colors  # type: ignore[return-value]
