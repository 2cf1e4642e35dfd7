"""Running the network on batches of tiles, with one loaded model per worker process.

Models are loaded once per process into :data:`_PREDICTORS` (by a Dask worker plugin, or directly
in-process) and looked up by key; tasks carry only the key. Loading from checkpoint *bytes* means
remote workers need no access to the client's files.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import threading

from typing import Iterator, Sequence

import numpy as np
import torch

from .allocator import keep_freed_memory
from .blending import Placement, summed_channels, summed_count
from .errors import ClusterError
from .geometry import option_text
from .model import ModelConfig, for_inference, load_checkpoint

__all__ = ["Predictor", "model_key", "install_predictor", "get_predictor", "resolve_device", "PRECISIONS", "check_precision",
           "check_forward_memory", "device_memory_available", "cudnn_math", "native_cpu_bf16"]

#: ``--precision``: the autocast dtype of each (None: no autocast). ``fp32`` is IEEE float32 on
#: every device; ``tf32`` is float32 whose convolutions cuDNN may run on TF32 tensor cores (inputs
#: rounded to 10 mantissa bits; PyTorch's own default for cuDNN convolutions, see
#: :func:`cudnn_math`).
PRECISIONS = {"fp32": None, "tf32": None, "bf16": torch.bfloat16, "fp16": torch.float16}

_PREDICTORS: dict[str, "Predictor"] = {}
_LOCK = threading.Lock()
_CUDNN_SETTINGS = threading.Lock()  # held while a CUDA forward runs under cudnn_math's settings


def model_key(data: bytes, device: str, precision: str = "fp32") -> str:
    return f"{hashlib.sha256(data).hexdigest()[:16]}-{device}" + ("" if precision == "fp32" else f"-{precision}")


def check_precision(precision: str, device: str, on_this_machine: bool = False) -> None:
    """Refuse a precision the device cannot run; ``on_this_machine``: the network will run in this
    process's machine (a worker's predictor; a client before its embedded cluster starts), so this
    CPU's instructions count too."""
    from .errors import OptionError

    if precision not in PRECISIONS:
        raise OptionError(f"--precision {precision!r} is not supported.", f"Use one of: {', '.join(PRECISIONS)}.")
    if precision == "fp16" and not device.startswith("cuda"):
        raise OptionError("--precision fp16 needs a GPU (PyTorch has no float16 3D convolutions on the CPU).", "Use --precision bf16 on a CPU, or --device cuda.")
    if precision == "tf32" and not device.startswith("cuda"):
        raise OptionError("--precision tf32 needs an NVIDIA GPU (TF32 is a tensor-core format of Ampere and later).", "Use --precision fp32 or bf16 on a CPU, or --device cuda.")
    if on_this_machine and precision == "bf16" and device == "cpu" and not native_cpu_bf16():
        raise OptionError("--precision bf16 on a CPU without AVX512-BF16 or AMX: PyTorch emulates bf16 there, "
                          "and the network takes 100-350x fp32's time.", "Use --precision fp32 (the default) on this CPU, or bf16 on a GPU.")


def native_cpu_bf16() -> bool:
    """Whether oneDNN runs bf16 convolutions natively on this CPU (AVX512-BF16 or AMX). Without
    them PyTorch emulates bf16, and the packaged network took 136x fp32's time for 2 tiles of 32³
    (348x over a 96³ grid) on an AVX2-only AMD EPYC. Asks PyTorch's own check; where this PyTorch
    has none, assumes native."""
    check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    try:
        return bool(check()) if check is not None else True
    except Exception:
        return True


