"""Fault injection with real processes: a SuperLink and three SuperNodes on 127.0.0.1, a 3-round DP-FPL run
submitted with ``flwr run``, every SuperNode with its resident worker (``dpfpl.launch.start_supernode``). While it
runs, one node is SIGKILLed (its SuperNode, its ClientApp, its worker and the worker's supervisor) and later
started again on its own state directory; the SuperLink (with its ServerApp) is SIGKILLed once and restarted on its
database, and the run is submitted again with ``resume = true``.

What must hold afterwards: the run completed every round exactly once; the server's books (participation per
node key) add up to the replies the metrics log says were aggregated, and each node's own accountant took
exactly the steps the server booked for it (at most one more for the killed node: a step taken, then killed
before the reply left); the privacy report is the accountant's for those books; no local prompt was lost (the
killed node's history from before the kill is the start of its history after).

Marked ``deployment`` (run alone with ``pytest -m deployment``). About 3-5 minutes on 2 CPU cores, the round
the dead node misses waiting up to ``round-timeout`` (generous, so that a slow but live node is never cut off
on a loaded machine).
"""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import tomli_w
from PIL import Image

from dpfpl.client_app.state import NodeState, node_key
from dpfpl.common.privacy import accounted_epsilon
from dpfpl.launch import (
    free_port,
    kill_tagged_processes,
    launch_env,
    start_run,
    start_superlink,
    start_supernode,
    stop_tagged_processes,
    wait_run,
)
from dpfpl.server_app.checkpoint import RunDirectory

pytestmark = pytest.mark.deployment
CLASSES = ["circle", "square", "stripes", "dots", "cross", "ring"]
ROUNDS = 3
KILLED = 2  # the SuperNode that dies


def _write_silo(root: Path, classes: list[str], seed: int) -> None:
    rng = np.random.default_rng(seed)
    for split, n in (("train", 10), ("test", 3)):
        for c in classes:
            folder = root / split / c
            folder.mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(folder / f"{c}-{i}.png")


