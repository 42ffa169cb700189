"""Privacy invariants the mutation check (scripts/mutation_check.py) relies on, each checked against an
independent reference: the Poisson sample's law, the accountant's rounding and calibration against
dp-accounting, the secure noise's construction, what a DP train reply carries and what the node's accountant
books for it, and the server's z_G for the largest declared sample rate."""

from __future__ import annotations

import math

import pytest
import torch
from dp_accounting.pld import privacy_loss_distribution
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.common import MessageType

from dpfpl.common.privacy import calibrate_noise_multiplier, poisson_sample
from dpfpl.common.privacy.accountant import accounting_sample_rate
from dpfpl.common.privacy.mechanisms import standard_normal

DELTA = 1e-5


def _pld_epsilon(sensitivity: float, sample_rate: float, steps: int) -> float:
    """epsilon of ``steps`` Poisson-subsampled Gaussians with unit noise, straight from dp-accounting."""
    pld = privacy_loss_distribution.from_gaussian_mechanism(
        standard_deviation=1.0,
        sensitivity=sensitivity,
        sampling_prob=sample_rate,
        value_discretization_interval=1e-4,
        use_connect_dots=True,
    )
    return float(pld.self_compose(steps).get_epsilon_for_delta(DELTA))


def _certified_epsilon(noise_multiplier: float, sample_rate: float, steps: int) -> float:
    """dp-accounting's pessimistic (upper-bound) epsilon on the grid the accountant uses for epsilon >= 0.5."""
    pld = privacy_loss_distribution.from_gaussian_mechanism(
        standard_deviation=noise_multiplier,
        sampling_prob=sample_rate,
        value_discretization_interval=1e-3,
        use_connect_dots=True,
    )
    return float(pld.self_compose(steps).get_epsilon_for_delta(DELTA))


