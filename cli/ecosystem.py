"""The commands that connect tileseg to other tools: ``export`` (MRC), ``preview`` (PNG) and ``copick`` (copick projects)."""

from __future__ import annotations

import sys
from typing import Any

import click

from .common import IGNORE_VOXEL_SIZE_OPTION, PROBABILITY_DTYPE_OPTION, SEGMENTATION_OPTIONS, handle_errors, parse_shape, progress_bar, with_options


@click.command()
@click.argument("output", metavar="OUTPUT.zarr", type=click.Path())
@click.argument("mask", metavar="MASK.mrc", type=click.Path())
@click.option("--probabilities", "probabilities", metavar="PROBS.mrc", default=None,
              help="Also write the probabilities as float32 MRC: the foreground class for 1- and 2-class models, "
                   "else one file per foreground class (PROBS_<label>_<class>.mrc).")
@click.option("--level", type=int, default=0, show_default=True, help="Pyramid level to export (0 = full resolution, 1 = 2× binned, ...).")
@click.option("--original-grid", "original", is_flag=True,
              help="For a tomogram resampled by 'tileseg convert --voxel-size': write the mask on the grid it was resampled from "
                   "(its shape, voxel size and origin), each voxel taking the nearest resampled voxel's label.")
@click.option("--overwrite", is_flag=True, help="Replace existing MRC files.")
@click.pass_context
@handle_errors
def export(ctx: click.Context, output: str, mask: str, probabilities: str | None, level: int, original: bool, overwrite: bool) -> None:
    """Write a finished segmentation as MRC: the label mask (mode 0, int8) and optionally probabilities (mode 2).

    Shape, voxel size and origin are the input tomogram's, so the mask overlays it in IMOD, ChimeraX
    or Amira. Streamed slab by slab; files appear only once complete.

    \b
    Example:
      tileseg export seg.zarr seg_mask.mrc
      tileseg export seg.zarr seg_mask.mrc --probabilities seg_probs.mrc --level 1
      tileseg export seg_10A.zarr mask_13.48A.mrc --original-grid
    """
    from tilesegment.export import export as run_export

    quiet = ctx.find_root().obj["quiet"]
    with progress_bar(quiet, total=None, unit="vox", unit_scale=True, desc="export") as bar:
        report = run_export(output, mask, probabilities=probabilities, level=level, overwrite=overwrite, original=original,
                            progress=bar.update)
    if not quiet:
        voxel = "×".join(f"{v:.4g}" for v in report.voxel_size[::-1])
        files = ", ".join([report.mask, *report.probabilities])
        click.echo(f"wrote {files}: {'×'.join(map(str, report.shape))} (z, y, x), {voxel} Å/voxel (x, y, z), "
                   f"origin {', '.join(f'{v:g}' for v in report.origin)} Å, {report.seconds:.1f} s")


def _position(value: str | None) -> tuple[int, int, int] | None:
    if value is None:
        return None
    try:
        parts = tuple(int(v) for v in value.split(","))
    except ValueError:
        parts = ()
    if len(parts) != 3:
        raise click.BadParameter(f"{value!r} is not a position; give Z,Y,X voxel indices such as 40,128,128.", param_hint="--position")
    return parts  # type: ignore[return-value]


@click.command()
@click.argument("output", metavar="OUTPUT.zarr", type=click.Path())
@click.argument("png", metavar="PREVIEW.png", type=click.Path())
@click.option("--tomogram", default=None, metavar="INPUT", help="Tomogram to draw under the mask (MRC or OME-Zarr); default: the run's input.")
@click.option("--level", type=int, default=None, help="Pyramid level (default: the finest that keeps the picture within about 1024 pixels).")
@click.option("--position", default=None, metavar="Z,Y,X", help="Where the three slices cross, in full-resolution voxels (default: the centre).")
@click.pass_context
@handle_errors
def preview(ctx: click.Context, output: str, png: str, tomogram: str | None, level: int | None, position: str | None) -> None:
    """Draw the xy, xz and yz slices of a segmentation over its tomogram into a PNG.

    The tomogram is in grey (1st-99th percentile contrast), each label in its colour from the
    label image's metadata, with a legend of class names. Only the three slices are read.

    \b
    Example:
      tileseg preview seg.zarr seg.png
      tileseg preview seg.zarr seg.png --tomogram tomo.zarr --position 60,256,256
    """
    from tilesegment.preview import preview as run_preview

    report = run_preview(output, png, tomogram=tomogram, level=level, position=_position(position))
    quiet = ctx.find_root().obj["quiet"]
    if report.note and not quiet:
        click.echo(f"tileseg: note: {report.note}", err=True)
    if not quiet:
        z, y, x = report.position
        click.echo(f"wrote {report.path}: {report.size[0]}×{report.size[1]} px, slices through z={z} y={y} x={x}, level {report.level}")


