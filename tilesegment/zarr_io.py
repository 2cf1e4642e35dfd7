"""All Zarr I/O: creating OME-Zarr groups and arrays, and reading or writing one region.

Arrays are always addressed by path (a local path or an fsspec URL such as ``s3://bucket/seg.zarr/0``,
see :mod:`tilesegment.storage`) so that tasks carry strings, never open handles. A region
written here is always a whole number of write units (chunks for Zarr v2, shards for v3) or the
clipped end of the array, and each write unit is written by one task only: there is no
read-modify-write and no lock.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numcodecs
import numpy as np
import zarr
from zarr.codecs import BloscCodec

from .errors import InputError, OptionError, OutputError
from .geometry import Box, Shape, ceil_div, option_text, shape_option
from .ome import dataset_translations, dataset_voxel_sizes, read_ome_attrs, zarr_format_for
from .storage import describe_failure, exists, filesystem, is_url, parent, remedy, zarr_store
from .zarr_chunks import BLOSC_SHUFFLE, local_chunks

__all__ = [
    "ArraySpec",
    "Compression",
    "DEFAULT_COMPRESSION",
    "LABEL_COMPRESSION",
    "PROBABILITY_COMPRESSION",
    "intensity_compression",
    "ZarrInput",
    "create_group",
    "a_file_in_the_way",
    "create_array",
    "open_group",
    "open_array",
    "read_region",
    "region_reader",
    "write_region",
    "describe_zarr_input",
    "update_attrs",
    "read_attrs",
    "tileseg_meta",
    "write_unit",
    "output_spec",
]

COMPRESSION_LEVEL = 5


@dataclass(frozen=True)
class Compression:
    """Blosc/zstd settings of one array: zstd's level and Blosc's shuffle (``bitshuffle``,
    ``shuffle`` for bytes, ``noshuffle``)."""

    level: int = COMPRESSION_LEVEL
    shuffle: str = "bitshuffle"


#: Float intensities, and any array not given its own: zstd 5 with bitshuffle.
DEFAULT_COMPRESSION = Compression()

#: Labels: zstd 3 with bitshuffle. On a simulated 256³ tomogram's labels (benchmarks/compression.py)
#: it encodes 2.5× as fast as zstd 5 (16 MiB on one thread: 0.030 against 0.074 s; a GPU worker's
#: blocks write labels as fast as the network makes them) for files 8 % larger (26× against 28×
#: smaller than raw); zstd 1 is barely faster, 3 % larger again and decodes 1.5× as slow, where
#: viewers read labels many times.
LABEL_COMPRESSION = Compression(3, "bitshuffle")

#: Class probabilities by dtype, measured on a simulated 256³ tomogram's probability map
#: (benchmarks/RESULTS.md): zstd 1 encodes 3-6× as fast as zstd 5 with bitshuffle, and with byte
#: shuffle float16 and uint8 maps come out 3 % and 20 % smaller too; float32 keeps bitshuffle
#: (3 % larger at zstd 1; byte shuffle would be 10 %).
PROBABILITY_COMPRESSION = {"float16": Compression(1, "shuffle"), "uint8": Compression(1, "shuffle"),
                           "float32": Compression(1, "bitshuffle")}


def intensity_compression(dtype: Any) -> Compression:
    """How ``tileseg convert`` writes a tomogram, measured on a simulated one (benchmarks/RESULTS.md).
    Floats: zstd 5 with bitshuffle (float32 1.15×). Integers: bitshuffle splits their noise into
    bit planes that zstd cannot shrink (1.00×), so one-byte voxels are left unshuffled (int8 1.15×)
    and wider ones byte-shuffled at zstd 3 (int16 1.18×, at twice the encode time of level 5
    bitshuffle, which stored them uncompressed)."""
    dtype = np.dtype(dtype)
    if dtype.kind not in "iu":
        return DEFAULT_COMPRESSION
    return Compression(COMPRESSION_LEVEL, "noshuffle") if dtype.itemsize == 1 else Compression(3, "shuffle")


@dataclass(frozen=True)
class ArraySpec:
    """How to lay out one array: its chunk and (Zarr v3 only) shard shapes."""

    chunk: Shape
    shard: Shape | None = None


def output_spec(ngff: str, chunk: int | Sequence[int], shard: int | Sequence[int] | None) -> ArraySpec:
    """Check the user's layout options (NGFF version, chunk, shard) and return the array spec."""
    if ngff not in ("0.4", "0.5"):
        raise OptionError(f"--ngff {ngff} is not supported.", "Use 0.4 (Zarr v2) or 0.5 (Zarr v3).")
    if shard is not None and ngff == "0.4":
        raise OptionError("--shard needs Zarr v3.", "Add --ngff 0.5, or leave out --shard.")
    spec = ArraySpec(shape_option(chunk, "--chunk"), shape_option(shard, "--shard") if shard is not None else None)
    if spec.shard is not None and any(s % c for s, c in zip(spec.shard, spec.chunk)):
        fixed = tuple(max(c, round(s / c) * c) for s, c in zip(spec.shard, spec.chunk))
        raise OptionError(f"--shard {option_text(spec.shard)} is not a multiple of --chunk {option_text(spec.chunk)}.",
                          f"Make each shard a whole number of chunks, e.g. --shard {option_text(fixed)}.")
    return spec