def _train_lines(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [r for r in (json.loads(x) for x in path.read_text().splitlines() if x.strip()) if r.get("phase") == "train"]


def _wait_for_round(run_dir: Path, server_round: int, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if any(r["round"] >= server_round for r in _train_lines(run_dir)):
            return
        time.sleep(0.5)
    raise TimeoutError(f"round {server_round} did not complete within {timeout}s; see {run_dir}")


@pytest.fixture()
def loopback(tmp_path):
    tags = {"link": f"link-{uuid.uuid4().hex}", **{i: f"node{i}-{uuid.uuid4().hex}" for i in range(3)}}
    home = tmp_path / "flwr-home"
    home.mkdir()
    port = free_port()
    (home / "config.toml").write_text(
        tomli_w.dumps({"superlink": {"default": "local", "local": {"address": f"127.0.0.1:{port}", "insecure": True}}})
    )
    env = {name: launch_env(home, tag) for name, tag in tags.items()}

    def link() -> None:
        start_superlink(port, tmp_path / "superlink.db", env["link"], tmp_path / "superlink.log")

    def node(i: int) -> None:
        start_supernode(
            port,
            {
                "data-dir": str(tmp_path / f"org{i}" / "data"),
                "state-dir": str(tmp_path / f"org{i}" / "state"),
                "cache-dir": str(tmp_path / f"org{i}" / "cache"),
                "device": "cpu",
            },
            env[i],
            tmp_path / f"supernode-{i}.log",
        )

    for i in range(3):
        _write_silo(tmp_path / f"org{i}" / "data", CLASSES[2 * i : 2 * i + 2], seed=i)
    try:
        yield {"tmp": tmp_path, "env": env, "tags": tags, "link": link, "node": node}
    finally:
        for tag in tags.values():
            stop_tagged_processes(tag, grace=5)


def test_a_killed_node_and_a_restarted_superlink_lose_no_round_and_no_local_prompt(loopback):
    tmp, env, tags = loopback["tmp"], loopback["env"], loopback["tags"]
    run_dir = tmp / "server-run"
    config = {
        "dataset": "silo",
        "classnames": ",".join(CLASSES),
        "model-name": "dpfpl-demo-tiny",
        "pretrained": "none",
        "n-ctx": 4,
        "rank": 2,
        "num-clients": 3,
        "min-clients": 2,
        "num-server-rounds": ROUNDS,
        "eval-every": 100,
        "eval-last": 0,
        "batch-size": 8,
        "target-epsilon": 1.0,
        "sample-rate": 0.34,  # public, declared: batch-size 8 / about 24 training images per silo
        "round-timeout": 90.0,
        "setup-timeout": 300.0,
        "run-dir": str(run_dir),
        "resume": False,
    }
    started = time.time()
    loopback["link"]()
    for i in range(3):
        loopback["node"](i)
    start_run("local", config, env=env["link"], cwd=tmp)

    # a node dies after round 1: SIGKILL, the SuperNode and its ClientApp process together
    _wait_for_round(run_dir, 1)
    assert kill_tagged_processes(tags[KILLED])
    killed_dir = tmp / f"org{KILLED}" / "state"
    history_at_kill = NodeState.load(killed_dir).accountant.history
    assert history_at_kill, "the node had trained before it was killed"

    # the run goes on without it; then the SuperLink and its ServerApp die
    _wait_for_round(run_dir, 2)
    assert kill_tagged_processes(tags["link"])
    rounds_before_restart = max(r["round"] for r in _train_lines(run_dir))
    assert rounds_before_restart < ROUNDS, "the SuperLink must die mid-run for this test to mean anything"

    # restart the SuperLink on its database, bring the dead node back on its own state, resume the run
    loopback["link"]()
    loopback["node"](KILLED)
    run_id = start_run("local", {**config, "resume": True}, env=env["link"], cwd=tmp)
    wait_run(run_id, "local", env=env["link"], timeout=420, stream=False, cwd=tmp)
    print(
        f"fault-injection run: {time.time() - started:.1f} s wall, SuperLink killed after round {rounds_before_restart}"
    )

    # every round exactly once, in order; each aggregated at least min-clients replies
    train = _train_lines(run_dir)
    print(
        "rounds (round, replies, seconds):", [(r["round"], r.get("num-replies"), r.get("round-seconds")) for r in train]
    )
    assert [r["round"] for r in train] == list(range(1, ROUNDS + 1))
    assert all(r["num-replies"] >= 2 and r["updated"] for r in train)
    assert any(r["num-replies"] == 2 for r in train), "some round must have run without the killed node"

    # the books add up: what the log says was aggregated is what the server booked, per node key
    state = RunDirectory(run_dir).load()
    assert state.server_round == ROUNDS
    assert sum(state.participation.values()) == sum(int(r["num-replies"]) for r in train)
    keys = {i: str(node_key(tmp / f"org{i}" / "state")) for i in range(3)}
    assert set(state.participation) == set(keys.values())
    for i, key in keys.items():
        node_state = NodeState.load(tmp / f"org{i}" / "state")
        steps = len(node_state.accountant.history)
        booked = state.participation[key]
        if i == KILLED:
            assert booked < ROUNDS
            assert booked <= steps <= booked + 1  # +1: a step taken, then killed before the reply left
            # no local prompt lost: the history from before the kill goes on, it did not start over
            assert node_state.accountant.history[: len(history_at_kill)] == history_at_kill
            assert steps > len(history_at_kill), "the restarted node rejoined and trained"
        else:
            # a round cut short by the SuperLink's death runs again with the same p_G: the cached reply is
            # re-sent, no second step and no second booking
            assert steps == booked == ROUNDS
        assert node_state.run_key == state.run_token

    # the privacy report is the accountant's for these books
    summary = json.loads((run_dir / "summary.json").read_text())
    expected = max(
        accounted_epsilon(state.noise_multiplier_global, state.node_sample_rates[k], n, 1e-5)
        for k, n in state.participation.items()
    )
    assert summary["privacy"]["epsilon-gdp-mechanism-max"] == pytest.approx(expected)
    # p_G's guarantee: DP-FPL's reply reads p_L, so it is the composed epsilon
    assert summary["privacy"]["epsilon-global-max"] == pytest.approx(summary["privacy"]["epsilon-published-max"])
    assert expected <= 1.0 + 1e-6  # calibrated for ROUNDS rounds at the largest rate: never exceeded
    # nothing private on the server's side
    assert not list(run_dir.rglob("local_state*"))
