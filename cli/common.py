"""What every command shares: error mapping, size parsing, whether to show progress."""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import sys
import threading
import time
import traceback
from typing import Any, Callable, Iterator

import click

from tilesegment.errors import TilesegError

__all__ = ["handle_errors", "parse_shape", "show_progress", "progress_bar", "ProgressLines", "configure_logging", "echo_json", "EXIT_INTERNAL",
           "SEGMENTATION_OPTIONS", "PROBABILITY_DTYPE_OPTION", "IGNORE_VOXEL_SIZE_OPTION", "with_options"]

EXIT_INTERNAL = 70

#: The network's and the cluster's options of every command that segments (``run``, ``copick``).
SEGMENTATION_OPTIONS = [
    click.option("--model", default=None, help="Checkpoint (.safetensors) from 'tileseg train'; default: the built-in model."),
    click.option("--tile", default="64", show_default=True, help="Tile shape fed to the network, N or Z,Y,X."),
    click.option("--overlap", type=float, default=0.25, show_default=True, help="Overlap of neighbouring tiles, a fraction in [0, 1)."),
    click.option("--blend", type=click.Choice(["gaussian", "linear", "constant"]), default="gaussian", show_default=True, help="Window that weights each tile's prediction."),
    click.option("--batch", type=int, default=4, show_default=True, help="Tiles per network forward."),
    click.option("--device", default="cpu", show_default=True, help="cpu, cuda or cuda:N."),
    click.option("--precision", type=click.Choice(["fp32", "tf32", "bf16", "fp16"]), default="fp32", show_default=True,
                 help="Network arithmetic: fp32 (IEEE float32 on every device), tf32 (float32 with TF32 convolutions on NVIDIA GPUs), "
                      "or bf16/fp16 autocast (faster on GPUs and on CPUs with AVX512-BF16 or AMX; tf32 and fp16 need CUDA)."),
    click.option("--scheduler", default=None, help="Dask scheduler address (tcp://host:8786) or scheduler file; default: an embedded cluster."),
    click.option("--workers", type=int, default=None, help="Workers of the embedded cluster (default: 1 on CPU, one per GPU)."),
    click.option("--block", default=None, help="Block shape (whole chunks; default: 2-3 tiles of whole strides, 192 for 64³ tiles at overlap 0.25)."),
    click.option("--chunk", default="64", show_default=True, help="Output chunk shape."),
]
PROBABILITY_DTYPE_OPTION = click.option("--probability-dtype", type=click.Choice(["float16", "float32", "uint8"]), default="float16", show_default=True)
IGNORE_VOXEL_SIZE_OPTION = click.option("--ignore-voxel-size", is_flag=True, help="Run even if the tomogram's voxel size is far from the model's.")


def with_options(*options: Callable[..., Any]) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """A decorator applying ``options``, listed in ``--help`` in the order given."""
    def apply(func: Callable[..., Any]) -> Callable[..., Any]:
        for option in reversed(options):
            func = option(func)
        return func
    return apply


def parse_shape(value: str | None, option: str) -> Any:
    """``64``, ``32,64,64`` or ``32x64x64`` → an int or a 3-tuple; anything else is the user's
    mistake, named by ``option`` (an OptionError: one line and exit 2, not a traceback)."""
    from tilesegment.errors import OptionError

    if value is None:
        return None
    fix = "Give N or Z,Y,X positive integers, e.g. 64 or 32,64,64."
    try:
        parts = [int(v) for v in value.replace("x", ",").split(",") if v.strip()]
    except ValueError:
        raise OptionError(f"{option} {value!r} is not a size.", fix) from None
    if len(parts) not in (1, 3) or min(parts) < 1:
        raise OptionError(f"{option} {value!r} is not a size.", fix)
    return parts[0] if len(parts) == 1 else tuple(parts)


def configure_logging(verbosity: int) -> None:
    """-1 errors only (-q); 0 warnings; 1 tileseg's info (-v); 2 tileseg's debug and Dask's info (-vv);
    3 everything (--debug). Dask is chatty: below -vv it only gets to say warnings and errors."""
    import logging

    ours = {-1: logging.ERROR, 0: logging.WARNING, 1: logging.INFO}.get(verbosity, logging.DEBUG)
    theirs = logging.ERROR if verbosity < 0 else logging.WARNING if verbosity < 2 else logging.INFO if verbosity == 2 else logging.DEBUG
    logging.basicConfig(level=min(ours, theirs), format="tileseg: %(levelname)s: %(message)s", force=True)
    for handler in logging.getLogger().handlers:
        handler.addFilter(lambda r: r.levelno >= (theirs if r.name.startswith(("distributed", "dask", "tornado", "asyncio")) else ours))
    for name in ("distributed", "dask"):  # LocalCluster sets its own levels; let the filter decide
        logging.getLogger(name).setLevel(min(ours, theirs))


def echo_json(data: Any) -> None:
    """A machine-readable summary on stdout (``--json``); everything else goes to stderr."""
    import json

    click.echo(json.dumps(data, indent=2, default=lambda o: list(o) if isinstance(o, tuple) else str(o)))


def show_progress(quiet: bool) -> bool:
    """Whether to draw a progress bar: on a terminal, unless quiet or in CI."""
    return not quiet and sys.stderr.isatty() and not os.environ.get("CI")


#: seconds between the progress lines written where there is no terminal (``TILESEG_PROGRESS_SECONDS``)
PROGRESS_SECONDS = 60.0