def write_unit(spec: ArraySpec) -> Shape:
    """The smallest region one task may write alone: a shard if sharded, else a chunk."""
    return spec.shard or spec.chunk


def _compressor(zarr_format: int, dtype: np.dtype, compression: Compression = DEFAULT_COMPRESSION):
    if zarr_format == 2:
        return numcodecs.Blosc(cname="zstd", clevel=compression.level, shuffle=BLOSC_SHUFFLE[compression.shuffle])
    return BloscCodec(cname="zstd", clevel=compression.level, shuffle=compression.shuffle, typesize=np.dtype(dtype).itemsize)


def create_group(path: str, ngff: str, overwrite: bool = False) -> zarr.Group:
    """Create an empty group for an OME-Zarr of version ``ngff``; refuse to replace data unless asked."""
    try:
        there = exists(path)
    except Exception as exc:  # only URLs get here: no credentials, endpoint unreachable, ...
        raise OutputError(f"cannot create {path}: {describe_failure(exc)}.", remedy(path, exc)) from None
    if there and not overwrite:
        raise OutputError(f"{path} already exists{_what_is_there(path)}.", "Choose another output path, or pass --overwrite to replace it.")
    if there and not is_url(path) and not os.path.isdir(path):
        raise a_file_in_the_way(path)
    try:
        if is_url(path):
            _check_writable(path)
        return zarr.open_group(zarr_store(path, "w"), mode="w", zarr_format=zarr_format_for(ngff))
    except Exception as exc:
        if is_url(path):
            raise OutputError(f"cannot create {path}: {describe_failure(exc)}.", remedy(path, exc)) from None
        if isinstance(exc, OSError):
            raise OutputError(f"cannot create {path}: {exc.strerror or exc}.", "Check that the parent folder exists and is writable.") from None
        raise


def a_file_in_the_way(path: str) -> OutputError:
    """A file where an output store would go (the tomogram itself, say): --overwrite replaces stores only."""
    return OutputError(f"{path} is a file, not a Zarr store; --overwrite replaces a store, never a file.",
                       "Give the output a name of its own, ending in .zarr.")


def _check_writable(url: str) -> None:
    """One small PUT (then removed) before Zarr's concurrent writes: a missing bucket or a denied
    write fails here, cleanly, rather than inside a batch of writes that Zarr abandons half-done."""
    fs, key = filesystem(url)
    probe = f"{key.rstrip('/')}/.tilesegment-write-check"
    fs.pipe_file(probe, b"")
    fs.rm_file(probe)


