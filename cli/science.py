"""The science commands: ``simulate``, ``train`` and ``evaluate``."""

from __future__ import annotations

import contextlib
import json
from typing import Any, Iterator

import click

from .common import handle_errors, parse_shape, progress_bar


@click.command()
@click.argument("prediction", metavar="PRED")
@click.argument("truth", metavar="TRUTH")
@click.option("--classes", default=None, help="Class names for labels 0, 1, ... (comma separated); default: from the prediction's metadata.")
@click.option("--ignore", default=None, help="Truth labels to leave out of every count (comma separated).")
@click.option("--json", "as_json", is_flag=True, help="Print the scores as JSON.")
@handle_errors
def evaluate(prediction: str, truth: str, classes: str | None, ignore: str | None, as_json: bool) -> None:
    """Score a predicted label mask against the truth: per-class IoU and Dice.

    PRED and TRUTH are MRC files, Zarr arrays or OME-Zarr label images of the same shape.

    \b
    Example:
      tileseg evaluate seg.zarr sim/labels.mrc
      tileseg evaluate seg.zarr sim/labels.mrc --json > scores.json
    """
    from tilesegment.evaluate import evaluate as run_evaluate

    names = [c.strip() for c in classes.split(",")] if classes else None
    try:
        ignored = [int(v) for v in ignore.split(",")] if ignore else []
    except ValueError:
        raise click.BadParameter(f"--ignore {ignore!r}: give label values such as 255 or 3,4.") from None
    report = run_evaluate(prediction, truth, classes=names, ignore=ignored)
    click.echo(json.dumps(report.to_dict(), indent=2) if as_json else report.to_table())


#: SimulationConfig's fields by the names of the options that set them, for its messages
SIMULATION_OPTIONS = {"shape": "--shape", "voxel_size": "--voxel-size", "templates": "--templates", "target": "--target",
                      "density": "--density", "snr": "--snr", "tilt_range": "--tilt-range", "defocus_um": "--defocus",
                      "voltage_kv": "--voltage", "cs_mm": "--cs"}


@contextlib.contextmanager
def _fields_as_options() -> Iterator[None]:
    """SimulationConfig's errors name its fields (``tilt_range 95.0 is outside (0, 90]``); on the
    command line they name the option the user typed (``--tilt-range 95.0 ...``)."""
    from tilesegment.errors import OptionError

    try:
        yield
    except OptionError as err:
        field, space, rest = err.what.partition(" ")
        option = SIMULATION_OPTIONS.get(field.rstrip(":"))
        if option is None:
            raise
        raise OptionError(option + field[len(field.rstrip(":")):] + space + rest, err.fix) from None


def _ids(value: str | None) -> tuple[str, ...] | None:
    return tuple(v.strip() for v in value.split(",") if v.strip()) if value else None


@click.command()
@click.argument("output_dir", metavar="OUTPUT_DIR", type=click.Path(file_okay=False))
@click.option("--shape", default="128", show_default=True, help="Tomogram shape, N or Z,Y,X voxels.")
@click.option("--voxel-size", type=float, default=10.0, show_default=True, help="Å per voxel.")
@click.option("--templates", default=None, help="Complexes to place: shipped ids (e.g. 1bxn,4v4r) or .mrc paths; default: all 16 shipped.")
@click.option("--target", default=None, help="The macromolecule of interest (one of --templates), for target-vs-rest masks.")
@click.option("--density", type=float, default=0.25, show_default=True, help="Fraction of the volume covered by particles.")
@click.option("--snr", type=float, default=1.0, show_default=True, help="var(signal)/var(noise); 'inf' for no noise.")
@click.option("--tilt-range", type=float, default=60.0, show_default=True, help="± tilt range in degrees (missing wedge); 90 = none.")
@click.option("--defocus", type=float, default=3.0, show_default=True, help="Defocus in µm, positive = underfocus.")
@click.option("--voltage", type=float, default=300.0, show_default=True, help="Acceleration voltage, kV.")
@click.option("--cs", type=float, default=2.7, show_default=True, help="Spherical aberration, mm.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--overwrite", is_flag=True, help="Replace existing output files.")
@click.pass_context
@handle_errors
def simulate(ctx: click.Context, output_dir: str, shape: str, voxel_size: float, templates: str | None, target: str | None,
             density: float, snr: float, tilt_range: float, defocus: float, voltage: float, cs: float, seed: int, overwrite: bool) -> None:
    """Simulate a crowded cryo-ET tomogram with per-voxel ground truth.

    Writes OUTPUT_DIR/tomogram.mrc, labels.mrc (0 = background, k = k-th template) and
    particles.json (classes, positions, orientations, settings).

    \b
    Example:
      tileseg simulate sim --shape 256 --snr 0.5 --seed 1
      tileseg simulate sim --templates 4v4r,1bxn,4cr2 --target 4v4r --tilt-range 50
    """
    from tilesegment.simulate import SimulationConfig, simulate as run_simulate

    fields = dict(shape=_as_shape3(parse_shape(shape, "--shape")), voxel_size=voxel_size, target=target, density=density, snr=snr,
                  tilt_range=tilt_range, defocus_um=defocus, voltage_kv=voltage, cs_mm=cs, seed=seed)
    if templates:
        fields["templates"] = _ids(templates)
    with _fields_as_options():
        config = SimulationConfig(**fields)
    report = run_simulate(output_dir, config, overwrite=overwrite)
    if not ctx.find_root().obj["quiet"]:
        kinds = sum(1 for n in report.class_counts.values() if n)
        click.echo(f"wrote {report.tomogram}, {report.labels}, {report.particles}: {'×'.join(map(str, report.shape))} at "
                   f"{report.voxel_size:g} Å, {report.particle_count} particles of {kinds} kinds, {100 * report.density:.0f}% of the volume")


