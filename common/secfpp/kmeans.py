"""The adaptive k-means rule that both the secure clustering and its plaintext reference follow.

Everything here works on *scaled squared distances* in integer units, D_{i,s} = n_s^2 ||x_i - c_s||^2 with x_i
the quantized reduced prompt of user i, c_s = S_s / n_s the mean of cluster s and n_s its (public) size. The
n_s^2 factor is what the coded computation yields without any field division; comparisons divide it out
exactly with integer cross-multiplication, so the secure and the plaintext run take identical decisions.

Adaptive number of clusters (this project's rule; the paper's is unknown): DP-means style, one cluster at a time,
with a minimum cluster size.
 1. start from one cluster holding everybody (or a warm start: last phase's assignment);
 2. every user decides on its own row: a_i = argmin_s ||x_i - c_s||^2 (ties: lowest s) and
    far_i = [min_s ||x_i - c_s||^2 > lambda] with lambda the (public) squared-distance threshold;
 3. if the nearest clusters change the assignment, that is the next assignment (a Lloyd step);
 4. once Lloyd has converged (nobody moves): a cluster smaller than ``min_size`` is dissolved (its members
    take their nearest other cluster, and may not open a cluster again in this phase); else, if some user
    who may still open is far and C < C_max, the lowest-index such user opens a new cluster;
 5. clusters are relabelled by order of first appearance (empty ones vanish); stop when nothing changes or
    after ``max_iter`` exchanges.
Why open only at converged centres: a stale mixture centre would spawn spurious clusters. Why a minimum size:
an outlier client beyond lambda would otherwise sit alone in its own cluster, and a singleton cluster's
aggregate is that client's own prompt (the reference suggests >= 2, better >= T + 1). The inputs are unit
vectors, so lambda is on a fixed scale: ||x - c||^2 in [0, 4]. Only (a_i, far_i) reach the server, never a
distance.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class Decision:
    """What one user reports after decoding its row: its nearest cluster and whether it is beyond lambda."""

    cluster: int
    far: bool


@dataclass
class ClusteringResult:
    assignment: list[int]
    num_clusters: int
    iterations: int
    history: list[list[int]] = field(default_factory=list)  # the assignment after each iteration


def canonical(assignment: Sequence[int]) -> list[int]:
    """Relabel clusters by order of first appearance over users 0..N-1 (empty clusters vanish)."""
    labels: dict[int, int] = {}
    return [labels.setdefault(a, len(labels)) for a in assignment]


def counts(assignment: Sequence[int]) -> list[int]:
    return np.bincount(np.asarray(assignment, dtype=np.int64), minlength=max(assignment) + 1).tolist()


def threshold_units(lam: float, bits: int) -> int:
    """lambda (a squared distance between unit vectors) in the quantized units 2^{2q}."""
    return int(round(lam * (1 << (2 * bits))))


def decide(row: Sequence[int], sizes: Sequence[int], threshold: int, exclude: frozenset[int] = frozenset()) -> Decision:
    """argmin_s D_s / n_s^2 over the clusters not excluded (exact: integer cross-multiplication, ties to the
    lowest s) and the far bit."""
    allowed = [s for s in range(len(row)) if s not in exclude]
    if not allowed:
        raise ValueError("every cluster is excluded")
    best = allowed[0]
    for s in allowed[1:]:
        if row[s] * sizes[best] ** 2 < row[best] * sizes[s] ** 2:
            best = s
    return Decision(best, row[best] > threshold * sizes[best] ** 2)


RowsFn = Callable[[list[int], frozenset[int]], list]


def adaptive_kmeans(
    num_users: int,
    rows: RowsFn,
    threshold: int,
    max_clusters: int,
    max_iter: int,
    initial: Sequence[int] | None = None,
    min_size: int = 2,
) -> ClusteringResult:
    """Run the rule. ``rows(assignment, exclude)`` returns every user's Decision (secure run: each user decided
    on its own decoded row) or its scaled-distance row (plaintext reference); ``exclude``: clusters being
    dissolved, which nobody may choose. The server's side is only this function."""
    if max_clusters < 1 or max_iter < 1 or min_size < 1:
        raise ValueError("max_clusters, max_iter and min_size must be >= 1")
    assignment = canonical(initial) if initial is not None else [0] * num_users
    if len(assignment) != num_users:
        raise ValueError(f"the initial assignment has {len(assignment)} users, not {num_users}")
    history: list[list[int]] = []
    barred: set[int] = set()  # users whose cluster was dissolved: they may not open another in this phase

    def decisions(current: list[int], exclude: frozenset[int]) -> list[Decision]:
        sizes = counts(current)
        return [o if isinstance(o, Decision) else decide(o, sizes, threshold, exclude) for o in rows(current, exclude)]

    for it in range(1, max_iter + 1):
        decided = decisions(assignment, frozenset())
        new = canonical([d.cluster for d in decided])
        if new == assignment:  # Lloyd has converged: dissolve a too-small cluster, else maybe open one
            sizes = counts(assignment)
            small = frozenset(s for s, n in enumerate(sizes) if n < min_size) if len(sizes) > 1 else frozenset()
            if small:
                barred.update(i for i, a in enumerate(assignment) if a in small)
                new = canonical([d.cluster for d in decisions(assignment, small)])
            else:
                far = [i for i, d in enumerate(decided) if d.far and i not in barred]
                if far and len(sizes) < max_clusters:
                    opened = list(assignment)
                    opened[far[0]] = len(sizes)
                    new = canonical(opened)
        history.append(new)
        if new == assignment:
            return ClusteringResult(new, max(new) + 1, it, history)
        assignment = new
    return ClusteringResult(assignment, max(assignment) + 1, max_iter, history)


def plaintext_rows(points: np.ndarray, assignment: Sequence[int]) -> list[list[int]]:
    """Scaled squared distances n_s^2 ||x_i - c_s||^2 = ||n_s x_i - S_s||^2 on the quantized integers (the
    reference the secure computation must reproduce exactly). Python ints: no overflow."""
    pts = [[int(v) for v in p] for p in np.asarray(points)]
    sizes = counts(assignment)
    sums = [[0] * len(pts[0]) for _ in sizes]
    for i, a in enumerate(assignment):
        sums[a] = [x + y for x, y in zip(sums[a], pts[i])]
    return [[sum((n * x - s) ** 2 for x, s in zip(p, sums[c])) for c, n in enumerate(sizes)] for p in pts]


def plaintext_kmeans(
    points: np.ndarray,
    threshold: int,
    max_clusters: int,
    max_iter: int,
    initial: Sequence[int] | None = None,
    min_size: int = 2,
) -> ClusteringResult:
    """The same rule on the quantized points in the clear."""
    return adaptive_kmeans(
        len(points), lambda a, _exclude: plaintext_rows(points, a), threshold, max_clusters, max_iter, initial, min_size
    )
