"""Secure aggregation protocol core: exact sums, dropouts, safe failure, what the server sees, encoding."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from dpfpl.common.secagg import crypto, shamir
from dpfpl.common.secagg.encoding import (
    EncodingError,
    client_sigma,
    ddg_tau,
    decode_sum,
    discrete_gaussian,
    effective_noise_multiplier,
    encode_update,
)
from dpfpl.common.secagg.field import (
    HALF,
    PRIME,
    from_field,
    quantized_sensitivity,
    scale_factor,
    stochastic_round,
    to_field,
)
from dpfpl.common.secagg.protocol import ClientSession, SecAggError, ServerSession, threshold_for
from dpfpl.secagg_simulate import run_round


def _inputs(n: int, size: int, seed: int = 0, scale: int = 10**9) -> dict[int, np.ndarray]:
    rng = np.random.default_rng(seed)
    # node ids as Flower gives them: large, unordered
    ids = rng.choice(2**62, size=n, replace=False)
    return {int(u): rng.integers(-scale, scale, size=size, dtype=np.int64) for u in ids}


def test_field_embedding_round_trips_signed_values():
    v = np.array([0, 1, -1, HALF, -HALF, 12345, -98765], dtype=np.int64)
    assert np.array_equal(from_field(to_field(v)), v)
    assert int(to_field(v).max()) < PRIME
    with pytest.raises(OverflowError):
        to_field(np.array([HALF + 1]))


@pytest.mark.parametrize("n,t", [(3, 2), (5, 3), (8, 6)])
def test_shamir_any_t_shares_rebuild_fewer_do_not(n, t):
    secret = bytes(range(32))
    shares = shamir.split(secret, n, t)
    rng = np.random.default_rng(n)
    for _ in range(4):
        pick = [shares[i] for i in rng.choice(n, size=t, replace=False)]
        assert shamir.combine(pick, t) == secret
    with pytest.raises(shamir.ShamirError):
        shamir.combine(shares[: t - 1], t)


def test_unmasked_sum_is_exact_in_the_field():
    inputs = _inputs(5, 257)
    total, stats_, _ = run_round(inputs, threshold=threshold_for(5, 2))
    assert np.array_equal(total, np.sum(list(inputs.values()), axis=0))
    assert stats_.stages == {"keys": 5, "shares": 5, "masked": 5, "unmask": 5}


@pytest.mark.parametrize("stage", ["drop_before_shares", "drop_before_masked"])
def test_dropouts_below_the_threshold_are_recovered(stage):
    inputs = _inputs(6, 64, seed=1)
    dropped = frozenset(sorted(inputs)[:2])
    total, _, server = run_round(inputs, threshold=threshold_for(6, 2), **{stage: dropped})
    expected = np.sum([x for u, x in inputs.items() if u not in dropped], axis=0)
    assert np.array_equal(total, expected)
    assert set(server.masked) == set(inputs) - dropped


def test_dropout_during_unmasking_is_tolerated_while_t_remain():
    inputs = _inputs(5, 32, seed=2)
    late = frozenset(sorted(inputs)[:1])  # sent its masked input, then vanished
    total, _, _ = run_round(inputs, threshold=4, drop_before_unmask=late)
    assert np.array_equal(total, np.sum(list(inputs.values()), axis=0))  # its input is in the sum


@pytest.mark.parametrize(
    "stage", ["drop_before_keys", "drop_before_shares", "drop_before_masked", "drop_before_unmask"]
)
def test_too_many_dropouts_fail_safely_at_every_stage(stage):
    inputs = _inputs(5, 16, seed=3)
    dropped = frozenset(sorted(inputs)[:2])  # 3 remain, threshold 4
    with pytest.raises(SecAggError, match="threshold"):
        run_round(inputs, threshold=4, **{stage: dropped})


def test_no_share_is_revealed_before_the_masked_input():
    ids = [3, 5, 9, 12]
    client = ClientSession(node_id=ids[0], context="x", threshold=3)
    client.advertise()
    with pytest.raises(SecAggError, match="stage"):
        client.unmask(ids, [])  # its input was never masked: no share is revealed before that


def test_repeated_unmask_with_another_split_is_refused():
    inputs = _inputs(4, 8, seed=5)
    ids = sorted(inputs)
    clients = {u: ClientSession(node_id=u, context="c", threshold=3) for u in ids}
    server = ServerSession(context="c", threshold=3, size=8)
    roster = server.set_roster({u: c.advertise() for u, c in clients.items()})
    inbox = server.collect_shares({u: c.share_keys(roster, 3) for u, c in clients.items()})
    for u, c in clients.items():
        c.masked_input(inbox[u], ids, inputs[u])
    c = clients[ids[0]]
    c.unmask(ids, [])
    with pytest.raises(SecAggError, match="twice"):
        c.unmask(ids[:3], ids[3:])  # would reveal s_sk of ids[3] after its b was revealed


def test_tampered_relayed_share_is_detected():
    inputs = _inputs(3, 4, seed=6)
    ids = sorted(inputs)
    clients = {u: ClientSession(node_id=u, context="c", threshold=2) for u in ids}
    server = ServerSession(context="c", threshold=2, size=4)
    roster = server.set_roster({u: c.advertise() for u, c in clients.items()})
    inbox = server.collect_shares({u: c.share_keys(roster, 2) for u, c in clients.items()})
    a, b = ids[0], ids[1]
    swapped = dict(inbox[a])
    swapped[b] = inbox[ids[2]][b]  # b's ciphertext for another client, replayed into a's slot
    with pytest.raises(SecAggError, match="authentication"):
        clients[a].masked_input(swapped, ids, inputs[a])


def test_threshold_rules():
    assert threshold_for(10, 3) == 7
    with pytest.raises(SecAggError, match="more than half"):
        threshold_for(4, 2)
    with pytest.raises(SecAggError):
        threshold_for(2, 1)


def test_one_masked_reply_looks_uniform_to_the_server():
    """Chi-square on residues: the server's view of one client's y (its input is all zeros, the most
    structured input there is) is indistinguishable from uniform field elements."""
    inputs = {u: np.zeros(20_000, dtype=np.int64) for u in (11, 22, 33)}
    ids = sorted(inputs)
    clients = {u: ClientSession(node_id=u, context="u", threshold=2) for u in ids}
    server = ServerSession(context="u", threshold=2, size=20_000)
    roster = server.set_roster({u: c.advertise() for u, c in clients.items()})
    inbox = server.collect_shares({u: c.share_keys(roster, 2) for u, c in clients.items()})
    y = clients[11].masked_input(inbox[11], ids, inputs[11])
    assert y.dtype == np.uint64 and int(y.max()) < PRIME
    for modulus in (256, 1009):  # low residues and a prime modulus
        counts = np.bincount((y % np.uint64(modulus)).astype(np.int64), minlength=modulus)
        assert stats.chisquare(counts).pvalue > 1e-3
    # high bits too: the top byte of y / p
    top = np.floor(y.astype(np.float64) / PRIME * 64).astype(np.int64)
    assert stats.chisquare(np.bincount(top, minlength=64)).pvalue > 1e-3
    # and a plain zero vector (the unmasked input) fails the same test: the test has power
    assert stats.chisquare(np.bincount(np.zeros(20_000, dtype=np.int64) % 256, minlength=256)).pvalue < 1e-10


def test_mask_prg_is_deterministic_and_seed_dependent():
    a, b = crypto.mask(b"\1" * 32, 1000), crypto.mask(b"\2" * 32, 1000)
    assert np.array_equal(a, crypto.mask(b"\1" * 32, 1000)) and not np.array_equal(a, b)
    assert int(a.max()) < PRIME


def test_client_state_survives_a_process_restart():
    inputs = _inputs(3, 16, seed=7)
    ids = sorted(inputs)
    clients = {u: ClientSession(node_id=u, context="r", threshold=2) for u in ids}
    server = ServerSession(context="r", threshold=2, size=16)
    roster = server.set_roster({u: c.advertise() for u, c in clients.items()})
    clients = {u: ClientSession.from_dict(c.to_dict()) for u, c in clients.items()}  # a fresh process each
    inbox = server.collect_shares({u: c.share_keys(roster, 2) for u, c in clients.items()})
    clients = {u: ClientSession.from_dict(c.to_dict()) for u, c in clients.items()}
    survivors, dropped = server.collect_masked(
        {u: c.masked_input(inbox[u], ids, inputs[u]) for u, c in clients.items()}
    )
    clients = {u: ClientSession.from_dict(c.to_dict()) for u, c in clients.items()}
    total = server.unmask({u: c.unmask(survivors, dropped) for u, c in clients.items()})
    assert np.array_equal(total, np.sum(list(inputs.values()), axis=0))


# ---------------------------------------------------------------- encoding and distributed noise


def test_stochastic_rounding_is_unbiased_and_within_one():
    rng = np.random.default_rng(0)
    a = np.full(200_000, 3.3)
    r = stochastic_round(a, rng)
    assert set(np.unique(r)) == {3, 4}
    assert abs(r.mean() - 3.3) < 0.01


def test_discrete_gaussian_moments_and_support():
    rng = np.random.default_rng(1)
    for sigma in (4.0, 37.5, 2000.0):
        x = discrete_gaussian(sigma, 100_000, rng)
        assert x.dtype == np.int64
        assert abs(x.mean()) < 5 * sigma / math.sqrt(x.size)
        assert abs(x.std() / sigma - 1) < 0.02
    assert not discrete_gaussian(0.0, 5, rng).any()


def test_discrete_gaussian_matches_its_pmf():
    rng = np.random.default_rng(2)
    sigma = 3.0
    x = discrete_gaussian(sigma, 200_000, rng)
    ks = np.arange(-12, 13)
    pmf = np.exp(-(ks.astype(float) ** 2) / (2 * sigma**2))
    pmf /= pmf.sum()
    counts = np.array([(x == k).sum() for k in ks])
    assert stats.chisquare(counts, pmf * counts.sum()).pvalue > 1e-3


def test_encoded_updates_sum_to_the_mean_with_the_full_global_noise():
    """m survivors' noise shares add to std >= z_G * Delta_q (the full global noise), and decoding gives
    the mean of the clipped updates within that noise."""
    rng = np.random.default_rng(3)
    n, t, d, z, bits, clip, batch = 6, 4, 500, 1.5, 12, 10.0, 32
    updates = [rng.normal(size=d) * 0.01 for _ in range(n)]
    sums = []
    for trial in range(40):
        enc = [
            encode_update(
                u,
                bits=bits,
                clip_norm=clip,
                batch_size=batch,
                noise_multiplier=z,
                threshold=t,
                num_clients=n,
                rng=np.random.default_rng(100 + trial * n + i),
            )
            for i, u in enumerate(updates)
        ]
        sums.append(np.sum(enc[:t], axis=0))  # exactly t survivors: the guaranteed minimum
    sums = np.array(sums, dtype=np.float64)
    gamma = scale_factor(bits, clip, batch)
    clean = gamma * np.sum(updates[:t], axis=0)
    noise_std = (sums - clean).std()
    target = z * quantized_sensitivity(bits, d)  # the accountant's z_G times the quantized sensitivity
    assert abs(noise_std / target - 1) < 0.02
    mean = decode_sum(sums[0], bits=bits, clip_norm=clip, batch_size=batch, num_summands=t)
    assert np.abs(mean - np.mean(updates[:t], axis=0)).max() < 6 * target / (gamma * t)
    assert effective_noise_multiplier(z, n, t) == pytest.approx(z * math.sqrt(n / t))


def test_encoding_without_noise_is_the_rounded_update_and_errors_are_clear():
    x = np.array([0.5, -0.25, 1e-6])
    v = encode_update(
        x,
        bits=16,
        clip_norm=10.0,
        batch_size=32,
        noise_multiplier=0.0,
        threshold=2,
        num_clients=3,
        rng=np.random.default_rng(0),
    )
    gamma = scale_factor(16, 10.0, 32)
    assert np.all(np.abs(v - gamma * x) < 1)
    with pytest.raises(EncodingError, match="NaN"):
        encode_update(
            np.array([np.nan]), bits=16, clip_norm=10.0, batch_size=32, noise_multiplier=0.0, threshold=2, num_clients=3
        )
    with pytest.raises(EncodingError, match="quantization-bits"):
        encode_update(
            np.zeros(4), bits=1, clip_norm=10.0, batch_size=32, noise_multiplier=0.5, threshold=9, num_clients=10
        )
    with pytest.raises(OverflowError, match="quantization-bits"):
        encode_update(
            np.full(2, 1e13), bits=16, clip_norm=10.0, batch_size=32, noise_multiplier=0.0, threshold=2, num_clients=3
        )


def test_ddg_gap_is_negligible_at_working_noise():
    assert ddg_tau(client_sigma(0.5, 16, 8192, 9), 10) < 1e-300
    assert ddg_tau(0.3, 10) > 1e-3  # and it is not at tiny noise: the check has teeth


def test_a_round_restarted_after_the_shares_is_refused_not_repeated():
    """A server that restarts mid-round and asks again for keys would, with fresh masks over the same input and
    another survivor set, learn the difference of two sums (one client's input with only its own noise share):
    the client refuses to advertise again once it has sent shares."""
    inputs = _inputs(3, 4, seed=8)
    ids = sorted(inputs)
    clients = {u: ClientSession(node_id=u, context="s", threshold=2) for u in ids}
    server = ServerSession(context="s", threshold=2, size=4)
    roster = server.set_roster({u: c.advertise() for u, c in clients.items()})
    assert clients[ids[0]].advertise() == roster[ids[0]]  # before the shares: the same keys again
    clients[ids[0]].share_keys(roster, 2)
    with pytest.raises(SecAggError, match="again"):
        clients[ids[0]].advertise()
    with pytest.raises(SecAggError, match="threshold"):
        clients[ids[1]].share_keys(roster, 3)  # the server may not change t mid-round


def test_keys_announced_a_round_ahead_sum_exactly_and_serve_that_round_only():
    """Keys drawn in round 1's unmasking for round 2 (context '<run>/2') are bound to round 2's full context when
    its train message arrives; the sum is exact, a repeated share request gets the same ciphertexts, and the keys
    serve no other round, nor a second binding."""
    inputs = _inputs(3, 8, seed=9)
    ids = sorted(inputs)
    ahead = {u: ClientSession(node_id=u, context="run/2") for u in ids}  # threshold set by the shares
    announced = {u: c.advertise() for u, c in ahead.items()}
    clients = {u: ClientSession.from_dict(c.to_dict()) for u, c in ahead.items()}  # kept on disk until round 2
    for c in clients.values():
        c.bind("run/2/g0")
    server = ServerSession(context="run/2/g0", threshold=2, size=8)
    roster = server.set_roster(announced)
    sent = {u: c.share_keys(roster, 2) for u, c in clients.items()}
    assert clients[ids[0]].share_keys(roster, 2) == sent[ids[0]]  # a re-sent train message: the same shares
    inbox = server.collect_shares(sent)
    survivors, dropped = server.collect_masked(
        {u: c.masked_input(inbox[u], ids, inputs[u]) for u, c in clients.items()}
    )
    total = server.unmask({u: c.unmask(survivors, dropped) for u, c in clients.items()})
    assert np.array_equal(total, np.sum(list(inputs.values()), axis=0))
    for context in ("run/3/g0", "other/2/g0", "run/22/g0"):
        with pytest.raises(SecAggError, match="cannot serve"):
            ClientSession.from_dict(ahead[ids[0]].to_dict()).bind(context)
    with pytest.raises(SecAggError, match="cannot serve"):
        clients[ids[0]].bind("run/2/g0")  # already used: a second binding would reuse keys across rounds
