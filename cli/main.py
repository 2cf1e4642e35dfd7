"""``tileseg``: a thin click layer. Each command parses, calls one library function, and maps
:class:`~tilesegment.errors.TilesegError` to a one-line message and its exit code (no traceback
unless ``--debug``)."""

from __future__ import annotations

import dataclasses
import logging
import sys
from typing import Any, Callable, Sequence

import click

from tilesegment import __version__

from .common import (IGNORE_VOXEL_SIZE_OPTION, PROBABILITY_DTYPE_OPTION, SEGMENTATION_OPTIONS, configure_logging, echo_json, handle_errors,
                     parse_shape, progress_bar, with_options)

log = logging.getLogger("tilesegment.cli")

@click.group(context_settings={"help_option_names": ["-h", "--help"], "auto_envvar_prefix": "TILESEG"})
@click.version_option(__version__, prog_name="tileseg")
@click.option("-v", "--verbose", count=True, help="More messages: -v what tileseg does, -vv also Dask's.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars or summaries, errors only.")
@click.option("--debug", is_flag=True, help="Everything, and tracebacks for errors.")
@click.pass_context
def main(ctx: click.Context, verbose: int, quiet: bool, debug: bool) -> None:
    """Segment macromolecules in whole cryo-ET tomograms with 3D CNNs, tile by tile on Dask.

    \b
    Examples:
      tileseg demo                                  # simulate, segment and score a tomogram
      tileseg convert tomo.mrc tomo.zarr
      tileseg run tomo.zarr seg.zarr --device cuda
      tileseg preview seg.zarr seg.png
    """
    configure_logging(-1 if quiet else 3 if debug else verbose)
    ctx.obj = {"quiet": quiet}


@main.command()
@click.argument("input_path", metavar="INPUT.mrc", type=click.Path())  # a folder gets tileseg's own line (tilesegment.mrc)
@click.argument("output", metavar="OUTPUT.zarr", type=click.Path())
@click.option("--ngff", type=click.Choice(["0.4", "0.5"]), default="0.4", show_default=True,
              help="OME-Zarr version: 0.4 on Zarr v2 (read by the CryoET Data Portal, copick, most viewers) or 0.5 on Zarr v3 (with sharding).")
@click.option("--chunk", default="64", show_default=True, help="Chunk shape, N or Z,Y,X.")
@click.option("--shard", default=None, help="Shard shape for --ngff 0.5 (a multiple of --chunk).")
@click.option("--levels", type=int, default=None, help="Pyramid levels (default: until an axis would be < 16).")
@click.option("--voxel-size", type=float, default=None, metavar="ANGSTROM",
              help="Resample to this voxel size in Å (the model's: 10 for the default model) instead of copying the voxels.")
@click.option("--overwrite", is_flag=True, help="Replace OUTPUT if it exists.")
@click.option("--json", "as_json", is_flag=True, help="Print a machine-readable summary (JSON) on stdout.")
@click.pass_context
@handle_errors
def convert(ctx: click.Context, input_path: str, output: str, ngff: str, chunk: str, shard: str | None, levels: int | None,
            voxel_size: float | None, overwrite: bool, as_json: bool) -> None:
    """Convert an MRC tomogram to a chunked, compressed, multiscale OME-Zarr (streamed).

    A compressed MRC (.mrc.gz, .map.gz, .bz2, .xz) is decompressed on the way, into a temporary
    copy beside OUTPUT that is removed afterwards. --voxel-size resamples the tomogram to a model's
    voxel size (smoothed, then linearly interpolated; the volume's edges stay in place);
    with it, INPUT may also be an OME-Zarr tomogram (a CryoET Data Portal download, say).

    \b
    Example:
      tileseg convert tomo.mrc tomo.zarr
      tileseg convert tomo.mrc tomo.zarr --ngff 0.5 --chunk 64 --shard 256
      tileseg convert emd_1234.map.gz emd_1234.zarr
      tileseg convert portal_13.48A.mrc tomo_10A.zarr --voxel-size 10
      tileseg convert TS_200_1.zarr TS_200_1_10A.zarr --voxel-size 10
    """
    from tilesegment.convert import convert as run_convert

    quiet = ctx.obj["quiet"]
    with progress_bar(quiet, total=None, unit="vox", unit_scale=True, desc="convert") as bar:
        report = run_convert(input_path, output, ngff=ngff, chunk=parse_shape(chunk, "--chunk"), shard=parse_shape(shard, "--shard"), levels=levels,
                             voxel_size=voxel_size, overwrite=overwrite, progress=bar.update)
    if as_json:
        echo_json(dataclasses.asdict(report))
    elif not quiet:
        voxel = "unknown voxel size (header has none; recorded as 1 Å)" if report.voxel_size is None else (
            voxel_text(report.voxel_size, "/voxel"))
        if report.resampled_from:
            voxel += f" (resampled from {voxel_text(report.resampled_from)})"
        click.echo(f"wrote {report.output}: {'×'.join(map(str, report.shape))} {report.dtype}, {voxel}, "
                   f"{report.levels} level{'s' if report.levels != 1 else ''}, {report.bytes_read / 2**20 / max(report.seconds, 1e-9):.0f} MiB/s")


