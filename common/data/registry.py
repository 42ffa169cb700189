"""One entry point from a run config's ``dataset`` + ``data-root`` to an ``ImageDataset``."""

from __future__ import annotations

from functools import lru_cache

from ..models import demo_pixels
from .cifar import CIFAR_LAYOUTS, load_cifar
from .coop import COOP_DATASETS, load_coop_dataset
from .demo import load_demo_dataset
from .folder import load_folder_dataset, load_manifest_dataset
from .images import ArraySource, DatasetError, ImageDataset

# "silo" is not here: a silo is one organization's own data, read by its node (common/data/silo.py).
DATASET_NAMES: tuple[str, ...] = ("demo", *COOP_DATASETS, *CIFAR_LAYOUTS, "folder", "csv")


@lru_cache(maxsize=1)
def demo_image_dataset() -> ImageDataset:
    """The clients' view of the embedded default: its train and test records only. The public part, on which
    the demo backbone was pretrained, is not in it (its model input is computed exactly as pretraining did)."""
    data = load_demo_dataset()
    records = data.private_records()
    images = data.images[records]
    return ImageDataset(
        name="demo",
        classnames=list(data.classnames),
        labels=data.labels[records],
        is_test=data.is_test[records],
        source=ArraySource(images, "demo"),
        batch_pixels=lambda idx: demo_pixels(images[idx]),
        note=f"{int(data.is_public.sum())} more public images pretrained the backbone and are never read by a run",
    )


@lru_cache(maxsize=4)
def load_dataset(name: str, data_root: str = "", classnames: tuple[str, ...] = (), seed: int = 0) -> ImageDataset:
    if name == "demo":
        return demo_image_dataset()
    if name not in DATASET_NAMES:
        raise DatasetError(f"unknown dataset '{name}'; choose one of {DATASET_NAMES} (or 'silo')")
    if not data_root:
        raise DatasetError(f"dataset = '{name}' needs data-root (the folder that holds it)")
    if name in COOP_DATASETS:
        dataset = load_coop_dataset(name, data_root)
    elif name in CIFAR_LAYOUTS:
        dataset = load_cifar(name, data_root)
    elif name == "folder":
        dataset = load_folder_dataset(data_root, list(classnames) or None, seed)
    else:
        dataset = load_manifest_dataset(data_root, list(classnames) or None, seed)
    if classnames and name not in ("folder", "csv") and list(classnames) != dataset.classnames:
        raise DatasetError(
            f"the run's classnames differ from {name}'s own class list: run {list(classnames)[:5]}..., "
            f"data set {dataset.classnames[:5]}...; leave classnames empty for {name}"
        )
    return dataset
