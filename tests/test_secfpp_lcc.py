"""LCC: T-privacy (statistical), exact decoding at the thresholds and not below, parameter validation."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from scipy.stats import chisquare

from dpfpl.common.secagg.field import PRIME
from dpfpl.common.secfpp.lcc import Lcc, LccParameterError, interpolate
from dpfpl.common.secfpp.quantize import check_range, from_field, to_field

SMALL_P = 13


def _pair_histogram(shares_fn, holders, draws):
    counts = np.zeros(SMALL_P ** len(holders), dtype=np.int64)
    for _ in range(draws):
        s = shares_fn()
        idx = 0
        for h in holders:
            idx = idx * SMALL_P + int(s[h, 0])
        counts[idx] += 1
    return counts


def test_any_t_shares_are_uniform_whatever_the_secret():
    """Every T-subset of shares is uniform on F_p^T for two different secrets; with the random padding replaced
    by zeros (FedML's bug) the same test rejects, so it has power."""
    lcc = Lcc(num_holders=5, num_slices=2, privacy=2, degree=1, prime=SMALL_P)
    rng = np.random.default_rng(0)
    draws = 5000
    for secret in (np.array([0, 0], dtype=object), np.array([7, 3], dtype=object)):
        for holders in itertools.combinations(range(5), lcc.privacy):
            counts = _pair_histogram(lambda secret=secret: lcc.encode(secret, rng), holders, draws)
            assert chisquare(counts).pvalue > 1e-4, (secret, holders)
    # the same T shares with zero padding are a deterministic function of the secret: far from uniform
    secret = np.array([7, 3], dtype=object)
    zero_pad = lambda: interpolate(lcc.betas, np.array([[7], [3], [0], [0]], dtype=object), lcc.alphas, SMALL_P)  # noqa: E731
    assert chisquare(_pair_histogram(zero_pad, (0, 1), 500)).pvalue < 1e-9
    # and T + 1 shares determine the secret slices (they are not uniform either)
    counts = _pair_histogram(lambda: lcc.encode(secret, rng), (0, 1, 2), 3000)
    assert (counts > 0).sum() <= SMALL_P**2  # only p^T of the p^(T+1) triples can occur


def _users(rng, n_users, dim, bits=10):
    return [np.rint(rng.uniform(-1, 1, dim) * 2**bits).astype(np.int64) for _ in range(n_users)]


def test_sums_decode_exactly_from_any_k_plus_t_holders():
    lcc = Lcc(num_holders=12, num_slices=2, privacy=2, degree=2)
    rng = np.random.default_rng(1)
    users = _users(rng, 5, 32)
    shares = [lcc.encode(to_field(u, PRIME)) for u in users]  # OS randomness for the padding
    coded_sum = sum(shares) % PRIME  # each holder adds the shares it holds
    for _ in range(5):
        holders = sorted(rng.choice(12, size=lcc.needed(1), replace=False).tolist())
        decoded = lcc.decode(holders, coded_sum[holders], degree=1).reshape(-1)
        assert [from_field(v, PRIME) for v in decoded] == np.sum(users, axis=0).tolist()
    with pytest.raises(LccParameterError):
        lcc.decode(list(range(lcc.needed(1) - 1)), coded_sum[: lcc.needed(1) - 1], degree=1)


def test_distances_decode_exactly_from_2kt_minus_1_holders_and_not_from_one_fewer():
    lcc = Lcc(num_holders=12, num_slices=2, privacy=2, degree=2)
    rng = np.random.default_rng(2)
    x, y, z = _users(rng, 3, 32)
    sx, sy, sz = (lcc.encode(to_field(v, PRIME)) for v in (x, y, z))
    n = 2  # cluster {y, z}: n^2 ||x - (y + z)/2||^2 = ||2x - y - z||^2
    diff = (n * sx - (sy + sz)) % PRIME
    coded = (diff * diff).sum(1) % PRIME  # one scalar per holder
    truth = int(((2 * x - y - z).astype(object) ** 2).sum())
    need = 2 * (lcc.num_slices + lcc.privacy - 1) + 1
    assert lcc.needed(2) == need == 7
    for _ in range(5):
        holders = sorted(rng.choice(12, size=need, replace=False).tolist())
        assert from_field(int(lcc.decode(holders, coded[holders]).sum() % PRIME), PRIME) == truth
    wrong = 0
    for _ in range(5):  # one fewer: the interpolated polynomial is not f(u(z)); decode refuses, raw interpolation errs
        holders = sorted(rng.choice(12, size=need - 1, replace=False).tolist())
        with pytest.raises(LccParameterError):
            lcc.decode(holders, coded[holders])
        guess = interpolate([lcc.alphas[h] for h in holders], coded[holders], lcc.betas[:2], PRIME).sum() % PRIME
        wrong += from_field(int(guess), PRIME) != truth
    assert wrong == 5


def test_parameters_are_validated_up_front():
    with pytest.raises(LccParameterError, match="needs"):
        Lcc(num_holders=6, num_slices=2, privacy=2, degree=2)  # needs 7
    Lcc(num_holders=7, num_slices=2, privacy=2, degree=2)
    with pytest.raises(LccParameterError, match="not prime"):
        Lcc(num_holders=7, num_slices=1, privacy=1, prime=2**61 - 3)
    with pytest.raises(LccParameterError, match="privacy"):
        Lcc(num_holders=7, num_slices=1, privacy=0)
    with pytest.raises(LccParameterError, match="distinct points"):
        Lcc(num_holders=9, num_slices=1, privacy=1, degree=1, prime=7)
    lcc = Lcc(num_holders=7, num_slices=2, privacy=2)
    assert not set(lcc.alphas) & set(lcc.betas)
    with pytest.raises(LccParameterError, match="wrap"):
        check_range(dim=64, num_clients=30, bits=24, prime=PRIME)
    check_range(dim=64, num_clients=30, bits=16, prime=PRIME)
    check_range(dim=8, num_clients=3, bits=8, prime=2**31 - 1)  # 8 * (6 * 2^8)^2 ~ 1.9e7 < 2^30: fits
    with pytest.raises(LccParameterError, match="wrap"):
        check_range(dim=8, num_clients=3, bits=14, prime=2**31 - 1)  # 8 * (6 * 2^14)^2 ~ 7.7e10: would wrap


def test_an_infeasible_secfpp_configuration_is_refused_where_the_run_starts():
    from dpfpl.common.config import RunConfig
    from dpfpl.common.secfpp.protocol import check_run_config
    from dpfpl.inprocess import run_inprocess

    check_run_config(RunConfig(method="secfpp", num_clients=5, secfpp_privacy=2))  # 2(1+2-1)+1 = 5: feasible
    with pytest.raises(LccParameterError, match="needs"):
        check_run_config(RunConfig(method="secfpp", num_clients=4, secfpp_privacy=2))
    with pytest.raises(LccParameterError, match="wrap"):
        check_run_config(RunConfig(method="secfpp", num_clients=30, secfpp_reduced_dim=64, secfpp_quantization_bits=24))
    check_run_config(RunConfig(method="dpfpl", num_clients=4, secfpp_privacy=2))  # other methods ignore the keys
    # an in-process run refuses it before any node is built (the ServerApp does the same before its first round)
    with pytest.raises(LccParameterError, match="needs"):
        run_inprocess({"method": "secfpp", "num-clients": 4, "secfpp-privacy": 2}, num_nodes=4)