def _as_shape3(value: Any) -> tuple[int, int, int]:
    return (value,) * 3 if isinstance(value, int) else tuple(value)


@click.command()
@click.argument("output", metavar="OUTPUT.safetensors", type=click.Path())
@click.option("--data", "data_dirs", multiple=True, type=click.Path(file_okay=False), help="A 'tileseg simulate' folder (repeat); the last --validation of them validate.")
@click.option("--simulate", "simulate_count", type=int, default=None, help="Instead of --data: simulate this many training tomograms on the fly.")
@click.option("--validation", type=int, default=None, help="Validation tomograms (default: 1 of --data folders, 2 simulated).")
@click.option("--shape", default="128", show_default=True, help="Shape of simulated tomograms.")
@click.option("--snr", type=float, default=1.0, show_default=True, help="SNR of simulated tomograms.")
@click.option("--templates", default=None, help="Kinds to simulate (default: all shipped).")
@click.option("--hold-out", default=None, help="Kinds to leave out of simulated training data (to test generalisation).")
@click.option("--classes", default="foreground", show_default=True, help="foreground (all vs background), kinds (one class each) or target:ID (the paper's setting).")
@click.option("--architecture", type=click.Choice(["ssn3d-encdec", "ssn3d-fcn"]), default="ssn3d-encdec", show_default=True)
@click.option("--channels", default="8,16,32", show_default=True, help="Widths of the three convolution blocks (the paper: 32,64,128).")
@click.option("--crop", type=int, default=48, show_default=True, help="Training subtomogram edge, voxels.")
@click.option("--batch", type=int, default=4, show_default=True)
@click.option("--steps", type=int, default=2000, show_default=True, help="Most optimisation steps.")
@click.option("--lr", type=float, default=2e-3, show_default=True, help="Learning rate (AdamW, cosine schedule).")
@click.option("--validate-every", type=int, default=100, show_default=True)
@click.option("--patience", type=int, default=6, show_default=True, help="Validations without improvement before stopping.")
@click.option("--device", default="cpu", show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--overwrite", is_flag=True, help="Replace OUTPUT if it exists.")
@click.pass_context
@handle_errors
def train(ctx: click.Context, output: str, data_dirs: tuple[str, ...], simulate_count: int | None, validation: int | None, shape: str,
          snr: float, templates: str | None, hold_out: str | None, classes: str, architecture: str, channels: str, crop: int, batch: int,
          steps: int, lr: float, validate_every: int, patience: int, device: str, seed: int, overwrite: bool) -> None:
    """Train a segmentation network on simulated tomograms; write a checkpoint for 'tileseg run --model'.

    \b
    Examples:
      tileseg train model.safetensors --simulate 8 --snr 0.5
      tileseg train model.safetensors --data sim1 --data sim2 --data sim3 --classes target:4v4r
    """
    from tilesegment.errors import OptionError
    from tilesegment.storage import check_output_file
    from tilesegment.train import TrainConfig, train as run_train
    from tilesegment.training_data import simulated_volumes, split_volumes

    check_output_file(output, overwrite, "model.safetensors")  # before the training, not after it
    if validation is not None and validation < 1:
        raise OptionError(f"--validation {validation} must be at least 1.", "Give 1 or more validation tomograms, or leave it out.")
    if bool(data_dirs) == bool(simulate_count):
        raise OptionError("give either --data folders or --simulate N.", "E.g. --simulate 8, or --data sim1 --data sim2.")
    if data_dirs:
        train_volumes, validation_volumes, kinds = split_volumes(data_dirs, validation or 1)
    else:
        from tilesegment.simulate import SimulationConfig

        with _fields_as_options():
            sim = SimulationConfig(shape=_as_shape3(parse_shape(shape, "--shape")), snr=snr, seed=seed)
            chosen = _ids(templates) or sim.templates
            kinds = tuple(k for k in chosen if k not in (_ids(hold_out) or ()))
            if not kinds:
                raise OptionError(f"--hold-out {hold_out} leaves none of the complexes to train on ({', '.join(chosen)}).",
                                  "Hold out fewer of them, or give more --templates.")
            sim = SimulationConfig(shape=sim.shape, snr=snr, templates=kinds, seed=seed)
        train_volumes = simulated_volumes(simulate_count, sim, seed)
        validation_volumes = simulated_volumes(validation or 2, sim, seed + simulate_count)
    try:
        widths = tuple(int(c) for c in channels.split(","))
    except ValueError:
        raise click.BadParameter(f"--channels {channels!r}: give three widths such as 8,16,32.") from None
    config = TrainConfig(architecture=architecture, channels=widths, crop=crop, batch=batch, max_steps=steps, learning_rate=lr,
                         validate_every=validate_every, patience=patience, device=device, seed=seed,
                         extra={"trained_on": list(kinds), "held_out": list(_ids(hold_out) or ())})
    quiet = ctx.find_root().obj["quiet"]
    with progress_bar(quiet, total=steps, unit="step", desc="train") as bar:
        def progress(step: int, record: dict) -> None:
            bar.update(step - bar.n)
            bar.set_postfix(loss=record["loss"], val_iou=record["validation_iou"])

        report = run_train(train_volumes, validation_volumes, output, config, classes=classes, kinds=kinds, progress=progress)
    if not quiet:
        click.echo(f"wrote {output}: best validation IoU {report.best_validation_iou:.3f} at step {report.best_step} "
                   f"of {report.steps}{' (stopped early)' if report.stopped_early else ''}, {report.seconds:.0f} s")
