"""Image features, computed once per image and cached on disk.

The image tower is frozen and the prompt lives only in the text tower, so an image's feature never changes
during a run: encode each image once, store the normalized features keyed by (model weights, data set),
and every round afterwards is text-tower work only.

The cache is only a cache: a cached file that cannot be read or does not match its SHA-256 digest (a copy cut
short, a disk that lied, a bit flip) is logged, removed and encoded again, instead of failing every message
that needs it; a cache that cannot be written for lack of space is logged and the features are used as computed.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .atomic import DIGEST_KEY, CorruptStateError, DiskFullError, read_checked, tensor_digest, write_tensors
from .data.images import DatasetError, ImageDataset
from .data.registry import demo_image_dataset
from .data.silo import load_images
from .models import LoadedModel, cache_dir

log = logging.getLogger("dpfpl.features")

# The papers' training augmentation (CoOp/Dassl: random_resized_crop with scale 0.08-1, random_flip).
AUGMENT_SCALE = (0.08, 1.0)


@torch.no_grad()
def encode_images(
    model: LoadedModel, pixels: torch.Tensor, batch_size: int = 256, progress: bool = False
) -> torch.Tensor:
    chunks = []
    for start in tqdm(range(0, len(pixels), batch_size), desc="encoding images (once)", disable=not progress):
        batch = pixels[start : start + batch_size].to(next(model.model.parameters()).device)
        chunks.append(F.normalize(model.model.encode_image(batch), dim=-1).cpu())
    return torch.cat(chunks) if chunks else torch.zeros(0)


def _cached(model: LoadedModel, data_key: str, cache: str | None, compute) -> torch.Tensor:
    """Features of one data set under one set of weights: computed once, then read from disk."""
    path = Path(cache_dir(cache)) / "features" / f"{model.name}-{model.weights_id}-{data_key}.safetensors"
    if path.is_file() and (feats := _read_cache(path)) is not None:
        return feats
    feats = compute()
    tensors = {"features": feats}
    try:
        write_tensors(path, tensors, {DIGEST_KEY: tensor_digest(tensors, {})})
    except DiskFullError as err:
        log.warning("%s; the features are used as computed, without a cache", err)
    return feats


def _read_cache(path: Path) -> torch.Tensor | None:
    """The cached features, or None when the file is damaged: logged and removed, so that it is encoded again
    (a file written before caches carried a digest is taken as it parses). Another process that already
    replaced the damaged file keeps its copy: only the file that was read is removed."""
    try:
        seen = path.stat()
        tensors, _ = read_checked(path, digest_required=False)
        return tensors["features"]
    except FileNotFoundError:  # removed by another process meanwhile
        return None
    except (CorruptStateError, KeyError) as err:
        reason = str(err) if isinstance(err, CorruptStateError) else f"{path} holds no 'features' tensor"
        log.warning("damaged feature cache, removed and encoded again: %s", reason)
        try:
            now = path.stat()
            if (now.st_ino, now.st_mtime_ns) == (seen.st_ino, seen.st_mtime_ns):
                os.unlink(path)
        except FileNotFoundError:
            pass
        return None


def demo_features(model: LoadedModel, cache: str | None = None, progress: bool = False) -> torch.Tensor:
    """Normalized image features of the clients' view of the demo data (train and test records, in the order
    of ``demo_image_dataset``), cached per backbone."""
    return dataset_features(model, demo_image_dataset(), cache, progress)


def silo_features(model: LoadedModel, silo, cache: str | None = None) -> torch.Tensor:
    """Normalized image features of a silo's images (model preprocess), cached per (weights, file set)."""

    def compute() -> torch.Tensor:  # 128 images at a time: a silo's decoded pixels need not fit in memory
        return torch.cat(
            [
                encode_images(model, load_images(silo.paths[i : i + 128], model.preprocess))
                for i in range(0, len(silo.paths), 128)
            ]
        )

    return _cached(model, f"silo-{silo.fingerprint}", cache, compute)


