"""Secure aggregation across real processes: a SuperLink and four authenticated SuperNodes (TLS), a 2-round
DP-FPL run with ``secure-aggregation = true``. Round 1's unmasking announces each node's keys for round 2, so round
2's train message carries the roster; one SuperNode is killed right after it announced its round-2 keys (its
unmasking reply is through; it never sends round 2's shares), and round 2 still completes without it, with one
exchange fewer than round 1. Marked ``deployment``.

(Killed *while* its reply is being uploaded, Flower's grid spends the round's timeout retrying the missing reply
objects and the round ends with no replies: it fails safely, nothing aggregated and nobody charged; seen once
while writing this test.)"""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import pytest

from dpfpl.launch import submit_run
from tests.test_deployment import CLASSES, federation  # noqa: F401  (the fixture)

pytestmark = pytest.mark.deployment

UNMASK_SENT = "Sending: train.secagg_unmask message ("


def _round_one_unmask_sent(log_text: str) -> bool:
    """The SuperNode's log shows its first unmasking reply (with round 2's announced keys) uploaded."""
    last = log_text.rfind(UNMASK_SENT)
    return log_text.count(UNMASK_SENT) == 1 and "Sent successfully" in log_text[last:]


def _kill_when_round_two_keys_announced(tmp, nodes, stop: threading.Event, killed: list[int]) -> None:
    """Poll the nodes' keys drawn ahead and logs; the first node whose round-2 keys reached the SuperLink is
    killed."""
    while not stop.is_set():
        for i, proc in enumerate(nodes):
            path = tmp / f"org{i}" / "state" / "secagg_ahead.json"
            try:
                session = json.loads(path.read_text())["session"]
                log_text = (tmp / f"supernode-{i}.log").read_text(errors="replace")
            except (OSError, ValueError, KeyError):
                continue
            if (
                session["context"].split("/")[1] == "2"
                and session["stage"] == "advertised"
                and _round_one_unmask_sent(log_text)
            ):
                os.killpg(proc.pid, signal.SIGKILL)
                killed.append(i)
                return
        time.sleep(0.05)


@pytest.mark.parametrize("federation", [4], indirect=True)
def test_two_secure_rounds_with_a_supernode_dying_mid_round(federation):  # noqa: F811
    tmp, env, nodes = federation["tmp"], federation["env"], federation["nodes"]
    run_dir = tmp / "server-run"
    stop, killed = threading.Event(), []
    watcher = threading.Thread(target=_kill_when_round_two_keys_announced, args=(tmp, nodes, stop, killed), daemon=True)
    watcher.start()
    started = time.time()
    try:
        submit_run(
            "org",
            {
                "dataset": "silo",
                "classnames": ",".join(CLASSES),
                "model-name": "dpfpl-demo-tiny",
                "pretrained": "none",
                "num-clients": 4,
                "min-clients": 3,
                "num-server-rounds": 2,
                "eval-every": 2,
                "eval-last": 0,
                "batch-size": 8,
                "target-epsilon": 1.0,
                "sample-rate": 0.34,  # public, declared: batch-size 8 / about 24 images per silo
                "round-timeout": 90.0,
                "secure-aggregation": True,
                "secagg-dropout-tolerance": 1,
                "run-dir": str(run_dir),
                "resume": False,
            },
            env=env,
            timeout=900,
            stream=True,
            cwd=tmp,
        )
    finally:
        stop.set()
        watcher.join(timeout=5)
    print(f"secure deployment run wall time {time.time() - started:.1f} s; killed node {killed}")
    rounds = [
        json.loads(line)
        for line in (run_dir / "metrics.jsonl").read_text().splitlines()
        if json.loads(line).get("phase") == "train"
    ]
    assert killed, "no SuperNode announced its round-2 keys"
    assert [r["updated"] for r in rounds] == [True, True]
    assert rounds[0]["secagg-dropped"] == 0
    # the killed node had announced keys, so it was in round 2's roster (N clients, t = N - 1) and is missing
    # from the sum; round 2 needed no share-keys exchange (the survivors' logs show one, round 1's)
    survivors = [i for i in range(len(nodes)) if i not in killed]
    for i in survivors:
        log_text = (tmp / f"supernode-{i}.log").read_text(errors="replace")
        assert log_text.count("Sending: train.secagg_shares message (") == 1
        assert log_text.count("Sending: train.secagg_masked message (") == 2
    assert rounds[1]["num-replies"] == rounds[1]["secagg-threshold"] >= 2
    assert rounds[1]["num-replies"] == rounds[0]["num-replies"] - 1
    assert rounds[1]["secagg-dropped"] == 1 and rounds[1]["secagg-masks-removed"] == 0  # dropped before its shares
    assert rounds[1]["noise-multiplier-global-effective"] > 0
    # no client's clear gradient reached the server's disk; every node kept its local prompt
    assert not list(run_dir.rglob("local_state*")) and not list(run_dir.rglob("secagg_session*"))
