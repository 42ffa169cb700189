import dataclasses
import logging
import math

import pytest
import torch
from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict
from flwr.common import MessageType

from dpfpl.common.config import RunConfig
from dpfpl.common.runtag import run_tag
from dpfpl.server_app.checkpoint import NonFiniteStateError, RunDirectory, ServerState
from dpfpl.server_app.replies import InvalidReply
from dpfpl.server_app.strategy import PromptStrategy, max_noisy_steps


def _strategy(tmp_path, **overrides):
    cfg = RunConfig(
        **{
            "run_dir": str(tmp_path),
            "num_clients": 4,
            "min_clients": 2,
            "batch_size": 8,
            "lr_global": 1.0,
            "target_epsilon": 0,
            "noise_multiplier_local": 1.0,
            "noise_multiplier_global": 2.0,
            **overrides,
        }
    )
    state = ServerState(
        p_global=torch.zeros(4, 16),
        momentum=None,
        server_round=0,
        run_token="t",
        noise_multiplier_global=2.0,
        config_fingerprint="f",
    )
    return PromptStrategy(cfg, state)


def _reply(grad, server_round=1, batch=8.0, node=1, extra_arrays=None, metrics=None):
    arrays = {"global-grad": grad, **(extra_arrays or {})}
    content = RecordDict(
        {
            "arrays": ArrayRecord(arrays),
            "metrics": MetricRecord(
                {"server-round": server_round, "batch-size": batch, "run-tag": run_tag("t"), **(metrics or {})}
            ),
        }
    )
    request = Message(content=RecordDict(), dst_node_id=node, message_type=MessageType.TRAIN)
    request.metadata.__dict__["_src_node_id"] = 0
    msg = Message(content=content, reply_to=request)
    msg.metadata.__dict__["_src_node_id"] = node
    return msg


def test_global_noise_std_is_z_c_over_b_n(tmp_path):
    strategy = _strategy(tmp_path)
    strategy.noise_generator = torch.Generator().manual_seed(0)  # a fixed draw: the check cannot flake
    deltas = []
    for _ in range(40):
        before = strategy.state.p_global.clone()
        arrays, _ = strategy.aggregate_train(1, [_reply(torch.zeros(4, 16), node=n) for n in (1, 2, 3)])
        assert arrays is not None
        deltas.append(strategy.state.p_global - before)
    std = float(torch.stack(deltas).std())
    expected = 2.0 * 10.0 / (8 * 3)  # lr = 1
    assert abs(std - expected) / expected < 0.05


@pytest.mark.parametrize(
    "bad",
    [
        lambda: _reply(torch.full((4, 16), float("nan"))),
        lambda: _reply(torch.zeros(4, 17)),
        lambda: _reply(torch.zeros(4, 16, dtype=torch.float64)),
        lambda: _reply(torch.ones(4, 16) * 100.0),  # norm 800 > C_G = 10
        lambda: _reply(torch.zeros(4, 16), server_round=7),
        lambda: _reply(torch.zeros(4, 16), extra_arrays={"p-local": torch.zeros(4, 16)}),
    ],
)
def test_invalid_replies_are_rejected_and_never_aggregated(tmp_path, bad):
    strategy = _strategy(tmp_path)
    good = [_reply(torch.zeros(4, 16), node=n) for n in (1, 2)]
    strategy.aggregate_train(1, good + [bad()])
    assert strategy.state.participation == {"1": 1, "2": 1}
    with pytest.raises(InvalidReply):  # a refusal, never a crash
        strategy.validate_train_reply(bad(), 1)


def test_a_non_finite_reply_is_rejected_without_dp_too(tmp_path):
    """Without DP there is no norm bound to catch a NaN: the finiteness check must."""
    strategy = _strategy(tmp_path, dp=False)
    for bad in (float("nan"), float("inf")):
        with pytest.raises(InvalidReply, match="NaN or Inf"):
            strategy.validate_train_reply(_reply(torch.full((4, 16), bad), node=3), 1)
    before = strategy.state.p_global.clone()
    strategy.aggregate_train(
        1, [_reply(torch.zeros(4, 16), node=n) for n in (1, 2)] + [_reply(torch.full((4, 16), float("nan")), node=3)]
    )
    assert torch.isfinite(strategy.state.p_global).all() and torch.equal(strategy.state.p_global, before)


