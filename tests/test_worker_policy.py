"""What a node with separated privileges serves, whoever asks (client_app/policy.py), and the link's limits
and deadlines (client_app/worker_link.py) and the supervisor's watchdog, without real Flower processes."""

from __future__ import annotations

import json
import os
import socket
import struct
import subprocess
import sys
import textwrap
import threading
import time

import pytest
from flwr.app import ConfigRecord, MetricRecord, RecordDict

from dpfpl.client_app import handlers, worker_link
from dpfpl.client_app.policy import (
    EvaluationQuotaSpent,
    PolicyRefusal,
    charge_evaluation,
    check_request,
    separated_node_problems,
)
from dpfpl.client_app.request import OPERATIONS, NodeRequest
from dpfpl.common.config import NodeConfig, RunConfig
from dpfpl.common.privacy.ledger import LEDGER_FILE, PrivacyLedger

SEPARATED = NodeConfig(
    state_dir="/s", lifetime_epsilon=8.0, global_noise="node", evaluations_per_day=5, weights_dir="/opt/weights"
)


def test_a_separated_node_serves_dp_training_on_its_own_data_only():
    silo = RunConfig(dataset="silo", classnames="a,b", dp=True)
    check_request("train", silo, SEPARATED)
    check_request("evaluate", RunConfig(dataset="demo"), SEPARATED)
    with pytest.raises(PolicyRefusal, match="differential privacy"):
        check_request("train", silo.model_copy(update={"dp": False}), SEPARATED)
    with pytest.raises(PolicyRefusal, match="reads a path"):
        check_request("evaluate", RunConfig(dataset="folder", data_root="/etc"), SEPARATED)
    check_request("query.node_key", RunConfig(dataset="folder", data_root="/etc"), SEPARATED)  # no data read


def test_weights_files_only_from_the_approved_directory():
    check_request("train", RunConfig(pretrained="/opt/weights/vit.bin"), SEPARATED)
    for path in ("/etc/shadow", "/opt/weights/../../etc/passwd.bin", "model.pt"):
        with pytest.raises(PolicyRefusal, match="weights-dir"):
            check_request("train", RunConfig(pretrained=path), SEPARATED)
    with pytest.raises(PolicyRefusal, match="not set"):
        check_request("train", RunConfig(pretrained="/opt/weights/vit.bin"), NodeConfig(state_dir="/s"))


def test_secfpp_is_refused_unless_the_operator_opted_in():
    """SecFPP's clustering messages release shares of an un-noised vector under keys the caller names: a separated
    node answers none of them, nor any message of a secfpp run, unless its node config says allow-secfpp."""
    silo = RunConfig(dataset="silo", classnames="a,b", dp=True)
    secfpp_run = silo.model_copy(update={"method": "secfpp"})
    clustering = [op for op in OPERATIONS if op.startswith("train.secfpp_")]
    assert len(clustering) == 4
    for operation in clustering:  # whatever method the request names beside it
        for cfg in (silo, secfpp_run):
            with pytest.raises(PolicyRefusal, match="allow-secfpp = true") as refused:
                check_request(operation, cfg, SEPARATED)
            assert "SecFPP" in str(refused.value)
    for operation in ("train", "evaluate"):
        with pytest.raises(PolicyRefusal, match="allow-secfpp"):
            check_request(operation, secfpp_run, SEPARATED)
        check_request(operation, silo, SEPARATED)  # another method is served as before
    check_request("query.node_key", secfpp_run, SEPARATED)  # a random key, nothing from the data
    opted_in = SEPARATED.model_copy(update={"allow_secfpp": True})
    for operation in (*clustering, "train", "evaluate"):
        check_request(operation, secfpp_run, opted_in)
    # opting in lifts only this refusal: the other rules still hold for a secfpp run
    with pytest.raises(PolicyRefusal, match="differential privacy"):
        check_request("train", secfpp_run.model_copy(update={"dp": False}), opted_in)
    # the key as an operator writes it in --node-config
    assert NodeConfig.from_flower({"allow-secfpp": True}).allow_secfpp
    assert not NodeConfig.from_flower({}).allow_secfpp


