"""Errors a user can act on.

Every error the tool raises for bad input or a bad environment is a :class:`TilesegError` that
carries *what* went wrong, *why*, and *how to fix it*, so the CLI can print one line and exit
non-zero without a traceback (the mrcfile/MONAI style: quote the bad value and the remedy).
"""

from __future__ import annotations

__all__ = [
    "TilesegError",
    "InputError",
    "VoxelSizeError",
    "OptionError",
    "CheckpointError",
    "OutputError",
    "ClusterError",
]


class TilesegError(Exception):
    """Base class: an error with a cause and a remedy, reported without a traceback."""

    exit_code = 1

    def __init__(self, what: str, fix: str | None = None) -> None:
        self.what = what
        self.fix = fix
        super().__init__(self.message)

    @property
    def message(self) -> str:
        return f"{self.what} {self.fix}" if self.fix else self.what

    def __reduce__(self):  # survive pickling across Dask workers with both fields intact
        return (type(self), (self.what, self.fix))


class InputError(TilesegError):
    """The input volume cannot be read or is not usable."""

    exit_code = 3


class VoxelSizeError(InputError):
    """The tomogram's voxel size is too far from the model's; ``model_voxel`` (Å) lets a caller that
    knows where the tomogram lives (copick) name the resampled copy to make."""

    def __init__(self, what: str, fix: str | None = None, model_voxel: float | None = None) -> None:
        self.model_voxel = model_voxel
        super().__init__(what, fix)

    def __reduce__(self):
        return (type(self), (self.what, self.fix, self.model_voxel))


class OptionError(TilesegError):
    """A command-line or API option is out of range or inconsistent."""

    exit_code = 2


class CheckpointError(TilesegError):
    """A model checkpoint is missing, corrupt or incompatible."""

    exit_code = 4


class OutputError(TilesegError):
    """The output location cannot be written as asked."""

    exit_code = 5


class ClusterError(TilesegError):
    """The Dask cluster or the compute device cannot be used."""

    exit_code = 6