@pytest.mark.parametrize("value", [[1.0, 2.0], [3], float("nan"), float("inf"), -1.0, 1e300])
def test_a_metric_of_the_wrong_type_or_range_is_a_rejection_not_a_crash(tmp_path, value):
    """The typed parser names the field: a list where a number belongs, NaN, Inf, out of range."""
    strategy = _strategy(tmp_path)
    bad = _reply(torch.zeros(4, 16), node=3)
    bad.content["metrics"]["batch-size"] = value
    with pytest.raises(InvalidReply, match="batch-size"):
        strategy.validate_train_reply(bad, 1)
    strategy.aggregate_train(1, [_reply(torch.zeros(4, 16), node=n) for n in (1, 2)] + [bad])
    assert strategy.state.participation == {"1": 1, "2": 1}


def test_too_few_valid_replies_leave_the_global_prompt_unchanged(tmp_path):
    strategy = _strategy(tmp_path)
    arrays, metrics = strategy.aggregate_train(1, [_reply(torch.zeros(4, 16))])
    assert arrays is None and metrics is None
    assert torch.equal(strategy.state.p_global, torch.zeros(4, 16))
    assert strategy.state.participation == {}


def test_checkpoint_round_trip_and_metric_truncation(tmp_path):
    run = RunDirectory(tmp_path)
    state = ServerState(
        p_global=torch.randn(4, 16),
        momentum=torch.randn(4, 16),
        server_round=3,
        run_token="abc",
        noise_multiplier_global=1.5,
        config_fingerprint="f",
        node_sample_rates={"1": 0.1},
        participation={"1": 3},
    )
    run.save(state)
    loaded = run.load()
    assert torch.equal(loaded.p_global, state.p_global) and torch.equal(loaded.momentum, state.momentum)
    assert (loaded.server_round, loaded.participation, loaded.node_sample_rates) == (3, {"1": 3}, {"1": 0.1})
    for r in range(6):
        run.append_metrics({"round": r})
    run.truncate_metrics(3)
    assert [m["round"] for m in run.read_metrics()] == [0, 1, 2, 3]


def test_a_non_finite_server_step_keeps_p_global_and_the_replies_stay_booked(tmp_path, caplog):
    """Replies that each pass every check can still make the server step overflow (here a learning rate past
    float32's range): p_G and its momentum keep their values, the round counts as not updated and the log names
    it, and the replies stay booked (the nodes' steps happened, the server saw their replies). The next round
    goes on from the kept p_G."""
    strategy = _strategy(tmp_path, lr_global=1e39, momentum=0.9)
    before = strategy.state.p_global.clone()
    replies = lambda r: [_reply(torch.full((4, 16), 0.5), server_round=r, node=n) for n in (1, 2)]  # noqa: E731
    with caplog.at_level(logging.ERROR, logger="dpfpl.server"):
        assert strategy.aggregate_train(1, replies(1)) == (None, None)
    assert torch.equal(strategy.state.p_global, before) and strategy.state.momentum is None
    assert "round 1" in caplog.text and "non-finite" in caplog.text
    assert strategy.state.participation == {"1": 1, "2": 1}
    RunDirectory(tmp_path).save(strategy.state)  # the kept p_G is checkpointed as any other
    strategy.cfg = strategy.cfg.model_copy(update={"lr_global": 1.0})
    arrays, metrics = strategy.aggregate_train(2, replies(2))
    assert arrays is not None and metrics["num-replies"] == 2
    assert torch.isfinite(strategy.state.p_global).all() and not torch.equal(strategy.state.p_global, before)
    assert strategy.state.participation == {"1": 2, "2": 2}


