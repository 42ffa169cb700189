"""The embedded default data set: images that ship inside PyPI packages, no download.

* animal-mnist: 10,000 28x28 animal silhouettes, 10 classes (MIT). Read from its gzip'd pickles with
  importlib.resources; its TensorFlow-based loader is not imported.
* scikit-learn's ``load_digits``: 1,797 8x8 handwritten digits, 10 classes.

Together: 20 named classes. Each class is split once, seeded, into train and test; the demo backbone is
pretrained on the train split only, so the test images are unseen by the backbone and by every prompt.
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
SPLIT_SEED = 2025


@dataclass(frozen=True)
class DemoDataset:
    images: np.ndarray  # (N, 32, 32) uint8 grayscale
    labels: np.ndarray  # (N,) int64 in [0, 20)
    is_test: np.ndarray  # (N,) bool
    classnames: list[str]

    @property
    def fingerprint(self) -> str:
        h = hashlib.sha256()
        h.update(self.images.tobytes())
        h.update(self.labels.tobytes())
        h.update(self.is_test.tobytes())
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
    rng = np.random.default_rng(SPLIT_SEED)
    is_test = np.zeros(len(labels), dtype=bool)
    for c in range(len(DEMO_CLASSES)):
        idx = np.flatnonzero(labels == c)
        n_test = int(round(len(idx) * TEST_FRACTION))
        is_test[rng.permutation(idx)[:n_test]] = True
    return DemoDataset(images=images, labels=labels, is_test=is_test, classnames=list(DEMO_CLASSES))
