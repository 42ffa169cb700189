"""CIFAR-10 and CIFAR-100 in torchvision's on-disk format (what ``torchvision.datasets.CIFAR10(root,
download=True)`` leaves behind)::

    data-root/cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}
    data-root/cifar-100-python/{train, test, meta}

The batches are Python pickles. They are read with an unpickler that admits only the types a CIFAR batch
holds (dicts, lists, strings, numbers and numpy arrays), so a tampered file cannot run code.
"""

from __future__ import annotations

import importlib
import io
import pickle
from pathlib import Path

import numpy as np

from .images import ArraySource, DatasetError, ImageDataset, clean_classname

_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),
}

CIFAR_LAYOUTS = {
    "cifar10": (
        "cifar-10-batches-py",
        [f"data_batch_{i}" for i in range(1, 6)],
        ["test_batch"],
        "batches.meta",
        "labels",
        "label_names",
    ),
    "cifar100": ("cifar-100-python", ["train"], ["test"], "meta", "fine_labels", "fine_label_names"),
}


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) in _ALLOWED_GLOBALS:
            return getattr(importlib.import_module(module), name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: not part of a CIFAR batch")


def _load_pickle(path: Path, hint: str) -> dict:
    if not path.is_file():
        raise DatasetError(f"CIFAR file not found: {path}\n{hint}")
    try:
        obj = _RestrictedUnpickler(io.BytesIO(path.read_bytes()), encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, ImportError) as err:
        raise DatasetError(f"{path} is not a readable CIFAR batch ({type(err).__name__}: {err})\n{hint}") from None
    if not isinstance(obj, dict):
        raise DatasetError(f"{path}: expected a dict, found {type(obj).__name__}\n{hint}")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in obj.items()}


def load_cifar(name: str, data_root: str | Path) -> ImageDataset:
    if name not in CIFAR_LAYOUTS:
        raise DatasetError(f"unknown CIFAR variant '{name}'; known: {sorted(CIFAR_LAYOUTS)}")
    folder_name, train_files, test_files, meta_file, label_key, names_key = CIFAR_LAYOUTS[name]
    folder = Path(data_root) / folder_name
    hint = (
        f"expected torchvision's layout: {folder}/ with {', '.join(train_files + test_files + [meta_file])} "
        f"(e.g. from torchvision.datasets.{'CIFAR10' if name == 'cifar10' else 'CIFAR100'}(root, download=True) "
        "on a machine with internet, then copy the folder)"
    )
    meta = _load_pickle(folder / meta_file, hint)
    if names_key not in meta:
        raise DatasetError(f"{folder / meta_file}: no '{names_key}' entry\n{hint}")
    classnames = [clean_classname(n.decode() if isinstance(n, bytes) else str(n)) for n in meta[names_key]]

    images, labels, is_test = [], [], []
    for files, test in ((train_files, False), (test_files, True)):
        for fname in files:
            batch = _load_pickle(folder / fname, hint)
            if "data" not in batch or label_key not in batch:
                raise DatasetError(f"{folder / fname}: expected 'data' and '{label_key}' entries\n{hint}")
            data = np.asarray(batch["data"])
            lab = np.asarray(batch[label_key], dtype=np.int64)
            if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(data) != len(lab):
                raise DatasetError(
                    f"{folder / fname}: 'data' must be uint8 (N, 3072) with N labels, found "
                    f"{data.dtype} {data.shape} and {len(lab)} labels"
                )
            if len(lab) and (lab.min() < 0 or lab.max() >= len(classnames)):
                raise DatasetError(f"{folder / fname}: labels outside 0..{len(classnames) - 1}")
            images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
            labels.append(lab)
            is_test.append(np.full(len(lab), test))
    arrays = np.ascontiguousarray(np.concatenate(images))
    return ImageDataset(
        name=name,
        classnames=classnames,
        labels=np.concatenate(labels),
        is_test=np.concatenate(is_test),
        source=ArraySource(arrays, name),
    )
