"""Deployment with real processes: a SuperLink and three SuperNodes on 127.0.0.1 with TLS and node
authentication, each SuperNode on its own silo of real image files, a 2-round DP-FPL run submitted with
``flwr run``. Marked ``deployment`` (run alone with ``pytest -m deployment``); it also runs in CI."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dpfpl.launch import PROJECT_ROOT, free_port, stop_tagged_processes, submit_run, wait_for_port

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
    certs = tmp_path / "certs"
    subprocess.run(
        ["bash", str(DEPLOY / "gen-certs.sh"), str(certs), "localhost", "4"], check=True, env=env, capture_output=True
    )
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
                str(certs),
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
            + [str(certs / f"supernode-{i}.pub") for i in range(registered)],
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
                        str(certs),
                        f"supernode-{i}",
                        str(free_port()),
                        "cpu",
                    ],
                    tmp_path / f"supernode-{i}.log",
                )
            )
        yield {"env": env, "tmp": tmp_path, "nodes": nodes, "port": port}
    finally:
        for proc in procs:
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                    proc.wait(timeout=20)
                except (ProcessLookupError, subprocess.TimeoutExpired):
                    os.killpg(proc.pid, signal.SIGKILL)
        stop_tagged_processes(tag)


def test_two_round_dpfpl_across_three_authenticated_supernodes(federation):
    tmp, env = federation["tmp"], federation["env"]
    run_dir = tmp / "server-run"
    started = time.time()
    submit_run(
        "org",
        {
            "dataset": "silo",
            "classnames": ",".join(CLASSES),
            "model-name": "dpfpl-demo-tiny",
            "pretrained": "none",
            "num-clients": 3,
            "min-clients": 3,
            "num-server-rounds": 2,
            "eval-every": 1,
            "batch-size": 8,
            "target-epsilon": 1.0,
            "run-dir": str(run_dir),
            "resume": False,
        },
        env=env,
        timeout=600,
        stream=False,
        cwd=tmp,
    )
    print(f"deployment run wall time {time.time() - started:.1f} s")
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
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
    metrics = [line for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
    assert len(metrics) == 3  # zero-shot + 2 rounds
