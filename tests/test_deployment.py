"""Deployment with real processes: a SuperLink and three SuperNodes on 127.0.0.1 with TLS and node
authentication, each SuperNode on its own silo of real image files and with its resident worker (the start
script's default), a 3-round DP-FPL run submitted with ``flwr run``. While it runs one node's worker is frozen
and SIGKILLed with a message in its socket; its supervisor restarts it and the run's books must not notice.
Then a run from an edited copy of the app meets workers running the old code and must be refused with what to
restart. Marked ``deployment`` (run alone with ``pytest -m deployment``); it also runs in CI."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dpfpl.client_app.state import NodeState, node_key
from dpfpl.common.outcome import RunOutcome
from dpfpl.launch import PROJECT_ROOT, free_port, stop_launched, submit_run, wait_for_port
from dpfpl.server_app.checkpoint import RunDirectory

pytestmark = pytest.mark.deployment
DEPLOY = PROJECT_ROOT / "deploy"
CLASSES = ["circle", "square", "stripes", "dots", "cross", "ring"]


def _write_silo(root: Path, classes: list[str], seed: int) -> None:
    rng = np.random.default_rng(seed)
    for split, n in (("train", 12), ("test", 4)):
        for c in classes:
            folder = root / split / c
            folder.mkdir(parents=True)
            for i in range(n):
                img = rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)
                Image.fromarray(img).save(folder / f"{c}-{i}.png")


@pytest.fixture()
def federation(tmp_path, request):
    registered = getattr(request, "param", 3)  # SuperNodes 0..registered-1 are registered, the rest are not
    tag = f"deploytest-{os.getpid()}-{time.time_ns()}"
    env = {
        **os.environ,
        "FLWR_HOME": str(tmp_path / "flwr-home"),
        "FLWR_TELEMETRY_ENABLED": "0",
        "DPFPL_LAUNCH_TAG": tag,
    }
    # the key flow of docs/deployment.md: the operator makes the CA and the SuperLink's certificate, the
    # aggregator gets only ca.crt, server.pem and server.key, and each organization makes its own node key next
    # to its copy of ca.crt and hands over only the public half
    certs = tmp_path / "certs"
    subprocess.run(
        ["bash", str(DEPLOY / "gen-certs.sh"), str(certs), "localhost"], check=True, env=env, capture_output=True
    )
    link_certs = tmp_path / "aggregator"
    link_certs.mkdir()
    for name in ("ca.crt", "server.pem", "server.key"):
        shutil.copy2(certs / name, link_certs / name)
    node_certs = []
    for i in range(4):
        keys = tmp_path / f"org{i}" / "keys"
        subprocess.run(
            ["bash", str(DEPLOY / "gen-node-key.sh"), str(keys), f"supernode-{i}"],
            check=True,
            env=env,
            capture_output=True,
        )
        shutil.copy2(certs / "ca.crt", keys / "ca.crt")
        node_certs.append(keys)
    port = free_port()
    procs: list[subprocess.Popen] = []

    def start(args: list[str], log: Path) -> subprocess.Popen:
        proc = subprocess.Popen(
            args, env=env, stdout=open(log, "wb"), stderr=subprocess.STDOUT, start_new_session=True, cwd=tmp_path
        )
        procs.append(proc)
        return proc

    try:
        link = start(
            [
                "bash",
                str(DEPLOY / "start-superlink.sh"),
                str(link_certs),
                "127.0.0.1",
                str(port),
                str(tmp_path / "superlink.db"),
            ],
            tmp_path / "superlink.log",
        )
        wait_for_port(port, link, tmp_path / "superlink.log")
        # write the connection and register keys 0..2; key 3 stays unregistered (unless a test asks for 4)
        subprocess.run(
            ["bash", str(DEPLOY / "connect.sh"), "org", f"127.0.0.1:{port}", str(certs / "ca.crt")]
            + [str(node_certs[i] / f"supernode-{i}.pub") for i in range(registered)],
            check=True,
            env=env,
            capture_output=True,
            cwd=tmp_path,
        )
        nodes = []
        for i in range(4):
            silo, state = tmp_path / f"org{i}" / "data", tmp_path / f"org{i}" / "state"
            _write_silo(silo, CLASSES[2 * (i % 3) : 2 * (i % 3) + 2], seed=i)
            nodes.append(
                start(
                    [
                        "bash",
                        str(DEPLOY / "start-supernode.sh"),
                        f"127.0.0.1:{port}",
                        str(silo),
                        str(state),
                        str(node_certs[i]),
                        f"supernode-{i}",
                        str(free_port()),
                        "cpu",
                    ],
                    tmp_path / f"supernode-{i}.log",
                )
            )
        yield {"env": env, "tmp": tmp_path, "nodes": nodes, "port": port}
    finally:
        stop_launched(procs, tag)


def _worker_status(tmp: Path, i: int) -> dict:
    return json.loads((tmp / f"org{i}" / "state" / "worker.json").read_text())


def _freeze_and_kill_worker(tmp: Path, i: int, stop: threading.Event, killed: list[int]) -> None:
    """Once node i's worker has answered round 1's train message: SIGSTOP it, let the next message reach its
    socket, then SIGKILL it. The ClientApp holding that message sees the link break and asks the worker its
    supervisor starts next."""
    while not stop.is_set():
        try:
            status = _worker_status(tmp, i)
        except (OSError, ValueError):
            status = {}
        if status.get("requests", {}).get("train", 0) >= 1:
            os.kill(status["pid"], signal.SIGSTOP)
            stop.wait(6)  # the SuperNode polls every 3 s: a message arrives while the worker is frozen
            os.kill(status["pid"], signal.SIGKILL)
            killed.append(status["pid"])
            return
        time.sleep(0.05)


def _edited_app(tmp: Path) -> Path:
    """A copy of the app with one handler file edited (a comment): what an organization meets when the app is
    updated and its worker still runs the old code."""
    app = tmp / "app-edited"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("dpfpl", "common", "server_app", "client_app"):
        shutil.copytree(PROJECT_ROOT / name, app / name, ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(PROJECT_ROOT / name, app / name)
    with open(app / "client_app" / "prompt_handlers.py", "a") as fh:
        fh.write("# edited after the workers started\n")
    return app


def test_three_rounds_across_three_authenticated_supernodes_with_resident_workers(federation):
    tmp, env = federation["tmp"], federation["env"]
    run_dir = tmp / "server-run"
    config = {
        "dataset": "silo",
        "classnames": ",".join(CLASSES),
        "model-name": "dpfpl-demo-tiny",
        "pretrained": "none",
        "num-clients": 3,
        "min-clients": 3,
        "num-server-rounds": 3,
        "eval-every": 1,
        "batch-size": 8,
        "target-epsilon": 1.0,
        "sample-rate": 0.34,  # public, declared: batch-size 8 / about 24 training images per silo
        "round-timeout": 120.0,
        "run-dir": str(run_dir),
        "resume": False,
    }
    stop, killed = threading.Event(), []
    killer = threading.Thread(target=_freeze_and_kill_worker, args=(tmp, 1, stop, killed), daemon=True)
    killer.start()
    started = time.time()
    try:
        submit_run("org", config, env=env, timeout=600, stream=False, cwd=tmp)
    finally:
        stop.set()
        killer.join(timeout=10)
    print(f"deployment run wall time {time.time() - started:.1f} s")
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
    for record in records:
        print(f"deployment round {record['round']}: {record.get('round-seconds', '-')} s")

    # the unregistered SuperNode was refused and exited
    refused = federation["nodes"][3]
    assert refused.wait(timeout=60) != 0

    # each node holds its own local prompt and no other node's; the server holds none
    for i in range(3):
        states = sorted((tmp / f"org{i}" / "state").rglob("local_state*.safetensors"))
        assert [p.name for p in states] == ["local_state.safetensors"]
    assert not list((tmp / "org3" / "state").rglob("local_state*.safetensors"))
    assert (run_dir / "checkpoint.safetensors").is_file()
    assert not list(run_dir.rglob("local_state*"))
    assert len(records) == 4  # zero-shot + 3 rounds
    assert all(r["updated"] and r["num-replies"] == 3 for r in records if r.get("phase") == "train")

    # the workers answered every message, each loading the model once; node 1's worker was killed once
    assert killed, "node 1's worker never reached round 1"
    for i in range(3):
        status = _worker_status(tmp, i)
        assert status["model-loads"] == 1 and status["errors"] == 0
        if i != 1:
            assert status["requests"] == {"evaluate": 5, "train": 3}  # setup, 3 rounds, the published prompt
    assert _worker_status(tmp, 1)["pid"] not in killed  # a new worker took over
    assert "restarting it" in (tmp / "org1" / "state" / "worker.log").read_text()

    # the books: each node's accountant took exactly the steps the server booked for it, one per round
    books = RunDirectory(run_dir).load()
    for i in range(3):
        node_state = NodeState.load(tmp / f"org{i}" / "state")
        assert len(node_state.accountant.history) == books.participation[str(node_key(tmp / f"org{i}" / "state"))]
        assert len(node_state.accountant.history) == 3

    # an app edited after the workers started: every node refuses it, and the run says what to restart
    edited_dir = tmp / "server-run-edited"
    with pytest.raises(RuntimeError):
        submit_run(
            "org",
            {**config, "run-dir": str(edited_dir), "setup-timeout": 120.0},
            env=env,
            timeout=300,
            stream=False,
            cwd=tmp,
            app=_edited_app(tmp),
        )
    outcome = RunOutcome.read(edited_dir)
    assert outcome is not None and outcome.status == "setup-failed"
    assert "Restart the node's worker" in outcome.paragraph()
    assert all(_worker_status(tmp, i)["refused"] >= 1 for i in range(3))
    assert len(NodeState.load(tmp / "org0" / "state").accountant.history) == 3  # nothing ran