def open_group(path: str, mode: str = "r") -> zarr.Group:
    return zarr.open_group(zarr_store(path, mode), mode=mode)


def open_array(path: str, mode: str = "r") -> zarr.Array:
    return zarr.open_array(zarr_store(path, mode), mode=mode)


def create_array(group: zarr.Group, name: str, shape: tuple[int, ...], dtype: Any, spec: ArraySpec,
                 channels: int | None = None, fill_value: Any = 0, compression: Compression = DEFAULT_COMPRESSION) -> zarr.Array:
    """Create a compressed (Blosc/zstd) array; a leading channel axis gets chunk 1."""
    zarr_format = group.metadata.zarr_format
    chunks: tuple[int, ...] = tuple(min(c, n) for c, n in zip(spec.chunk, shape[-3:]))
    shards = None
    if spec.shard is not None and zarr_format == 3:
        # a shard must stay a whole number of chunks: trim it to the chunks the axis needs, not to the axis
        shards = tuple(min(s, ceil_div(n, c) * c) for s, c, n in zip(spec.shard, chunks, shape[-3:]))
    dims = ("z", "y", "x")
    if channels is not None:
        shape = (channels, *shape)
        chunks = (1, *chunks)
        shards = (1, *shards) if shards else None
        dims = ("c", *dims)
    kwargs: dict[str, Any] = dict(
        shape=shape, chunks=chunks, dtype=dtype, compressors=_compressor(zarr_format, dtype, compression), fill_value=fill_value,
    )
    if zarr_format == 3:
        kwargs.update(shards=shards, dimension_names=dims)
    else:
        kwargs.update(chunk_key_encoding={"name": "v2", "separator": "/"})
    return group.create_array(name, **kwargs)


def update_attrs(path: str, attrs: dict[str, Any]) -> None:
    open_group(path, mode="r+").attrs.update(attrs)


def read_attrs(path: str) -> dict[str, Any]:
    """The root attributes of the group at ``path`` (``{}`` if there is no readable group)."""
    try:
        return dict(open_group(path).attrs)
    except Exception:
        return {}


def read_region(path: str, box: Box) -> np.ndarray:
    """Read ``box`` of the (z, y, x) or (c, z, y, x) array at ``path``."""
    return region_reader(path)(box)


def region_reader(path: str) -> Callable[[Box], np.ndarray]:
    """:func:`read_region` for many boxes of one array, opened once (about 1 ms an opening). A
    local array laid out as tileseg lays out its own is read chunk file by chunk file
    (:mod:`tilesegment.zarr_chunks`), the rest through zarr."""
    chunks = None if is_url(path) else local_chunks(path, lambda: open_array(path))
    array = None

    def read(box: Box) -> np.ndarray:
        nonlocal array
        if chunks is not None and chunks.holds(box):
            return chunks.read(box)
        if array is None:
            array = open_array(path)
        return np.asarray(array[(Ellipsis, *box.slices())])

    return read


def write_region(path: str, box: Box, data: np.ndarray) -> None:
    """Write ``data`` into ``box`` (whole write units only; see module docstring). A local array
    laid out as tileseg lays out its own is written chunk by chunk directly, the same bytes as zarr
    writes in under half the time (:mod:`tilesegment.zarr_chunks`); any other through zarr."""
    if not is_url(path):
        writer = local_chunks(path, lambda: open_array(path, mode="r+"))
        if writer is not None and writer.covers(box, data):
            writer.write(box, data)
            return
    array = open_array(path, mode="r+")
    array[(Ellipsis, *box.slices())] = data


