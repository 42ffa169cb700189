"""The link between a node's ClientApp and its resident worker: one Unix socket in the node's state directory.

Why a worker: a deployed SuperNode starts a fresh ClientApp process for every message, and that process would
import torch and OpenCLIP (seconds) and load the model and the node's features again each time. The worker is
one long-lived process per node that keeps them; the ClientApp only forwards. This module is both ends'
shared vocabulary and the ClientApp's end; it imports flwr and the standard library only.

The link, message by message (one connection per message):
  1. the ClientApp sends ``hello`` with the link's protocol version and its code's identity (``app_identity``);
     the worker answers ``ok`` or refuses a mismatch (then nothing else is sent);
  2. the ClientApp sends one ``call``: the message type, the run and node configuration, Flower's node id, and
     the message's content (Flower's own protobuf encoding of the RecordDict);
  3. while the handler runs, the worker sends an ``alive`` frame every ``HEARTBEAT_SECONDS``; then it answers
     with the reply's content, or with the handler's error text.
A frame is a 4-byte header length, the JSON header, an 8-byte payload length, the payload. Both lengths are
bounded, and so is the header's nesting: a peer cannot make the other end allocate or recurse without limit.

Deadline: the ClientApp gives up when the worker sends nothing for ``SILENCE_SECONDS`` (a worker frozen or hung
sends no heartbeat); the worker's supervisor restarts such a worker (``worker_supervisor.py``), and the message
is reported to the server as this node's failure for the round.

Trust: the worker checks who connects with the kernel's peer credentials (``SO_PEERCRED``): its own user, or,
with privileges separated, the SuperNode's user (docs/deployment.md). Either way it answers the protocol's
operations only, and every reply is within what the node's privacy boundary lets leave (client_app/worker.py).
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import socket
import struct
import time
from importlib import metadata
from pathlib import Path

from flwr.app import RecordDict
from flwr.common.serde import recorddict_from_proto, recorddict_to_proto
from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict

import dpfpl.client_app
import dpfpl.common

from .request import NodeRequest

PROTOCOL_VERSION = 1
SOCKET_NAME = "worker.sock"
STATUS_FILE = "worker.json"  # the worker's own counters (requests, model loads), for its operator
MAX_HEADER = 1 << 24
MAX_PAYLOAD = 1 << 30  # a message's content: p_G and the secure-aggregation shares are megabytes, never a gigabyte
MAX_HEADER_DEPTH = 32  # the run and node configuration are flat: a deeper header is not one of ours
HEARTBEAT_SECONDS = 2.0
# The ClientApp's deadline: this long without a frame from the worker (the handshake's answer included) and it
# gives up on the message. Shorter than the supervisor's watchdog (worker_supervisor.HUNG_AFTER_SECONDS), so
# that a message held by a frozen worker fails and its node is reported, rather than answered a round late.
SILENCE_SECONDS = 10.0
SOCKET_PATH_MAX = 107  # sun_path is 108 bytes on Linux, with the terminating NUL
# After a worker died mid-message its supervisor restarts it within a second or two; the ClientApp waits this
# long for the socket to accept again before it answers the message itself.
RESTART_WAIT_SECONDS = 20.0
log = logging.getLogger("dpfpl.client")


class LinkError(RuntimeError):
    """The link broke: a frame cut short, a peer that closed, an unreadable header."""


class WorkerMismatch(RuntimeError):
    """The worker runs other code than this ClientApp (another dpfpl version, or the same version edited)."""


class WorkerHandlerError(RuntimeError):
    """The worker's handler raised: the text is the error the ClientApp would have raised itself."""


class WorkerHung(RuntimeError):
    """The worker went silent past the deadline while holding this message."""


class WorkerUnavailable(RuntimeError):
    """A node whose privileges are separated has no worker answering: its ClientApp cannot read the node's data
    and does not answer in its own process."""


def socket_path(state_dir: Path) -> Path:
    """The single-user default: the socket beside the node's state (a separated node names its own socket)."""
    return Path(state_dir) / SOCKET_NAME


def _package_version() -> str:
    try:
        return metadata.version("dpfpl")
    except metadata.PackageNotFoundError:
        return "unknown"


