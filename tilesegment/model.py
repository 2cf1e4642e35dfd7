"""The segmentation networks and their checkpoint format.

Networks (all fully convolutional, so the same weights run on any tile whose size is a multiple of
:attr:`ModelConfig.size_multiple`):

* ``ssn3d-encdec`` - the encoder-decoder of Liu et al. (ICIP 2018): three blocks of 3×3×3
  convolutions (widths ``channels``) with 2× max pooling, and a decoder that upsamples and fuses
  the encoder features at each scale.
* ``ssn3d-fcn`` - the paper's FCN-style baseline: the same encoder with a third pooling, 1×1×1
  score maps at 1/2, 1/4 and 1/8 scale fused by upsampling and summing (FCN-8s style).
* ``identity`` - passes the (un-normalised) input through; for testing the stitching exactly.

Checkpoint format (``.safetensors``): the weights as tensors, and in the header metadata
``tilesegment.config`` (JSON: architecture, widths, class names, voxel size in Å, input
normalisation, output activation). safetensors holds data only, so loading one never executes code.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from importlib import resources
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import nn

from .errors import CheckpointError

__all__ = [
    "ModelConfig",
    "ARCHITECTURES",
    "build_model",
    "save_checkpoint",
    "checkpoint_bytes",
    "load_checkpoint",
    "read_checkpoint",
    "default_checkpoint_path",
    "for_inference",
    "OneDNNConv3d",
]

FORMAT = "tilesegment.checkpoint/1"
ARCHITECTURES = ("ssn3d-encdec", "ssn3d-fcn", "identity")


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to rebuild a network and use it correctly."""

    architecture: str = "ssn3d-encdec"
    channels: tuple[int, ...] = (32, 64, 128)
    class_names: tuple[str, ...] = ("background", "macromolecule")
    voxel_size: float = 10.0  # ångström per voxel of the training data
    normalization: str = "zscore"  # 'zscore' (whole-volume mean/std) or 'none'
    output: str = "softmax"  # 'softmax', 'sigmoid' or 'none' (raw values, identity only)
    in_channels: int = 1
    description: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def out_channels(self) -> int:
        return 1 if self.output in ("sigmoid", "none") else len(self.class_names)

    @property
    def size_multiple(self) -> int:
        """Tile sizes must be a multiple of this (2 per pooling)."""
        return {"ssn3d-encdec": 4, "ssn3d-fcn": 8}.get(self.architecture, 1)

    @property
    def forward_bytes_per_voxel(self) -> int:
        """About the most memory an inference forward holds, in bytes per voxel of its batch (float32).

        The encoder-decoder keeps its full-resolution features for the decoder: 23.4-27.4 bytes per
        voxel per unit of the first width at its peak, the FCN 8.0-9.0 (the growth of peak RSS over
        a forward after a warm-up, widths 8-32, tiles 64-128³, batches 1-4, 1 or 2 threads;
        ``tests/test_model.py`` checks it). Rounded up, plus the input and output tensors."""
        first = self.channels[0] if self.channels else 1
        network = {"ssn3d-encdec": 28 * first, "ssn3d-fcn": 10 * first}.get(self.architecture, 0)
        return network + 4 * (self.in_channels + self.out_channels)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "ModelConfig":
        data = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError("config is not a JSON object")
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        for key in ("channels", "class_names"):
            if key in known:
                known[key] = tuple(known[key])
        return cls(**known)


def _conv_block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv3d(cin, cout, 3, padding=1), nn.BatchNorm3d(cout), nn.ReLU(inplace=True),
        nn.Conv3d(cout, cout, 3, padding=1), nn.BatchNorm3d(cout), nn.ReLU(inplace=True),
    )


