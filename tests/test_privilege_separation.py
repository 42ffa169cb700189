"""Privileges separated on real processes: a SuperLink (TLS, node authentication) and three SuperNodes started by
deploy/start-supernode.sh as root with two users, the SuperNode's (which runs every submitted app's ClientApp)
and the worker's (the only one that can read the images and the node's state).

* A rogue app bundle, submitted through the Control API like any run, tries on every node to read data-dir and
  state-dir and to get from the worker's socket what an honest round never asks: no DP, a data set from a
  path, a tiny global noise multiplier, rounds past the calibration, a thousand evaluations, an operation
  outside the protocol. It reads nothing; the worker refuses all of it beyond the node's bounds, and says so in
  its log; the node's ledger stays within its lifetime budget.
* An honest run then completes on the same nodes.
* A worker frozen with SIGSTOP during a run is killed and restarted by its supervisor; its node is reported as
  failed for that round, and the round goes on with the others.

Users are created for the test and removed after it (CI runs as root, with useradd, setpriv and runuser).
"""

from __future__ import annotations

import base64
import json
import os
import pwd
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from dpfpl.common.privacy.ledger import PrivacyLedger
from dpfpl.launch import PROJECT_ROOT, free_port, stop_launched, submit_run, wait_for_port

from .test_deployment import CLASSES, DEPLOY, _write_silo
from .test_node_boundary_deployment import BASE as DEPLOYED_RUN

pytestmark = pytest.mark.deployment
ROGUE_APP = Path(__file__).parent / "rogue_app"
LIFETIME = 6.0
EVALUATIONS_PER_DAY = 40
# the deployed run of the node-boundary test; two nodes suffice for a round (one worker is frozen in it), and
# the setup allows for three workers loading their libraries at once
BASE = {**DEPLOYED_RUN, "min-clients": 2, "round-timeout": 90.0, "setup-timeout": 180.0}


def _open_path_for_others(paths: list[Path]) -> list[tuple[Path, int]]:
    """Let the test's users enter every parent directory of ``paths`` (a root-owned checkout and its Python may
    sit under /root, mode 0700); returns what to restore."""
    changed = []
    for path in paths:
        for parent in [path, *path.parents]:
            mode = parent.stat().st_mode
            if parent.is_dir() and not mode & stat.S_IXOTH:
                os.chmod(parent, stat.S_IMODE(mode) | stat.S_IXOTH)
                changed.append((parent, stat.S_IMODE(mode)))
    return changed


