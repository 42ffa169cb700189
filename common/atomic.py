"""Atomic file writes: write to a temporary file in the same directory, fsync, rename over the target.

A crash mid-write leaves the previous file intact (rename is atomic on POSIX), never a torn one. State that
must survive anything (a node's local prompt, the server's checkpoint) goes further: its tensors carry a
SHA-256 digest in their metadata, and the file it replaces is kept as ``<name>.prev``. Reading checks the
digest and falls back to the previous file when the current one is damaged (a disk that lied about fsync,
a copy cut short, a bit flip), so a damaged write costs one step, never the state.

torch and safetensors are imported where tensors are written or read: the JSON writes serve messages (secure
aggregation's later stages, SecFPP's phases) that a node answers without loading torch.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

log = logging.getLogger("dpfpl.state")
DIGEST_KEY = "sha256"


class CorruptStateError(RuntimeError):
    """A state file that cannot be read or whose content does not match its digest."""


def _atomic_write(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_directory(path.parent)


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


def write_bytes(path: Path, data: bytes) -> None:
    _atomic_write(Path(path), lambda fh: fh.write(data))


def write_json(path: Path, obj: Any) -> None:
    _atomic_write(Path(path), lambda fh: fh.write(json.dumps(obj, indent=2, sort_keys=True).encode()))


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
    path = Path(path)
    metadata = {**metadata, DIGEST_KEY: tensor_digest(tensors, metadata)}
    if path.is_file():
        os.replace(path, previous_path(path))  # a crash before the next line: the reader takes .prev
    write_tensors(path, tensors, metadata)


def _read_checked(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open
    from safetensors.torch import load_file

    try:
        with safe_open(str(path), framework="pt") as fh:
            metadata = dict(fh.metadata() or {})
        tensors = load_file(str(path))
    except Exception as err:  # noqa: BLE001 - any parse failure means the file is damaged
        raise CorruptStateError(f"{path} cannot be read ({type(err).__name__}: {err})") from err
    if metadata.get(DIGEST_KEY) != tensor_digest(tensors, metadata):
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
            result = _read_checked(candidate)
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


def write_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    from safetensors.torch import save_file

    path = Path(path)
    tmp_dir = path.parent
    tmp_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=tmp_dir, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp, metadata=metadata)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_directory(path.parent)


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))
