"""An organization's own data silo: a class-per-folder tree or a CSV manifest, checked before training.

Accepted layouts of a node's ``data-dir``:

* ``manifest.csv`` with a header ``path,label[,split]``: paths relative to data-dir, labels from the run's
  class list, split ``train`` or ``test``;
* ``train/<class>/*.{png,jpg,...}`` and ``test/<class>/*``;
* ``<class>/*`` (no split folders).

Without an explicit split, each class is split once, seeded, into 80% train / 20% test. Every problem is
collected and reported together with the files or labels involved, before any training starts.

The silo is the node's own, but not necessarily tidy or friendly: a file that only half arrived, an image
built to exhaust memory when decoded, a file name that is not UTF-8, a manifest row or a symlink that points
elsewhere on the machine. Each is refused at the check with the file and the reason, because found later it
would fail as a bare exception in the middle of encoding (naming no file), or, for a path outside data-dir,
would train on, and so release information about, files the organization never put in its silo.
"""

from __future__ import annotations

import csv
import hashlib
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from .images import DatasetError, decode_failure, open_rgb, seeded_split, shown

if TYPE_CHECKING:
    import torch

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
SPLITS = ("train", "test")
TEST_FRACTION = 0.2


class SiloError(DatasetError):
    """The node's data silo does not match what the run expects."""


@dataclass(frozen=True)
class Silo:
    paths: list[Path]
    labels: np.ndarray  # indices into the run's class list
    is_test: np.ndarray

    @property
    def fingerprint(self) -> str:
        """Content identity of the file set (keys the feature cache). A name is hashed as its bytes
        (``os.fsencode``): a name that is not UTF-8 has no ``str.encode``, and for every UTF-8 name the bytes
        are the same, so existing cache keys stay valid."""
        h = hashlib.sha256()
        for p, y, t in zip(self.paths, self.labels.tolist(), self.is_test.tolist()):
            try:
                st = p.stat()
            except OSError as err:
                raise SiloError(f"silo image {shown(p)} can no longer be read ({err.strerror or err})") from None
            h.update(os.fsencode(p) + f"|{y}|{t}|{st.st_size}|{st.st_mtime_ns}\n".encode())
        return h.hexdigest()[:16]


def folder_entries(root: Path) -> list[tuple[Path, str, str | None]]:
    entries = []
    split_dirs = [root / s for s in SPLITS if (root / s).is_dir()]
    for base, split in [(d, d.name) for d in split_dirs] if split_dirs else [(root, None)]:
        for class_dir in sorted(p for p in base.iterdir() if p.is_dir()):
            for f in sorted(class_dir.iterdir()):
                if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES:
                    entries.append((f, class_dir.name, split))
    return entries


def manifest_entries(root: Path, manifest: Path) -> list[tuple[Path, str, str | None]]:
    entries = []
    with open(manifest, newline="") as fh:
        reader = csv.DictReader(fh)
        if reader.fieldnames is None or not {"path", "label"} <= set(reader.fieldnames):
            raise SiloError(f"{shown(manifest)}: the header must be 'path,label[,split]', found {reader.fieldnames}")
        for line, row in enumerate(reader, start=2):
            split = (row.get("split") or "").strip() or None
            if split is not None and split not in SPLITS:
                raise SiloError(f"{shown(manifest)}:{line}: split must be 'train' or 'test', found '{split}'")
            if not (row.get("path") or "").strip() or not (row.get("label") or "").strip():
                raise SiloError(f"{shown(manifest)}:{line}: every row needs a path and a label, found {dict(row)}")
            entries.append((root / row["path"].strip(), row["label"].strip(), split))
    return entries


def outside_reason(root: Path, real_root: Path, path: Path) -> str | None:
    """Why ``path`` (a manifest row joined to ``root``, or a file found under it) is not a file inside
    data-dir (``real_root`` is ``root.resolve()``), or None when it is. Judged on the resolved path, so an
    absolute row, a '..' row and a symlink (the file's own, or a folder's above it) that lead out are caught
    alike, and links that stay inside are fine; the lexical form only picks the words of the reason."""
    try:
        real = path.resolve()
    except (OSError, RuntimeError) as err:  # a symlink loop: RuntimeError before Python 3.13, OSError since
        return f"cannot be resolved ({type(err).__name__}: {err})"
    if real.is_relative_to(real_root):
        return None
    here, base = path.absolute(), root.absolute()
    if not here.is_relative_to(base):
        return "an absolute path outside data-dir"
    if ".." in here.relative_to(base).parts:
        return "a '..' path that leads outside data-dir"
    return f"reached through a symlink, resolves to {shown(real)}, outside data-dir"