class EncoderDecoder(nn.Module):
    """SSN3D encoder-decoder: conv blocks with pooling, then upsample-and-fuse at each scale."""

    def __init__(self, in_channels: int, out_channels: int, channels: tuple[int, ...]) -> None:
        super().__init__()
        c1, c2, c3 = channels
        self.enc1, self.enc2, self.enc3 = _conv_block(in_channels, c1), _conv_block(c1, c2), _conv_block(c2, c3)
        self.pool = nn.MaxPool3d(2)
        self.up2, self.dec2 = nn.ConvTranspose3d(c3, c2, 2, stride=2), _conv_block(2 * c2, c2)
        self.up1, self.dec1 = nn.ConvTranspose3d(c2, c1, 2, stride=2), _conv_block(2 * c1, c1)
        self.head = nn.Conv3d(c1, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e1 = self.enc1(x)
        e2 = self.enc2(self.pool(e1))
        e3 = self.enc3(self.pool(e2))
        d2 = self.dec2(torch.cat([self.up2(e3), e2], dim=1))
        d1 = self.dec1(torch.cat([self.up1(d2), e1], dim=1))
        return self.head(d1)


class FCN(nn.Module):
    """SSN3D baseline: FCN-8s-style fusion of score maps from three pooled scales."""

    def __init__(self, in_channels: int, out_channels: int, channels: tuple[int, ...]) -> None:
        super().__init__()
        c1, c2, c3 = channels
        self.enc1, self.enc2, self.enc3 = _conv_block(in_channels, c1), _conv_block(c1, c2), _conv_block(c2, c3)
        self.pool = nn.MaxPool3d(2)
        self.score1, self.score2, self.score3 = (nn.Conv3d(c, out_channels, 1) for c in (c1, c2, c3))
        self.upsample = nn.Upsample(scale_factor=2, mode="trilinear", align_corners=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p1 = self.pool(self.enc1(x))
        p2 = self.pool(self.enc2(p1))
        p3 = self.pool(self.enc3(p2))
        score = self.upsample(self.score3(p3)) + self.score2(p2)
        score = self.upsample(score) + self.score1(p1)
        return self.upsample(score)


class Identity(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def build_model(config: ModelConfig) -> nn.Module:
    """A freshly initialised network for ``config``."""
    if config.architecture == "identity":
        return Identity()
    if config.architecture not in ARCHITECTURES:
        raise CheckpointError(f"unknown architecture {config.architecture!r}.", f"Known architectures: {', '.join(ARCHITECTURES)}.")
    if len(config.channels) != 3:
        raise CheckpointError(f"architecture {config.architecture} needs 3 channel widths, got {list(config.channels)}.",
                              "Use a checkpoint written by 'tileseg train'.")
    cls = EncoderDecoder if config.architecture == "ssn3d-encdec" else FCN
    return cls(config.in_channels, config.out_channels, tuple(config.channels))


class OneDNNConv3d(nn.Conv3d):
    """A ``Conv3d`` that sends a batch of one sample on the CPU to oneDNN as well.

    PyTorch's CPU heuristic runs a single sample with few input channels (in the packaged network
    the first convolution's one channel and the 32³ level's 16) through its native im2col kernels,
    which are far slower: one 64³ tile took 0.13 s that way and 0.067 s through oneDNN on 2 cores,
    against 0.10 s for a batch of two. A block holding a single tile (at 256³ the corner block) and
    ``--batch 1`` forward such batches. Larger batches already take oneDNN: the same bits as before.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (x.shape[0] == 1 and x.device.type == "cpu" and x.dtype == torch.float32
                and self.weight.dtype == torch.float32 and not _autocast_on_cpu()):
            return torch.mkldnn_convolution(x, self.weight, self.bias, self.padding, self.stride, self.dilation, self.groups)
        return super().forward(x)


def _autocast_on_cpu() -> bool:
    try:
        return torch.is_autocast_enabled("cpu")
    except TypeError:  # PyTorch before 2.4
        return torch.is_autocast_cpu_enabled()


def _runs_on_onednn(conv: nn.Module) -> bool:
    return (type(conv) is nn.Conv3d and conv.padding_mode == "zeros" and not isinstance(conv.padding, str)
            and hasattr(torch, "mkldnn_convolution") and torch.backends.mkldnn.is_available())


def for_inference(model: nn.Module, channels_last: bool | None = None) -> nn.Module:
    """``model`` (in eval mode) in the form that runs a segmentation fastest: every batch norm folded
    into the convolution before it and, on the CPU, the weights in channels-last order and a batch
    of one tile through oneDNN too (:class:`OneDNNConv3d`).

    At inference a batch norm is a fixed per-channel scale and shift, which the convolution's
    weights and bias can absorb: the same function (to float rounding) with one pass over the
    activations fewer per convolution. On the CPU, oneDNN's 3D convolutions run channels-last
    (``NDHWC``) activations much faster than channels-first ones: the packaged network in 0.65× the
    time for batches of 4 × 64³ on 2 cores (``benchmarks/inference_form.py``); a contiguous input
    is taken as it is, and the activations follow the weights' order. ``channels_last=None`` picks
    it on the CPU only: on CUDA it has not been measured yet (``benchmarks/gpu_benchmark.py`` times
    the bare network both ways). Everything that runs the network for a
    segmentation (the predictor, the benchmarks' bare network and MONAI) runs this form; training
    never does.
    """
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    model.eval()
    for block in model.modules():
        if not isinstance(block, nn.Sequential):
            continue
        layers = list(block)
        for i in range(len(layers) - 1):
            conv, norm = layers[i], layers[i + 1]
            if isinstance(conv, nn.Conv3d) and isinstance(norm, nn.BatchNorm3d):
                block[i], block[i + 1] = fuse_conv_bn_eval(conv, norm), nn.Identity()
    parameter = next(model.parameters(), None)
    if channels_last is None:
        channels_last = parameter is not None and parameter.device.type == "cpu"
    if channels_last:
        model.to(memory_format=torch.channels_last_3d)
    if parameter is not None and parameter.device.type == "cpu":
        for conv in model.modules():
            if _runs_on_onednn(conv):
                conv.__class__ = OneDNNConv3d  # same parameters and state dict, another forward
    return model


def checkpoint_bytes(model: nn.Module, config: ModelConfig) -> bytes:
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    return save_safetensors(tensors, metadata={"format": FORMAT, "tilesegment.config": config.to_json()})


def save_checkpoint(path: str | os.PathLike, model: nn.Module, config: ModelConfig) -> None:
    """Write the checkpoint under a temporary name and rename it: a failed write (a full disk)
    leaves any older checkpoint of that name whole."""
    from .storage import replaced_when_written

    with replaced_when_written(os.fspath(path)) as partial, open(partial, "wb") as f:
        f.write(checkpoint_bytes(model, config))


def default_checkpoint_path() -> str:
    return str(resources.files("tilesegment") / "data" / "default_model.safetensors")


def read_checkpoint(path: str | os.PathLike | None) -> bytes:
    """The bytes of a checkpoint file (the packaged default when ``path`` is None)."""
    path = default_checkpoint_path() if path in (None, "", "default") else os.fspath(path)
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise CheckpointError(f"model checkpoint {path} does not exist.", "Check --model, or leave it out to use the built-in default model.") from None
    except IsADirectoryError:
        raise CheckpointError(f"model checkpoint {path} is a directory.", "Give the .safetensors file written by 'tileseg train'.") from None


def _header_metadata(data: bytes) -> dict[str, str]:
    """Parse the safetensors header ourselves to report a clear error (it is plain JSON)."""
    if len(data) < 8:
        raise ValueError("file too short")
    size = int.from_bytes(data[:8], "little")
    if size <= 0 or size > len(data) - 8:
        raise ValueError("bad header size")
    header = json.loads(data[8 : 8 + size])
    return header.get("__metadata__") or {}


def load_checkpoint(data: bytes, device: str | torch.device = "cpu", name: str = "checkpoint") -> tuple[nn.Module, ModelConfig]:
    """Rebuild the network of a checkpoint, in eval mode on ``device``; never runs embedded code."""
    try:
        metadata = _header_metadata(data)
    except (ValueError, UnicodeDecodeError):
        raise CheckpointError(f"{name} is not a tileseg checkpoint (not a safetensors file; pickled .pt/.ckpt files are refused).",
                              "Use a .safetensors checkpoint written by 'tileseg train', or leave out --model.") from None
    if metadata.get("format") != FORMAT or "tilesegment.config" not in metadata:
        raise CheckpointError(f"{name} is a safetensors file without tileseg metadata (format {metadata.get('format')!r}).",
                              "Use a checkpoint written by 'tileseg train' (it records architecture, classes and voxel size).")
    try:
        config = ModelConfig.from_json(metadata["tilesegment.config"])
    except (ValueError, TypeError) as exc:
        raise CheckpointError(f"{name} has an unreadable model config ({exc}).", "Re-export the checkpoint with 'tileseg train'.") from None
    if config.in_channels != 1:
        raise CheckpointError(f"{name} expects {config.in_channels} input channels; tomograms have 1.",
                              "Use a model trained on single-channel tomograms.")
    model = build_model(config)
    try:
        state = load_safetensors(data)
        model.load_state_dict(state, strict=True)
    except (SafetensorError, RuntimeError) as exc:
        first = str(exc).strip().splitlines()[0]
        raise CheckpointError(f"{name}: weights do not match architecture {config.architecture} {list(config.channels)} ({first}).",
                              "The file is corrupt or was edited; re-export it with 'tileseg train'.") from None
    return model.to(device).eval(), config
