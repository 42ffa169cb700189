"""``flwr run .`` as Flower's documentation tells its users, from the app's folder, on Flower's own default
connection: the managed local SuperLink (simulation mode) that ``flwr`` starts by itself.

What makes it work here, and what the README tells users: the SuperLink reuses this environment instead of
installing the app's dependencies into a new one (``FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1``, which
``flower-superlink`` reads; the managed SuperLink inherits ``flwr``'s environment), and one simulated
SuperNode per client (``--federation-config "num-supernodes=N"``).

The managed SuperLink outlives ``flwr run``: the test gives it its own FLWR_HOME and ports (Flower's
``FLWR_LOCAL_SUPERLINK_HTTP_API_PORT`` / ``FLWR_LOCAL_CONTROL_API_PORT``) and stops it, and everything it
started, by pid (every process inherits the test's launch tag). ``flwr run --stream`` exits 0 even when the
ServerApp fails, so the run's status is checked with ``flwr ls``.
"""

from __future__ import annotations

import json
import re
import subprocess
import uuid

import pytest

from dpfpl.common.config import RunConfig
from dpfpl.inprocess import full_run_config
from dpfpl.launch import PROJECT_ROOT, _bin, _status, free_port, launch_env, stop_tagged_processes, tagged_processes
from dpfpl.run_commands import prepare

pytestmark = pytest.mark.flower  # Flower's own `flwr run .` with its managed local SuperLink

CLIENTS = 3


@pytest.fixture()
def flower_home(tmp_path):
    """A private FLWR_HOME (no config.toml: flwr writes its default, the managed local connection) and free
    ports for the managed SuperLink; afterwards every process started under the tag is stopped by pid."""
    tag = f"flwr-run-test-{uuid.uuid4().hex}"
    env = {
        **launch_env(tmp_path / "flwr-home", tag),
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(free_port()),
        "FLWR_LOCAL_CONTROL_API_PORT": str(free_port()),
    }
    try:
        yield env
    finally:
        stop_tagged_processes(tag)
        assert tagged_processes(tag) == []


def test_flwr_run_dot_on_the_embedded_default(tmp_path, cache_dir, flower_home):
    run_dir = tmp_path / "run"
    overrides = {
        "num-clients": CLIENTS,
        "min-clients": CLIENTS,
        "num-server-rounds": 2,
        "eval-every": 1,
        "eval-last": 0,
        "lr-global": 0.1,
        "lr-local": 0.1,
        "run-dir": str(run_dir),
        "resume": False,
    }
    prepare(RunConfig.from_flower(full_run_config(overrides)), print_partition=False)  # the backbone, once
    done = _flwr_run_completed(overrides, flower_home, "--federation-config", f"num-supernodes={CLIENTS}")
    assert "Installing application dependencies" not in done.stdout + done.stderr

    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["round"] for m in metrics] == [0, 1, 2]
    assert all(m["updated"] and m["num-replies"] == CLIENTS for m in metrics[1:])
    summary = json.loads((run_dir / "summary.json").read_text())
    assert (summary["rounds-run"], summary["rounds-updated"]) == (2, 2)
    assert "updated in 2 of 2 rounds" in done.stdout + done.stderr  # the ServerApp's last words
    assert sorted(p.name for p in (run_dir / "nodes").iterdir()) == [f"node-{i}" for i in range(CLIENTS)]


def test_flwr_run_dot_without_num_clients_trains_on_flowers_default_federation(tmp_path, cache_dir, flower_home):
    """A Flower user's first try: ``flwr run . --stream``, no federation config. Flower's default local
    simulation has 2 SuperNodes, and pyproject leaves num-clients to the federation: the run trains 2 clients."""
    run_dir = tmp_path / "run"
    overrides = {
        "num-server-rounds": 1,
        "eval-every": 1,
        "eval-last": 0,
        "pretrained": "none",
        "n-ctx": 4,
        "rank": 2,
        "batch-size": 8,
        "run-dir": str(run_dir),
        "resume": False,
    }
    done = _flwr_run_completed(overrides, flower_home)
    assert "num-clients not set: training on the 2 SuperNodes of the federation" in done.stdout + done.stderr
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["num-clients"] == 2 and (summary["rounds-run"], summary["rounds-updated"]) == (1, 1)
    assert sorted(p.name for p in (run_dir / "nodes").iterdir()) == ["node-0", "node-1"]


def _flwr_run_completed(overrides: dict, flower_home: dict, *federation: str) -> subprocess.CompletedProcess:
    """``flwr run . --stream`` from the project folder with ``overrides`` as its run config (plus ``federation``
    options), asserted to have completed: ``--stream`` exits 0 whatever happened, so the run's own status says
    whether the ServerApp succeeded."""
    run_config = " ".join(
        f"{k}={json.dumps(v) if isinstance(v, str) else str(v).lower()}" for k, v in overrides.items()
    )
    done = subprocess.run(
        [_bin("flwr"), "run", ".", "--run-config", run_config, *federation, "--stream"],
        cwd=PROJECT_ROOT,
        env=flower_home,
        capture_output=True,
        text=True,
        timeout=900,
    )
    print(done.stdout[-4000:], done.stderr[-2000:])
    assert done.returncode == 0
    run_id = int(re.search(r"Successfully started run (\d+)", done.stdout).group(1))
    assert _status(run_id, flower_home, PROJECT_ROOT, "local") == "finished:completed"
    return done