@dataclass(frozen=True)
class ZarrInput:
    """A 3D array to segment inside a Zarr store, with what its OME metadata says about it."""

    array_path: str
    shape: Shape
    dtype: str
    voxel_size: tuple[float, float, float] | None
    levels: tuple[str, ...]  # all pyramid levels (finest first) when the input is an OME-Zarr group
    origin: tuple[float, float, float] = (0.0, 0.0, 0.0)  # (z, y, x) Å, as 'tileseg convert' kept it from the MRC
    label_image: bool = False  # an OME-Zarr label image (a segmentation), not an image
    made_from: str | None = None  # the input a tileseg output records
    status: str | None = None  # a tileseg output's 'complete' or 'incomplete' (None: not tileseg's)
    level_voxel_sizes: tuple[tuple[float, float, float] | None, ...] = ()  # of each of ``levels``, where the metadata say
    translation: tuple[float, float, float] = (0.0, 0.0, 0.0)  # (z, y, x) Å of the first voxel's centre, from its OME metadata
    resampled: dict[str, Any] | None = None  # what 'tileseg convert --voxel-size' resampled level 0 from


def _translation(ome: dict[str, Any], dataset: str | None = None) -> tuple[float, float, float]:
    """Where the image's ``dataset`` (its finest when None) starts, by its OME metadata; 0 where they do not say."""
    try:
        entry = ome["multiscales"][0]
        names = [d["path"] for d in entry["datasets"]]
        return dataset_translations(entry)[0 if dataset is None else names.index(dataset)]
    except (KeyError, IndexError, StopIteration, TypeError, ValueError):
        return (0.0, 0.0, 0.0)


def _voxel_size(ome: dict[str, Any], dataset: str | None = None) -> tuple[float, float, float] | None:
    """Å per voxel of the image's ``dataset`` (its finest when None); None where the metadata do not say."""
    try:
        entry = ome["multiscales"][0]
        sizes = dataset_voxel_sizes(entry)
        if dataset is None:
            return sizes[0]
        names = [d["path"] for d in entry["datasets"]]
        return sizes[names.index(dataset)] if dataset in names else None
    except (KeyError, IndexError, StopIteration, TypeError, ValueError):
        return None


_ZARR_METADATA = (".zgroup", ".zarray", "zarr.json")