def voxel_text(voxel: Sequence[float], per: str = "") -> str:
    """``13.48 Å`` for a cube (as the header's float32 sizes print), else ``20×10×10 Å (z, y, x)``."""
    sizes = [f"{v:.4g}" for v in voxel]
    return f"{sizes[-1]} Å{per}" if len(set(sizes)) == 1 else f"{'×'.join(sizes)} Å{per} (z, y, x)"


def run_options(func: Callable[..., Any]) -> Callable[..., Any]:
    return with_options(
        *SEGMENTATION_OPTIONS,
        click.option("--shard", default=None, help="Output shard shape (with --ngff 0.5)."),
        click.option("--ngff", type=click.Choice(["0.4", "0.5"]), default="0.4", show_default=True, help="Output OME-Zarr version."),
        click.option("--probabilities", is_flag=True, help="Also write the class probabilities (under probabilities/)."),
        PROBABILITY_DTYPE_OPTION,
        click.option("--overwrite", is_flag=True, help="Replace OUTPUT if it exists."),
        click.option("--resume", is_flag=True, help="Finish a stopped run on OUTPUT (same options), computing only its unfinished blocks."),
        IGNORE_VOXEL_SIZE_OPTION,
    )(func)


def run_segmentation(quiet: bool, input_path: str, output: str, as_json: bool = False, **options: Any) -> Any:
    from tilesegment.pipeline import segment

    bar = progress_bar(quiet, total=0, unit="tile", desc="segment", dynamic_ncols=True)

    def on_start(plan: Any, link: str | None) -> None:
        bar.total = plan.grid.count
        bar.refresh()
        log.info("%s: %s voxels, %d tiles of %s in %d blocks of %s", input_path, "×".join(map(str, plan.volume)),
                 plan.grid.count, "×".join(map(str, plan.grid.tile)), plan.block_count, "×".join(map(str, plan.block)))
        if link and not quiet:
            bar.write(f"Dask dashboard: {link}", file=sys.stderr)

    with bar:
        report = segment(input_path, output, progress=bar.update, on_start=on_start, **options)
    if as_json:
        summary = dataclasses.asdict(report)
        summary.update(summary.pop("extra"), tiles_per_second=round(report.tiles_per_second, 3))
        echo_json(summary)
    elif not quiet and report.extra.get("already_complete"):
        click.echo(f"{report.output} is already complete; nothing to do.")
    elif not quiet:
        if report.extra.get("resumed_blocks"):
            click.echo(f"resumed: {report.extra['resumed_blocks']} of {report.blocks} blocks were already done")
        fraction = report.foreground_voxels / max(1, report.shape[0] * report.shape[1] * report.shape[2])
        click.echo(f"wrote {report.output}: {'×'.join(map(str, report.shape))} labels {', '.join(report.class_names)}; "
                   f"{report.tiles_forwarded}/{report.tile_count} tiles in {report.blocks} block{'s' if report.blocks != 1 else ''}, "
                   f"{report.seconds:.1f} s ({report.tiles_per_second:.1f} tiles/s); foreground {100 * fraction:.1f}%")
    return report


