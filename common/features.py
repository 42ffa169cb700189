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


def demo_features(model: LoadedModel, cache: str | None = None, progress: bool = False) -> torch.Tensor:
    """Normalized image features of every demo image (train and test), cached per backbone."""
    from .data.demo import load_demo_dataset

    data = load_demo_dataset()
    path = Path(cache_dir(cache)) / "features" / f"{model.name}-{model.weights_id}-demo-{data.fingerprint}.safetensors"
    if path.is_file():
        return read_tensors(path)["features"]
    feats = encode_images(model, demo_pixels(data.images), progress=progress)
    write_tensors(path, {"features": feats})
    return feats


def silo_features(model: LoadedModel, silo, cache: str | None = None) -> torch.Tensor:
    """Normalized image features of a silo's images (model preprocess), cached per (weights, file set)."""
    from .data.silo import load_images

    path = Path(cache_dir(cache)) / "features" / f"{model.name}-{model.weights_id}-silo-{silo.fingerprint}.safetensors"
    if path.is_file():
        return read_tensors(path)["features"]
    chunks = []
    for start in range(0, len(silo.paths), 128):
        pixels = load_images(silo.paths[start : start + 128], model.preprocess)
        chunks.append(encode_images(model, pixels))
    feats = torch.cat(chunks)
    write_tensors(path, {"features": feats})
    return feats
