"""OME-NGFF metadata as plain dicts (no I/O), for versions 0.4 (Zarr v2) and 0.5 (Zarr v3).

0.4 on Zarr v2 is what the CryoET Data Portal, copick and most napari/neuroglancer set-ups read
today, so it is the default; 0.5 on Zarr v3 adds sharding (far fewer files for big volumes).
"""

from __future__ import annotations

from typing import Any, Sequence

__all__ = ["NGFF_VERSIONS", "zarr_format_for", "multiscales", "image_label", "ome_attrs", "read_ome_attrs", "LABEL_COLORS"]

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


def multiscales(
    name: str,
    paths: Sequence[str],
    voxel_size: Sequence[float],
    factors: Sequence[int],
    ngff: str,
    channel: bool = False,
    method: str = "mean",
) -> dict[str, Any]:
    """A ``multiscales`` entry: level ``i`` at ``paths[i]`` is downsampled ``factors[i]``× in z, y, x."""
    datasets = []
    for path, factor in zip(paths, factors):
        scale = [float(v) * factor for v in voxel_size]
        if channel:
            scale = [1.0] + scale
        datasets.append({"path": path, "coordinateTransformations": [{"type": "scale", "scale": scale}]})
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