def test_a_non_finite_secure_mean_leaves_p_global_as_it_was(tmp_path, caplog):
    """Under secure aggregation the decoded mean takes the server step; a step that is not finite is refused."""
    strategy = _strategy(tmp_path)
    before = strategy.state.p_global.clone()
    with caplog.at_level(logging.ERROR, logger="dpfpl.server"):
        assert not strategy.apply_secure_mean(4, 0, torch.full((4, 16), float("nan")), 3)
    assert torch.equal(strategy.state.p_global, before) and "round 4" in caplog.text
    assert strategy.apply_secure_mean(4, 0, torch.full((4, 16), 0.25), 3)
    assert torch.allclose(strategy.state.p_global, before - 0.25)  # lr 1


def test_a_cluster_whose_step_is_not_finite_keeps_its_prompt_and_the_others_update(tmp_path):
    """SecFPP: each cluster's prompt takes its own step; one that overflows keeps its prompt, the round still
    updates the others, and a round in which every cluster's step is refused counts as not updated."""
    from dpfpl.server_app.secfpp_round import SecfppStrategy

    cfg = RunConfig(run_dir=str(tmp_path), method="secfpp", min_clients=1, lr_global=10.0, dp=False)
    state = ServerState(
        p_global=torch.zeros(4, 16),
        momentum=None,
        server_round=0,
        run_token="t",
        noise_multiplier_global=0.0,
        config_fingerprint="f",
        cluster_prompts={0: torch.zeros(4, 16), 1: torch.ones(4, 16)},
        assignment={"1": 0, "2": 1},  # no node-key in the replies: booked under their node ids
    )
    strategy = SecfppStrategy(cfg, state)
    small, huge = torch.full((4, 16), 0.1), torch.full((4, 16), 1e38)  # 10 x 1e38 overflows float32
    arrays, metrics = strategy.aggregate_train(1, [_reply(small, node=1), _reply(huge, node=2)])
    assert metrics is not None and metrics["num-replies"] == 2
    assert torch.allclose(state.cluster_prompts[0], torch.full((4, 16), -1.0))
    assert torch.equal(state.cluster_prompts[1], torch.ones(4, 16)) and torch.equal(
        state.p_global, state.cluster_prompts[0]
    )
    assert strategy.aggregate_train(2, [_reply(huge, server_round=2, node=n) for n in (1, 2)]) == (None, None)
    assert torch.allclose(state.cluster_prompts[0], torch.full((4, 16), -1.0))
    assert torch.equal(state.cluster_prompts[1], torch.ones(4, 16))


def test_a_non_finite_prompt_is_never_checkpointed(tmp_path):
    """The checkpoint is what a resumed run sends the nodes: a NaN or Inf in a prompt or its momentum is refused
    with the tensor named, and the last checkpoint stays."""
    run = RunDirectory(tmp_path)
    good = ServerState(
        p_global=torch.zeros(4, 16),
        momentum=None,
        server_round=1,
        run_token="t",
        noise_multiplier_global=1.0,
        config_fingerprint="f",
    )
    run.save(good)
    bad_states = {
        "p_global": dataclasses.replace(good, p_global=torch.full((4, 16), math.nan)),
        "momentum": dataclasses.replace(good, momentum=torch.full((4, 16), math.inf)),
        "cluster-1": dataclasses.replace(
            good, cluster_prompts={0: torch.zeros(4, 16), 1: torch.full((4, 16), -math.inf)}
        ),
        "p_global_average": dataclasses.replace(good, p_global_average=torch.full((4, 16), math.nan)),
    }
    for name, bad in bad_states.items():
        bad.server_round = 2
        with pytest.raises(NonFiniteStateError, match=f"round 2: {name} holds NaN or Inf"):
            run.save(bad)
    loaded = run.load()
    assert loaded.server_round == 1 and torch.equal(loaded.p_global, good.p_global)


