"""The resident node worker, as a real process behind its real socket, driven through the ClientApp's own
handlers (the same calls Flower makes). The deployment tests run it under real SuperNodes."""

from __future__ import annotations

import functools
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.common import MessageType

import dpfpl.client_app.app as client_module
from dpfpl.client_app import worker_link
from dpfpl.client_app.state import NodeState
from dpfpl.client_app.worker_link import STATUS_FILE, WorkerMismatch, recv_frame, send_frame, socket_path
from dpfpl.common.classlist import DIGEST_KEY, class_list_digest
from dpfpl.common.config import RunConfig
from dpfpl.common.run_classes import run_class_list

RUN = dict(num_clients=10, classes_per_client=2, batch_size=16, num_server_rounds=5, pretrained="none", n_ctx=4, rank=2)
DIGEST = class_list_digest(run_class_list(RunConfig()))


def _context(tmp_path, state_dir, partition_id=0, **run) -> Context:
    cfg = RunConfig(run_dir=str(tmp_path / "run"), **{**RUN, **run})
    return Context(
        run_id=1,
        node_id=partition_id + 100,
        node_config={"partition-id": partition_id, "num-partitions": 10, "state-dir": str(state_dir)},
        state=RecordDict(),
        run_config=cfg.to_flower(),
    )


def _message(message_type: str, server_round: int, token: str = "tok", **config) -> Message:
    p_global = torch.randn(4, 128, generator=torch.Generator().manual_seed(0)) * 0.02
    content = RecordDict(
        {
            "arrays": ArrayRecord({"global-prompt": p_global}),
            "config": ConfigRecord(
                {
                    "server-round": server_round,
                    "run-token": token,
                    "noise-multiplier-global": 2.0,
                    DIGEST_KEY: DIGEST,
                    **config,
                }
            ),
        }
    )
    return Message(content=content, dst_node_id=1, message_type=message_type)


def _status(state_dir) -> dict:
    return json.loads((state_dir / STATUS_FILE).read_text())


def _wait(predicate, timeout: float = 120.0, what: str = "the worker") -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise TimeoutError(f"{what} did not get there within {timeout} s")


@pytest.fixture()
def start_worker(tmp_path, cache_dir):
    """Start ``dpfpl worker --supervise`` on a state directory; every worker started is stopped afterwards."""
    procs = []

    def start(state_dir, supervise=True, preexec_fn=None, code=None):
        args = [sys.executable, "-m", "dpfpl.client_app.worker", "--state-dir", str(state_dir)]
        if code is not None:  # a worker of another version: its code identity differs from this checkout's
            args = [
                sys.executable,
                "-c",
                "import sys; import dpfpl.client_app.worker_link as link; "
                f"link.app_identity = lambda: {{'version': '0.0.9', 'code': '{code}'}}; "
                "from dpfpl.client_app.worker import main; sys.exit(main(sys.argv[1:]))",
                "--state-dir",
                str(state_dir),
            ]
        elif supervise:
            args.append("--supervise")
        proc = subprocess.Popen(
            args,
            stdout=open(tmp_path / f"worker-{len(procs)}.log", "wb"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=preexec_fn,
        )
        procs.append(proc)
        _wait(lambda: (state_dir / STATUS_FILE).is_file() or proc.poll() is not None)
        return proc

    yield start
    for proc in procs:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)


def test_a_worker_answers_exactly_as_the_clientapp_would_and_loads_the_model_once(tmp_path, start_worker):
    served, alone = tmp_path / "served", tmp_path / "alone"
    start_worker(served)
    assert stat.S_IMODE(served.stat().st_mode) == 0o700  # the node's state: its owner only
    assert stat.S_IMODE(socket_path(served).stat().st_mode) == 0o600
    assert stat.S_ISSOCK(socket_path(served).stat().st_mode)
    # Without DP the step is seeded: the same node answered by the worker and by a ClientApp on its own (no
    # socket in its state directory) must send identical replies, array for array and metric for metric.
    for server_round in (1, 2):
        via_worker = client_module.train(
            _message(MessageType.TRAIN, server_round), _context(tmp_path, served, dp=False)
        )
        by_itself = client_module.train(_message(MessageType.TRAIN, server_round), _context(tmp_path, alone, dp=False))
        np.testing.assert_array_equal(
            via_worker.content["arrays"]["global-grad"].numpy(), by_itself.content["arrays"]["global-grad"].numpy()
        )
        drop = ("client-seconds", "node-key")  # the handler's wall time; each node's random identity
        mine = {k: v for k, v in dict(via_worker.content["metrics"]).items() if k not in drop}
        assert mine == {k: v for k, v in dict(by_itself.content["metrics"]).items() if k not in drop}
    evaluated = client_module.evaluate(
        _message(MessageType.EVALUATE, 2, phase="train"), _context(tmp_path, served, dp=False)
    )
    assert 0.0 <= evaluated.content["metrics"]["local-acc"] <= 1.0
    # the local prompt stayed on the node's disk, where the worker wrote it as a ClientApp would
    assert NodeState.load(served).last_round == 2
    status = _status(served)
    assert status["requests"] == {"train": 2, "evaluate": 1}
    assert status["model-loads"] == 1  # three messages, one backbone load
    assert status["errors"] == 0


