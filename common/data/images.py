"""A labelled image data set as the rest of dpfpl sees it: class names, labels, a train/test flag per record,
and a source that yields the images. Every on-disk format (CoOp folders, CIFAR pickles, a class-per-folder
tree, a CSV manifest, the embedded demo) is read into this one shape, so partitioners, feature caching and
evaluation never care where the pixels came from.

Images are only decoded when their features are computed (once per image and view; see
``common/features.py``), and a file that cannot be decoded then fails with its path.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
from PIL import Image, UnidentifiedImageError


class DatasetError(ValueError):
    """A data set on disk is missing, malformed or inconsistent; the message names the file and the layout."""


def shown(path: str | Path) -> str:
    """A file name for a message: as it is, or, when it is not valid UTF-8 (Python keeps such bytes as lone
    surrogates, which no log or terminal can encode), its escaped repr, so the message can always be printed
    and still names the file."""
    text = str(path)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return ascii(text)
    return text


def decode_failure(err: BaseException) -> str:
    """Why PIL could not open or decode a file, in words the file's owner can act on."""
    if isinstance(err, (Image.DecompressionBombError, Image.DecompressionBombWarning)):  # the warning, made an error
        return (
            f"exceeds PIL's pixel limit (Image.MAX_IMAGE_PIXELS = {Image.MAX_IMAGE_PIXELS}) and is refused as a "
            f"possible decompression bomb: {err}"
        )
    if isinstance(err, UnidentifiedImageError):
        return "not an image format PIL recognizes"
    return f"{type(err).__name__}: {err}"


def open_rgb(path: Path, error: type[DatasetError] = DatasetError) -> Image.Image:
    """The file decoded as an RGB image, or ``error`` naming the file and the reason.

    Any exception counts as a bad file: on hostile or damaged input PIL's decoders raise far more than
    ``OSError`` (``DecompressionBombError``, ``ValueError``, ``struct.error``, ``EOFError``, ...), and a bare
    one of those, raised while encoding thousands of files, would not say which file to fix.
    """
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except FileNotFoundError:
        raise error(f"image file missing: {shown(path)}") from None
    except Exception as err:
        raise error(
            f"cannot decode image {shown(path)} ({decode_failure(err)}); remove or replace the file (the data "
            "set's folders or manifest list it)"
        ) from None


class ImageSource(Protocol):
    def __len__(self) -> int: ...

    def image(self, i: int) -> Image.Image:
        """Record i as an RGB PIL image."""

    def describe(self, i: int) -> str:
        """Where record i comes from, for error messages (a file path, or 'cifar-10 test_batch #12')."""

    def digest(self) -> str:
        """Identifies the content (file list with sizes and mtimes, or the array bytes) for the feature cache."""


@dataclass(frozen=True)
class FileSource:
    paths: tuple[Path, ...]

    def __len__(self) -> int:
        return len(self.paths)

    def image(self, i: int) -> Image.Image:
        return open_rgb(self.paths[i])

    def describe(self, i: int) -> str:
        return shown(self.paths[i])

    def digest(self) -> str:
        h = hashlib.sha256()
        for p in self.paths:
            try:
                st = p.stat()
            except FileNotFoundError:
                raise DatasetError(f"image file missing: {p}") from None
            # os.fsencode: a file name that is not UTF-8 (kept by Python as lone surrogates) still has bytes;
            # for every UTF-8 name these are the bytes str.encode gave, so existing cache keys stay valid
            h.update(os.fsencode(p) + f"|{st.st_size}|{st.st_mtime_ns}\n".encode())
        return h.hexdigest()


@dataclass(frozen=True)
class ArraySource:
    """Images held in memory as uint8 arrays, (N, H, W) grayscale or (N, H, W, 3) RGB."""

    arrays: np.ndarray
    name: str

    def __len__(self) -> int:
        return len(self.arrays)

    def image(self, i: int) -> Image.Image:
        return Image.fromarray(self.arrays[i]).convert("RGB")

    def describe(self, i: int) -> str:
        return f"{self.name} #{i}"

    def digest(self) -> str:
        return hashlib.sha256(np.ascontiguousarray(self.arrays).tobytes()).hexdigest()


@dataclass(frozen=True, eq=False)
class ImageDataset:
    """``labels`` index ``classnames``; ``is_test`` marks the test split (fixed by the data set's own split
    files, or drawn once, seeded, where the format has none)."""

    name: str
    classnames: list[str]
    labels: np.ndarray
    is_test: np.ndarray
    source: ImageSource
    # A faster exact path from records to model input for in-memory data (the demo), else the model's
    # own preprocess is applied to each PIL image.
    batch_pixels: Callable[[np.ndarray], object] | None = field(default=None, repr=False)
    note: str = ""  # what else the summary should say about where the records come from

    def __post_init__(self) -> None:
        n = len(self.source)
        if len(self.labels) != n or len(self.is_test) != n:
            raise DatasetError(f"{self.name}: {n} images but {len(self.labels)} labels / {len(self.is_test)} flags")
        if n and (self.labels.min() < 0 or self.labels.max() >= len(self.classnames)):
            raise DatasetError(f"{self.name}: labels outside 0..{len(self.classnames) - 1}")
        if len(set(self.classnames)) != len(self.classnames):
            dupes = sorted({c for c in self.classnames if self.classnames.count(c) > 1})
            raise DatasetError(f"{self.name}: duplicate class names {dupes}")

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def fingerprint(self) -> str:
        """Content identity: images, labels, split and class names (keys the feature cache)."""
        h = hashlib.sha256(self.source.digest().encode())
        h.update(self.labels.astype(np.int64).tobytes())
        h.update(self.is_test.astype(bool).tobytes())
        h.update("\n".join(self.classnames).encode())
        return h.hexdigest()[:16]

    def train_indices(self) -> np.ndarray:
        return np.flatnonzero(~self.is_test)

    def test_indices(self) -> np.ndarray:
        return np.flatnonzero(self.is_test)

    def summary(self) -> str:
        return (
            f"{self.name}: {len(self.classnames)} classes, {int((~self.is_test).sum())} train / "
            f"{int(self.is_test.sum())} test images" + (f" ({self.note})" if self.note else "")
        )


def seeded_split(labels: np.ndarray, test_fraction: float, seed: int) -> np.ndarray:
    """Per class, a seeded ``test_fraction`` of the records become test records (a class of one stays train)."""
    rng = np.random.default_rng(seed)
    is_test = np.zeros(len(labels), dtype=bool)
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        n_test = int(round(len(idx) * test_fraction)) if len(idx) > 1 else 0
        is_test[rng.permutation(idx)[:n_test]] = True
    return is_test


def clean_classname(name: str) -> str:
    """CoOp's cleaning of folder/JSON class names for the text prompt: underscores become spaces."""
    return " ".join(name.replace("_", " ").split())