def test_a_reply_claiming_more_noisy_steps_than_possible_is_rejected_and_the_round_goes_on(tmp_path):
    """The books take a node's step count on trust, and the accountant's work grows with it: a count no node can
    have reached by this round (one step per round, a round a crash cut off, and a lost-step charge per step) is
    refused, in a train reply as in an evaluation reply; one at the bound is booked."""
    strategy = _strategy(tmp_path)
    most = max_noisy_steps(3)
    assert most == 8
    books = lambda n, steps: _reply(  # noqa: E731
        torch.zeros(4, 16), server_round=3, node=n, metrics={"noisy-steps": steps, "noise-multiplier-local": 1.0}
    )
    honest, at_most = [books(n, 3.0) for n in (1, 2)], books(3, float(most))
    hostile = [books(4, steps) for steps in (float(most + 1), 1e9)]
    for bad in hostile:
        with pytest.raises(InvalidReply, match="noisy-steps"):
            strategy.validate_train_reply(bad, 3)
    arrays, metrics = strategy.aggregate_train(3, [*honest, at_most, hostile[1]])
    assert arrays is not None and metrics["num-replies"] == 3
    assert strategy.state.node_steps == {"1": 3, "2": 3, "3": most}
    assert any("node 4" in r and "noisy-steps" in r for r in strategy.rejected)
    request = Message(content=RecordDict(), dst_node_id=1, message_type=MessageType.EVALUATE)
    request.metadata.__dict__["_src_node_id"] = 0
    claim = {"server-round": 3, "run-tag": run_tag("t"), "noisy-steps": 1e9, "local-acc": 0.5}
    evaluation = Message(content=RecordDict({"metrics": MetricRecord(claim)}), reply_to=request)
    evaluation.metadata.__dict__["_src_node_id"] = 1
    assert strategy.aggregate_evaluate(3, [evaluation]) is None  # rejected: nothing to average, nothing booked
    assert strategy.state.node_steps == {"1": 3, "2": 3, "3": most}
    assert math.isfinite(strategy.privacy_maxima()["epsilon-published-max"])


@pytest.mark.parametrize("z_local", [math.inf, math.nan])
def test_a_non_finite_local_noise_multiplier_is_refused_under_dp_with_the_key_named(tmp_path, z_local):
    """An infinite z_L would book a node's local releases as free (NaN as nothing at all): under DP a method with a
    local prompt refuses the reply, and the round goes on with the others. PromptFL has no local release: its
    honest z_L is inf, and it is accepted."""
    strategy = _strategy(tmp_path)  # DP-FPL: a local prompt
    good = [_reply(torch.zeros(4, 16), node=n, metrics={"noise-multiplier-local": 1.0}) for n in (1, 2)]
    bad = _reply(torch.zeros(4, 16), node=3, metrics={"noise-multiplier-local": z_local})
    with pytest.raises(InvalidReply, match="noise-multiplier-local"):
        strategy.validate_train_reply(bad, 1)
    arrays, _ = strategy.aggregate_train(1, [*good, bad])
    assert arrays is not None and strategy.state.participation == {"1": 1, "2": 1}
    assert strategy.state.node_noise_local == {"1": 1.0, "2": 1.0}
    if math.isinf(z_local):
        promptfl = _strategy(tmp_path, method="promptfl")
        promptfl.validate_train_reply(
            _reply(torch.zeros(4, 16), node=3, metrics={"noise-multiplier-local": z_local}), 1
        )


def _metrics_only_reply(server_round=1, node=1, arrays=None):
    records = {"metrics": MetricRecord({"server-round": server_round, "batch-size": 8.0, "run-tag": run_tag("t")})}
    if arrays is not None:
        records["arrays"] = ArrayRecord(arrays)
    request = Message(content=RecordDict(), dst_node_id=node, message_type=MessageType.TRAIN)
    request.metadata.__dict__["_src_node_id"] = 0
    msg = Message(content=RecordDict(records), reply_to=request)
    msg.metadata.__dict__["_src_node_id"] = node
    return msg


def test_coop_shares_nothing_and_the_server_adds_no_noise(tmp_path):
    strategy = _strategy(tmp_path, method="coop")
    assert strategy.current_arrays() is None  # nodes are sent no global prompt
    arrays, metrics = strategy.aggregate_train(1, [_metrics_only_reply(node=n) for n in (1, 2)])
    assert arrays is None and metrics["num-replies"] == 2 and "global-noise-std" not in metrics
    assert torch.equal(strategy.state.p_global, torch.zeros(4, 16)) and strategy.state.participation == {}
    assert strategy.epsilon_global() == 0.0
    # a reply that smuggles an array is rejected: coop shares nothing
    with pytest.raises(Exception, match="shares nothing"):
        strategy.validate_train_reply(_metrics_only_reply(arrays={"global-grad": torch.zeros(4, 16)}), 1)


