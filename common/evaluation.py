"""Accuracy of a prompt on cached image features (prediction over the classifier's class names), and the
harmonic mean FedPGP reports over (local, base, novel)."""

from __future__ import annotations

import math

import torch


@torch.no_grad()
def accuracy(text_features: torch.Tensor, image_features: torch.Tensor, labels: torch.Tensor) -> float:
    if len(labels) == 0:
        return math.nan
    return float(((image_features @ text_features.t()).argmax(1) == labels).float().mean())


@torch.no_grad()
def cross_entropy(text_features: torch.Tensor, image_features: torch.Tensor, labels: torch.Tensor,
                  logit_scale: float) -> float:
    """Mean test loss over all C classes (test images only: a training loss would leak under DP)."""
    if len(labels) == 0:
        return math.nan
    return float(torch.nn.functional.cross_entropy(logit_scale * image_features @ text_features.t(), labels))


def harmonic_mean(values: list[float]) -> float:
    """HM of accuracies (FedPGP's HM(local, base, novel)); 0 if any is 0, NaN if any is missing."""
    if not values or any(math.isnan(v) for v in values):
        return math.nan
    if any(v <= 0 for v in values):
        return 0.0
    return len(values) / sum(1.0 / v for v in values)