@click.command("copick")
@click.argument("config", metavar="CONFIG.json", type=click.Path(dir_okay=False))
@click.option("--run", "run_name", required=True, help="copick run (e.g. TS_001).")
@click.option("--voxel-spacing", type=float, required=True, help="Voxel spacing of the tomogram, in Å (copick's VoxelSpacing folder, e.g. 10).")
@click.option("--tomo-type", required=True, help="Tomogram type (e.g. wbp, denoised).")
@click.option("--name", required=True, help="Name of the multilabel segmentation (e.g. macromolecule).")
@click.option("--user-id", default="tileseg", show_default=True, help="copick user or tool id of the segmentation.")
@click.option("--session-id", default="0", show_default=True, help="copick session id (\"0\": made by a tool).")
@with_options(*SEGMENTATION_OPTIONS)
@click.option("--probabilities", is_flag=True, help="Also write the class probabilities (under probabilities/ in the segmentation's store).")
@PROBABILITY_DTYPE_OPTION
@click.option("--overwrite", is_flag=True, help="Replace the segmentation if copick already lists it.")
@click.option("--resume", is_flag=True, help="Finish a stopped run (same options), computing only its unfinished blocks.")
@IGNORE_VOXEL_SIZE_OPTION
@click.pass_context
@handle_errors
def copick(ctx: click.Context, config: str, run_name: str, voxel_spacing: float, tomo_type: str, name: str, tile: str,
           block: str | None, chunk: str, **options: Any) -> None:
    """Segment a tomogram of a copick project into a copick multilabel segmentation.

    Reads ExperimentRuns/RUN/VoxelSpacingVS/TOMO_TYPE.zarr (static or overlay root) and writes
    ExperimentRuns/RUN/Segmentations/VS_USER_SESSION_NAME-multilabel.zarr in the overlay root,
    where copick lists it (0 background, 1.. the model's classes). Local filesystem projects only.
    The store appears only once complete; --resume finishes a stopped run.

    \b
    Examples:
      tileseg copick copick.json --run TS_001 --voxel-spacing 10 --tomo-type wbp --name macromolecule
      tileseg copick copick.json --run TS_001 --voxel-spacing 10 --tomo-type denoised --name macromolecule \\
          --device cuda --batch 8 --session-id 1
      tileseg copick copick.json --run TS_001 --voxel-spacing 10 --tomo-type wbp --name macromolecule --resume
    """
    from tilesegment.copick_io import segment_copick

    quiet = ctx.find_root().obj["quiet"]
    bar = progress_bar(quiet, total=0, unit="tile", desc="segment", dynamic_ncols=True)

    def on_start(plan: Any, link: str | None) -> None:
        bar.total = plan.grid.count
        bar.refresh()
        if link and not quiet:
            bar.write(f"Dask dashboard: {link}", file=sys.stderr)

    with bar:
        result = segment_copick(config, run_name, voxel_spacing, tomo_type, name, tile=parse_shape(tile, "--tile"), block=parse_shape(block, "--block"),
                                chunk=parse_shape(chunk, "--chunk"), progress=bar.update, on_start=on_start, **options)
    if quiet:
        return
    for note in result.notes:
        click.echo(f"tileseg: note: {note}", err=True)
    where = f"run {result.run}, {result.voxel_spacing:.3f} Å, user {result.user_id}, session {result.session_id}"
    report = result.report
    if report is None or report.extra.get("already_complete"):
        click.echo(f"{result.path} is already complete ({where}); nothing to do.")
        return
    labels = ", ".join(f"{value}={cls}" for value, cls in enumerate(report.class_names))
    click.echo(f"wrote copick multilabel segmentation {result.store} ({where}): {'×'.join(map(str, report.shape))} labels {labels}; "
               f"{report.tiles_forwarded}/{report.tile_count} tiles, {report.seconds:.1f} s -> {result.path}")