@pytest.fixture()
def separated_federation():
    if os.geteuid() != 0 or not shutil.which("useradd") or not shutil.which("setpriv"):
        pytest.fail("this test needs root with useradd and setpriv (CI has them): it creates the node users")
    suffix = f"{os.getpid() % 100000}"
    node_user, worker_user = f"dpfpln{suffix}", f"dpfplw{suffix}"
    base = Path(tempfile.mkdtemp(prefix="dpfpl-sep-", dir="/tmp"))
    os.chmod(base, 0o755)
    restore = _open_path_for_others([Path(sys.executable).resolve(), PROJECT_ROOT.resolve()])
    tag = f"septest-{os.getpid()}-{time.time_ns()}"
    env = {**os.environ, "FLWR_HOME": str(base / "flwr-home"), "FLWR_TELEMETRY_ENABLED": "0", "DPFPL_LAUNCH_TAG": tag}
    procs: list[subprocess.Popen] = []

    def run(args: list[str]) -> None:
        subprocess.run(args, check=True, env=env, capture_output=True, cwd=base)

    def start(args: list[str], log: Path, extra: dict | None = None) -> subprocess.Popen:
        proc = subprocess.Popen(
            args,
            env={**env, **(extra or {})},
            stdout=open(log, "wb"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
            cwd=base,
        )
        procs.append(proc)
        return proc

    try:
        certs = base / "certs"
        run(["bash", str(DEPLOY / "gen-certs.sh"), str(certs), "localhost"])
        for i in range(3):
            run(["bash", str(DEPLOY / "gen-node-key.sh"), str(certs), f"supernode-{i}"])
        os.chmod(certs, 0o755)
        os.chmod(certs / "ca.crt", 0o644)
        port = free_port()
        link = start(
            ["bash", str(DEPLOY / "start-superlink.sh"), str(certs), "127.0.0.1", str(port), str(base / "link.db")],
            base / "superlink.log",
        )
        wait_for_port(port, link, base / "superlink.log")
        run(
            ["bash", str(DEPLOY / "connect.sh"), "org", f"127.0.0.1:{port}", str(certs / "ca.crt")]
            + [str(certs / f"supernode-{i}.pub") for i in range(3)]
        )
        orgs = []
        for i in range(3):
            data, state = base / f"org{i}" / "data", base / f"org{i}" / "state"
            _write_silo(data, CLASSES[2 * i : 2 * i + 2], seed=i)
            run(
                [
                    "bash",
                    str(DEPLOY / "setup-node-users.sh"),
                    node_user,
                    worker_user,
                    str(data),
                    str(state),
                    str(certs / f"supernode-{i}.key"),
                ]
            )
            os.chmod(base / f"org{i}", 0o755)
            orgs.append({"data": data, "state": state})
        separated = {
            "DPFPL_NODE_USER": node_user,
            "DPFPL_WORKER_USER": worker_user,
            "DPFPL_SAMPLE_RATE": "0.34",
            "DPFPL_LIFETIME_EPSILON": str(LIFETIME),
            "DPFPL_EVALUATIONS_PER_DAY": str(EVALUATIONS_PER_DAY),
            # the watchdog later than the ClientApp's 10 s deadline plus a message's arrival after the freeze, so
            # that the frozen worker holds a message when it is killed (the default, 15 s, may restart it first)
            "DPFPL_WORKER_HUNG_AFTER": "40",
        }
        for i, org in enumerate(orgs):
            start(
                [
                    "bash",
                    str(DEPLOY / "start-supernode.sh"),
                    f"127.0.0.1:{port}",
                    str(org["data"]),
                    str(org["state"]),
                    str(certs),
                    f"supernode-{i}",
                    str(free_port()),
                    "cpu",
                ],
                base / f"supernode-{i}.log",
                {**separated, "DPFPL_SOCKET_DIR": str(base / "run" / f"org{i}")},
            )
        deadline = time.monotonic() + 180
        while not all((org["state"] / "worker.json").exists() for org in orgs):  # every worker serving
            assert time.monotonic() < deadline, "the node workers did not start: see their worker.log"
            time.sleep(0.5)
        yield {"env": env, "base": base, "orgs": orgs, "node_user": node_user, "worker_user": worker_user}
    finally:
        stop_launched(procs, tag)
        for user in (node_user, worker_user):
            subprocess.run(["pkill", "-KILL", "-u", user], capture_output=True)
            subprocess.run(["userdel", "-r", user], capture_output=True)
        for path, mode in reversed(restore):
            os.chmod(path, mode)
        if not os.environ.get("DPFPL_KEEP_TEST_DIRS"):  # kept for a post-mortem when asked
            shutil.rmtree(base, ignore_errors=True)


def _worker_pid(state: Path) -> int:
    return int(json.loads((state / "worker.json").read_text())["pid"])


def test_a_rogue_app_gets_nothing_beyond_the_bounds_and_an_honest_run_follows(separated_federation):
    fed = separated_federation
    base, env, orgs = fed["base"], fed["env"], fed["orgs"]
    for org in orgs:  # the modes the start script checked
        assert stat.S_IMODE(org["state"].stat().st_mode) == 0o700
        assert pwd.getpwuid(org["state"].stat().st_uid).pw_name == fed["worker_user"]

    # ---- the rogue app, submitted like any run
    report_path = base / "rogue-report.json"
    probes = [str(p) for org in orgs for p in (org["data"], org["state"], org["data"] / "train")]
    rogue_config = {
        "report": str(report_path),
        "probe-paths": ",".join(probes),
        "base-run-config": base64.b64encode(json.dumps({**BASE, "target-epsilon": 1.0}).encode()).decode(),
        "timeout": 900.0,
    }
    submit_run("org", rogue_config, env=env, timeout=1200, stream=False, cwd=base, app=ROGUE_APP)
    reports = json.loads(report_path.read_text())
    assert len(reports) == 3 and all("error" not in r for r in reports), reports
    for report in reports:
        assert report["uid"] == pwd.getpwnam(fed["node_user"]).pw_uid
        assert report["node-config-keys"] == ["worker-socket"]  # the SuperNode knows where to ask, nothing more
        for probe in report["probes"]:  # nothing listed, nothing read
            assert "listing" not in probe and probe.get("read-bytes", 0) == 0, probe
        calls = report["calls"]
        assert calls["no-dp"] == {"refused": 1}
        assert calls["other-dataset"] == {"refused": 1}
        assert calls["tiny-z-global"] == {"refused": 1}
        assert calls["outside-protocol"] == {"refused": 1}
        assert calls["extra-rounds"] == {"answered": 2, "refused": 4}  # calibrated for 2 rounds
        # the run's schedule (setup + 2 rounds + the published prompt) per run token: 4 of each 500 answered
        assert calls["evaluations"] == {"answered": 8, "refused": 992}
        refusals = " ".join(s for texts in report["refusals"].values() for s in texts)
        assert "differential privacy" in refusals and "lifetime-epsilon" in refusals and "past its limit" in refusals
        assert "not one of its operations" in refusals
    for org in orgs:
        ledger = PrivacyLedger.of(org["state"])
        assert ledger.epsilon(1e-5) <= LIFETIME * (1 + 1e-6)
        assert {k: r.count for k, r in ledger.runs.items()} == {"rogue-rounds": 2}
        assert sum(len(t) for t in ledger.evaluations.values()) == 8
        log = (org["state"] / "worker.log").read_text()
        assert "refused train" in log and "past its lifetime-epsilon" in log and "evaluation refused" in log

    # ---- an honest run on the same nodes, with one worker frozen mid-run
    run_dir = base / "honest"
    frozen: list[int] = []
    stop = threading.Event()

    trained_before = json.loads((orgs[0]["state"] / "worker.json").read_text())["requests"].get("train", 0)

    def freeze_once() -> None:
        state = orgs[0]["state"]
        while not stop.is_set():
            try:
                status = json.loads((state / "worker.json").read_text())
            except (OSError, ValueError):
                status = {}
            if status.get("requests", {}).get("train", 0) > trained_before:  # after its first honest train message
                os.kill(status["pid"], signal.SIGSTOP)
                frozen.append(status["pid"])
                return
            time.sleep(0.2)

    watcher = threading.Thread(target=freeze_once, daemon=True)
    watcher.start()
    honest = {**BASE, "num-server-rounds": 3, "target-epsilon": 1.0, "run-dir": str(run_dir), "resume": False}
    try:
        submit_run("org", honest, env=env, timeout=1200, stream=False, cwd=base)
    finally:
        stop.set()
    assert frozen, "the worker was never frozen"
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
    train = [r for r in records if r.get("phase") == "train"]
    assert [r["round"] for r in train] == [1, 2, 3] and all(r["updated"] for r in train)
    reported = [text for r in records for text in r.get("rejected", [])]
    assert any("frozen or hung" in text for text in reported), f"the frozen node was not reported: {reported}"
    supervisor_log = (orgs[0]["state"] / "worker.log").read_text()
    assert "hung" in supervisor_log and _worker_pid(orgs[0]["state"]) != frozen[0]  # restarted
    with pytest.raises(ProcessLookupError):
        os.kill(frozen[0], 0)