@contextlib.contextmanager
def cudnn_math(device: torch.device, precision: str, deterministic: bool = True) -> Iterator[None]:
    """cuDNN's settings while a forward runs, put back after (they are process-wide); nothing off CUDA.

    * Float32 convolutions in TF32 only for ``tf32``, IEEE float32 otherwise. PyTorch lets cuDNN
      round fp32 convolutions to TF32 by default, which moved the packaged network's probabilities
      by up to 1.7e-3 in a CPU emulation (inputs and weights rounded to 10 mantissa bits): so
      ``fp32`` means the same float32 on a GPU as on the CPU, and TF32's speed is asked for by name.
    * Deterministic algorithms only: with ``torch.backends.cudnn.benchmark`` off (see
      :class:`Predictor`) cuDNN's heuristics choose the same algorithm each time, but some of those
      (the transposed convolutions' backward-data kernels among them) add with atomics in any order;
      a resumed run must give the bytes the stopped one would have. ``benchmarks/gpu_benchmark.py``
      measures what this costs.

    The flags belong to the process, so CUDA forwards in one process take turns here: two models
    in one worker (two runs sharing a GPU worker) would otherwise run under each other's settings.
    A worker drives one GPU, which runs one forward at a time anyway.
    """
    if device.type != "cuda":
        yield
        return
    conv, cudnn = torch.backends.cudnn.conv, torch.backends.cudnn
    with _CUDNN_SETTINGS:
        before = conv.fp32_precision, cudnn.deterministic
        conv.fp32_precision = "tf32" if precision == "tf32" else "ieee"
        cudnn.deterministic = deterministic
        try:
            yield
        finally:
            conv.fp32_precision, cudnn.deterministic = before


def resolve_device(device: str) -> torch.device:
    """``cpu``, ``cuda`` or ``cuda:N``; refuse CUDA where there is none, and a GPU index beyond this machine's
    (PyTorch would accept it here and fail later, in ``model.to``, with a bare RuntimeError)."""
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ClusterError(f"--device {device} was asked for, but PyTorch sees no CUDA GPU here.",
                               "Use --device cpu, or run on a machine with a GPU and a CUDA build of PyTorch.")
        try:
            parsed = torch.device(device)
        except RuntimeError:
            raise ClusterError(f"--device {device!r} is not a device.", "Use cuda or cuda:N, N a GPU's index (0 for the first).") from None
        count = torch.cuda.device_count()
        if parsed.index is not None and parsed.index >= count:
            raise ClusterError(f"--device {device} was asked for, but PyTorch sees {count} GPU{'s' if count != 1 else ''} here "
                               f"(cuda:0 to cuda:{count - 1}).", "Use --device cuda, or one of those indices.")
        return parsed
    if device != "cpu":
        raise ClusterError(f"--device {device!r} is not a device.", "Use cpu, cuda or cuda:N.")
    return torch.device("cpu")


def device_memory_available(device: str) -> int | None:
    """Bytes a forward on ``device`` (of this machine) can have: MemAvailable for the CPU, the GPU's
    free memory for CUDA; None where unknown."""
    if device.startswith("cuda"):
        free, _total = torch.cuda.mem_get_info(resolve_device(device))
        return int(free)
    from .allocator import memory_available

    return memory_available()


def check_forward_memory(config: ModelConfig, tile: Sequence[int], batch: int, device: str, available: int | None) -> None:
    """Refuse, before the run, a batch whose forward cannot fit in ``available`` bytes (the memory
    of one worker's device): it would end in an allocation error on the first block, or on a Linux
    CPU in the kernel's out-of-memory killer. The need is :attr:`ModelConfig.forward_bytes_per_voxel`
    of every voxel of the batch."""
    from .errors import OptionError

    per_voxel = config.forward_bytes_per_voxel
    need = batch * math.prod(tile) * per_voxel
    if available is None or need <= available:
        return
    multiple = config.size_multiple
    fits = int((available / 2 / (batch * per_voxel)) ** (1 / 3)) // multiple * multiple  # half: room for the blocks
    hint = f"--tile {fits} fits at --batch {batch}" if fits >= multiple else f"even --tile {multiple} does not fit at --batch {batch}"
    raise OptionError(f"--tile {option_text(tile)} with --batch {batch}: the network's forward needs about {need / 2**30:.1f} GiB, "
                      f"more than the {available / 2**30:.1f} GiB of memory available on {device}.",
                      f"Use a smaller --tile or --batch ({hint}; 64-160 suit most tomograms).")


def _out_of_memory(exc: BaseException) -> bool:
    """Whether a forward failed for want of memory (a GPU's, or the CPU allocator's)."""
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    text = str(exc)
    return isinstance(exc, (RuntimeError, MemoryError)) and ("can't allocate memory" in text or "out of memory" in text.lower())