def test_a_new_run_releases_the_previous_runs_data_and_keeps_the_model(tmp_path, start_worker):
    state_dir = tmp_path / "node"
    start_worker(state_dir)
    client_module.train(_message(MessageType.TRAIN, 1, token="run-a"), _context(tmp_path, state_dir))
    client_module.train(_message(MessageType.TRAIN, 1, token="run-b"), _context(tmp_path, state_dir, seed=1))
    reply = client_module.train(_message(MessageType.TRAIN, 2, token="run-b"), _context(tmp_path, state_dir, seed=1))
    assert reply.content["metrics"]["noisy-steps"] == 2.0  # run b's own books (run a's state was moved aside)
    status = _status(state_dir)
    assert status["runs"] == 2 and status["model-loads"] == 1
    assert "released the previous run's features" in (tmp_path / "worker-0.log").read_text()


def test_a_worker_of_another_version_is_refused_with_what_to_restart(tmp_path, start_worker):
    state_dir = tmp_path / "node"
    start_worker(state_dir, code="0123456789abcdef")
    with pytest.raises(WorkerMismatch) as err:
        client_module.train(_message(MessageType.TRAIN, 1), _context(tmp_path, state_dir))
    text = str(err.value)
    assert "dpfpl 0.0.9" in text and "0123456789abcdef" in text and worker_link.app_identity()["code"] in text
    assert "Restart the node's worker" in text
    # refused before anything ran: no step, no state
    assert NodeState.load(state_dir) is None
    assert _status(state_dir)["refused"] == 1 and _status(state_dir)["requests"] == {}


def test_the_link_answers_only_the_clientapps_message_types(tmp_path, start_worker):
    state_dir = tmp_path / "node"
    start_worker(state_dir)
    request = client_module.NodeRequest.from_flower(_message(MessageType.TRAIN, 1), _context(tmp_path, state_dir))
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(str(socket_path(state_dir)))
        send_frame(sock, {"op": "hello", **worker_link.app_identity(), "protocol": worker_link.PROTOCOL_VERSION})
        answer = recv_frame(sock)[0]
        while answer == {"op": "alive"}:  # the worker may still be loading its libraries
            answer = recv_frame(sock)[0]
        assert answer == {"op": "ok"}
        header = {**worker_link.call_header(request), "operation": "query.local_prompt"}
        send_frame(sock, header, worker_link.encode_content(request.content))
        refusal = recv_frame(sock)[0]  # refused before any handler runs
        assert refusal["op"] == "error" and "not one of its operations" in refusal["message"]
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:  # a call without the handshake
        sock.connect(str(socket_path(state_dir)))
        send_frame(sock, worker_link.call_header(request), worker_link.encode_content(request.content))
        with pytest.raises(worker_link.LinkError):
            recv_frame(sock)
    assert NodeState.load(state_dir) is None and _status(state_dir)["requests"] == {}


def test_a_worker_turns_away_a_peer_of_another_user(tmp_path):
    """The socket's mode keeps other users out; the worker also reads the peer's uid from the kernel
    (SO_PEERCRED) and serves only its own user. Here the worker is told to serve another uid than this test's."""
    from dpfpl.client_app.worker import NodeWorker

    own = {
        "state-dir": str(tmp_path / "node"),
        "lifetime-epsilon": 8.0,
        "global-noise": "node",
        "evaluations-per-day": 10,
    }
    sock_file = tmp_path / "run" / "worker.sock"
    sock_file.parent.mkdir()
    worker = NodeWorker(tmp_path / "node", peer_uid=os.getuid() + 1, socket_file=sock_file, node_config=own)
    worker.bind()
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.connect(str(sock_file))
            send_frame(sock, {"op": "hello", **worker_link.app_identity(), "protocol": worker_link.PROTOCOL_VERSION})
            conn, _ = worker._listener.accept()
            with conn:
                worker.serve_one(conn)
            with pytest.raises(worker_link.LinkError):  # closed without a word
                recv_frame(sock)
    finally:
        worker.close()
    assert _status(tmp_path / "node")["refused"] == 1 and _status(tmp_path / "node")["requests"] == {}
    assert not sock_file.exists()  # a stopped worker leaves no socket behind


