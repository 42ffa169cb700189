"""Accuracy of a prompt on cached image features (prediction over all C class names)."""

from __future__ import annotations

import math

import torch


@torch.no_grad()
def accuracy(text_features: torch.Tensor, image_features: torch.Tensor, labels: torch.Tensor) -> float:
    if len(labels) == 0:
        return math.nan
    return float(((image_features @ text_features.t()).argmax(1) == labels).float().mean())
