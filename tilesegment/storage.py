"""Where data live: local paths or fsspec URLs (``s3://bucket/tomo.zarr``, ``gs://…``, ``az://…``).

Everything else keeps carrying plain strings; this module turns a string into a file system, a Zarr
store or a one-line explanation of why it cannot be reached. Local paths never go through fsspec,
so they behave exactly as before. Endpoints and credentials come from where the file system's own
tools look (for S3: ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``/``AWS_PROFILE``,
``AWS_ENDPOINT_URL``/``AWS_ENDPOINT_URL_S3``, ``~/.aws``), and from fsspec's configuration
(``FSSPEC_S3_ENDPOINT_URL``, ``FSSPEC_S3='{...}'``, ``~/.config/fsspec``): tileseg adds no flags.

Directory listings are never cached (``use_listings_cache=False``): the journal and the output's
existence are read while other processes write them, and a stale listing would hide their work.
"""

from __future__ import annotations

import contextlib
import errno
import os
import posixpath
import re
from typing import Any, Iterator

__all__ = ["check_output_file", "check_not_nested", "replaced_when_written", "is_url", "filesystem", "exists", "isdir", "join", "parent", "basename", "normalize", "zarr_store",
           "storage_options", "describe_failure", "remedy", "is_write_failure", "write_failure"]

_SCHEME = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://")


def is_url(path: str | os.PathLike) -> bool:
    """True for ``scheme://…`` other than ``file://`` (which is a local path)."""
    match = _SCHEME.match(os.fspath(path)) if isinstance(path, (str, os.PathLike)) else None
    return bool(match) and match.group(1).lower() != "file"


def _local(path: str) -> str:
    return path[len("file://"):] if path.lower().startswith("file://") else path


def storage_options(path: str = "") -> dict[str, Any]:
    """Options tileseg itself adds; everything else comes from the environment and fsspec's config.

    For S3, whole-object reads are single GETs (``max_concurrency=1``, unless fsspec's config sets
    it): s3fs otherwise asks for each object's size first, doubling the requests for Zarr's small
    chunk and metadata objects; the parallelism is across chunks and blocks instead.
    """
    options: dict[str, Any] = {"use_listings_cache": False}
    scheme = path.split("://", 1)[0].lower() if is_url(path) else ""
    if scheme in ("s3", "s3a"):
        from fsspec.config import conf

        if "max_concurrency" not in conf.get(scheme, {}):
            options["max_concurrency"] = 1
    return options


def filesystem(path: str) -> tuple[Any, str]:
    """``(fs, path inside fs)`` for a URL or a local path."""
    from fsspec.core import url_to_fs

    if not is_url(path):
        return url_to_fs(os.path.abspath(_local(path)))
    return url_to_fs(path, **storage_options(path))


def exists(path: str) -> bool:
    """Whether anything (file, object, directory or prefix) is at ``path``.

    For URLs, failures other than "not there" (no credentials, endpoint unreachable) propagate:
    callers turn them into :class:`~tilesegment.errors.InputError` or ``OutputError``.
    """
    if not is_url(path):
        return os.path.exists(_local(path).rstrip("/") or "/")
    fs, inner = filesystem(path)
    return bool(fs.exists(inner.rstrip("/")))


def isdir(path: str) -> bool:
    if not is_url(path):
        return os.path.isdir(_local(path).rstrip("/") or "/")
    fs, inner = filesystem(path)
    return bool(fs.isdir(inner.rstrip("/")))


def join(base: str, *parts: str) -> str:
    if not is_url(base):
        return os.path.join(base, *parts)
    return "/".join([base.rstrip("/"), *(p.strip("/") for p in parts)])


def parent(path: str) -> str:
    """The folder (or prefix) holding ``path``; for a URL, still a URL."""
    if not is_url(path):
        return os.path.dirname(os.path.abspath(_local(path).rstrip(os.sep) or os.sep))
    scheme, rest = path.split("://", 1)
    head = posixpath.dirname(rest.rstrip("/"))
    return f"{scheme}://{head}"


def basename(path: str) -> str:
    return posixpath.basename(path.rstrip("/")) if is_url(path) else os.path.basename(path.rstrip(os.sep))


def normalize(path: str) -> str:
    """One spelling per location: a resolved absolute path, or ``scheme://bucket/key`` with no
    doubled or trailing slashes and no ``.``/``..`` (so two URLs can be compared as strings)."""
    if not is_url(path):
        return os.path.realpath(_local(path))
    scheme, rest = path.split("://", 1)
    rest = posixpath.normpath("/" + rest.lstrip("/")).lstrip("/")
    return f"{scheme.lower()}://{rest}"


def zarr_store(path: str, mode: str = "r") -> Any:
    """What to hand ``zarr.open*``: the path itself when local, else an ``FsspecStore``."""
    if not is_url(path):
        return _local(path)
    from zarr.storage import FsspecStore

    return FsspecStore.from_url(path, storage_options=storage_options(path), read_only=mode == "r")


