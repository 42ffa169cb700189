"""Partitioners for simulation."""

from __future__ import annotations

import numpy as np


def pathological_partition(num_classes: int, num_clients: int, classes_per_client: int, seed: int) -> list[list[int]]:
    """Disjoint classes per client (DP-FPL protocol): shuffle the class list with ``seed`` and deal
    ``classes_per_client`` classes to each client in turn."""
    if num_clients * classes_per_client > num_classes:
        raise ValueError(
            f"pathological partition needs num-clients x classes-per-client <= number of classes "
            f"({num_clients} x {classes_per_client} > {num_classes})"
        )
    order = np.random.default_rng(seed).permutation(num_classes)
    return [sorted(order[i * classes_per_client : (i + 1) * classes_per_client].tolist()) for i in range(num_clients)]