def progress_bar(quiet: bool, *, total: float | None, unit: str, desc: str, unit_scale: bool = False, **bar_options: Any) -> Any:
    """A tqdm bar on a terminal; where stderr is a file or a pipe (a batch job's log), a line every
    ``TILESEG_PROGRESS_SECONDS`` (60) seconds instead, since a bar there is one ever-growing line of
    carriage returns; nothing when quiet."""
    from tqdm import tqdm

    if quiet or show_progress(quiet):
        return tqdm(total=total, unit=unit, unit_scale=unit_scale, desc=desc, disable=quiet, **bar_options)
    try:
        interval = float(os.environ.get("TILESEG_PROGRESS_SECONDS", PROGRESS_SECONDS))
    except ValueError:
        interval = PROGRESS_SECONDS
    return ProgressLines(total, unit, desc, unit_scale, interval)


class ProgressLines:
    """The part of tqdm's interface the commands use, written as occasional log lines:
    ``tileseg: segment: 1200/15625 tiles (7.7 %), 22.1 tiles/s, about 11 min left``."""

    def __init__(self, total: float | None, unit: str, desc: str, unit_scale: bool, interval: float) -> None:
        self.total, self.unit, self.desc, self.unit_scale, self.interval = total, unit, desc, unit_scale, interval
        self.n = 0
        self.postfix: dict[str, Any] = {}
        self._started = self._said = time.monotonic()
        self._lock = threading.Lock()  # a run's tiles are reported from Dask's event thread

    def update(self, n: float = 1) -> None:
        with self._lock:
            self.n += n
            now = time.monotonic()
            if now - self._said < self.interval:
                return
            self._said = now
        click.echo(self.line(now), err=True)

    def line(self, now: float) -> str:
        rate = self.n / max(now - self._started, 1e-9)
        unit = self.unit if self.unit_scale else f"{self.unit}s"
        if self.total:
            left = (self.total - self.n) / rate if rate > 0 else float("inf")
            text = (f"{self._count(self.n)}/{self._count(self.total)} {unit} ({100 * self.n / self.total:.1f} %), "
                    f"{self._count(rate)} {unit}/s, about {_duration(left)} left")
        else:
            text = f"{self._count(self.n)} {unit}, {self._count(rate)} {unit}/s"
        extra = "".join(f", {key} {value:.4g}" if isinstance(value, float) else f", {key} {value}" for key, value in self.postfix.items())
        return f"tileseg: {self.desc}: {text}{extra}"

    def _count(self, value: float) -> str:
        if not self.unit_scale:
            return f"{value:.1f}" if value != int(value) else str(int(value))
        for prefix, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
            if value >= size:
                return f"{value / size:.2f} {prefix}"
        return f"{value:.0f}"

    def set_postfix(self, **values: Any) -> None:
        self.postfix = values

    def refresh(self) -> None:
        pass

    def write(self, text: str, file: Any = None) -> None:
        click.echo(text, err=True)

    def __enter__(self) -> "ProgressLines":
        return self

    def __exit__(self, *exc: Any) -> None:
        pass


def _duration(seconds: float) -> str:
    if seconds == float("inf"):
        return "an unknown time"
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


class Stopped(KeyboardInterrupt):
    """SIGTERM (a batch system's time limit, ``kill``, a container stopping), raised in the main
    thread like Ctrl-C, so that a run stops the same way: its blocks cancelled, the stragglers
    waited for, the output's lock released and the cluster shut down, ready for ``--resume``."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _stop(signum: int, _frame: Any) -> None:
    raise Stopped(signum)


@contextlib.contextmanager
def _stop_on_sigterm() -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():  # signal handlers belong to the main thread
        yield
        return
    before = signal.signal(signal.SIGTERM, _stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, before)


#: the parameters that name what a command writes, most specific first (export reads OUTPUT.zarr and writes MASK.mrc)
WRITTEN = ("mask", "png", "output_dir", "output")


def handle_errors(func: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        context = click.get_current_context()
        debug = context.find_root().params.get("debug", False)
        # what a stopped command leaves: a run (or copick's) can be finished, anything else is just stopped
        after_stop = f" (finish it with 'tileseg {context.info_name} ... --resume')" if context.info_name in ("run", "copick") else ""
        try:
            with _stop_on_sigterm():
                return func(*args, **kwargs)
        except Stopped as exc:
            click.echo(f"tileseg: stopped by {signal.Signals(exc.signum).name}{after_stop}.", err=True)
            sys.exit(128 + exc.signum)
        except click.ClickException as exc:  # an option the command body found bad (click.BadParameter)
            click.echo(f"tileseg: error: {exc.format_message()}", err=True)
            sys.exit(2)
        except TilesegError as exc:
            if debug:
                traceback.print_exc()
            click.echo(f"tileseg: error: {exc.message}", err=True)
            sys.exit(exc.exit_code)
        except KeyboardInterrupt:
            click.echo(f"tileseg: interrupted{after_stop}.", err=True)
            sys.exit(130)
        except Exception as exc:
            from tilesegment.storage import is_write_failure, write_failure

            if is_write_failure(exc):  # a full disk or a read-only place, wherever it was met
                written = exc.filename or next((context.params[name] for name in WRITTEN if context.params.get(name)), "the output")  # type: ignore[attr-defined]
                failure = write_failure(str(written), exc, resumable=bool(after_stop))
                click.echo(f"tileseg: error: {failure.message}", err=True)
                sys.exit(failure.exit_code)
            if debug:  # a bug: say so, in one line, and how to see more
                traceback.print_exc()
            click.echo(f"tileseg: internal error: {type(exc).__name__}: {exc} (rerun with --debug for the traceback, and please report it).", err=True)
            sys.exit(EXIT_INTERNAL)

    return wrapper