# ------------------------------------------------------------------ Poisson sampling
def test_poisson_batch_size_is_binomial_and_every_record_is_included_with_probability_q():
    """Amplification by subsampling needs each record in the batch independently with probability q: the
    batch size is then Binomial(n, q) (it varies, with variance n q (1 - q)), and no record is favoured."""
    n, q, draws = 200, 0.1, 3000
    gen = torch.Generator().manual_seed(0)
    included = torch.zeros(draws, n)
    for i in range(draws):
        idx = poisson_sample(n, q, gen)
        assert len(set(idx.tolist())) == len(idx) and (0 <= idx).all() and (idx < n).all()
        included[i, idx] = 1.0
    sizes = included.sum(1)
    assert float(sizes.mean()) == pytest.approx(n * q, rel=0.02)
    assert float(sizes.var()) == pytest.approx(n * q * (1 - q), rel=0.1)  # a fixed-size batch has variance 0
    rate = included.mean(0)  # each record's inclusion frequency: q for all, first and last alike
    assert float(rate.min()) > q - 0.03 and float(rate.max()) < q + 0.03
    assert float(rate[: n // 2].mean()) == pytest.approx(float(rate[n // 2 :].mean()), abs=0.01)


# ------------------------------------------------------------------ the accountant's rate and calibration
@pytest.mark.parametrize(
    "q, rounded",
    [(16 / 944, 0.017), (0.0123, 0.013), (0.00101, 0.0011), (0.0401, 0.041), (0.04, 0.04), (0.5, 0.5), (1.0, 1.0)],
)
def test_the_accounting_rate_is_q_rounded_up_to_two_significant_digits(q, rounded):
    assert accounting_sample_rate(q) == pytest.approx(rounded, rel=1e-9)
    assert accounting_sample_rate(q) >= q  # epsilon grows with q: rounding down would under-report it


def test_the_calibrated_noise_is_the_smallest_that_meets_the_target_in_dp_accounting():
    """At a known setting, the calibrated z meets the target by dp-accounting's own pessimistic PLD, with no
    tolerance (the promise is epsilon <= target), and 1% less noise does not: the calibration neither under-
    nor over-noises."""
    target, q, steps = 1.0, 0.05, 50
    z = calibrate_noise_multiplier(target, q, steps, DELTA)
    assert _certified_epsilon(z, q, steps) <= target
    assert _certified_epsilon(0.99 * z, q, steps) > target
    assert _pld_epsilon(1.0 / z, q, steps) <= target  # a finer grid: a tighter bound, still within the target


# ------------------------------------------------------------------ secure noise
def test_secure_noise_is_the_scaled_sum_of_four_float64_draws_from_the_os_csprng(monkeypatch):
    """Replay the secure sampler with the OS's bytes pinned: the release is (sum of 4 Box-Muller draws) / 2, every
    bit from ``os.urandom`` (no seeded stream), summed in float64 (Holohan & Braghin 2021, Opacus' secure_mode)."""
    import os

    import numpy as np

    stream = np.random.default_rng(7).bytes(1 << 20)
    taken: list[int] = []

    def urandom(n: int) -> bytes:
        start = sum(taken)
        taken.append(n)
        return stream[start : start + n]

    monkeypatch.setattr(os, "urandom", urandom)
    got = standard_normal((64, 32), torch.Generator().manual_seed(0), torch.float64, secure=True)
    assert taken == [16 * 1024] * 4  # 128 random bits per pair of draws, four draws
    expected = np.zeros(2048)
    for i in range(4):
        words = np.frombuffer(stream[i * 16384 : (i + 1) * 16384], dtype=np.uint64).reshape(2, 1024) >> np.uint64(11)
        u1, u2 = (words[0] + 0.5) / 2.0**53, (words[1] + 0.5) / 2.0**53
        r = np.sqrt(-2 * np.log(u1))
        expected += np.concatenate([r * np.cos(2 * np.pi * u2), r * np.sin(2 * np.pi * u2)])
    torch.testing.assert_close(got, torch.from_numpy(expected / 2.0).reshape(64, 32), rtol=0, atol=1e-12)


def test_secure_noise_is_standard_normal_and_never_repeats():
    """Two releases never share a draw (no seed to collide), and the draws are N(0, 1) in float64."""
    a = standard_normal((100_000,), None, torch.float64, secure=True)
    b = standard_normal((100_000,), None, torch.float64, secure=True)
    assert not torch.isin(a, b).any()
    assert abs(float(a.mean())) < 0.02 and abs(float(a.std()) - 1) < 0.02
    assert abs(float((a**4).mean()) - 3) < 0.15  # Gaussian kurtosis


# ------------------------------------------------------------------ a node's DP train reply and its books
Z_LOCAL, Z_GLOBAL, Q = 1.0, 2.0, 0.05  # q with two significant digits: the accounting rate is q itself


@pytest.fixture(scope="module")
def dp_train(tmp_path_factory, cache_dir):
    """One DP-FPL step through the ClientApp, as Flower calls it (fixed z_L, the z_G the server sends, the
    run's declared q; random backbone weights, so nothing is pretrained)."""
    import dpfpl.client_app.app as client_module
    from dpfpl.client_app.state import NodeState
    from dpfpl.common.classlist import DIGEST_KEY, class_list_digest
    from dpfpl.common.config import RunConfig
    from dpfpl.common.prompt import initial_global_prompt
    from dpfpl.common.run_classes import run_class_list

    run_dir = tmp_path_factory.mktemp("dp-reply") / "run"
    cfg = RunConfig(
        run_dir=str(run_dir),
        num_clients=4,
        classes_per_client=2,
        batch_size=8,
        n_ctx=4,
        rank=2,
        pretrained="none",
        dp=True,
        target_epsilon=0,
        noise_multiplier_local=Z_LOCAL,
        noise_multiplier_global=Z_GLOBAL,
        sample_rate=Q,
    )
    ctx = Context(
        run_id=1,
        node_id=101,
        node_config={"partition-id": 1, "num-partitions": 4},
        state=RecordDict(),
        run_config=cfg.to_flower(),
    )
    content = RecordDict(
        {
            "arrays": ArrayRecord({"global-prompt": initial_global_prompt(cfg)}),
            "config": ConfigRecord(
                {
                    "server-round": 1,
                    "run-token": "tok",
                    "noise-multiplier-global": Z_GLOBAL,
                    DIGEST_KEY: class_list_digest(run_class_list(cfg)),
                }
            ),
        }
    )
    reply = client_module.train(Message(content=content, dst_node_id=1, message_type=MessageType.TRAIN), ctx)
    assert not reply.has_error(), reply.error
    return dict(reply.content["metrics"]), NodeState.load(run_dir / "nodes" / "node-1")


def test_a_dp_train_reply_carries_nothing_outside_the_epsilon(dp_train):
    """The batch's loss, its realized size and the step's wall time are functions of the Poisson batch that
    no noise covers: under DP none of them leaves the node."""
    from dpfpl.client_app.prompt_handlers import OUTSIDE_EPSILON_TRAIN_METRICS

    metrics, _ = dp_train
    assert set(OUTSIDE_EPSILON_TRAIN_METRICS) == {"train-loss", "batch-size", "client-seconds"}
    assert not set(metrics) & {"train-loss", "batch-size", "client-seconds"}
    assert metrics["noisy-steps"] == 1.0  # it is a DP reply, with its books


def test_the_node_books_its_step_with_the_noise_it_added_and_reports_the_stacked_gaussian(dp_train):
    """The node's accountant records the step's real mechanism (z_L it added, the z_G the server adds, its
    declared q), and the epsilons it reports are dp-accounting's for those multipliers."""
    metrics, state = dp_train
    assert state.accountant.history == [(Z_LOCAL, Z_GLOBAL, Q)]
    assert metrics["sample-rate"] == Q and metrics["noise-multiplier-local"] == Z_LOCAL
    assert metrics["epsilon-local"] == pytest.approx(_pld_epsilon(1.0 / Z_LOCAL, Q, 1), rel=0.01)
    stacked = math.sqrt(Z_LOCAL**-2 + Z_GLOBAL**-2)  # both releases of one batch, scaled to unit noise
    assert metrics["epsilon-published"] == pytest.approx(_pld_epsilon(stacked, Q, 1), rel=0.01)


# ------------------------------------------------------------------ the server's z_G
def test_the_server_calibrates_z_g_for_the_largest_declared_sample_rate(tmp_path, cache_dir):
    """z_G is shared by every node, so it must meet the target at the largest rate any node declared: then the
    global release's epsilon stays within the target for that node too (calibrate-for "each": z_G alone is
    calibrated to the target). A real (in-process) run, nodes declaring different rates."""
    from dpfpl.client_app.app import app as client_app
    from dpfpl.common.config import RunConfig
    from dpfpl.inprocess import InProcessGrid, full_run_config
    from dpfpl.server_app.checkpoint import RunDirectory
    from dpfpl.server_app.runner import run_federation

    target, rounds, rates = 1.0, 2, (0.02, 0.08)
    config = full_run_config(
        {
            "num-clients": 2,
            "classes-per-client": 2,
            "min-clients": 2,
            "num-server-rounds": rounds,
            "pretrained": "none",
            "n-ctx": 4,
            "batch-size": 8,
            "rank": 2,
            "eval-every": 100,
            "eval-last": 0,
            "dp": True,
            "target-epsilon": target,
            "calibrate-for": "each",
            "run-dir": str(tmp_path / "run"),
        }
    )
    grid = InProcessGrid(client_app, config, len(rates), {"num-threads": 1})
    for ctx, q in zip(grid.contexts.values(), rates, strict=True):
        ctx.node_config["sample-rate"] = q  # each node's public declaration
    with grid.identity():
        summary = run_federation(grid, RunConfig.from_flower(config))
    state = RunDirectory(tmp_path / "run").load()
    assert sorted(state.node_sample_rates.values()) == pytest.approx(sorted(rates))
    assert state.noise_multiplier_global == pytest.approx(calibrate_noise_multiplier(target, max(rates), rounds, DELTA))
    assert _certified_epsilon(state.noise_multiplier_global, max(rates), rounds) <= target
    assert sorted(state.participation.values()) == [rounds] * len(rates)  # no node had to refuse z_G
    assert summary["privacy"]["epsilon-gdp-mechanism-max"] <= target * (1 + 1e-6)