class Predictor:
    """A loaded network that turns a batch of tiles into per-class probabilities.

    One forward at a time per process: a worker runs two block tasks at once so that one reads,
    blends and writes while the other's tiles are on the network (prefetch and write-behind, with
    the device never shared by two forwards that would each get half of it).
    """

    def __init__(self, data: bytes, device: str = "cpu", precision: str = "fp32") -> None:
        self.device = resolve_device(device)
        check_precision(precision, str(self.device), on_this_machine=True)  # this worker's device and CPU
        # on a GPU, cuDNN's heuristics choose the convolution algorithms (torch.backends.cudnn.benchmark
        # is left off): timing them for each shape can choose differently from one run to the next,
        # and a resumed run must give the bytes the stopped one would have (with deterministic
        # algorithms only, see cudnn_math; benchmarks/gpu_benchmark.py measures what timing them would gain)
        model, self.config = load_checkpoint(data, self.device)
        self.model = for_inference(model)
        self._pin = self.device.type == "cuda"
        self._precision = precision
        self._autocast = PRECISIONS[precision]
        self._lock = threading.Lock()
        self._window: tuple[np.ndarray, torch.Tensor] | None = None  # the last window and its tensor
        self._local = threading.local()  # each block thread's batch buffer

    @property
    def out_channels(self) -> int:
        return self.config.out_channels

    @property
    def summed(self) -> slice:
        """The output channels an accumulator holds (:func:`tilesegment.blending.summed_channels`)."""
        return summed_channels(self.out_channels, self.config.output == "softmax")

    @torch.inference_mode()
    def __call__(self, tiles: np.ndarray) -> np.ndarray:
        """``(n, z, y, x)`` float32 tiles → ``(n, C, z, y, x)`` float32 probabilities."""
        return self._probabilities(tiles).numpy()

    @torch.inference_mode()
    def summed_probabilities(self, tiles: np.ndarray) -> np.ndarray:
        """``(n, z, y, x)`` tiles → ``(n, S, z, y, x)`` probabilities of the :attr:`summed` channels."""
        return self._probabilities(tiles, summed=True).numpy()

    @torch.inference_mode()
    def forward_into(self, tiles: np.ndarray | Sequence[np.ndarray], acc: np.ndarray, placements: Sequence[Placement | None],
                     weights: np.ndarray) -> None:
        """Forward ``tiles`` (an ``(n, z, y, x)`` array, or ``n`` arrays of one tile each, such as
        views into a block's input) and add each one's window-weighted probabilities of the
        :attr:`summed` channels into the accumulator ``acc`` where ``placements`` say.

        The same float32 arithmetic as :func:`tilesegment.blending.accumulate`, so the same sums, done
        by PyTorch on every core instead of numpy on one: 2-3x faster on the CPU, where the cores
        would otherwise wait for it between forwards. The window's multiplication is done where the
        network ran (on a GPU, so the CPU, which a GPU worker's blocks share, only adds).
        """
        summed = summed_count(self.out_channels, self.config.output == "softmax")
        if acc.shape[0] != summed:
            raise ValueError(f"an accumulator of {acc.shape[0]} channels for a network that sums {summed}")
        y = self._probabilities(tiles, summed=True, window=weights)
        sums = torch.from_numpy(acc)
        for prediction, where in zip(y, placements):
            if where is not None:
                dst, src = where
                sums[(slice(None), *dst)].add_(prediction[(slice(None), *src)])

    def _window_tensor(self, weights: np.ndarray) -> torch.Tensor:
        """``weights`` as a tensor on the network's device (a copy: torch wants a writable array),
        made once per window rather than per batch: a run's blocks share one cached, read-only
        window. A writable array could change between calls, so it is copied every time."""
        known = self._window
        if known is None or known[0] is not weights:
            known = (weights, torch.from_numpy(np.array(weights, dtype=np.float32)).to(self.device))
            if not weights.flags.writeable:
                self._window = known
        return known[1]

    def _batch(self, tiles: np.ndarray | Sequence[np.ndarray]) -> torch.Tensor:
        """The tiles as one contiguous float32 ``(n, z, y, x)`` tensor (pinned on a GPU).

        Separate tiles are stacked by PyTorch, on every core, into a buffer this thread keeps for
        its next batch: numpy's stack took 0.76 ms for 4 tiles of 64³ on 2 cores, this 0.17 ms, and
        on a GPU the batch is in pinned memory at once instead of being copied there again. The
        buffer is reused only after the batch's results were copied back, so after its copy to the
        device is done."""
        if isinstance(tiles, np.ndarray):
            x = torch.from_numpy(np.ascontiguousarray(tiles, dtype=np.float32))
            return x.pin_memory() if self._pin else x
        count, shape = len(tiles), tuple(tiles[0].shape)
        buffer = getattr(self._local, "batch", None)
        if buffer is None or buffer.shape[0] < count or tuple(buffer.shape[1:]) != shape:
            buffer = torch.empty((count, *shape), dtype=torch.float32, pin_memory=self._pin)
            self._local.batch = buffer
        return torch.stack([torch.from_numpy(np.asarray(tile, dtype=np.float32)) for tile in tiles], out=buffer[:count])

    def _probabilities(self, tiles: np.ndarray | Sequence[np.ndarray], summed: bool = False,
                       window: np.ndarray | None = None) -> torch.Tensor:
        x = self._batch(tiles)[:, None]
        with self._lock, cudnn_math(self.device, self._precision):
            try:
                with torch.autocast(self.device.type, dtype=self._autocast, enabled=self._autocast is not None):
                    y = self.model(x.to(self.device, non_blocking=True))
            except (RuntimeError, MemoryError) as exc:
                if not _out_of_memory(exc):
                    raise
                from .errors import OptionError

                tiles = f"{len(x)} tile{'s' if len(x) != 1 else ''} of {'×'.join(map(str, x.shape[2:]))}"
                fix = ("Use a smaller --batch, and finish the run with --resume (or start again with a smaller --tile)." if len(x) > 1 else
                       "Start again with a smaller --tile (--overwrite): a tile is part of the run's settings.")
                raise OptionError(f"the network ran out of memory on {self.device} with a batch of {tiles}.", fix) from None
            # in the input's order again (a channels-last network answers channels-last): blending
            # walks the result channel by channel
            y = (_summed_activation(y.float(), self.config) if summed else _activate(y.float(), self.config)).contiguous()
            if window is not None:
                y.mul_(self._window_tensor(window))
            return y.cpu()


