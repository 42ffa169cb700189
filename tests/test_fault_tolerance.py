"""Node faults and restarts through the real round loop (``run_federation``) and the real ClientApp, on the
in-process Grid: a node that dies mid-run and rejoins, a resumed run whose nodes come back under new Flower
node ids, a class list that is not the server's, duplicated node identities, and a crash between the
checkpoint and its metrics line. (Real processes: tests/test_fault_injection.py.)"""

from __future__ import annotations

import logging
import math
import secrets

import pytest
import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.common import MessageType

from dpfpl.client_app.app import app as client_app
from dpfpl.client_app.state import NODE_KEY_FILE, NodeState, node_key
from dpfpl.common.classlist import ClassListMismatch, check_class_list, class_list_digest
from dpfpl.common.config import RunConfig
from dpfpl.common.outcome import RunFailed
from dpfpl.common.privacy import accounted_epsilon
from dpfpl.common.run_classes import run_class_list
from dpfpl.common.runtag import run_tag
from dpfpl.inprocess import InProcessGrid, full_run_config
from dpfpl.server_app.checkpoint import RunDirectory, ServerState
from dpfpl.server_app.runner import run_federation
from dpfpl.server_app.strategy import PromptStrategy

torch.set_num_threads(1)

TINY = {
    "num-clients": 3,
    "classes-per-client": 2,
    "min-clients": 2,
    "pretrained": "none",
    "n-ctx": 4,
    "batch-size": 8,
    "eval-every": 100,
    "eval-last": 0,
    "rank": 2,
    "dp": True,
    "target-epsilon": 0.0,
    "noise-multiplier-local": 1.0,
    "noise-multiplier-global": 1.5,
}


