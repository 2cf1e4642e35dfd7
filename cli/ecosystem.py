"""The commands that take a segmentation to other tools: ``export`` (MRC) and ``preview`` (PNG)."""

from __future__ import annotations

import click

from .common import handle_errors, show_progress


@click.command()
@click.argument("output", metavar="OUTPUT.zarr", type=click.Path())
@click.argument("mask", metavar="MASK.mrc", type=click.Path())
@click.option("--probabilities", "probabilities", metavar="PROBS.mrc", default=None,
              help="Also write the probabilities as float32 MRC: the foreground class for 1- and 2-class models, "
                   "else one file per foreground class (PROBS_<label>_<class>.mrc).")
@click.option("--level", type=int, default=0, show_default=True, help="Pyramid level to export (0 = full resolution, 1 = 2× binned, ...).")
@click.option("--overwrite", is_flag=True, help="Replace existing MRC files.")
@click.pass_context
@handle_errors
def export(ctx: click.Context, output: str, mask: str, probabilities: str | None, level: int, overwrite: bool) -> None:
    """Write a finished segmentation as MRC: the label mask (mode 0, int8) and optionally probabilities (mode 2).

    Shape, voxel size and origin are the input tomogram's, so the mask overlays it in IMOD, ChimeraX
    or Amira. Streamed slab by slab; files appear only once complete.

    \b
    Example:
      tileseg export seg.zarr seg_mask.mrc
      tileseg export seg.zarr seg_mask.mrc --probabilities seg_probs.mrc --level 1
    """
    from tqdm import tqdm

    from tilesegment.export import export as run_export

    quiet = ctx.find_root().obj["quiet"]
    with tqdm(total=None, unit="vox", unit_scale=True, disable=not show_progress(quiet), desc="export") as bar:
        report = run_export(output, mask, probabilities=probabilities, level=level, overwrite=overwrite, progress=bar.update)
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
@click.argument("png", metavar="PREVIEW.png", type=click.Path(dir_okay=False))
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