def describe_failure(exc: BaseException) -> str:
    """The reason a URL could not be used, in a few words, for a one-line error."""
    name = type(exc).__name__
    text = str(exc).strip().rstrip(".") or name
    if name == "NoCredentialsError" or "Unable to locate credentials" in text:
        return "no credentials were found"
    if name in ("EndpointConnectionError", "ConnectTimeoutError", "ConnectionClosedError") or "Could not connect" in text:
        return f"the storage endpoint cannot be reached ({text})"
    if isinstance(exc, PermissionError) or name in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
        return f"access was denied ({text})"
    if isinstance(exc, FileNotFoundError):
        return f"not found ({text})"
    if isinstance(exc, ImportError) or ("Protocol not known" in text) or ("not available" in text and "protocol" in text.lower()):
        return f"this kind of URL cannot be opened here ({text})"
    return f"{name}: {text}"


def remedy(path: str, exc: BaseException | None = None) -> str:
    """How to fix a storage failure at ``path``."""
    if exc is not None and (isinstance(exc, ImportError) or "Protocol not known" in str(exc)):
        return "Install the fsspec back-end for this URL scheme (e.g. 'pip install s3fs' for s3://)."
    if is_url(path) and path.lower().startswith(("s3://", "s3a://")):
        return ("Check the bucket and key, the credentials (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE) and, "
                "for a non-AWS store, the endpoint (AWS_ENDPOINT_URL or FSSPEC_S3_ENDPOINT_URL).")
    return "Check the URL, the credentials and the endpoint (fsspec's configuration or the store's usual environment variables)."


#: what a full or closed local file system says, in words
_WRITE_ERRNOS = {errno.ENOSPC: "no space is left on the device", errno.EDQUOT: "the disk quota is exceeded",
                 errno.EROFS: "the file system is read-only", errno.EACCES: "permission was denied"}


def is_write_failure(exc: BaseException) -> bool:
    """A full disk, an exceeded quota, a read-only file system or a permission refused."""
    return isinstance(exc, OSError) and exc.errno in _WRITE_ERRNOS


def write_failure(output: str, exc: OSError, resumable: bool = True) -> Exception:
    """The one-line error for an output that could not be written (a full disk, an exceeded quota,
    a store refusing the write); ``resumable``: a run's blocks already written are kept, so the run
    can be finished where it stopped."""
    from .errors import OutputError

    reason = _WRITE_ERRNOS.get(exc.errno or -1) or describe_failure(exc)
    fix = remedy(output, exc) if is_url(output) else "Free space (or fix the permissions), or choose another output"
    then = "; then finish the run with --resume (the blocks already written are kept)." if resumable else "."
    return OutputError(f"cannot write {output}: {reason}.", fix.rstrip(".") + then)


def check_output_file(path: str, overwrite: bool, example: str) -> None:
    """Refuse, before any work is done, a local output file that could not be written at the end: a
    folder of that name, an existing file (unless ``overwrite``), a missing or read-only folder.
    ``example``: a file name to suggest (``mask.mrc``)."""
    from .errors import OutputError

    if os.path.isdir(path):
        raise OutputError(f"{path} is a directory.", f"Give a file name such as {example}.")
    if os.path.exists(path) and not overwrite:
        raise OutputError(f"{path} already exists.", "Choose another file name, or pass --overwrite to replace it.")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder) or not os.access(folder, os.W_OK):
        raise OutputError(f"cannot write {path}: the folder {folder} does not exist or is not writable.", "Create it, or write elsewhere.")


@contextlib.contextmanager
def replaced_when_written(path: str) -> Iterator[str]:
    """A temporary name beside the local file ``path`` (hidden, this process's) to write it under:
    renamed onto ``path`` when the block ends without an error, removed otherwise, so that no
    reader sees half a file and a failed write leaves an older file of that name whole."""
    folder, name = os.path.split(os.path.abspath(path))
    partial = os.path.join(folder, f".{name}.{os.getpid()}.partial")
    try:
        yield partial
        os.replace(partial, path)
    finally:
        if os.path.exists(partial):
            os.remove(partial)


def check_not_nested(input_path: str, output: str) -> None:
    """Refuse an output inside the input, or holding it; paths and URLs are compared normalised."""
    from .errors import OptionError

    if is_url(input_path) != is_url(output):
        return  # one on this machine, one in a store: never nested
    src, dst = normalize(input_path), normalize(output)
    sep = "/" if is_url(output) else os.sep
    if dst == src or dst.startswith(src.rstrip(sep) + sep):
        raise OptionError(f"output {output} is inside the input {input_path}.", "Write the output somewhere else; tileseg never modifies its input.")
    if src.startswith(dst.rstrip(sep) + sep):
        raise OptionError(f"output {output} contains the input {input_path}; overwriting it would delete the input.", "Choose another output path.")