def test_a_separated_worker_names_every_missing_setting():
    assert separated_node_problems(SEPARATED) == []
    problems = " ".join(separated_node_problems(NodeConfig()))
    for key in ("state-dir", "lifetime-epsilon", "global-noise", "evaluations-per-day"):
        assert key in problems


def test_evaluations_are_bounded_by_the_run_schedule_and_the_day_and_counted_in_the_ledger(tmp_path):
    # setup + 2 rounds + the published prompt = 4 per run (zero-shot trains nothing: no published prompt, 3)
    cfg = RunConfig(num_server_rounds=2, eval_every=1, eval_last=0)
    assert cfg.scheduled_evaluations == 4 and cfg.model_copy(update={"method": "zeroshot"}).scheduled_evaluations == 3
    node = NodeConfig(state_dir=str(tmp_path), evaluations_per_day=5)
    for _ in range(4):
        charge_evaluation(tmp_path, "run-a", cfg, node)
    with pytest.raises(EvaluationQuotaSpent, match="schedule"):
        charge_evaluation(tmp_path, "run-a", cfg, node)
    charge_evaluation(tmp_path, "run-b", cfg, node)
    with pytest.raises(EvaluationQuotaSpent, match="a day"):  # 5 in 24 h, whichever run
        charge_evaluation(tmp_path, "run-c", cfg, node)
    ledger = PrivacyLedger.of(tmp_path)  # on disk, under the ledger's digest
    assert ledger.evaluations_of("run-a") == 4 and ledger.evaluations_of("run-b") == 1
    assert ledger.evaluations_since(24) == 5 and ledger.runs == {}
    assert "evaluation replies (outside epsilon): 5" in ledger.describe(1e-5)
    # a tampered count is caught by the digest: the previous copy is used, with one evaluation more, not fewer
    raw = json.loads((tmp_path / LEDGER_FILE).read_text())
    raw["evaluations"]["run-a"] = raw["evaluations"]["run-a"][:1]
    (tmp_path / LEDGER_FILE).write_text(json.dumps(raw))
    assert PrivacyLedger.of(tmp_path).evaluations_since(24) == 5
    # without a quota nothing is counted (simulation)
    charge_evaluation(tmp_path / "sim", "run-a", cfg, NodeConfig(state_dir=str(tmp_path / "sim")))
    assert not (tmp_path / "sim" / LEDGER_FILE).exists()


# ------------------------------------------------------------------------------------------ the link
def _pair():
    a, b = socket.socketpair()
    a.settimeout(5)
    b.settimeout(5)
    return a, b


def test_a_frame_too_large_or_too_deep_is_refused_without_reading_it():
    a, b = _pair()
    with a, b:
        a.sendall(struct.pack(">I", 2) + b"{}" + struct.pack(">Q", worker_link.MAX_PAYLOAD + 1))
        with pytest.raises(worker_link.LinkError, match="payload"):
            worker_link.recv_frame(b)
    a, b = _pair()
    with a, b:
        deep = b'{"x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
        a.sendall(struct.pack(">I", len(deep)) + deep)
        with pytest.raises(worker_link.LinkError, match="nested deeper"):
            worker_link.recv_frame(b)
    a, b = _pair()
    with a, b:  # brackets inside strings are not nesting
        text = json.dumps({"x": "[" * 100}).encode()
        a.sendall(struct.pack(">I", len(text)) + text + struct.pack(">Q", 0))
        assert worker_link.recv_frame(b)[0] == {"x": "[" * 100}


def _fake_worker(tmp_path, behaviour):
    """A socket that answers like a worker would, per ``behaviour(conn)``, once."""
    path = tmp_path / "w.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(4)

    def serve():
        conn, _ = listener.accept()
        with conn:
            worker_link.recv_frame(conn)
            behaviour(conn)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return path, listener


def _request():
    return NodeRequest("query.node_key", RecordDict({"config": ConfigRecord({"x": 1})}))