def image_problem(path: Path) -> str | None:
    """Why the file cannot be used as an image, or None. ``verify()`` checks the structure (PNG checksums,
    say) but decodes nothing, so a truncated JPEG passes it; ``load()`` on a fresh open decodes every pixel
    and fails there. Any exception counts (see ``open_rgb``). PIL only warns about an image between its pixel
    limit and twice that (``DecompressionBombWarning``) and decodes it anyway: the check makes the warning an
    error, so that every image past the limit is refused here, not only those past twice it."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                img.verify()
            with Image.open(path) as img:  # verify() leaves the image unusable: open again to decode
                img.load()
    except Exception as err:
        return decode_failure(err)
    return None


def _entries(root: Path) -> list[tuple[Path, str, str | None]]:
    manifest = root / "manifest.csv"
    try:
        return manifest_entries(root, manifest) if manifest.is_file() else folder_entries(root)
    except (UnicodeDecodeError, csv.Error) as err:
        raise SiloError(
            f"{shown(manifest)}: not a readable 'path,label[,split]' CSV ({type(err).__name__}: {err})"
        ) from None
    except OSError as err:  # a folder or the manifest the node may not read
        raise SiloError(f"cannot read {shown(err.filename or root)} ({err.strerror or err})") from None


def load_silo(data_dir: str | Path, classnames: list[str], seed: int = 0, check_images: bool = True) -> Silo:
    root = Path(data_dir)
    if not root.is_dir():
        raise SiloError(f"data-dir '{shown(root)}' does not exist or is not a directory")
    entries = _entries(root)
    if not entries:
        raise SiloError(
            f"the silo '{shown(root)}' holds no images: expected manifest.csv (path,label[,split]) or class folders "
            f"(train/<class>/*.png, test/<class>/*.png, or <class>/*.png) with one of {sorted(IMAGE_SUFFIXES)}"
        )
    index = {name: i for i, name in enumerate(classnames)}
    unknown = sorted({label for _, label, _ in entries if label not in index})
    problems = []
    if unknown:
        problems.append(f"labels not in the run's class list: {unknown} (class list: {classnames})")
    # a file outside data-dir is neither opened nor looked for: only its listing is reported
    real_root = root.resolve()
    outside = {p: why for p, _, _ in entries if (why := outside_reason(root, real_root, p)) is not None}
    if outside:
        named = [f"{shown(p)} ({why})" for p, why in outside.items()]
        problems.append(f"{len(named)} files outside data-dir, refused: " + "; ".join(named[:10]))
    inside = [p for p, _, _ in entries if p not in outside]
    missing = [shown(p) for p in inside if not p.is_file()]
    if missing:
        problems.append(f"{len(missing)} missing files, e.g. " + "; ".join(missing[:5]))
    if check_images:
        corrupt = [f"{shown(p)} ({why})" for p in inside if p.is_file() and (why := image_problem(p)) is not None]
        if corrupt:
            problems.append(f"{len(corrupt)} unreadable or corrupt images: " + "; ".join(corrupt[:10]))
    if problems:
        raise SiloError(f"data silo '{shown(root)}' is not usable:\n  - " + "\n  - ".join(problems))

    paths = [p for p, _, _ in entries]
    labels = np.array([index[label] for _, label, _ in entries], dtype=np.int64)
    if all(split is not None for _, _, split in entries):
        is_test = np.array([split == "test" for _, _, split in entries])
    else:
        is_test = seeded_split(labels, TEST_FRACTION, seed)
    if is_test.all():
        raise SiloError(f"data silo '{shown(root)}' has no training images")
    return Silo(paths=paths, labels=labels, is_test=is_test)


def load_images(paths: list[Path], preprocess) -> torch.Tensor:
    """The files through ``preprocess``, stacked. A file that fails to decode here (changed since the check,
    or never checked) raises ``SiloError`` naming it: the node keeps a ``SiloError``'s file names in its own
    log instead of sending them to the server."""
    import torch

    return torch.stack([preprocess(open_rgb(p, SiloError)) for p in paths])