def app_identity() -> dict[str, str]:
    """The dpfpl version and a digest of the code a handler runs (``dpfpl.client_app`` and ``dpfpl.common``, as
    loaded in this process). The digest catches what a version number misses: an app bundle or a checkout
    edited without a new version."""
    digest = hashlib.sha256()
    for package in (dpfpl.common, dpfpl.client_app):
        for root in package.__path__:
            root = Path(root)
            for path in sorted(p for p in root.rglob("*") if p.suffix in (".py", ".json") and p.is_file()):
                if "__pycache__" in path.parts:
                    continue
                digest.update(f"{package.__name__}/{path.relative_to(root).as_posix()}\0".encode())
                digest.update(path.read_bytes())
                digest.update(b"\0")
    return {"version": _package_version(), "code": digest.hexdigest()[:16]}


def mismatch_text(worker: dict, app: dict, state_dir: Path | str) -> str:
    """What the refusal says, on either end: what differs and what to restart."""
    return (
        f"the node worker serving {state_dir} runs dpfpl {worker.get('version')} (code {worker.get('code')}, link "
        f"protocol {worker.get('protocol')}), but this run's ClientApp is dpfpl {app.get('version')} (code "
        f"{app.get('code')}, link protocol {app.get('protocol')}). Restart the node's worker so that it loads the "
        "code the run uses (systemctl restart dpfpl-worker, or restart deploy/start-supernode.sh, which starts "
        "it), after installing on this node the dpfpl version the run's app bundle was built from"
    )


# ------------------------------------------------------------------------------------------ frames
def send_frame(sock: socket.socket, header: dict, payload: bytes = b"") -> None:
    head = json.dumps(header).encode()
    sock.sendall(struct.pack(">I", len(head)) + head + struct.pack(">Q", len(payload)))
    if payload:
        sock.sendall(payload)


def _exactly(sock: socket.socket, n: int) -> bytes:
    chunks, got = [], 0
    while got < n:
        try:
            chunk = sock.recv(min(n - got, 1 << 20))
        except ConnectionError as err:
            raise LinkError(f"the peer reset the link after {got} of {n} bytes") from err
        if not chunk:
            raise LinkError(f"the peer closed the link after {got} of {n} bytes")
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def _depth(raw: bytes) -> int:
    """The deepest nesting of brackets in a JSON text, counted before parsing (``json.loads`` recurses)."""
    depth = deepest = 0
    in_string = escaped = False
    for byte in raw:
        if in_string:
            if escaped:
                escaped = False
            elif byte == 0x5C:  # backslash
                escaped = True
            elif byte == 0x22:  # quote
                in_string = False
        elif byte == 0x22:
            in_string = True
        elif byte in (0x5B, 0x7B):  # [ {
            depth += 1
            deepest = max(deepest, depth)
        elif byte in (0x5D, 0x7D):
            depth -= 1
    return deepest


def recv_frame(sock: socket.socket) -> tuple[dict, bytes]:
    (head_len,) = struct.unpack(">I", _exactly(sock, 4))
    if head_len > MAX_HEADER:
        raise LinkError(f"a frame header of {head_len} bytes (at most {MAX_HEADER})")
    raw = _exactly(sock, head_len)
    if _depth(raw) > MAX_HEADER_DEPTH:
        raise LinkError(f"a frame header nested deeper than {MAX_HEADER_DEPTH} levels")
    try:
        header = json.loads(raw)
    except (ValueError, RecursionError) as err:
        raise LinkError(f"an unreadable frame header: {err}") from err
    if not isinstance(header, dict):
        raise LinkError("a frame header that is not a JSON object")
    (payload_len,) = struct.unpack(">Q", _exactly(sock, 8))
    if payload_len > MAX_PAYLOAD:
        raise LinkError(f"a frame payload of {payload_len} bytes (at most {MAX_PAYLOAD})")
    return header, _exactly(sock, payload_len) if payload_len else b""


def encode_content(content: RecordDict) -> bytes:
    return recorddict_to_proto(content).SerializeToString()


def decode_content(data: bytes) -> RecordDict:
    return recorddict_from_proto(ProtoRecordDict.FromString(data))


