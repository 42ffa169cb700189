"""Secure adaptive k-means on LCC shares equals plaintext k-means on the quantized data; the relay sees no
plaintext."""

from __future__ import annotations

import numpy as np
import pytest

from dpfpl.common.secagg.field import PRIME
from dpfpl.common.secfpp.kmeans import Decision, canonical, plaintext_kmeans, plaintext_rows, threshold_units
from dpfpl.common.secfpp.lcc import LccParameterError
from dpfpl.common.secfpp.protocol import _pack, secure_clustering
from dpfpl.common.secfpp.quantize import quantize, to_field

BITS = 12


def _groups(seed: int, sizes: list[int], dim: int = 16, spread: float = 0.25) -> tuple[list[np.ndarray], list[int]]:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((len(sizes), dim))
    points, labels = [], []
    for g, n in enumerate(sizes):
        for _ in range(n):
            v = centres[g] / np.linalg.norm(centres[g]) + spread * rng.standard_normal(dim) / np.sqrt(dim)
            points.append(v / np.linalg.norm(v))
            labels.append(g)
    order = rng.permutation(len(points))  # groups interleaved over user indices
    return [points[i] for i in order], [labels[i] for i in order]


def _ari(a, b) -> float:
    from sklearn.metrics import adjusted_rand_score

    return adjusted_rand_score(a, b)


@pytest.mark.parametrize(
    "seed,sizes,k,t,lam", [(0, [4, 3, 3], 2, 2, 0.5), (1, [5, 4], 1, 3, 0.5), (2, [4, 4, 1], 1, 2, 0.3)]
)
def test_secure_clustering_equals_plaintext_kmeans_on_quantized_data(seed, sizes, k, t, lam):
    """The third case has a lone outlier: its cluster is opened, then dissolved (min size 2) on both sides."""
    points, labels = _groups(seed, sizes)
    kwargs = dict(lam=lam, max_clusters=5, max_iter=20)
    secure, clients, relay = secure_clustering(points, num_slices=k, privacy=t, bits=BITS, context="test/1", **kwargs)
    quantized = np.stack([quantize(p, BITS) for p in points])
    plain = plaintext_kmeans(
        quantized, threshold_units(kwargs["lam"], BITS), kwargs["max_clusters"], kwargs["max_iter"]
    )
    assert secure.history == plain.history and secure.assignment == plain.assignment
    real = [g for g, n in enumerate(sizes) if n >= 2]
    assert secure.num_clusters == plain.num_clusters == len(real)
    kept = [i for i, g in enumerate(labels) if g in real]
    assert _ari([secure.assignment[i] for i in kept], [labels[i] for i in kept]) == 1.0
    # each user's decoded row is exactly the plaintext scaled distance row of the last iteration's input
    last_input = plain.history[-2] if len(plain.history) > 1 else [0] * len(points)
    assert [c.last_row for c in clients] == plaintext_rows(quantized, last_input)


def test_threshold_and_cap_control_the_number_of_clusters():
    points, _ = _groups(3, [4, 4, 4])
    quantized = np.stack([quantize(p, BITS) for p in points])
    one = plaintext_kmeans(quantized, threshold_units(4.0, BITS), 5, 10)  # nothing is ever "far"
    assert one.num_clusters == 1
    capped = plaintext_kmeans(quantized, threshold_units(0.3, BITS), 2, 10)
    assert capped.num_clusters == 2
    warm = plaintext_kmeans(quantized, threshold_units(0.3, BITS), 5, 10, initial=capped.assignment)
    assert warm.num_clusters == 3 and canonical(warm.assignment) == warm.assignment


def test_min_cluster_size_dissolves_a_lone_outlier():
    points, labels = _groups(6, [4, 4, 1])
    quantized = np.stack([quantize(p, BITS) for p in points])
    strict = plaintext_kmeans(quantized, threshold_units(0.3, BITS), 5, 20, min_size=2)
    loose = plaintext_kmeans(quantized, threshold_units(0.3, BITS), 5, 20, min_size=1)
    assert (strict.num_clusters, loose.num_clusters) == (2, 3)
    assert _ari(loose.assignment, labels) == 1.0
    assert any(max(a) + 1 == 3 for a in strict.history)  # it was opened, then dissolved


def test_relay_log_holds_no_plaintext():
    points, _ = _groups(4, [4, 3])
    result, clients, relay = secure_clustering(
        points, num_slices=2, privacy=2, bits=BITS, lam=0.5, max_clusters=4, max_iter=10, context="test/2"
    )
    kinds = {e["kind"] for e in relay.log}
    assert kinds == {"public-key", "share", "coded-distances", "decision"}
    blob = b"".join(e["payload"] for e in relay.log if isinstance(e["payload"], bytes))
    for c in clients:
        assert _pack(to_field(c.point, PRIME)) not in blob  # the quantized point
        for share in c._shares.values():  # the decrypted shares a user holds
            assert _pack(share) not in blob
        assert _pack(c.point[:4].astype(np.uint64) % PRIME) not in blob  # not even a few coordinates
    clear = [e["payload"] for e in relay.log if e["kind"] == "decision"]
    assert all(isinstance(d, Decision) for d in clear)  # the server learns (cluster, far) only
    assert all(len(e["payload"]) == 32 for e in relay.log if e["kind"] == "public-key")


def test_protocol_refuses_infeasible_parameters():
    points, _ = _groups(5, [3, 3])
    with pytest.raises(LccParameterError, match="needs"):
        secure_clustering(points, num_slices=2, privacy=2, bits=BITS, lam=0.5, max_clusters=3, max_iter=5, context="x")
    with pytest.raises(LccParameterError, match="wrap"):
        secure_clustering(points, num_slices=1, privacy=1, bits=28, lam=0.5, max_clusters=3, max_iter=5, context="x")