def test_a_silent_worker_fails_the_message_at_the_deadline(tmp_path):
    path, listener = _fake_worker(tmp_path, lambda conn: time.sleep(3))  # never answers the handshake
    with listener:
        started = time.monotonic()
        with pytest.raises(worker_link.WorkerHung, match="frozen or hung"):
            worker_link.forward(_request(), path, restart_wait=1, silence=0.5)
        assert time.monotonic() - started < 2.5


def test_heartbeats_keep_a_long_handler_alive_past_the_deadline(tmp_path):
    def slow_but_alive(conn):
        worker_link.send_frame(conn, {"op": "ok"})
        worker_link.recv_frame(conn)
        for _ in range(6):  # 1.2 s of work, a heartbeat every 0.2 s, with a 0.5 s deadline
            time.sleep(0.2)
            worker_link.send_frame(conn, {"op": "alive"})
        worker_link.send_frame(conn, {"op": "reply"}, worker_link.encode_content(RecordDict()))

    path, listener = _fake_worker(tmp_path, slow_but_alive)
    with listener:
        assert worker_link.forward(_request(), path, restart_wait=1, silence=0.5) is not None


def test_a_handler_stuck_past_the_message_deadline_stops_the_workers_signs_of_life(tmp_path, monkeypatch):
    """A handler stuck in Python keeps the worker's threads running: without the message deadline its alive
    frames would hold the ClientApp for the handler's whole length, and its heartbeat file would keep the
    supervisor from restarting it. Past the deadline both stop: the ClientApp gives up (WorkerHung) and the
    heartbeat file is no longer touched, so the supervisor restarts the worker."""
    from dpfpl.client_app import worker as worker_module
    from dpfpl.client_app.worker_supervisor import beat

    monkeypatch.setattr(worker_module, "HEARTBEAT_SECONDS", 0.1)
    monkeypatch.setattr(worker_module, "CLOCK", worker_module._MessageClock(deadline=0.5))
    monkeypatch.setattr(handlers, "handle", lambda context: time.sleep(6) or RecordDict())
    heartbeat = tmp_path / "worker.heartbeat"
    beat(heartbeat, every=0.05, alive=worker_module.CLOCK.alive)
    node = worker_module.NodeWorker(tmp_path / "node")
    path = tmp_path / "w.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(1)

    def serve():
        conn, _ = listener.accept()
        with conn:
            node.serve_one(conn)

    threading.Thread(target=serve, daemon=True).start()
    request = NodeRequest(
        "query.node_key", RecordDict({"config": ConfigRecord({"x": 1})}), {}, {"state-dir": str(tmp_path / "node")}, 1
    )
    started = time.monotonic()
    with listener, pytest.raises(worker_link.WorkerHung):
        worker_link.forward(request, path, restart_wait=1, silence=1.0)
    assert time.monotonic() - started < 4.0  # the handler alone would have taken 6 s
    last = heartbeat.stat().st_mtime
    time.sleep(0.5)
    assert heartbeat.stat().st_mtime == last  # the supervisor's watchdog now sees a hung worker


def test_a_held_node_lock_times_out_with_a_clear_error(tmp_path):
    with handlers.node_lock(tmp_path):
        done = []

        def other():
            try:
                with handlers.node_lock(tmp_path, timeout=0.3):
                    done.append("got it")
            except handlers.NodeBusy as err:
                done.append(str(err))

        thread = threading.Thread(target=other)
        thread.start()
        thread.join()
    assert len(done) == 1 and "held this node's lock" in done[0]


def test_the_supervisor_restarts_a_worker_whose_heartbeat_stops(tmp_path):
    """The child beats once, then hangs (as a SIGSTOPped worker would): the watchdog kills and restarts it."""
    child = textwrap.dedent(
        f"""
        import os, pathlib, time
        with open({str(tmp_path / "pids")!r}, "a") as fh:
            fh.write(f"{{os.getpid()}}\\n")
        pathlib.Path({str(tmp_path / "beat")!r}).touch()
        time.sleep(600)
        """
    )
    supervisor = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, pathlib; from dpfpl.client_app.worker_supervisor import supervise; "
            f"sys.exit(supervise([sys.executable, '-c', {child!r}], heartbeat=pathlib.Path({str(tmp_path / 'beat')!r}),"
            " hung_after=1.0))",
        ],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            pids = (tmp_path / "pids").read_text().split() if (tmp_path / "pids").exists() else []
            if len(pids) >= 2:
                break
            time.sleep(0.2)
        assert len(pids) >= 2, "the hung child was not restarted"
        with pytest.raises(ProcessLookupError):  # the first one was killed, not left behind
            os.kill(int(pids[0]), 0)
    finally:
        supervisor.terminate()
        _, err = supervisor.communicate(timeout=30)
    assert "hung: no heartbeat" in err