def _activate(y: torch.Tensor, config: ModelConfig) -> torch.Tensor:
    if config.output == "softmax":
        return torch.softmax(y, dim=1)
    if config.output == "sigmoid":
        return torch.sigmoid(y)
    return y


def _summed_activation(y: torch.Tensor, config: ModelConfig) -> torch.Tensor:
    """The activation of the summed channels only. A two-class softmax's class 1 is σ(l₁ − l₀):
    one pass over one channel instead of a softmax over two (0.4 against 1.1 ms for 4 tiles of 64³
    on 2 CPU cores), and on a GPU half the bytes to copy back."""
    if config.output == "softmax" and y.shape[1] == 2:
        return torch.sub(y[:, 1:], y[:, :1]).sigmoid_()
    return _activate(y, config)[:, summed_channels(y.shape[1], config.output == "softmax")]


def install_predictor(key: str, data: bytes, device: str = "cpu", threads: int | None = None,
                      precision: str = "fp32") -> Predictor:
    """Load the model for ``key`` in this process, once (and keep freed memory for reuse, see
    :mod:`tilesegment.allocator`: before this process's worker threads first allocate)."""
    keep_freed_memory()
    with _LOCK:
        if threads:
            torch.set_num_threads(threads)
        if key not in _PREDICTORS:
            _PREDICTORS[key] = Predictor(data, device, precision)
        return _PREDICTORS[key]


def get_predictor(key: str) -> Predictor:
    try:
        return _PREDICTORS[key]
    except KeyError:
        raise ClusterError(f"model {key} is not loaded on this worker.",
                           "Workers get the model from tileseg's worker plugin; start workers before or after the run, not with a different Python environment.") from None