def describe_zarr_input(path: str) -> ZarrInput:
    """Find the volume in a Zarr array or OME-Zarr group, or say clearly why there is none."""
    if not is_url(path) and os.path.isdir(path) and not any(os.path.exists(os.path.join(path, name)) for name in _ZARR_METADATA):
        tomograms = sorted(name for name in os.listdir(path) if name.lower().endswith((".mrc", ".rec", ".map", ".st", ".zarr")))
        hint = (f"It holds {', '.join(tomograms[:4])}{' and more' if len(tomograms) > 4 else ''}: give one of those."
                if tomograms else "Give an .mrc file, a Zarr array, or an OME-Zarr group (e.g. from 'tileseg convert').")
        raise InputError(f"{path}: a folder, but not a Zarr store (no .zgroup, .zarray or zarr.json in it).", hint)
    try:
        node = zarr.open(zarr_store(path), mode="r")
    except Exception as exc:
        if is_url(path) and not isinstance(exc, (zarr.errors.BaseZarrError, ValueError, KeyError, TypeError, FileNotFoundError)):
            raise InputError(f"{path}: cannot be read: {describe_failure(exc)}.", remedy(path, exc)) from None
        raise InputError(f"{path}: not a readable Zarr store ({type(exc).__name__}: {exc}).",
                         "Give an .mrc file, a Zarr array, or an OME-Zarr group (e.g. from 'tileseg convert').") from None
    attrs: dict[str, Any] = {}  # the image group's (an array's parent's)
    if isinstance(node, zarr.Array):
        array, array_path, levels, voxel, origin, translation, resampled = node, path, (path,), None, (0.0, 0.0, 0.0), (0.0, 0.0, 0.0), None
        names = []
        folder = parent(path) if is_url(path) else os.path.dirname(path.rstrip("/"))
        if folder and (is_url(folder) or os.path.exists(folder)):
            try:
                attrs = dict(open_group(folder).attrs)
            except Exception:
                attrs = {}
            try:
                level = path.rstrip("/").rsplit("/", 1)[-1]
                voxel = _voxel_size(read_ome_attrs(attrs), level)  # this level's, not the finest's
                translation = _translation(read_ome_attrs(attrs), level)
            except Exception:
                voxel = None
    else:
        attrs = dict(node.attrs)
        ome = read_ome_attrs(attrs)
        if "multiscales" in ome:
            names = [d["path"] for d in ome["multiscales"][0]["datasets"]]
        else:
            names = [k for k, v in node.arrays() if v.ndim == 3][:1]
        if not names or names[0] not in node:
            found = json.dumps(sorted(node.keys()))
            raise InputError(f"{path}: Zarr group holds no usable 3D array (members: {found}).",
                             "Point INPUT at the array itself (e.g. tomo.zarr/0) or at an OME-Zarr image group.")
        levels = tuple(f"{path.rstrip('/')}/{n}" for n in names if n in node)
        array_path = levels[0]
        array = node[names[0]]
        voxel = _voxel_size(ome)
        translation = _translation(ome)
        origin = _recorded_origin(dict(node.attrs))
        ours = attrs.get("tilesegment")
        resampled = ours.get("resampled") if isinstance(ours, dict) and isinstance(ours.get("resampled"), dict) else None
    # OME-Zarr images are often (t, c, z, y, x) or (c, z, y, x) with one time point and channel:
    # such an image is its volume (volume.read_native drops the single leading axes)
    if array.ndim < 3 or any(n != 1 for n in array.shape[:-3]):
        what = (f"{math.prod(array.shape[:-3])} channels or time points of a {'×'.join(map(str, array.shape[-3:]))} volume"
                if array.ndim > 3 else "not a volume")
        raise InputError(f"{path}: array has {array.ndim} dimensions {tuple(array.shape)}, {what}; tileseg segments one 3D (z, y, x) volume.",
                         "Save the channel or time point to segment as a 3D array (an MRC file or a Zarr array) and give that.")
    if array.dtype.kind not in "iuf":
        raise InputError(f"{path}: array dtype {array.dtype} is not numeric.", "Give an integer or float volume.")
    sizes = tuple(_voxel_size(ome, n) for n in names if f"{path.rstrip('/')}/{n}" in levels) if names else (voxel,)
    return ZarrInput(array_path, tuple(int(n) for n in array.shape[-3:]), array.dtype.str, voxel, levels, origin,  # type: ignore[arg-type]
                     *tileseg_meta(attrs), level_voxel_sizes=sizes, translation=translation,
                     resampled=resampled)


def _what_is_there(path: str) -> str:
    """``: an unfinished ... of X`` for a store tileseg left incomplete (a stopped convert), else nothing."""
    try:
        _, made_from, status = tileseg_meta(read_attrs(path))
    except Exception:
        return ""
    return f": an unfinished 'tileseg convert' or run of {made_from} (its status is incomplete)" if status == "incomplete" and made_from else ""


def tileseg_meta(attrs: dict[str, Any]) -> tuple[bool, str | None, str | None]:
    """What a group's attributes say it is: a label image (OME ``image-label``, or a ``tileseg run``
    output, which has that metadata only once complete), the input a tileseg output records
    (run's ``input``, convert's ``source``), and a tileseg output's status."""
    ours = attrs.get("tilesegment")
    ours = ours if isinstance(ours, dict) else {}
    try:
        labels = "run" in ours or "image-label" in read_ome_attrs(attrs)
    except Exception:
        labels = "run" in ours
    made_from, status = ours.get("input") or ours.get("source"), ours.get("status")
    return labels, str(made_from) if made_from else None, str(status) if status else None


def _recorded_origin(attrs: dict[str, Any]) -> tuple[float, float, float]:
    try:
        z, y, x = (float(v) for v in attrs["tilesegment"]["origin_angstrom"])
        return (z, y, x)
    except (KeyError, TypeError, ValueError):
        return (0.0, 0.0, 0.0)