@main.command()
@click.argument("input_path", metavar="INPUT", type=click.Path())
@click.argument("output", metavar="OUTPUT.zarr", type=click.Path())
@run_options
@click.option("--json", "as_json", is_flag=True, help="Print a machine-readable summary (JSON) on stdout.")
@click.pass_context
@handle_errors
def run(ctx: click.Context, input_path: str, output: str, tile: str, block: str | None, chunk: str, shard: str | None, **options: Any) -> None:
    """Segment a tomogram (MRC, Zarr array or OME-Zarr) into an OME-Zarr label image.

    \b
    Examples:
      tileseg run tomo.mrc seg.zarr
      tileseg run tomo.zarr seg.zarr --device cuda --batch 8 --probabilities
      tileseg run tomo.zarr seg.zarr --scheduler tcp://10.0.0.5:8786
      tileseg run tomo.zarr seg.zarr --resume     # after a crash: only unfinished blocks
    """
    run_segmentation(ctx.obj["quiet"], input_path, output, tile=parse_shape(tile, "--tile"), block=parse_shape(block, "--block"), chunk=parse_shape(chunk, "--chunk"), shard=parse_shape(shard, "--shard"), **options)


@main.command()
@click.argument("output", metavar="OUTPUT.zarr", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print the status as JSON on stdout.")
@click.pass_context
@handle_errors
def status(ctx: click.Context, output: str, as_json: bool) -> None:
    """Say whether a segmentation output is complete; exit status 0 if it is, 1 if not.

    \b
    Example:
      tileseg status seg.zarr || tileseg run tomo.zarr seg.zarr --resume
    """
    from tilesegment.output import describe_output

    report = describe_output(output)
    if as_json:
        echo_json({**dataclasses.asdict(report), "message": report.describe()})
    elif not ctx.obj["quiet"]:
        click.echo(report.describe())
    sys.exit(0 if report.complete else 1)


@main.command()
@click.argument("directory", default="tileseg-demo", type=click.Path(file_okay=False))
@click.option("--size", type=int, default=96, show_default=True, help="Edge of the simulated cubic tomogram, in voxels.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--workers", type=int, default=None, help="Workers of the embedded cluster.")
@click.pass_context
@handle_errors
def demo(ctx: click.Context, directory: str, size: int, seed: int, workers: int | None) -> None:
    """Simulate a crowded tomogram, convert it, segment it with the default model, and score it.

    Writes DIRECTORY/simulation/ (tomogram.mrc, labels.mrc, particles.json), DIRECTORY/tomogram.zarr,
    DIRECTORY/segmentation.zarr and DIRECTORY/truth.mrc.

    \b
    Examples:
      tileseg demo                       # into ./tileseg-demo
      tileseg demo mydemo --size 128 --seed 3
      tileseg preview tileseg-demo/segmentation.zarr demo.png
    """
    from tilesegment.demo import prepare_demo, score_demo

    quiet = ctx.obj["quiet"]
    files = prepare_demo(directory, size, seed)
    if not quiet:
        click.echo(f"simulated {files.mrc} ({size}³, {files.particles} particles, 10 Å/voxel, SNR 1) and converted it to {files.zarr}")
    run_segmentation(quiet, files.zarr, files.segmentation, overwrite=True, workers=workers)
    iou = score_demo(files)
    if not quiet and iou is not None:
        click.echo(f"macromolecule IoU against the simulation's ground truth: {iou:.3f}")


from .ecosystem import copick, export, preview  # noqa: E402  (taking a segmentation to other tools)
from .science import evaluate, simulate, train  # noqa: E402  (the science commands live in their own module)

for command in (simulate, train, evaluate, export, preview, copick):
    main.add_command(command)

if __name__ == "__main__":
    main()
