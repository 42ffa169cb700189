"""Image features, computed once per image and cached on disk.

The image tower is frozen and the prompt lives only in the text tower, so an image's feature never changes
during a run: encode each image once, store the normalized features keyed by (model weights, data set),
and every round afterwards is text-tower work only.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .atomic import read_tensors, write_tensors
from .config import cache_dir
from .models import LoadedModel, demo_pixels


@torch.no_grad()
def encode_images(model: LoadedModel, pixels: torch.Tensor, batch_size: int = 256, progress: bool = False) -> torch.Tensor:
    chunks = []
    for start in tqdm(range(0, len(pixels), batch_size), desc="encoding images (once)", disable=not progress):
        batch = pixels[start : start + batch_size].to(next(model.model.parameters()).device)
        chunks.append(F.normalize(model.model.encode_image(batch), dim=-1).cpu())
    return torch.cat(chunks) if chunks else torch.zeros(0)


def _cached(model: LoadedModel, data_key: str, cache: str | None, compute) -> torch.Tensor:
    """Features of one data set under one set of weights: computed once, then read from disk."""
    path = Path(cache_dir(cache)) / "features" / f"{model.name}-{model.weights_id}-{data_key}.safetensors"
    if path.is_file():
        return read_tensors(path)["features"]
    feats = compute()
    write_tensors(path, {"features": feats})
    return feats


def demo_features(model: LoadedModel, cache: str | None = None, progress: bool = False) -> torch.Tensor:
    """Normalized image features of every demo image (train and test), cached per backbone."""
    from .data.demo import load_demo_dataset

    data = load_demo_dataset()
    return _cached(model, f"demo-{data.fingerprint}", cache,
                   lambda: encode_images(model, demo_pixels(data.images), progress=progress))


def silo_features(model: LoadedModel, silo, cache: str | None = None) -> torch.Tensor:
    """Normalized image features of a silo's images (model preprocess), cached per (weights, file set)."""
    from .data.silo import load_images

    def compute() -> torch.Tensor:  # 128 images at a time: a silo's decoded pixels need not fit in memory
        return torch.cat([encode_images(model, load_images(silo.paths[i : i + 128], model.preprocess))
                          for i in range(0, len(silo.paths), 128)])

    return _cached(model, f"silo-{silo.fingerprint}", cache, compute)
