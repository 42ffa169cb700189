"""The papers' data sets, laid out the way CoOp's DATASETS.md tells users to prepare them.

Under ``data-root`` (CoOp's ``$DATA``)::

    caltech-101/101_ObjectCategories/<class>/*.jpg      + caltech-101/split_zhou_Caltech101.json
    oxford_pets/images/*.jpg                             + oxford_pets/split_zhou_OxfordPets.json
    oxford_flowers/jpg/*.jpg                             + oxford_flowers/split_zhou_OxfordFlowers.json
    food-101/images/<class>/*.jpg                        + food-101/split_zhou_Food101.json
    dtd/images/<class>/*.jpg                             + dtd/split_zhou_DescribableTextures.json

A split file is ``{"train": [[relative image path, label, class name], ...], "val": [...], "test": [...]}``
(CoOp's ``read_split``). The fixed train and test lists are used as they are; ``val`` is not used (the
federated protocols of DP-FPL and FedPGP train on train and report test). Class names come from the split
file and are cleaned as CoOp does before they enter a prompt (``_`` becomes a space).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .images import DatasetError, FileSource, ImageDataset, clean_classname


@dataclass(frozen=True)
class CoopLayout:
    folder: str
    image_dir: str
    split_file: str


COOP_DATASETS: dict[str, CoopLayout] = {
    "caltech101": CoopLayout("caltech-101", "101_ObjectCategories", "split_zhou_Caltech101.json"),
    "oxford_pets": CoopLayout("oxford_pets", "images", "split_zhou_OxfordPets.json"),
    "oxford_flowers": CoopLayout("oxford_flowers", "jpg", "split_zhou_OxfordFlowers.json"),
    "food101": CoopLayout("food-101", "images", "split_zhou_Food101.json"),
    "dtd": CoopLayout("dtd", "images", "split_zhou_DescribableTextures.json"),
}


def _layout_hint(name: str, root: Path) -> str:
    lay = COOP_DATASETS[name]
    return (
        f"expected CoOp's layout under data-root '{root}': {lay.folder}/{lay.image_dir}/ (the images) and "
        f"{lay.folder}/{lay.split_file} (the split file from CoOp's DATASETS.md)"
    )


def _read_split_file(path: Path, name: str, root: Path) -> dict[str, list]:
    if not path.is_file():
        raise DatasetError(f"split file not found: {path}\n{_layout_hint(name, root)}")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DatasetError(
            f"{path} is not valid JSON ({err}); download it again ({_layout_hint(name, root)})"
        ) from None
    if not isinstance(data, dict) or not {"train", "test"} <= set(data):
        raise DatasetError(
            f"{path}: expected a JSON object with 'train', 'val' and 'test' lists of [image path, label, class name]"
        )
    for split in ("train", "test"):
        entries = data[split]
        if not isinstance(entries, list) or not entries:
            raise DatasetError(f"{path}: '{split}' must be a non-empty list of [image path, label, class name]")
        for k, item in enumerate(entries):
            if (
                not isinstance(item, list)
                or len(item) != 3
                or not isinstance(item[0], str)
                or not isinstance(item[1], int)
                or isinstance(item[1], bool)
                or not isinstance(item[2], str)
            ):
                raise DatasetError(
                    f"{path}: {split}[{k}] = {item!r} is not [image path (str), label (int), class name (str)]"
                )
    return data


def load_coop_dataset(name: str, data_root: str | Path) -> ImageDataset:
    if name not in COOP_DATASETS:
        raise DatasetError(f"unknown CoOp data set '{name}'; known: {sorted(COOP_DATASETS)}")
    root = Path(data_root)
    lay = COOP_DATASETS[name]
    folder = root / lay.folder
    image_dir = folder / lay.image_dir
    split_path = folder / lay.split_file
    if not image_dir.is_dir():
        raise DatasetError(f"image folder not found: {image_dir}\n{_layout_hint(name, root)}")
    data = _read_split_file(split_path, name, root)

    names: dict[int, str] = {}
    paths, labels, is_test = [], [], []
    for split in ("train", "test"):
        for impath, label, classname in data[split]:
            if names.setdefault(label, classname) != classname:
                raise DatasetError(f"{split_path}: label {label} is named both '{names[label]}' and '{classname}'")
            paths.append(image_dir / impath)
            labels.append(label)
            is_test.append(split == "test")
    if sorted(names) != list(range(len(names))):
        raise DatasetError(f"{split_path}: labels must be 0..C-1 without gaps, found {sorted(names)[:10]}...")
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise DatasetError(
            f"{len(missing)} images listed in {split_path} are missing, e.g. {missing[:3]}\n{_layout_hint(name, root)}"
        )
    classnames = [clean_classname(names[i]) for i in range(len(names))]
    return ImageDataset(
        name=name,
        classnames=classnames,
        labels=np.asarray(labels, dtype=np.int64),
        is_test=np.asarray(is_test, dtype=bool),
        source=FileSource(tuple(paths)),
    )