def call_header(request: NodeRequest) -> dict:
    return {
        "op": "call",
        "operation": request.operation,
        "run-config": request.run_config,
        "node-config": request.node_config,
        "node-id": request.node_id,
        "clientapp-age": request.clientapp_age,
    }


def request_from(header: dict, payload: bytes) -> NodeRequest:
    return NodeRequest(
        operation=str(header["operation"]),
        content=decode_content(payload),
        run_config=dict(header["run-config"]),
        node_config=dict(header["node-config"]),
        node_id=int(header["node-id"]),
        clientapp_age=None if header.get("clientapp-age") is None else float(header["clientapp-age"]),
    )


# ------------------------------------------------------------------------------------------ the ClientApp's end
def _connect(path: Path, wait: float) -> socket.socket | None:
    """A connection to the worker; None when no worker answers within ``wait`` seconds (no socket file, or a
    stale one left by a worker that was killed and not restarted)."""
    deadline = time.monotonic() + wait
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(str(path))
            return sock
        except OSError as err:
            sock.close()
            if err.errno not in (errno.ENOENT, errno.ECONNREFUSED):
                log.warning("cannot connect to the node worker at %s: %s", path, err)  # e.g. a permission
                return None
            if time.monotonic() >= deadline:
                return None
            time.sleep(0.1)


def _exchange(sock: socket.socket, request: NodeRequest, state_dir: Path) -> RecordDict:
    app = {**app_identity(), "protocol": PROTOCOL_VERSION}
    send_frame(sock, {"op": "hello", **app})
    header, _ = recv_frame(sock)
    while header.get("op") == "alive":  # a worker still loading its libraries holds the connection
        header, _ = recv_frame(sock)
    if header.get("op") == "refused":
        worker = header.get("worker", {})
        raise WorkerMismatch(str(worker["changed"]) if "changed" in worker else mismatch_text(worker, app, state_dir))
    if header.get("op") != "ok":
        raise LinkError(f"the worker answered the handshake with {header.get('op')!r}")
    send_frame(sock, call_header(request), encode_content(request.content))
    header, payload = recv_frame(sock)
    while header.get("op") == "alive":  # the handler is still at work: each heartbeat renews the deadline
        header, payload = recv_frame(sock)
    if header.get("op") == "reply":
        return decode_content(payload)
    if header.get("op") == "error":
        raise WorkerHandlerError(str(header.get("message", "the worker's handler failed")))
    raise LinkError(f"the worker answered the call with {header.get('op')!r}")


def forward(
    request: NodeRequest,
    path: Path,
    restart_wait: float = RESTART_WAIT_SECONDS,
    silence: float = SILENCE_SECONDS,
    expect_worker: bool = False,
) -> RecordDict | None:
    """The reply of the worker listening on ``path`` to ``request``, or None when no worker answers it. A worker
    that dies mid-message is asked again once its supervisor has restarted it: every handler is safe to repeat,
    since a node's state is on disk and a repeated train message gets the reply already sent, not a second step
    (``PromptNode.train``). A worker silent for ``silence`` seconds (frozen, hung) counts as broken.
    ``expect_worker``: the node has no other way to answer (separated privileges), so a socket that is not there
    yet (a worker still starting) is waited for, ``restart_wait`` seconds, like a refused connection."""
    path = Path(path)
    if not path.exists() and not expect_worker:
        return None
    for attempt in (1, 2):
        sock = _connect(path, restart_wait)
        if sock is None:
            return None
        with sock:
            sock.settimeout(silence)
            try:
                return _exchange(sock, request, path.parent)
            except TimeoutError:
                # not asked again: its supervisor restarts a hung worker, and this message fails, so that the
                # server leaves the node out of this round instead of waiting for it
                raise WorkerHung(
                    f"the node worker at {path} sent nothing for {silence:g} s while answering {request.operation} "
                    "(frozen or hung); its supervisor restarts it, and the node is left out of this round"
                ) from None
            except (LinkError, OSError) as err:  # a reset or a closed link: the worker died
                log.warning(
                    "the node worker at %s broke off %s (attempt %d: %s)", path, request.operation, attempt, err
                )
    return None