@pytest.mark.parametrize("method", ["promptfl", "fedotp", "fedpgp", "dpfpl-noresidual", "dpfpl"])
def test_global_noise_goes_on_the_global_prompt_of_every_sharing_method(tmp_path, method):
    quiet, noisy = _strategy(tmp_path, method=method), _strategy(tmp_path, method=method)
    quiet.state.noise_multiplier_global = 0.0
    replies = lambda: [_reply(torch.full((4, 16), 0.1), node=n) for n in (1, 2)]  # noqa: E731
    quiet.aggregate_train(1, replies())
    noisy.aggregate_train(1, replies())
    assert torch.allclose(quiet.state.p_global, torch.full((4, 16), -0.1))  # lr 1, mean gradient 0.1
    assert not torch.allclose(noisy.state.p_global, quiet.state.p_global, atol=1e-3)


def test_resuming_with_more_rounds_than_the_noise_was_calibrated_for_is_refused(tmp_path):
    from dpfpl.server_app.runner import config_fingerprint, run_federation

    cfg = RunConfig(run_dir=str(tmp_path), num_server_rounds=5, target_epsilon=0.4)
    RunDirectory(tmp_path).save(
        ServerState(
            p_global=torch.zeros(4, 16),
            momentum=None,
            server_round=3,
            run_token="t",
            noise_multiplier_global=2.0,
            config_fingerprint=config_fingerprint(cfg),
            calibrated_rounds=3,
        )
    )
    with pytest.raises(RuntimeError, match="calibrated for 3 rounds"):
        run_federation(grid=None, cfg=cfg)  # refused before any node is contacted
    assert RunDirectory(tmp_path).load().server_round == 3  # nothing was touched


def test_every_round_waits_at_most_round_timeout(tmp_path, cache_dir, monkeypatch):
    """A hung node must not stall the federation: each exchange carries the configured timeout (the setup
    phase, the nodes' first contact, its own)."""
    from dpfpl.client_app.app import app as client_app
    from dpfpl.inprocess import InProcessGrid, full_run_config
    from dpfpl.server_app import runner, strategy
    from dpfpl.server_app.exchange import exchange
    from dpfpl.server_app.runner import run_federation

    class RecordingGrid(InProcessGrid):
        timeouts: list = []

    def recording_exchange(grid, messages, timeout=None):
        grid.timeouts.append(timeout)
        return exchange(grid, messages, timeout=timeout)

    for module in (runner, strategy):  # setup and evaluation (runner), the clear train exchange (strategy)
        monkeypatch.setattr(module, "exchange", recording_exchange)

    config = full_run_config(
        {
            "num-clients": 2,
            "classes-per-client": 2,
            "min-clients": 2,
            "num-server-rounds": 2,
            "dp": False,
            "pretrained": "none",
            "n-ctx": 4,
            "rank": 2,
            "batch-size": 8,
            "round-timeout": 42.0,
            "setup-timeout": 420.0,
            "run-dir": str(tmp_path / "run"),
            "resume": False,
        }
    )
    grid = RecordingGrid(client_app, config, 2, {})
    with grid.identity():
        run_federation(grid, RunConfig.from_flower(config))
    assert grid.timeouts[0] == 420.0 and grid.timeouts[1:] and set(grid.timeouts[1:]) == {42.0}


def test_server_class_list_needs_no_data_when_the_run_config_names_the_classes(tmp_path):
    """A deployed ServerApp has no images; with ``classnames`` in the run config it still checks every node's
    list, and without them it says how to fix the missing index files."""
    from dpfpl.common.classlist import class_list_digest
    from dpfpl.common.config import RunConfig
    from dpfpl.server_app.strategy import _server_class_list

    named = RunConfig(dataset="caltech101", data_root=str(tmp_path / "absent"), classnames="face,leopard,motorbike")
    assert class_list_digest(_server_class_list(named)) == class_list_digest(["face", "leopard", "motorbike"])
    with pytest.raises(ValueError, match="classnames"):
        _server_class_list(RunConfig(dataset="caltech101", data_root=str(tmp_path / "absent")))
