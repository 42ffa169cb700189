"""The embedded default data set: images that ship inside PyPI packages, no download.

* animal-mnist: 10,000 28x28 animal silhouettes, 10 classes (MIT). Read from its gzip'd pickles with
  importlib.resources; its TensorFlow-based loader is not imported.
* scikit-learn's ``load_digits``: 1,797 8x8 handwritten digits, 10 classes.

Together: 20 named classes. Each class is split once, seeded, into three disjoint parts:

* **public** (``PUBLIC_FRACTION``): the only records the demo backbone is pretrained on. They play the part of
  the public web data a real CLIP saw; no client trains on them and no evaluation reads them.
* **train** (the rest): the clients' private training records, divided among them by the run's partition.
* **test** (``TEST_FRACTION``): the test records.

So neither the clients' records nor the test records were seen by the backbone, as in a real deployment where
CLIP is pretrained on public data and the organizations' images are new to it. The clients (and every
evaluation) see only the train and test parts (``common/data/registry.py``).
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.resources
import pickle
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

ANIMAL_CLASSES = ["bear", "bird", "cat", "cow", "dog", "elephant", "giraffe", "horse", "sheep", "zebra"]
DIGIT_CLASSES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
DEMO_CLASSES = ANIMAL_CLASSES + [f"digit {d}" for d in DIGIT_CLASSES]
IMAGE_SIZE = 32
TEST_FRACTION = 0.2
PUBLIC_FRACTION = 0.3
SPLIT_SEED = 2025
TRAIN, TEST, PUBLIC = 0, 1, 2  # the values of ``DemoDataset.split``
SPLIT_NAMES = {TRAIN: "train (clients' private records)", TEST: "test", PUBLIC: "public (backbone pretraining only)"}


@dataclass(frozen=True)
class DemoDataset:
    """Every embedded record, with the part it belongs to (``split``: TRAIN, TEST or PUBLIC)."""

    images: np.ndarray  # (N, 32, 32) uint8 grayscale
    labels: np.ndarray  # (N,) int64 in [0, 20)
    split: np.ndarray  # (N,) int8
    classnames: list[str]

    @property
    def is_test(self) -> np.ndarray:
        return self.split == TEST

    @property
    def is_public(self) -> np.ndarray:
        return self.split == PUBLIC

    def private_records(self) -> np.ndarray:
        """Indices of the records clients train and evaluate on (train and test): never the public part."""
        return np.flatnonzero(self.split != PUBLIC)

    def public_records(self) -> np.ndarray:
        """Indices of the records the demo backbone is pretrained on (and nothing else reads)."""
        return np.flatnonzero(self.split == PUBLIC)

    def counts(self) -> dict[str, int]:
        return {SPLIT_NAMES[k]: int((self.split == k).sum()) for k in (TRAIN, TEST, PUBLIC)}

    @property
    def fingerprint(self) -> str:
        """Content identity of the images, labels and which part each record belongs to (keys the backbone)."""
        h = hashlib.sha256()
        h.update(self.images.tobytes())
        h.update(self.labels.tobytes())
        h.update(self.split.astype(np.int8).tobytes())
        return h.hexdigest()[:16]


def _load_animal_mnist() -> tuple[np.ndarray, np.ndarray]:
    try:
        root = importlib.resources.files("animal_mnist") / "data" / "Animal_MNIST"
    except ModuleNotFoundError as err:
        raise RuntimeError(
            "the embedded demo data needs the 'animal-mnist' package: pip install --no-deps animal-mnist"
        ) from err
    with gzip.open(root / "animal_data_version_3.gz", "rb") as fh:
        images = pickle.load(fh)  # trusted: the package's own bundled array
    with gzip.open(root / "animal_label_version_3.gz", "rb") as fh:
        labels = pickle.load(fh)
    return np.asarray(images, dtype=np.uint8), np.asarray(labels, dtype=np.int64)


def _resize(images: np.ndarray, size: int) -> np.ndarray:
    """Nearest-neighbour-free bilinear resize to size x size with torch (no PIL loop)."""
    import torch
    import torch.nn.functional as F

    t = torch.from_numpy(images.astype(np.float32)).unsqueeze(1)
    t = F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False)
    return t.squeeze(1).round().clamp(0, 255).to(torch.uint8).numpy()


@lru_cache(maxsize=1)
def load_demo_dataset() -> DemoDataset:
    from sklearn.datasets import load_digits

    a_img, a_lab = _load_animal_mnist()
    digits = load_digits()
    d_img = (digits.images / 16.0 * 255.0).astype(np.uint8)
    d_lab = digits.target.astype(np.int64) + len(ANIMAL_CLASSES)
    images = np.concatenate([_resize(a_img, IMAGE_SIZE), _resize(d_img, IMAGE_SIZE)])
    labels = np.concatenate([a_lab, d_lab])
    return DemoDataset(images=images, labels=labels, split=_split(images, labels), classnames=list(DEMO_CLASSES))


def _split(images: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Per class, seeded: TEST_FRACTION of the distinct images become test, PUBLIC_FRACTION public, the rest
    train. The unit is a distinct image, not a record: the sources hold a few hundred exact duplicates, and a
    duplicate on both sides of the line would let the backbone see a client's image after all."""
    _, image_id = np.unique(images.reshape(len(images), -1), axis=0, return_inverse=True)
    image_id = image_id.ravel()
    rng = np.random.default_rng(SPLIT_SEED)
    split = np.full(len(labels), TRAIN, dtype=np.int8)
    for c in range(len(DEMO_CLASSES)):
        distinct = rng.permutation(np.unique(image_id[labels == c]))
        n_test, n_public = int(round(len(distinct) * TEST_FRACTION)), int(round(len(distinct) * PUBLIC_FRACTION))
        in_class = labels == c
        split[in_class & np.isin(image_id, distinct[:n_test])] = TEST
        split[in_class & np.isin(image_id, distinct[n_test : n_test + n_public])] = PUBLIC
    return split
