"""Which handler answers which message, and the one way every handler runs: under this node's lock.

The table names modules, not functions, so that a message is answered with only the imports its handler needs:
secure aggregation's later stages and SecFPP's phase messages are numpy and cryptography, and a ClientApp that
answers them itself (no resident worker) never loads torch for them.
"""

from __future__ import annotations

import fcntl
import importlib
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from flwr.app import RecordDict

from dpfpl.common.config import NodeConfig, RunConfig

from .request import OPERATIONS, NodeRequest

ROUTES = {
    "train": ("prompt_handlers", "train"),
    "evaluate": ("prompt_handlers", "evaluate"),
    "train.secagg_shares": ("secagg", "share_keys"),
    "train.secagg_masked": ("secagg", "masked_input"),
    "train.secagg_unmask": ("secagg", "unmask"),
    "train.secfpp_keys": ("secfpp", "advertise"),
    "train.secfpp_shares": ("secfpp", "share"),
    "train.secfpp_distances": ("secfpp", "distances"),
    "train.secfpp_decide": ("secfpp", "decide"),
    "query.node_key": ("secfpp", "identify"),
}
assert tuple(ROUTES) == OPERATIONS
LOCK_FILE = "node.lock"
LOCK_TIMEOUT_SECONDS = 120.0  # longer than any one message's work on a warm node, shorter than a round timeout


class UnknownOperation(ValueError):
    """A message type this node does not answer."""


def state_dir(request: NodeRequest) -> Path:
    """The node's state directory for this request (the node's ``state-dir``, or its place in the run directory
    in simulation)."""
    cfg = RunConfig.from_flower(request.run_config)
    return NodeConfig.from_flower(request.node_config).resolved_state_dir(cfg.run_dir)


class NodeBusy(RuntimeError):
    """Another process has held this node's lock for longer than a message may wait (a hung worker)."""


@contextmanager
def node_lock(directory: Path, timeout: float = LOCK_TIMEOUT_SECONDS) -> Iterator[None]:
    """One message at a time per node, whichever process serves it (the worker, a ClientApp that answers itself
    while the worker restarts): every handler reads the node's state, changes it and writes it back. A holder
    that keeps the lock past ``timeout`` (hung, or frozen) fails the waiting message instead of holding the node
    until the server's round timeout; the worker's supervisor restarts a hung worker."""
    directory.mkdir(parents=True, exist_ok=True)
    fd = os.open(directory / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise NodeBusy(
                        f"another process has held this node's lock ({directory / LOCK_FILE}) for {timeout:g} s; "
                        "if the node's worker hangs, its supervisor restarts it"
                    ) from None
                time.sleep(0.05)
        yield
    finally:
        os.close(fd)  # releases the lock


def handle(request: NodeRequest, directory: Path | None = None) -> RecordDict:
    """Answer one message: the reply's content. ``directory``: the request's state directory, when the caller
    has already resolved it."""
    if request.operation not in ROUTES:
        raise UnknownOperation(f"this node does not answer '{request.operation}' messages")
    module, function = ROUTES[request.operation]
    handler = getattr(importlib.import_module(f"{__package__}.{module}"), function)
    with node_lock(directory or state_dir(request)):
        return handler(request)
