"""Atomic file writes: write to a temporary file in the same directory, fsync, rename over the target.

A crash mid-write leaves the previous file intact (rename is atomic on POSIX), never a torn one. State that
must survive anything (a node's local prompt, the server's checkpoint) goes further: its tensors carry a
SHA-256 digest in their metadata, and the file it replaces is kept as ``<name>.prev``. Reading checks the
digest and falls back to the previous file when the current one is damaged (a disk that lied about fsync,
a copy cut short, a bit flip), so a damaged write costs one step, never the state.

A write that fails (a full disk above all) changes nothing: the new content goes to a temporary file that is
complete and fsynced before it takes the name, the file it replaces is kept as ``.prev`` through a hard link
(so the name always points at a complete file), and the temporary file is removed on any failure. A full disk
is reported as ``DiskFullError``, naming the file and what to do; the previous state is still the current one,
so the write can simply be retried once space is freed.

torch and safetensors are imported where tensors are written or read: the JSON writes serve messages (secure
aggregation's later stages, SecFPP's phases) that a node answers without loading torch.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

log = logging.getLogger("dpfpl.state")
DIGEST_KEY = "sha256"


class CorruptStateError(RuntimeError):
    """A state file that cannot be read or whose content does not match its digest."""


class DiskFullError(OSError):
    """A state write refused for lack of space (ENOSPC, or a quota: EDQUOT). Nothing of the write was kept: the
    file it would have replaced is still the current one."""


# what safetensors (Rust) says when a write hits a full disk: it raises its own error type, not OSError
_DISK_FULL_TEXTS = ("no space left on device", "os error 28", "disk quota exceeded", "os error 122")


def is_disk_full(err: BaseException) -> bool:
    """``err`` says the disk (or a quota) is full, whoever raised it."""
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
        return True
    return any(text in str(err).lower() for text in _DISK_FULL_TEXTS)


def _explain_disk_full(path: Path, err: BaseException) -> DiskFullError:
    return DiskFullError(
        errno.ENOSPC,
        f"no space left on device while writing {path} ({err}). Nothing of this write was kept: {path.name} still "
        f"holds what it held before. Free space on the file system of {path.parent} and resume (re-run the "
        "command, or let the server send the round again): nothing is lost or charged twice",
        str(path),
    )


def _install(tmp: str, path: Path, keep_previous: bool) -> None:
    """Give the complete, fsynced temporary file the name ``path``. With ``keep_previous`` the file it replaces
    becomes ``path.prev`` first, through a hard link, so that ``path`` names a complete file at every instant (a
    crash in between leaves the old file under both names). A file system without hard links gets two renames
    instead: a crash between them leaves only ``.prev``, which the reader takes (and charges as a lost write)."""
    if keep_previous and path.is_file():
        link = f"{tmp}.prev"
        try:
            os.link(path, link)
        except OSError as err:
            if err.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK, errno.ENOSYS):
                raise
            os.replace(path, previous_path(path))
        else:
            try:
                os.replace(link, previous_path(path))
            except BaseException:
                Path(link).unlink(missing_ok=True)
                raise
    os.replace(tmp, path)


@contextmanager
def _replacing(path: Path, keep_previous: bool) -> Iterator[str]:
    """A temporary file beside ``path`` for the caller to write completely and fsync. When the caller is done it
    takes the name ``path`` (``_install``) and the directory is fsynced; on any failure it is removed, ``path``
    is untouched, and a full disk is reported as ``DiskFullError``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield tmp
        _install(tmp, path, keep_previous)
    except BaseException as err:
        Path(tmp).unlink(missing_ok=True)
        if is_disk_full(err):
            raise _explain_disk_full(path, err) from err
        raise
    fsync_directory(path.parent)


def _atomic_write(path: Path, data: bytes, keep_previous: bool = False) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same directory (``os.write`` until every byte
    is down, then fsync), then rename it over ``path``; on any failure the temporary file is removed and
    ``path`` is untouched."""
    with _replacing(path, keep_previous) as tmp:
        fd = os.open(tmp, os.O_WRONLY)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)


def fsync_directory(directory: Path) -> None:
    """Make a rename in ``directory`` durable: without it a power loss can undo the rename even though the
    file's own data was fsynced (POSIX leaves directory entries to the directory's own fsync)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # a platform without directory handles: the rename is as durable as it gets there
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_bytes(path: Path, data: bytes, keep_previous: bool = False) -> None:
    _atomic_write(Path(path), data, keep_previous)


def write_json(path: Path, obj: Any, keep_previous: bool = False) -> None:
    """``obj`` as JSON, atomically; ``keep_previous``: the replaced file stays as ``path.prev``."""
    _atomic_write(Path(path), json.dumps(obj, indent=2, sort_keys=True).encode(), keep_previous)


def tensor_digest(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> str:
    """SHA-256 over every tensor (name, dtype, shape, bytes) and the metadata, in a fixed order."""
    import torch

    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    h.update(json.dumps({k: v for k, v in metadata.items() if k != DIGEST_KEY}, sort_keys=True).encode())
    return h.hexdigest()


def previous_path(path: Path) -> Path:
    return Path(path).with_name(Path(path).name + ".prev")


def write_state(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Write tensors + metadata with a digest, atomically, keeping the replaced file as ``.prev``."""
    metadata = {**metadata, DIGEST_KEY: tensor_digest(tensors, metadata)}
    write_tensors(Path(path), tensors, metadata, keep_previous=True)


def read_checked(path: Path, digest_required: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and metadata of ``path``; ``CorruptStateError`` when it cannot be parsed or does not match its
    digest (``digest_required=False``: a file written without a digest is taken as it parses)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    try:
        with safe_open(str(path), framework="pt") as fh:
            metadata = dict(fh.metadata() or {})
        tensors = load_file(str(path))
    except Exception as err:  # noqa: BLE001 - any parse failure means the file is damaged
        raise CorruptStateError(f"{path} cannot be read ({type(err).__name__}: {err})") from err
    if (digest_required or DIGEST_KEY in metadata) and metadata.get(DIGEST_KEY) != tensor_digest(tensors, metadata):
        raise CorruptStateError(f"{path} does not match its SHA-256 digest")
    return tensors, metadata


@dataclass
class StateFile:
    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str]
    from_previous: bool  # the current file was missing or damaged: this is the copy before the last write


def read_state(path: Path) -> StateFile | None:
    """The tensors and metadata of ``path``, or of ``path.prev`` when ``path`` is missing or damaged;
    ``None`` when neither exists. Raises ``CorruptStateError`` (naming both files) when no copy is intact."""
    path = Path(path)
    errors = []
    for candidate in (path, previous_path(path)):
        if not candidate.is_file():
            continue
        try:
            result = read_checked(candidate)
        except CorruptStateError as err:
            errors.append(str(err))
            log.error("%s", err)
            continue
        if candidate != path:
            log.warning("using the previous state %s: %s", candidate, "; ".join(errors) or f"{path} is missing")
        return StateFile(*result, from_previous=candidate != path)
    if errors:
        raise CorruptStateError(
            "no intact copy of the state: "
            + "; ".join(errors)
            + ". Restore the file from a backup, or move it away to start this state afresh."
        )
    return None


def write_tensors(
    path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None, keep_previous: bool = False
) -> None:
    """Tensors (+ string metadata) as safetensors, atomically, as ``_atomic_write`` writes bytes (safetensors
    writes the temporary file itself: a large cache is never held twice in memory)."""
    from safetensors.torch import save_file

    with _replacing(Path(path), keep_previous) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp, metadata=metadata)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))
