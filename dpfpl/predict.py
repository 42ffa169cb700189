"""Classifying images with a published prompt: the model it names, its class list, top-k labels.

The classifier is the one the node evaluated with: text features of the published context through the
frozen OpenCLIP text tower (``PromptTextEncoder``), image features through the frozen image tower with the
model's own preprocessing, ``softmax(logit_scale * cos)`` over every class of the prompt's list.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from .common.data.silo import IMAGE_SUFFIXES, load_images
from .common.features import encode_images
from .common.models import LoadedModel, cached_clip
from .common.prompt import PromptTextEncoder
from .publish import PublishedPrompt, check_classnames, check_model


@dataclass(frozen=True)
class Prediction:
    source: str
    labels: list[str]
    probabilities: list[float]


def image_paths(inputs: list[str | Path]) -> list[Path]:
    """Image files named directly, and every image under named folders (recursively, sorted)."""
    paths: list[Path] = []
    problems = []
    for item in map(Path, inputs):
        if item.is_dir():
            found = sorted(p for p in item.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                problems.append(f"folder '{item}' holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
            paths.extend(found)
        elif item.is_file():
            paths.append(item)
        else:
            problems.append(f"'{item}' does not exist")
    if problems:
        raise FileNotFoundError("; ".join(problems))
    return paths


def load_model_for(published: PublishedPrompt, pretrained: str | None = None, cache: str | None = None) -> LoadedModel:
    """The frozen model the prompt names (or ``pretrained``: the same weights elsewhere), checked by content."""
    model = cached_clip(published.manifest.model_name, pretrained or published.manifest.pretrained, cache)
    check_model(published.manifest, model)
    return model


class PromptClassifier:
    def __init__(self, published: PublishedPrompt, model: LoadedModel, classnames: list[str] | None = None) -> None:
        check_model(published.manifest, model)
        check_classnames(published.manifest, classnames)
        self.model = model
        self.classnames = published.manifest.classnames
        encoder = PromptTextEncoder(model.model, model.tokenizer, self.classnames, published.manifest.n_ctx)
        device = next(model.model.parameters()).device
        with torch.no_grad():
            self.text_features = encoder.to(device)(published.prompt.to(device)).cpu()
        self.logit_scale = float(model.model.logit_scale.exp())

    @torch.no_grad()
    def probabilities(self, image_features: torch.Tensor) -> torch.Tensor:
        """(N, D) normalized image features -> (N, C) class probabilities."""
        return (self.logit_scale * image_features @ self.text_features.t()).softmax(dim=-1)

    def top_k(self, probabilities: torch.Tensor, sources: list[str], k: int) -> list[Prediction]:
        k = max(1, min(k, len(self.classnames)))
        values, idx = probabilities.topk(k, dim=-1)
        return [
            Prediction(src, [self.classnames[i] for i in row_i.tolist()], row_v.tolist())
            for src, row_v, row_i in zip(sources, values, idx)
        ]

    def image_features(self, paths: list[Path], batch: int = 128) -> torch.Tensor:
        """Model preprocessing (resize, crop, normalize) and the frozen image tower, ``batch`` files at a time."""
        chunks = [
            encode_images(self.model, load_images(paths[i : i + batch], self.model.preprocess))
            for i in range(0, len(paths), batch)
        ]
        return torch.cat(chunks) if chunks else torch.zeros(0, self.text_features.shape[1])

    def predict_files(self, paths: list[Path], k: int = 1, batch: int = 128) -> list[Prediction]:
        return self.top_k(self.probabilities(self.image_features(paths, batch)), [str(p) for p in paths], k)
