"""Accuracy of a prompt on cached image features (prediction over the classifier's class names), and the
harmonic mean FedPGP reports over (local, base, novel)."""

from __future__ import annotations

import math

import torch

from .metrics import LOCAL_ACC, NEIGHBOR_ACC


@torch.no_grad()
def accuracy(text_features: torch.Tensor, image_features: torch.Tensor, labels: torch.Tensor) -> float:
    if len(labels) == 0:
        return math.nan
    return float(((image_features @ text_features.t()).argmax(1) == labels).float().mean())


@torch.no_grad()
def cross_entropy(
    text_features: torch.Tensor, image_features: torch.Tensor, labels: torch.Tensor, logit_scale: float
) -> float:
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


def last_rounds_per_client(
    evals: list[dict], count: int, keys: tuple[str, ...] = (LOCAL_ACC, NEIGHBOR_ACC)
) -> dict[str, dict[str, float]]:
    """Each client's accuracies averaged over the evaluations of the last ``count`` rounds: the measure of
    the run's last-rounds mean, per client (a single round's number moves with that round's noise)."""
    if not evals or count <= 0:
        return {}
    last_round = evals[-1]["round"]
    window = [m.get("per-client", {}) for m in evals if m["round"] > last_round - count]
    clients = sorted({c for per_client in window for c in per_client})
    out: dict[str, dict[str, float]] = {}
    for client in clients:
        rows = [per_client[client] for per_client in window if client in per_client]
        out[client] = {k: sum(r[k] for r in rows) / len(rows) for k in keys if all(k in r for r in rows)}
    return out


def worst_client(zeroshot: dict, final: dict, key: str = LOCAL_ACC) -> dict:
    """The client whose personalized prompt gained least over its own zero-shot accuracy (a mean can hide a
    collapsed node). Empty when no client has both numbers."""
    gains = {c: final[c][key] - zeroshot[c][key] for c in final if key in final[c] and key in zeroshot.get(c, {})}
    if not gains:
        return {}
    client = min(gains, key=gains.get)
    return {
        "client": client,
        key: final[client][key],
        f"zeroshot-{key}": zeroshot[client][key],
        "gain": gains[client],
        "clients-below-zeroshot": sum(g < 0 for g in gains.values()),
    }