def test_a_worker_killed_holding_a_message_is_restarted_and_the_step_is_taken_once(tmp_path, start_worker):
    state_dir = tmp_path / "node"
    supervisor = start_worker(state_dir)
    client_module.train(_message(MessageType.TRAIN, 1), _context(tmp_path, state_dir))
    first = _status(state_dir)["pid"]
    # Freeze the worker, hand it round 2 (the ClientApp's request waits in its socket), then kill it: the
    # ClientApp sees the link break, waits for the supervisor's new worker and asks again.
    os.kill(first, signal.SIGSTOP)
    killer = subprocess.Popen(["bash", "-c", f"sleep 2; kill -KILL {first}"])
    reply = client_module.train(_message(MessageType.TRAIN, 2), _context(tmp_path, state_dir))
    killer.wait()
    status = _status(state_dir)
    assert status["pid"] != first and supervisor.poll() is None  # a new worker, under the same supervisor
    assert status["requests"] == {"train": 1} and status["model-loads"] == 1
    state = NodeState.load(state_dir)
    # two rounds, two noisy steps: the killed worker's message was neither lost nor taken twice
    assert state.last_round == 2 and len(state.accountant.history) == 2
    assert reply.content["metrics"]["noisy-steps"] == 2.0
    # the supervisor stops its worker when it is stopped itself, and the worker removes its socket
    os.killpg(supervisor.pid, signal.SIGTERM)
    assert supervisor.wait(timeout=60) == 0
    assert not socket_path(state_dir).exists()


def test_a_worker_refuses_a_step_beyond_the_nodes_budget(tmp_path, start_worker):
    """The budget is enforced where the step is taken: the worker refuses the step its noise was not calibrated
    for, and the ClientApp sends that refusal as its error."""
    state_dir = tmp_path / "node"
    start_worker(state_dir)
    for server_round in (1, 2):
        client_module.train(
            _message(MessageType.TRAIN, server_round), _context(tmp_path, state_dir, num_server_rounds=2)
        )
    with pytest.raises(worker_link.WorkerHandlerError, match="privacy budget spent"):
        client_module.train(_message(MessageType.TRAIN, 3), _context(tmp_path, state_dir, num_server_rounds=2))
    assert len(NodeState.load(state_dir).accountant.history) == 2
    assert _status(state_dir)["errors"] == 1


def test_without_a_worker_a_deployed_clientapp_answers_itself_and_says_so(tmp_path, cache_dir, caplog):
    state_dir = tmp_path / "node"
    with caplog.at_level("WARNING", logger="dpfpl.client"):
        reply = client_module.train(_message(MessageType.TRAIN, 1), _context(tmp_path, state_dir))
    assert reply.content["metrics"]["noisy-steps"] == 1.0
    lines = [r.getMessage() for r in caplog.records if "no node worker" in r.getMessage()]
    assert len(lines) == 1 and str(socket_path(state_dir)) in lines[0]


def test_a_separated_clientapp_without_a_worker_fails_and_never_answers_itself(tmp_path, monkeypatch):
    """Privileges separated (the node config names the worker's socket): with no worker answering, neither a
    missing socket nor one a dead worker left, the ClientApp fails the message with the reason and does not run
    the handler in its own process, even where the node config would let it find a state directory."""
    answered = []
    monkeypatch.setattr(client_module, "handle", lambda context: answered.append(context.operation) or RecordDict())
    # the real link, with a short wait for a worker to appear (20 s by default)
    monkeypatch.setattr(client_module, "forward", functools.partial(worker_link.forward, restart_wait=0.3))
    stale = tmp_path / "stale.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as dead:
        dead.bind(str(stale))  # the file stays; nobody listens on it
    state_dir = tmp_path / "state"
    for path in (tmp_path / "missing.sock", stale):
        context = Context(
            run_id=1,
            node_id=100,
            node_config={"worker-socket": str(path), "state-dir": str(state_dir)},
            state=RecordDict(),
            run_config=RunConfig(run_dir=str(tmp_path / "run"), **RUN).to_flower(),
        )
        with pytest.raises(worker_link.WorkerUnavailable, match="does not answer itself") as failed:
            client_module.train(_message(MessageType.TRAIN, 1), context)
        assert str(path) in str(failed.value)
    assert answered == [] and not state_dir.exists()


def test_the_clientapp_and_the_torch_free_handlers_load_without_torch():
    """A ClientApp process that forwards, and one that answers secure aggregation's later stages or SecFPP's
    phase messages itself, never pays torch's import (seconds per message in a deployment)."""
    code = (
        "import sys\n"
        "import dpfpl.client_app.app, dpfpl.client_app.secagg_handlers, dpfpl.client_app.secfpp_handlers\n"
        "import dpfpl.client_app.worker_link, dpfpl.client_app.handlers\n"
        "heavy = sorted(m for m in ('torch', 'open_clip', 'dp_accounting') if m in sys.modules)\n"
        "print(','.join(heavy))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == ""
