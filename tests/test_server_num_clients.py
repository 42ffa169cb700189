"""num-clients = 0 (pyproject's default, for ``flwr run .``): the ServerApp trains on as many clients as the
federation has SuperNodes, and tells every node that number; an explicit num-clients is used as is."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from dpfpl.common.config import RunConfig
from dpfpl.common.secfpp.protocol import check_run_config
from dpfpl.server_app.checkpoint import ServerState
from dpfpl.server_app.federation import FROM_FEDERATION, NUM_CLIENTS_KEY, resolve_num_clients
from dpfpl.server_app.strategy import PromptStrategy


class CountingGrid:
    """The one Grid call the resolution makes: the connected node ids, growing as nodes connect."""

    def __init__(self, *connected: list[int]) -> None:
        self.connected = list(connected)
        self.calls = 0

    def get_node_ids(self) -> list[int]:
        self.calls += 1
        return self.connected[min(self.calls, len(self.connected)) - 1]


@pytest.fixture(autouse=True)
def no_wait(monkeypatch):
    """Flower's ``sample_nodes`` sleeps 1 s between looks while fewer than min-clients are connected."""
    monkeypatch.setattr("flwr.serverapp.strategy.strategy_utils.sleep", lambda seconds: None)


def test_an_explicit_num_clients_is_used_as_is_without_asking_the_grid():
    cfg = RunConfig(num_clients=3, min_clients=2)
    assert resolve_num_clients(None, cfg) is cfg  # no Grid call: an explicit run behaves as it always did


def test_num_clients_0_is_the_number_of_connected_supernodes(caplog):
    cfg = RunConfig(num_clients=FROM_FEDERATION, min_clients=2)
    with caplog.at_level(logging.INFO, logger="dpfpl.server"):
        resolved = resolve_num_clients(CountingGrid([11, 12]), cfg)
    assert resolved.num_clients == 2
    assert resolved.model_dump() == {**cfg.model_dump(), "num_clients": 2}  # nothing else changes
    assert "num-clients not set: training on the 2 SuperNodes of the federation" in caplog.text


def test_the_count_waits_for_min_clients_like_every_round():
    grid = CountingGrid([11], [11, 12], [11, 12, 13])
    assert resolve_num_clients(grid, RunConfig(num_clients=0, min_clients=3)).num_clients == 3
    assert grid.calls == 3


def test_the_resolved_number_is_validated_as_an_explicit_one():
    """SecFPP's coded distances decode from 2(K+T-1)+1 nodes: with T = 2 two SuperNodes are too few, as
    num-clients = 2 would be."""
    cfg = RunConfig(num_clients=0, method="secfpp", secfpp_privacy=2, min_clients=2)
    with pytest.raises(ValueError) as explicit:
        check_run_config(RunConfig(num_clients=2, method="secfpp", secfpp_privacy=2, min_clients=2))
    with pytest.raises(ValueError) as resolved:
        resolve_num_clients(CountingGrid([11, 12]), cfg)
    assert str(resolved.value) == str(explicit.value)
    assert "needs" in str(resolved.value)


def test_the_run_config_accepts_0_and_still_checks_an_explicit_number():
    assert RunConfig(num_clients=0, min_clients=25).num_clients == 0  # min-clients is checked once resolved
    with pytest.raises(ValueError, match="min-clients"):
        RunConfig(num_clients=3, min_clients=4)
    with pytest.raises(ValueError):
        RunConfig(num_clients=-1)


def test_every_train_and_evaluation_message_carries_the_number(tmp_path):
    cfg = RunConfig(num_clients=2, min_clients=2, run_dir=str(tmp_path), dp=False)
    state = ServerState(
        p_global=torch.zeros(4, 16),
        momentum=None,
        server_round=0,
        run_token="t",
        noise_multiplier_global=0.0,
        config_fingerprint="f",
    )
    strategy = PromptStrategy(cfg, state)
    grid = CountingGrid([11, 12])
    for messages in (
        strategy.configure_train(1, strategy.current_arrays(), {}, grid),
        strategy.configure_evaluate(1, strategy.current_arrays(), {"phase": "personalized"}, grid),
    ):
        assert [m.content["config"][NUM_CLIENTS_KEY] for m in messages] == [2, 2]


def test_a_run_without_num_clients_trains_on_the_two_nodes_it_has(tmp_path, cache_dir):
    """Flower's default local simulation has 2 SuperNodes: a run that leaves num-clients to the federation
    partitions the data set for those 2, and records that number where an explicit one would be."""
    from dpfpl.inprocess import run_inprocess

    run_dir = tmp_path / "run"
    summary = run_inprocess(
        {
            "num-clients": 0,
            "min-clients": 2,
            "classes-per-client": 2,
            "num-server-rounds": 1,
            "eval-every": 1,
            "eval-last": 0,
            "pretrained": "none",
            "n-ctx": 4,
            "rank": 2,
            "batch-size": 8,
            "dp": False,
            "run-dir": str(run_dir),
            "resume": False,
        },
        num_nodes=2,
    )
    assert summary["num-clients"] == 2 and (summary["rounds-run"], summary["rounds-updated"]) == (1, 1)
    assert json.loads((run_dir / "config.json").read_text())["num_clients"] == 2  # what `dpfpl export` rebuilds
    assert sorted(p.name for p in (run_dir / "nodes").iterdir()) == ["node-0", "node-1"]
