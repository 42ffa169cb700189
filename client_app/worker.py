"""The resident node worker: one long-lived process per node that answers the ClientApp's messages.

    dpfpl worker --state-dir STATE [--supervise]
    dpfpl worker --state-dir STATE --socket /run/dpfpl/node/worker.sock --peer-user dpfpl-node \
                 --node-config 'data-dir="..." state-dir="STATE" lifetime-epsilon=8 ...' [--supervise]

What it keeps between messages is what is expensive to build and safe to keep: the imported libraries, the
OpenCLIP model on its device (loaded once per model), the text encoders and the node's encoded features.
What it does not keep in memory is the node's private state: p_L, its optimizer state, the accountant and the
secure-aggregation and SecFPP round state are read from the state directory at each message and written back
atomically, exactly as a ClientApp answering in its own process does. So a worker killed at any point loses
nothing, a restarted worker and a ClientApp that answers while the worker is away see the same books, and a
repeated message is answered from disk (the reply already sent), never with a second step.

The worker runs the same handlers as the ClientApp (``client_app/handlers.py``), under the same per-node lock,
and enforces the privacy budget the same way (``PromptNode.train`` refuses a step the budget does not cover).
The link's rules (the socket, the handshake, the frames) are in ``client_app/worker_link.py``.

**Privileges separated** (``--peer-user``, docs/deployment.md): the worker runs as the one user that can read
the node's data and state, and answers the SuperNode's user, whose ClientApps (any submitted app's) can read
neither. Then the request is untrusted: the worker uses its own node config (``--node-config``), applies its
operator's policy (``client_app/policy.py``), checks every reply against the wire inventory
(``dpfpl.common.wire``) itself before it sends it, and sends only error texts that name no private detail.

**Liveness.** A thread touches ``worker.heartbeat`` every second; the supervisor restarts a worker whose
heartbeat stops (frozen, hung), and while a handler runs the worker sends the waiting ClientApp an ``alive``
frame every few seconds, so that a silent worker is given up on quickly (``SILENCE_SECONDS``). Both come from
threads of their own, so a handler stuck in Python (a deadlock, a loop) would keep them going: a handler that
runs past the message deadline (``--message-deadline``) stops both, and the worker is then restarted and
reported like a frozen one.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fcntl
import logging
import os
import pwd
import signal
import socket
import struct
import sys
import threading
import time
from pathlib import Path

from flwr.common.config import parse_config_args

from dpfpl.common.atomic import write_json
from dpfpl.common.classlist import ClassListMismatch
from dpfpl.common.config import NodeConfig
from dpfpl.common.wire import UnclassifiedField, check_reply

from . import handlers
from .context import MessageContext
from .errors import NodeUnfit, PrivacyBudgetSpent
from .policy import PolicyRefusal, check_request, separated_node_problems
from .request import OPERATIONS, NodeRequest
from .worker_link import (
    HEARTBEAT_SECONDS,
    PROTOCOL_VERSION,
    SOCKET_PATH_MAX,
    STATUS_FILE,
    LinkError,
    app_identity,
    encode_content,
    mismatch_text,
    recv_frame,
    request_from,
    send_frame,
    socket_path,
)
from .worker_supervisor import EXIT_CONFIG, HEARTBEAT_FILE, HUNG_AFTER_SECONDS, beat, supervise

# The refusals whose text a separated worker sends as it is: what was refused and why, no record in them.
PUBLIC_ERRORS = (
    PrivacyBudgetSpent,
    PolicyRefusal,
    NodeUnfit,
    ClassListMismatch,
    handlers.NodeBusy,
    UnclassifiedField,  # names the operation and the fields' names (the code's), never a value
)
READ_TIMEOUT_SECONDS = 30.0  # a ClientApp that connects and sends nothing holds the worker no longer than this
# a handler running longer than this counts as hung (a first message encodes a whole silo: generous by default)
MESSAGE_DEADLINE_SECONDS = 3600.0


class _MessageClock:
    """When the handler now running started, and whether it is past the message deadline: then the worker's
    signs of life stop (the heartbeat file, the ``alive`` frames), so that its supervisor restarts it and the
    waiting ClientApp gives up on it, as for a frozen worker."""

    def __init__(self, deadline: float = MESSAGE_DEADLINE_SECONDS) -> None:
        self.deadline = deadline
        self.started: float | None = None
        self.reported = False

    def start(self) -> None:
        self.started, self.reported = time.monotonic(), False

    def stop(self) -> None:
        self.started = None

    def alive(self) -> bool:
        overdue = self.started is not None and time.monotonic() - self.started > self.deadline
        if overdue and not self.reported:
            self.reported = True
            log.error(
                "a handler has run for more than the message deadline (%.0f s): hung; this worker stops its "
                "heartbeat so that its supervisor restarts it",
                self.deadline,
            )
        return not overdue


CLOCK = _MessageClock()
LOCK_NAME = "worker.lock"
log = logging.getLogger("dpfpl.worker")


class WorkerSetupError(RuntimeError):
    """The worker cannot serve this state directory (another worker holds it, the path is too long, the
    platform has no peer credentials)."""


class _Stop(Exception):
    pass


def _peer_uid(conn: socket.socket) -> int:
    _pid, uid, _gid = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
    return uid


def _node_module():
    """``client_app.node`` once a handler has imported it (the worker itself does not need torch to start)."""
    return sys.modules.get(f"{__package__}.node")


def _model_loads() -> int:
    node = _node_module()
    return int(sum(node.MODEL_LOADS.values())) if node is not None else 0


class _Heartbeat:
    """While a handler runs, an ``alive`` frame to the waiting ClientApp every ``HEARTBEAT_SECONDS``: its
    deadline is on the worker's silence, not on the handler's length (a first message encodes a whole silo)."""

    def __init__(self, conn: socket.socket) -> None:
        self.conn = conn
        self.lock = threading.Lock()
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.done.wait(HEARTBEAT_SECONDS):
            with self.lock, contextlib.suppress(OSError):
                if not self.done.is_set() and CLOCK.alive():
                    send_frame(self.conn, {"op": "alive"})

    def send(self, header: dict, payload: bytes = b"") -> None:
        with self.lock:
            self.done.set()
            send_frame(self.conn, header, payload)

    def __enter__(self) -> _Heartbeat:
        self.thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.done.set()
        self.thread.join()


def _public_error(err: Exception, operation: str) -> str:
    """The text a separated worker sends for a failed handler: the refusals its operator's rules produce say
    what was refused and why (no record in them); any other error may quote the node's files or values, so it
    stays in the worker's log and the reply names only its type."""
    if isinstance(err, PUBLIC_ERRORS):
        return str(err)
    return f"{type(err).__name__} while answering {operation}; the node's operator finds the reason in its worker log"