def test_a_separated_worker_uses_its_own_node_config_and_policy(tmp_path):
    """The request's node config (another state-dir, a huge lifetime budget) is replaced by the worker's own;
    a run without DP is refused by policy; another error's text stays in the log (the reply names its type)."""
    from dpfpl.client_app.worker import NodeWorker, WorkerSetupError

    own = {
        "state-dir": str(tmp_path / "node"),
        "lifetime-epsilon": 8.0,
        "global-noise": "node",
        "evaluations-per-day": 3,
    }
    with pytest.raises(WorkerSetupError, match="lifetime-epsilon"):
        NodeWorker(tmp_path / "node", os.getuid() + 1, tmp_path / "run.sock", {"state-dir": str(tmp_path / "node")})
    worker = NodeWorker(tmp_path / "node", os.getuid() + 1, tmp_path / "run.sock", own)
    elsewhere = tmp_path / "elsewhere"
    hostile = {"state-dir": str(elsewhere), "lifetime-epsilon": 1e9, "data-dir": "/"}
    request = NodeRequest(
        "query.node_key", RecordDict({"config": ConfigRecord({"run-token": "t"})}), {}, hostile, node_id=1
    )
    header, _ = worker._answer(request)
    assert header["op"] == "reply"
    assert (tmp_path / "node" / "node-key").exists() and not elsewhere.exists()
    no_dp = NodeRequest("train", RecordDict({"config": ConfigRecord({"run-token": "t"})}), {"dp": False}, hostile)
    header, _ = worker._answer(no_dp)
    assert header["op"] == "error" and "differential privacy" in header["message"]
    broken = NodeRequest("train", RecordDict(), {"dp": True, "dataset": "demo"}, hostile)  # no config record at all
    header, _ = worker._answer(broken)
    assert header["op"] == "error" and "worker log" in header["message"] and "config" not in header["message"]


def test_a_separated_worker_refuses_a_run_config_that_does_not_validate_before_any_handler(tmp_path):
    """The message's context is built (its configuration validated) before the policy and any handler: a run
    config with an unknown key is refused with the validation error, and nothing of the node is read."""
    from dpfpl.client_app.worker import NodeWorker

    own = {
        "state-dir": str(tmp_path / "node"),
        "lifetime-epsilon": 8.0,
        "global-noise": "node",
        "evaluations-per-day": 3,
    }
    worker = NodeWorker(tmp_path / "node", os.getuid() + 1, tmp_path / "run.sock", own)
    config = RecordDict({"config": ConfigRecord({"run-token": "t"})})
    header, _ = worker._answer(NodeRequest("query.node_key", config, {"no-such-key": 1}, {}, node_id=1))
    assert header["op"] == "error" and header["message"].startswith("refused by this node's policy")
    assert "no_such_key" in header["message"]
    assert worker.status["refused"] == 1 and not (tmp_path / "node" / "node-key").exists()


def test_a_worker_whose_code_changed_on_disk_refuses_with_what_to_restart(tmp_path, monkeypatch):
    """The worker's code identity is taken when it has loaded its handlers; each handshake checks the files
    again. Files changed under a running worker (an install mid-run): every message is refused, clearly."""
    from dpfpl.client_app import worker as worker_module

    node = worker_module.NodeWorker(tmp_path / "node")
    loaded = dict(node.identity)
    monkeypatch.setattr(worker_module, "app_identity", lambda: {"version": loaded["version"], "code": "edited"})
    a, b = socket.socketpair()
    with a, b:
        thread = threading.Thread(target=node.serve_one, args=(b,))
        thread.start()
        with pytest.raises(worker_link.WorkerMismatch, match="changed on disk after it started"):
            worker_link._exchange(a, _request(), tmp_path / "node")
        thread.join()
    assert json.loads((tmp_path / "node" / worker_link.STATUS_FILE).read_text())["refused"] == 1


