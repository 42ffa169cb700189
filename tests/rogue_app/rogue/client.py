"""A rogue ClientApp: what anyone who can submit a run to the SuperLink gets to run on every node.

It runs as the SuperNode's user. It tries to read the organization's images and the node's state, then asks
the node's worker (whose socket the SuperNode's node config names) for what an honest round would never ask:
a run without DP, another data set, a tiny global noise multiplier under a huge target, rounds past the run's
schedule, a thousand evaluations, an operation outside the protocol. It reports everything it got.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from dpfpl.client_app.request import NodeRequest
from dpfpl.client_app.worker_link import LinkError, WorkerHandlerError, forward
from dpfpl.common.config import RunConfig
from dpfpl.common.methods import build_method
from dpfpl.server_app.strategy import global_noise_multiplier

app = ClientApp()


def _read(path: str) -> dict:
    """Everything this user can list or read at ``path``."""
    out: dict = {"path": path}
    try:
        out["listing"] = sorted(os.listdir(path))
    except OSError as err:
        out["listing-error"] = type(err).__name__
    try:
        for root, _dirs, files in os.walk(path):
            for name in files:
                with open(Path(root) / name, "rb") as fh:
                    out.setdefault("read-bytes", 0)
                    out["read-bytes"] += len(fh.read())
    except OSError as err:
        out["read-error"] = type(err).__name__
    return out


def _ask(sock: str, operation: str, run_config: dict, config: dict, node_id: int, prompt_shape) -> str:
    """One crafted call to the worker: 'answered', or the refusal's first words."""
    records = {"config": ConfigRecord(config)}
    if prompt_shape is not None:
        records["arrays"] = ArrayRecord({"global-prompt": Array(np.zeros(prompt_shape, dtype=np.float32))})
    request = NodeRequest(
        operation=operation,
        content=RecordDict(records),
        run_config=run_config,
        node_config={"data-dir": "/", "state-dir": "/tmp/rogue-state", "lifetime-epsilon": 1e9},  # ignored
        node_id=node_id,
    )
    try:
        reply = forward(request, Path(sock), expect_worker=True)
    except (WorkerHandlerError, LinkError, OSError, RuntimeError) as err:
        return "refused: " + str(err)[:300]
    return "answered" if reply is not None else "no-worker"


def _kinds(outcomes: list[str]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for outcome in outcomes:
        key = "answered" if outcome == "answered" else outcome.split(":", 1)[0]
        counts[key] = counts.get(key, 0) + 1
    return counts


@app.train()
def attack(msg: Message, context: Context) -> Message:
    rc = dict(context.run_config)
    sock = str(context.node_config.get("worker-socket", ""))
    report: dict = {"node-config-keys": sorted(context.node_config), "uid": os.getuid()}
    report["probes"] = [_read(p) for p in str(rc["probe-paths"]).split(",") if p]
    base = json.loads(base64.b64decode(str(rc["base-run-config"])))
    classes = str(base["classnames"]).split(",")
    shape = tuple(int(n) for n in str(rc["prompt-shape"]).split("x"))
    digest = hashlib.sha256("\n".join(classes).encode()).hexdigest()
    node_id = int(msg.metadata.dst_node_id)

    def train_config(token: str, server_round: int, z_global: float) -> dict:
        return {
            "server-round": server_round,
            "run-token": token,
            "classes-sha256": digest,
            "noise-multiplier-global": z_global,
            "rerelease": False,
        }

    # the z_G an honest server would calibrate for a run (public code, public parameters)
    rounds_cfg = {**base, "target-epsilon": 1.0, "num-server-rounds": 2}
    cfg = RunConfig.from_flower(rounds_cfg)
    method = build_method(cfg.method, cfg.rank, cfg.contrastive_weight, cfg.contrastive_temperature)
    z_honest = global_noise_multiplier(cfg, float(base["sample-rate"]), method)

    calls: dict[str, list[str]] = {}
    # a run without differential privacy, and a data set read from a path the run names
    calls["no-dp"] = [_ask(sock, "train", {**base, "dp": False}, train_config("rogue-nodp", 1, 1.0), node_id, shape)]
    calls["other-dataset"] = [
        _ask(
            sock,
            "train",
            {**base, "dataset": "folder", "data-root": "/etc"},
            train_config("rogue-folder", 1, 1.0),
            node_id,
            shape,
        )
    ]
    # a huge target, so that the run's own limit does not stop it, and a tiny z_G: only the lifetime budget can
    calls["tiny-z-global"] = [
        _ask(
            sock,
            "train",
            {**base, "target-epsilon": 1000.0, "num-server-rounds": 2},
            train_config("rogue-tiny", 1, 0.05),
            node_id,
            shape,
        )
    ]
    # a run calibrated for 2 rounds, asked for 6
    calls["extra-rounds"] = [
        _ask(sock, "train", rounds_cfg, train_config("rogue-rounds", r, z_honest), node_id, shape) for r in range(1, 7)
    ]
    # a thousand evaluations of chosen prompts: two runs of 500
    evaluations = []
    for token in ("rogue-eval-a", "rogue-eval-b"):
        config = {"server-round": 1, "run-token": token, "classes-sha256": digest, "phase": "personal"}
        evaluations += [_ask(sock, "evaluate", rounds_cfg, config, node_id, shape) for _ in range(500)]
    calls["evaluations"] = evaluations
    calls["outside-protocol"] = [_ask(sock, "train.exfiltrate", base, train_config("rogue-x", 1, 1.0), node_id, shape)]
    report["calls"] = {name: _kinds(outcomes) for name, outcomes in calls.items()}
    report["refusals"] = {
        name: sorted({o for o in outcomes if o != "answered"})[:3] for name, outcomes in calls.items()
    }
    return Message(content=RecordDict({"report": ConfigRecord({"json": json.dumps(report)})}), reply_to=msg)
