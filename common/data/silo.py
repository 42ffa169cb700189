"""An organization's own data silo: a class-per-folder tree or a CSV manifest, checked before training.

Accepted layouts of a node's ``data-dir``:

* ``manifest.csv`` with a header ``path,label[,split]``: paths relative to data-dir, labels from the run's
  class list, split ``train`` or ``test``;
* ``train/<class>/*.{png,jpg,...}`` and ``test/<class>/*``;
* ``<class>/*`` (no split folders).

Without an explicit split, each class is split once, seeded, into 80% train / 20% test. Every problem is
collected and reported together with the files or labels involved, before any training starts.
"""

from __future__ import annotations

import csv
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, UnidentifiedImageError

from .images import DatasetError, seeded_split

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
        h = hashlib.sha256()
        for p, y, t in zip(self.paths, self.labels.tolist(), self.is_test.tolist()):
            st = p.stat()
            h.update(f"{p}|{y}|{t}|{st.st_size}|{st.st_mtime_ns}\n".encode())
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
            raise SiloError(f"{manifest}: the header must be 'path,label[,split]', found {reader.fieldnames}")
        for line, row in enumerate(reader, start=2):
            split = (row.get("split") or "").strip() or None
            if split is not None and split not in SPLITS:
                raise SiloError(f"{manifest}:{line}: split must be 'train' or 'test', found '{split}'")
            if not (row.get("path") or "").strip() or not (row.get("label") or "").strip():
                raise SiloError(f"{manifest}:{line}: every row needs a path and a label, found {dict(row)}")
            entries.append((root / row["path"].strip(), row["label"].strip(), split))
    return entries


def load_silo(data_dir: str | Path, classnames: list[str], seed: int = 0, check_images: bool = True) -> Silo:
    root = Path(data_dir)
    if not root.is_dir():
        raise SiloError(f"data-dir '{root}' does not exist or is not a directory")
    manifest = root / "manifest.csv"
    entries = manifest_entries(root, manifest) if manifest.is_file() else folder_entries(root)
    if not entries:
        raise SiloError(
            f"the silo '{root}' holds no images: expected manifest.csv (path,label[,split]) or class folders "
            f"(train/<class>/*.png, test/<class>/*.png, or <class>/*.png) with one of {sorted(IMAGE_SUFFIXES)}"
        )
    index = {name: i for i, name in enumerate(classnames)}
    unknown = sorted({label for _, label, _ in entries if label not in index})
    problems = []
    if unknown:
        problems.append(f"labels not in the run's class list: {unknown} (class list: {classnames})")
    missing = [str(p) for p, _, _ in entries if not p.is_file()]
    if missing:
        problems.append(f"{len(missing)} missing files, e.g. {missing[:5]}")
    if check_images:
        corrupt = []
        for p, _, _ in entries:
            if p.is_file():
                try:
                    with Image.open(p) as img:
                        img.verify()
                except (UnidentifiedImageError, OSError, SyntaxError) as err:
                    corrupt.append(f"{p} ({type(err).__name__})")
        if corrupt:
            problems.append(f"{len(corrupt)} unreadable or corrupt images: {corrupt[:10]}")
    if problems:
        raise SiloError(f"data silo '{root}' is not usable:\n  - " + "\n  - ".join(problems))

    paths = [p for p, _, _ in entries]
    labels = np.array([index[label] for _, label, _ in entries], dtype=np.int64)
    if all(split is not None for _, _, split in entries):
        is_test = np.array([split == "test" for _, _, split in entries])
    else:
        is_test = seeded_split(labels, TEST_FRACTION, seed)
    if is_test.all():
        raise SiloError(f"data silo '{root}' has no training images")
    return Silo(paths=paths, labels=labels, is_test=is_test)


def load_images(paths: list[Path], preprocess) -> torch.Tensor:
    import torch

    batch = []
    for p in paths:
        with Image.open(p) as img:
            batch.append(preprocess(img.convert("RGB")))
    return torch.stack(batch)
