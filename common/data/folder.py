"""A whole data set from a class-per-folder tree or a CSV manifest (organizations' own formats, for simulation
with a partitioner; a single organization's silo uses ``common/data/silo.py`` with the same readers).

* ``dataset = "folder"``: ``data-root/train/<class>/*`` + ``data-root/test/<class>/*``, or ``data-root/<class>/*``
  (then split per class, seeded, 80/20);
* ``dataset = "csv"``: ``data-root/manifest.csv`` (or data-root is the CSV file) with a header
  ``path,label[,split]``; paths are relative to the CSV's folder.

The class list is the sorted set of folder names / labels, or the run's ``classnames`` when given (then every
label must be in it). Names are cleaned for prompts as CoOp does (``_`` becomes a space).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .images import DatasetError, FileSource, ImageDataset, clean_classname, seeded_split
from .silo import IMAGE_SUFFIXES, TEST_FRACTION, folder_entries, manifest_entries


def _dataset_from_entries(
    name: str, where: Path, entries: list[tuple[Path, str, str | None]], classnames: list[str] | None, seed: int
) -> ImageDataset:
    if not entries:
        raise DatasetError(
            f"no images found in {where}: expected train/<class>/*, test/<class>/* or <class>/* with "
            f"one of {sorted(IMAGE_SUFFIXES)}, or manifest.csv with 'path,label[,split]'"
        )
    raw = sorted({label for _, label, _ in entries}) if not classnames else list(classnames)
    index = {label: i for i, label in enumerate(raw)}
    unknown = sorted({label for _, label, _ in entries if label not in index})
    if unknown:
        raise DatasetError(f"{where}: labels not in the run's classnames: {unknown[:20]} (classnames: {raw})")
    missing = [str(p) for p, _, _ in entries if not p.is_file()]
    if missing:
        raise DatasetError(f"{where}: {len(missing)} listed images are missing, e.g. {missing[:5]}")
    labels = np.array([index[label] for _, label, _ in entries], dtype=np.int64)
    splits = [split for _, _, split in entries]
    if all(s is not None for s in splits):
        is_test = np.array([s == "test" for s in splits])
    elif any(s is not None for s in splits):
        raise DatasetError(f"{where}: some records have a split and some do not; give every record one or none")
    else:
        is_test = seeded_split(labels, TEST_FRACTION, seed)
    if is_test.all() or not is_test.any():
        raise DatasetError(
            f"{where}: needs both train and test images (found {int((~is_test).sum())} train, "
            f"{int(is_test.sum())} test)"
        )
    return ImageDataset(
        name=name,
        classnames=[clean_classname(c) for c in raw],
        labels=labels,
        is_test=is_test,
        source=FileSource(tuple(p for p, _, _ in entries)),
    )


def load_folder_dataset(data_root: str | Path, classnames: list[str] | None = None, seed: int = 0) -> ImageDataset:
    root = Path(data_root)
    if not root.is_dir():
        raise DatasetError(f"data-root '{root}' is not a directory (dataset = 'folder' expects class folders)")
    return _dataset_from_entries("folder", root, folder_entries(root), classnames, seed)


def load_manifest_dataset(data_root: str | Path, classnames: list[str] | None = None, seed: int = 0) -> ImageDataset:
    path = Path(data_root)
    manifest = path / "manifest.csv" if path.is_dir() else path
    if not manifest.is_file():
        raise DatasetError(
            f"manifest not found: {manifest} (dataset = 'csv' expects data-root/manifest.csv or the "
            "CSV file itself, with a header 'path,label[,split]')"
        )
    try:
        entries = manifest_entries(manifest.parent, manifest)
    except (UnicodeDecodeError, KeyError) as err:
        raise DatasetError(
            f"{manifest}: not a readable 'path,label[,split]' CSV ({type(err).__name__}: {err})"
        ) from None
    return _dataset_from_entries("csv", manifest, entries, classnames, seed)