class NodeWorker:
    """Serves one state directory on its socket (``<state-dir>/worker.sock`` unless named), one message at a
    time. ``peer_uid``: the user it answers (default: its own; another user means privileges are separated).
    ``node_config``: the node's own configuration (Flower's key names), used in place of the request's."""

    def __init__(
        self,
        state_dir: Path,
        peer_uid: int | None = None,
        socket_file: Path | None = None,
        node_config: dict | None = None,
    ) -> None:
        self.state_dir = Path(state_dir).absolute()
        self.peer_uid = os.getuid() if peer_uid is None else peer_uid  # who may connect
        self.separated = self.peer_uid != os.getuid()
        self.socket_file = Path(socket_file).absolute() if socket_file else socket_path(self.state_dir)
        self.node_config = None if node_config is None else dict(node_config)
        if self.separated:
            self._check_separated_setup()
        self.identity = {**app_identity(), "protocol": PROTOCOL_VERSION}
        self.status: dict = {
            "pid": os.getpid(),
            "started": time.time(),
            **self.identity,
            "requests": {},
            "errors": 0,
            "refused": 0,
            "model-loads": 0,
            "runs": 0,  # distinct runs served: each new one releases the previous run's features
        }
        self._run_token: str | None = None
        self._busy = False
        self._stop_after_message = False
        self._lock_fd: int | None = None
        self._listener: socket.socket | None = None
        self._held: list[socket.socket] = []  # connections that arrived while the worker warmed up

    # -------------------------------------------------------------------------------- setup
    def _check_separated_setup(self) -> None:
        if self.node_config is None:
            raise WorkerSetupError("a worker answering another user needs the node's own --node-config")
        node = NodeConfig.from_flower(self.node_config)
        problems = separated_node_problems(node)
        if node.state_dir and Path(node.state_dir).absolute() != self.state_dir:
            problems.append(f"state-dir: the node config says {node.state_dir}, the worker serves {self.state_dir}")
        if self.socket_file.parent == self.state_dir:
            problems.append("--socket: outside the state directory, which only the worker's user may enter")
        if problems:
            raise WorkerSetupError(
                "privileges are separated (--peer-user), but the worker's node config is missing what a node that "
                "trusts no submitted app needs:\n  " + "\n  ".join(problems)
            )

    def bind(self) -> None:
        """Take the directory (one worker per node), then listen. Listening comes before the heavy imports, so
        a ClientApp that connects while the worker starts waits in the backlog instead of answering itself."""
        if not hasattr(socket, "SO_PEERCRED"):
            raise WorkerSetupError("the node worker needs Linux (SO_PEERCRED, to check who connects)")
        path = self.socket_file
        if len(str(path).encode()) > SOCKET_PATH_MAX:
            raise WorkerSetupError(
                f"the socket path {path} is longer than the {SOCKET_PATH_MAX} bytes a Unix socket allows; "
                "give the node a shorter state-dir"
            )
        self.state_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.state_dir, 0o700)  # the node's private state: its owner only
        fd = os.open(self.state_dir / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise WorkerSetupError(
                f"another node worker already serves {self.state_dir}; stop it first (each SuperNode has one worker)"
            ) from None
        self._lock_fd = fd
        path.unlink(missing_ok=True)  # a socket left by a killed worker
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)
        try:
            listener.bind(str(path))
        finally:
            os.umask(old)
        # separated: the socket's directory (mode 0710, the SuperNode's group) admits the SuperNode's user, and
        # the peer credentials admit that user only; otherwise the socket is the worker's own user's
        os.chmod(path, 0o666 if self.separated else 0o600)
        listener.listen(16)
        self._listener = listener
        log.info("node worker %d listening on %s (dpfpl %s, code %s)", os.getpid(), path, *self._version())

    def _version(self) -> tuple[str, str]:
        return self.identity["version"], self.identity["code"]

    def warm(self) -> None:
        """Import every handler module (torch, OpenCLIP, the protocols): once, before the first message. The code
        identity is taken after, so that it describes the code this process runs; each handshake checks it
        against the files again (``_code_changed``)."""
        started = time.perf_counter()
        warming = threading.Event()
        holder = threading.Thread(target=self._hold_while_warming, args=(warming,), daemon=True)
        if self._listener is not None:
            holder.start()
        try:
            handlers.import_handlers()
            self.identity = {**app_identity(), "protocol": PROTOCOL_VERSION}
        finally:
            warming.set()
            if holder.is_alive():
                holder.join()
        log.info("libraries imported in %.1f s", time.perf_counter() - started)

    def _hold_while_warming(self, done: threading.Event) -> None:
        """While the libraries load (seconds; longer with several workers starting on one host), accept the
        ClientApps that connect and send each an ``alive`` frame every ``HEARTBEAT_SECONDS``: their deadline is on
        silence, and a worker that is starting is not a hung one. They are served first once it is ready."""
        self._listener.settimeout(0.2)
        last_beat = time.monotonic()
        try:
            while not done.is_set():
                with contextlib.suppress(TimeoutError):
                    conn, _ = self._listener.accept()
                    conn.setblocking(True)
                    self._held.append(conn)
                if time.monotonic() - last_beat >= HEARTBEAT_SECONDS:
                    last_beat = time.monotonic()
                    for conn in list(self._held):
                        try:
                            send_frame(conn, {"op": "alive"})
                        except OSError:
                            self._held.remove(conn)
                            conn.close()
        finally:
            self._listener.settimeout(None)

    def _code_changed(self) -> str | None:
        """Why this worker must not answer: its code files changed since it loaded them (an install or an edit
        mid-run), or None."""
        now = app_identity()
        if now["code"] != self.identity["code"] or now["version"] != self.identity["version"]:
            return (
                f"the code of the node worker serving {self.state_dir} changed on disk after it started (it runs "
                f"dpfpl {self.identity['version']}, code {self.identity['code']}; the files now say "
                f"{now['version']}, code {now['code']}). It answers nothing until it is restarted "
                "(systemctl restart dpfpl-worker, or restart deploy/start-supernode.sh)"
            )
        return None

    def close(self) -> None:
        if self._listener is not None:
            self._listener.close()
            self.socket_file.unlink(missing_ok=True)
            self._listener = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    # -------------------------------------------------------------------------------- serving
    def _on_term(self, *_: object) -> None:
        if self._busy:  # finish the message (its state write and its reply), then stop
            self._stop_after_message = True
        else:
            raise _Stop

    def serve_forever(self) -> None:
        signal.signal(signal.SIGTERM, self._on_term)
        signal.signal(signal.SIGINT, self._on_term)
        self._write_status()
        try:
            while not self._stop_after_message:
                conn = self._held.pop(0) if self._held else self._listener.accept()[0]
                self._busy = True
                try:
                    with conn:
                        self.serve_one(conn)
                finally:
                    self._busy = False
        except _Stop:
            pass
        finally:
            log.info("node worker %d stopping", os.getpid())
            self.close()

    def serve_one(self, conn: socket.socket) -> None:
        """One ClientApp's connection: the handshake, then one message."""
        conn.settimeout(READ_TIMEOUT_SECONDS)
        uid = _peer_uid(conn)
        if uid != self.peer_uid:
            log.warning("refused a connection from uid %d (only uid %d may connect)", uid, self.peer_uid)
            self.status["refused"] += 1
            self._write_status()
            return
        try:
            header, _ = recv_frame(conn)
            if header.get("op") != "hello":
                raise LinkError(f"expected the handshake, got {header.get('op')!r}")
            app = {k: header.get(k) for k in ("version", "code", "protocol")}
            changed = self._code_changed()
            if changed is not None:
                log.error("%s", changed)
                self.status["refused"] += 1
                self._write_status()
                send_frame(conn, {"op": "refused", "worker": {**self.identity, "changed": changed}})
                return
            if app != self.identity:
                log.error("%s", mismatch_text(self.identity, app, self.state_dir))
                self.status["refused"] += 1
                self._write_status()
                send_frame(conn, {"op": "refused", "worker": self.identity})
                return
            send_frame(conn, {"op": "ok"})
            header, payload = recv_frame(conn)
            if header.get("op") != "call" or header.get("operation") not in OPERATIONS:
                refusal = f"this node does not answer {str(header.get('operation'))[:80]!r}: not one of its operations"
                log.warning("refused a call: %s", refusal)
                self.status["refused"] += 1
                self._write_status()
                send_frame(conn, {"op": "error", "message": refusal})
                return
            try:
                request = request_from(header, payload)
            except Exception as err:  # noqa: BLE001 - a malformed request (header fields, protobuf) is dropped
                raise LinkError(f"an unreadable request: {type(err).__name__}: {err}") from err
            with _Heartbeat(conn) as heartbeat:
                reply = self._answer(request)
                self._write_status()  # before the reply: whoever reads the reply finds the counters up to date
                heartbeat.send(*reply)
        except (LinkError, OSError, ValueError, KeyError) as err:
            log.warning("dropped a connection: %s", err)
            self._write_status()

    def _answer(self, request: NodeRequest) -> tuple[dict, bytes]:
        requests = self.status["requests"]
        requests[request.operation] = requests.get(request.operation, 0) + 1
        if self.node_config is not None:  # the node's own configuration, whatever the request says
            request = dataclasses.replace(request, node_config=dict(self.node_config))
        try:
            context = MessageContext.of(request)
            if self.separated:
                check_request(request.operation, context.cfg, context.node)
        except (PolicyRefusal, ValueError) as err:  # ValueError: a run config that does not parse
            if not self.separated:
                raise  # no policy to cite: the connection is dropped, as for any unreadable request
            log.warning("refused %s: %s", request.operation, err)
            self.status["refused"] += 1
            return {"op": "error", "message": f"refused by this node's policy: {err}"}, b""
        own = context.state_dir.absolute()
        if own != self.state_dir:
            self.status["errors"] += 1
            return {"op": "error", "message": f"this worker serves {self.state_dir}, the message is for {own}"}, b""
        self._follow_run(request)
        started = time.perf_counter()
        CLOCK.start()
        try:
            content = handlers.handle(context)
            if self.separated:
                # the inventory's check, on this side of the socket: the ClientApp that would make it
                # (client_app/app.py ``leave``) may be any submitted app's, which sends on whatever it is given
                check_reply(request.operation, {name: list(record.keys()) for name, record in content.items()})
        except Exception as err:  # noqa: BLE001 - the ClientApp raises it on its side, as if it had run it
            log.exception("%s failed", request.operation)
            self.status["errors"] += 1
            message = _public_error(err, request.operation) if self.separated else str(err) or type(err).__name__
            return {"op": "error", "message": message}, b""
        finally:
            CLOCK.stop()
        age = "-" if request.clientapp_age is None else f"{request.clientapp_age:.2f}"
        # dpfpl/bench/step.py reads these two numbers: the handler's time and the ClientApp's start-up share
        log.info("%s answered in %.2f s (ClientApp %s s old)", request.operation, time.perf_counter() - started, age)
        return {"op": "reply"}, encode_content(content)

    def _follow_run(self, request: NodeRequest) -> None:
        """A message of a new run: release the previous run's features and encoders (the model stays)."""
        config = request.content.config_records.get("config")
        token = None if config is None or "run-token" not in config else str(config["run-token"])
        if token is None or token == self._run_token:
            return
        if self._run_token is not None:
            node = _node_module()
            if node is not None:
                node.release_run_caches()
                log.info("a new run: released the previous run's features and encoders")
        self._run_token = token
        self.status["runs"] += 1

    def _write_status(self) -> None:
        self.status["model-loads"] = _model_loads()
        self.status["updated"] = time.time()
        with contextlib.suppress(OSError):
            write_json(self.state_dir / STATUS_FILE, self.status)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="dpfpl worker",
        description="Serve this node's ClientApp messages from one long-lived process (see docs/deployment.md).",
    )
    parser.add_argument("--state-dir", required=True, help="the node's state directory (its SuperNode's state-dir)")
    parser.add_argument("--socket", help="the socket to listen on (default: STATE/worker.sock)")
    parser.add_argument(
        "--peer-user",
        help="the user allowed to connect: the SuperNode's, when privileges are separated (default: this user)",
    )
    parser.add_argument(
        "--node-config",
        help="the node's own configuration, in flower-supernode's --node-config format; used in place of the one "
        "each request carries (required with --peer-user)",
    )
    parser.add_argument(
        "--hung-after",
        type=float,
        default=HUNG_AFTER_SECONDS,
        help="with --supervise: restart a worker whose heartbeat is this many seconds old (default %(default)s)",
    )
    parser.add_argument(
        "--message-deadline",
        type=float,
        default=MESSAGE_DEADLINE_SECONDS,
        help="a handler running longer than this many seconds is hung: the worker stops its heartbeat and is "
        "restarted (default %(default)s; a run's first message encodes the node's whole data set)",
    )
    parser.add_argument(
        "--supervise",
        action="store_true",
        help="run the worker as a child, restart it whenever it dies or its heartbeat stops",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.supervise:
        child = [sys.executable, "-m", "dpfpl.client_app.worker", "--state-dir", args.state_dir]
        for flag, value in (
            ("--socket", args.socket),
            ("--peer-user", args.peer_user),
            ("--node-config", args.node_config),
            ("--message-deadline", str(args.message_deadline)),
        ):
            if value:
                child += [flag, value]
        return supervise(child, heartbeat=Path(args.state_dir) / HEARTBEAT_FILE, hung_after=args.hung_after)
    Path(args.state_dir).mkdir(parents=True, exist_ok=True)
    CLOCK.deadline = args.message_deadline
    # from the start: the supervisor's watchdog covers start-up too; a handler past the deadline stops it
    beat(Path(args.state_dir) / HEARTBEAT_FILE, alive=CLOCK.alive)
    try:
        peer_uid = None if args.peer_user is None else pwd.getpwnam(args.peer_user).pw_uid
        node_config = None if args.node_config is None else parse_config_args([args.node_config])
        worker = NodeWorker(Path(args.state_dir), peer_uid, args.socket and Path(args.socket), node_config)
        worker.bind()
    except KeyError:
        log.error("--peer-user %s: no such user on this machine", args.peer_user)
        return EXIT_CONFIG
    except (WorkerSetupError, ValueError) as err:
        log.error("%s", err)
        return EXIT_CONFIG
    try:
        worker.warm()
        worker.serve_forever()
    finally:
        worker.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
