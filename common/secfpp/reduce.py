"""Dimension reduction on a public basis: what a user clusters on, before quantization.

A fixed random orthonormal projection (D -> d'), drawn from a public seed that every party derives from the run
seed. Why public and shared: distances are only comparable if every user projects onto the same basis; a
per-user truncated SVD would give each user its own coordinates. A Johnson-Lindenstrauss projection keeps
squared distances within a small factor, which is all the clustering needs. The reduced vector is normalized
to unit length, which fixes the quantization range (``quantize.check_range``) and makes the clustering
threshold lambda scale-free (a direction, not a magnitude, tells the domains apart).
"""

from __future__ import annotations

import numpy as np


def public_basis(dim: int, reduced_dim: int, seed: int) -> np.ndarray:
    """(dim, d') with orthonormal columns, from a public seed."""
    if not 1 <= reduced_dim <= dim:
        raise ValueError(f"secfpp-reduced-dim must be in [1, {dim}], got {reduced_dim}")
    q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((dim, reduced_dim)))
    return q


def reduce(vector: np.ndarray, basis: np.ndarray) -> np.ndarray:
    """Project and normalize to a unit vector (a zero vector stays zero)."""
    z = np.asarray(vector, dtype=np.float64).reshape(-1) @ basis
    norm = float(np.linalg.norm(z))
    return z / norm if norm > 0 else z