class FaultyGrid(InProcessGrid):
    """Delivers nothing to the partitions listed in ``down`` for the rounds listed there: a node that died
    (its messages get no reply, as from a SuperNode whose process is gone)."""

    def __init__(self, *args, down: dict[int, set[int]] | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.down = down or {}
        self.rounds_seen: list[int] = []

    def push_messages(self, messages):
        kept = []
        for message in messages:
            partition = self.contexts[message.metadata.dst_node_id].node_config["partition-id"]
            server_round = int(message.content["config"]["server-round"])
            if server_round not in self.down.get(partition, set()):
                kept.append(message)
        return super().push_messages(kept)


def _run(tmp_path, rounds: int, down=None, fresh_node_ids=False, **overrides) -> tuple[dict, FaultyGrid]:
    config = full_run_config({**TINY, "num-server-rounds": rounds, "run-dir": str(tmp_path / "run"), **overrides})
    grid = FaultyGrid(client_app, config, 3, {"num-threads": 1}, down=down)
    if fresh_node_ids:  # as Flower's simulation does for every run: new random node ids
        grid.contexts = {
            (nid := secrets.randbits(62) + 1): Context(
                run_id=c.run_id, node_id=nid, node_config=c.node_config, state=c.state, run_config=c.run_config
            )
            for c in grid.contexts.values()
        }
    with grid.identity():
        return run_federation(grid, RunConfig.from_flower(config)), grid


def _node_dir(tmp_path, partition: int):
    return tmp_path / "run" / "nodes" / f"node-{partition}"


def test_a_node_that_dies_mid_run_is_left_out_and_rejoins_with_its_local_prompt(tmp_path, cache_dir):
    summary, _ = _run(tmp_path, rounds=4, down={2: {2, 3}})
    run = RunDirectory(tmp_path / "run")
    rounds = [m for m in run.read_metrics() if m["phase"] == "train"]
    assert [m["round"] for m in rounds] == [1, 2, 3, 4]
    assert [m["num-replies"] for m in rounds] == [3, 2, 2, 3]
    # the global noise is calibrated to the replies actually aggregated: z_G C_G / (B n)
    for m in rounds:
        assert m["global-noise-std"] == pytest.approx(1.5 * 10.0 / (8 * m["num-replies"]))
    state = run.load()
    keys = {p: str(node_key(_node_dir(tmp_path, p))) for p in range(3)}
    assert state.participation == {keys[0]: 4, keys[1]: 4, keys[2]: 2}  # what really happened
    # the node rejoined with its local prompt: its accountant holds both steps, no fresh state was started
    node2 = NodeState.load(_node_dir(tmp_path, 2))
    assert node2.last_round == 4 and len(node2.accountant.history) == 2 and node2.run_key == state.run_token
    assert sorted(p.name for p in _node_dir(tmp_path, 2).glob("local_state*")) == [
        "local_state.safetensors",
        "local_state.safetensors.prev",
    ]
    # the privacy report is the accountant's, for each node's own rounds
    expected = max(accounted_epsilon(1.5, state.node_sample_rates[k], n, 1e-5) for k, n in state.participation.items())
    assert summary["privacy"]["epsilon-gdp-mechanism-max"] == pytest.approx(expected)
    # p_G's guarantee: the reply reads p_L, so both releases compose, z = (1^-2 + 1.5^-2)^-1/2, over every
    # step each node's own accountant took
    z = 1.0 / math.sqrt(1.0 + 1.5**-2)
    steps = {
        str(node_key(_node_dir(tmp_path, p))): len(NodeState.load(_node_dir(tmp_path, p)).accountant.history)
        for p in range(3)
    }
    composed = max(accounted_epsilon(z, state.node_sample_rates[k], n, 1e-5) for k, n in steps.items())
    assert summary["privacy"]["epsilon-global-max"] == pytest.approx(composed) and composed > expected
    assert summary["privacy"]["epsilon-published-max"] == pytest.approx(composed)


def test_a_resumed_run_keeps_per_node_books_when_node_ids_change(tmp_path, cache_dir):
    """Flower's simulation gives a resumed run new node ids: the books follow the nodes' stable keys."""
    _run(tmp_path, rounds=2, fresh_node_ids=True)
    first = RunDirectory(tmp_path / "run").load()
    summary, _ = _run(tmp_path, rounds=4, fresh_node_ids=True)
    state = RunDirectory(tmp_path / "run").load()
    keys = {str(node_key(_node_dir(tmp_path, p))) for p in range(3)}
    assert set(state.participation) == keys == set(state.node_sample_rates)
    assert all(n == 4 for n in state.participation.values())
    assert state.node_sample_rates == first.node_sample_rates and all(q < 1 for q in state.node_sample_rates.values())
    assert [m["round"] for m in RunDirectory(tmp_path / "run").read_metrics()] == [0, 1, 2, 3, 4]
    assert summary["rounds"] == 4


def test_the_node_key_is_stable_and_a_damaged_key_file_is_refused(tmp_path):
    key = node_key(tmp_path)
    assert node_key(tmp_path) == key and 0 < key < 2**62
    (tmp_path / NODE_KEY_FILE).write_text("garbage")
    with pytest.raises(ValueError, match="delete it"):
        node_key(tmp_path)


def test_a_class_list_that_differs_from_the_servers_fails_before_any_work(tmp_path, cache_dir, caplog):
    config = full_run_config({**TINY, "num-server-rounds": 1, "run-dir": str(tmp_path / "run2")})
    grid = InProcessGrid(client_app, config, 3, {"num-threads": 1, "classnames": "cat,dog,cow"})
    with caplog.at_level(logging.ERROR), grid.identity(), pytest.raises(RunFailed, match="before round 1"):
        run_federation(grid, RunConfig.from_flower(config))
    server = class_list_digest(run_class_list(RunConfig()))
    mine = class_list_digest(["cat", "dog", "cow"])
    assert server[:16] in caplog.text and mine[:16] in caplog.text and "node config 'classnames'" in caplog.text
    assert not list((tmp_path / "run2").rglob("local_state*"))  # nothing was trained or written


def test_check_class_list_order_matters_and_a_missing_digest_is_refused():
    names = ["cat", "dog"]
    check_class_list(class_list_digest(names), names, "test")
    with pytest.raises(ClassListMismatch, match="mismatch"):
        check_class_list(class_list_digest(["dog", "cat"]), names, "test")
    with pytest.raises(ClassListMismatch, match="sent no"):
        check_class_list(None, names, "test")


# ------------------------------------------------------------------ strategy-level books
def _strategy(tmp_path) -> PromptStrategy:
    cfg = RunConfig(
        run_dir=str(tmp_path),
        num_clients=4,
        min_clients=1,
        batch_size=8,
        lr_global=1.0,
        target_epsilon=0,
        noise_multiplier_local=1.0,
        noise_multiplier_global=2.0,
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


def _reply(node: int, key, sample_rate: float = 0.1) -> Message:
    metrics = {
        "server-round": 1,
        "sample-rate": sample_rate,
        "run-tag": run_tag("t"),
        "noise-multiplier-local": 1.0,
    }
    if key is not None:
        metrics["node-key"] = key
    request = Message(content=RecordDict(), dst_node_id=node, message_type=MessageType.TRAIN)
    request.metadata.__dict__["_src_node_id"] = 0
    msg = Message(
        content=RecordDict(
            {"arrays": ArrayRecord({"global-grad": torch.zeros(4, 16)}), "metrics": MetricRecord(metrics)}
        ),
        reply_to=request,
    )
    msg.metadata.__dict__["_src_node_id"] = node
    return msg


def test_two_replies_under_one_node_key_are_both_rejected(tmp_path, caplog):
    strategy = _strategy(tmp_path)
    with caplog.at_level(logging.WARNING):
        _, metrics = strategy.aggregate_train(1, [_reply(1, 111), _reply(2, 111), _reply(3, 333)])
    assert metrics["num-replies"] == 1 and strategy.state.participation == {"333": 1}
    assert "share a node key" in caplog.text


@pytest.mark.parametrize("key", [-5, 0, 2**62, 1.5, [1, 2]])
def test_a_malformed_node_key_is_rejected(tmp_path, key):
    strategy = _strategy(tmp_path)
    strategy.aggregate_train(1, [_reply(1, key), _reply(2, 222)])
    assert strategy.state.participation == {"222": 1}


def test_a_node_that_missed_the_setup_phase_is_booked_with_its_own_sample_rate(tmp_path):
    strategy = _strategy(tmp_path)
    strategy.state.node_sample_rates = {"111": 0.1}
    # the rate it declares (public), never a training-set size
    strategy.aggregate_train(1, [_reply(1, 111), _reply(2, 222, sample_rate=0.4)])
    assert strategy.state.participation == {"111": 1, "222": 1}
    assert strategy.state.node_sample_rates == {"111": 0.1, "222": pytest.approx(0.4)}
    books = strategy.privacy_maxima()
    assert books["epsilon-gdp-mechanism-max"] == pytest.approx(accounted_epsilon(2.0, 0.4, 1, 1e-5))
    z = 1.0 / math.sqrt(1.0 + 2.0**-2)  # DP-FPL's reply reads p_L: p_G's epsilon composes both releases
    assert strategy.epsilon_global() == pytest.approx(accounted_epsilon(z, 0.4, 1, 1e-5))
    assert not math.isinf(strategy.epsilon_global())


def test_a_crash_between_checkpoint_and_metrics_line_loses_no_line(tmp_path):
    run = RunDirectory(tmp_path)
    run.append_metrics({"round": 0, "phase": "zeroshot"})
    run.append_metrics({"round": 1, "phase": "train"})
    record = {"round": 2, "phase": "train", "num-replies": 3.0}
    state = ServerState(
        p_global=torch.zeros(2, 2),
        momentum=None,
        server_round=2,
        run_token="t",
        noise_multiplier_global=1.0,
        config_fingerprint="f",
        last_record=record,
    )
    run.save(state)  # ... and the process dies before append_metrics(record)
    run.append_metrics({"round": 3, "phase": "train"})  # a line past the checkpoint (the round runs again)
    run.resume_metrics(run.load())
    assert run.read_metrics() == [{"round": 0, "phase": "zeroshot"}, {"round": 1, "phase": "train"}, record]
    run.resume_metrics(run.load())  # idempotent
    assert [m["round"] for m in run.read_metrics()] == [0, 1, 2]