def _preprocess_cfg(model: LoadedModel) -> tuple[int, tuple[float, ...], tuple[float, ...]]:
    import open_clip

    cfg = getattr(model.model.visual, "preprocess_cfg", {}) or {}
    size = cfg.get("size", getattr(model.model.visual, "image_size", 224))
    size = size[0] if isinstance(size, (tuple, list)) else size
    return (
        int(size),
        tuple(cfg.get("mean", open_clip.OPENAI_DATASET_MEAN)),
        tuple(cfg.get("std", open_clip.OPENAI_DATASET_STD)),
    )


def augment_transform(model: LoadedModel):
    """Random resized crop (scale 0.08-1, bicubic) + horizontal flip + the model's normalization."""
    from torchvision import transforms as T

    size, mean, std = _preprocess_cfg(model)
    return T.Compose(
        [
            T.RandomResizedCrop(size, scale=AUGMENT_SCALE, interpolation=T.InterpolationMode.BICUBIC),
            T.RandomHorizontalFlip(),
            T.ToTensor(),
            T.Normalize(mean, std),
        ]
    )


def _encode_records(
    model: LoadedModel,
    dataset: ImageDataset,
    indices: np.ndarray,
    transform,
    desc: str,
    progress: bool,
    batch_size: int = 128,
) -> torch.Tensor:
    """Features of ``indices`` under ``transform`` (None: the model's evaluation preprocess). Every image that
    cannot be decoded is collected and reported together, by file, before anything is cached."""
    device = next(model.model.parameters()).device
    bad: list[str] = []
    chunks = []
    for start in tqdm(range(0, len(indices), batch_size), desc=desc, disable=not progress, unit="batch"):
        idx = indices[start : start + batch_size]
        if transform is None and dataset.batch_pixels is not None:
            pixels = dataset.batch_pixels(idx)
        else:
            tf = transform or model.preprocess
            items = []
            for i in idx.tolist():
                try:
                    items.append(tf(dataset.source.image(i)))
                except DatasetError as err:
                    bad.append(str(err).splitlines()[0])
            if bad:  # keep scanning for every bad file, skip the compute
                continue
            pixels = torch.stack(items)
        with torch.no_grad():
            chunks.append(F.normalize(model.model.encode_image(pixels.to(device)), dim=-1).cpu())
    if bad:
        raise DatasetError(
            f"{len(bad)} images of {dataset.name} cannot be used:\n  - "
            + "\n  - ".join(bad[:20])
            + ("\n  ..." if len(bad) > 20 else "")
        )
    return torch.cat(chunks) if chunks else torch.zeros(0)


def dataset_features(
    model: LoadedModel, dataset: ImageDataset, cache: str | None = None, progress: bool = False
) -> torch.Tensor:
    """Normalized features of every record (train and test) under the evaluation preprocess, cached per
    (weights, data set content)."""
    key = f"{dataset.name}-{dataset.fingerprint}"
    return _cached(
        model,
        key,
        cache,
        lambda: _encode_records(
            model, dataset, np.arange(len(dataset)), None, f"encoding {dataset.name} images (once)", progress
        ),
    )


def augmented_train_features(
    model: LoadedModel, dataset: ImageDataset, views: int, seed: int, cache: str | None = None, progress: bool = False
) -> torch.Tensor:
    """(views, number of training records, D): ``views`` augmented views of every training record (in
    ``dataset.train_indices()`` order), each encoded once and cached, so training draws a view per sampled
    record without running the image tower again. Views are seeded: the same views on every node and run."""
    key = f"{dataset.name}-{dataset.fingerprint}-aug{views}-s{seed}-rrc{AUGMENT_SCALE[0]:g}"
    train = dataset.train_indices()

    def compute() -> torch.Tensor:
        tf = augment_transform(model)
        out = []
        for v in range(views):
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed * 1009 + v)
                out.append(
                    _encode_records(model, dataset, train, tf, f"encoding view {v + 1}/{views} (once)", progress)
                )
        return torch.stack(out)

    return _cached(model, key, cache, compute)