def test_the_worker_listens_before_it_loads_torch():
    """A restarted worker must bind its socket within the ClientApp's restart wait, under load too: its module
    (and what it imports before ``bind``) must not pull in torch or the accountant."""
    probe = (
        "import sys, dpfpl.client_app.worker; print(sorted(m for m in ('torch', 'dp_accounting') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def _separated_worker(tmp_path, **node_config):
    from dpfpl.client_app.worker import NodeWorker

    own = {
        "state-dir": str(tmp_path / "node"),
        "lifetime-epsilon": 8.0,
        "global-noise": "node",
        "evaluations-per-day": 3,
        **node_config,
    }
    return NodeWorker(tmp_path / "node", os.getuid() + 1, tmp_path / "run.sock", own)


def test_a_separated_worker_refuses_secfpp_with_the_key_to_opt_in_before_any_handler(tmp_path, monkeypatch):
    """A rogue app asking for SecFPP's clustering shares gets one refusal naming the node-config key, and no
    handler runs (no vector is computed, no session written); the request's own node config cannot opt in."""
    ran = []
    monkeypatch.setattr(handlers, "handle", lambda context: ran.append(context.operation) or RecordDict())
    worker = _separated_worker(tmp_path)
    config = RecordDict({"config": ConfigRecord({"run-token": "t", "phase": "p", "index": 0, "num-users": 3})})
    hostile = {"allow-secfpp": True, "state-dir": str(tmp_path / "node")}
    for operation, method in (("train.secfpp_keys", "dpfpl"), ("train.secfpp_shares", "secfpp"), ("train", "secfpp")):
        request = NodeRequest(operation, config, {"dataset": "demo", "method": method}, hostile, node_id=1)
        header, payload = worker._answer(request)
        assert header["op"] == "error" and payload == b""
        assert (
            header["message"].startswith("refused by this node's policy") and "allow-secfpp = true" in header["message"]
        )
    assert ran == [] and worker.status["refused"] == 3
    assert not (tmp_path / "node" / "secfpp_session.json").exists()
    # opted in by its operator: the same request reaches the handler
    opted_in = _separated_worker(tmp_path / "opted", **{"allow-secfpp": True})
    request = NodeRequest("train.secfpp_keys", config, {"dataset": "demo", "method": "secfpp"}, {}, node_id=1)
    opted_in._answer(request)
    assert ran == ["train.secfpp_keys"]


def test_a_separated_worker_sends_no_field_the_wire_inventory_does_not_classify(tmp_path, monkeypatch):
    """The inventory check runs in the worker, not only in the ClientApp (which may be any submitted app's): a
    handler whose reply carries an unclassified field gets an error reply that names the field, never its value."""
    leaky = RecordDict(
        {"identity": ConfigRecord({"node-key": 7}), "metrics": MetricRecord({"secret-accuracy": 0.8125})}
    )
    monkeypatch.setattr(handlers, "handle", lambda context: leaky)
    worker = _separated_worker(tmp_path)
    request = NodeRequest("query.node_key", RecordDict({"config": ConfigRecord({"run-token": "t"})}), {}, {}, 1)
    header, payload = worker._answer(request)
    assert header["op"] == "error" and payload == b""
    assert "metrics/secret-accuracy" in header["message"] and "0.8125" not in header["message"]
    assert worker.status["errors"] == 1
    # the classified fields alone are sent
    monkeypatch.setattr(handlers, "handle", lambda context: RecordDict({"identity": ConfigRecord({"node-key": 7})}))
    header, payload = worker._answer(request)
    assert header["op"] == "reply" and worker_link.decode_content(payload)["identity"]["node-key"] == 7
