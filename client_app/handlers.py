"""Which handler answers which message, and the one way every handler runs: under this node's lock, given the
message's context (``client_app/context.py``: its configuration parsed once, by whoever received it).

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

from .context import MessageContext
from .request import OPERATIONS

ROUTES = {
    "train": ("prompt_handlers", "train"),
    "evaluate": ("prompt_handlers", "evaluate"),
    "train.secagg_shares": ("secagg_handlers", "share_keys"),
    "train.secagg_masked": ("secagg_handlers", "masked_input"),
    "train.secagg_unmask": ("secagg_handlers", "unmask"),
    "train.secfpp_keys": ("secfpp_vector", "advertise"),
    "train.secfpp_shares": ("secfpp_handlers", "share"),
    "train.secfpp_distances": ("secfpp_handlers", "distances"),
    "train.secfpp_decide": ("secfpp_handlers", "decide"),
    "query.node_key": ("secfpp_handlers", "identify"),
}
assert tuple(ROUTES) == OPERATIONS
LOCK_FILE = "node.lock"
LOCK_TIMEOUT_SECONDS = 120.0  # longer than any one message's work on a warm node, shorter than a round timeout


class UnknownOperation(ValueError):
    """A message type this node does not answer."""


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


def import_handlers() -> None:
    """Import every module the table names (torch, OpenCLIP, the protocols): what a resident worker does once,
    before its first message. A ClientApp never does: it imports the one module its message needs."""
    for module in dict.fromkeys(module for module, _ in ROUTES.values()):
        importlib.import_module(f"{__package__}.{module}")


def handle(context: MessageContext) -> RecordDict:
    """Answer one message: the reply's content."""
    if context.operation not in ROUTES:
        raise UnknownOperation(f"this node does not answer '{context.operation}' messages")
    module, function = ROUTES[context.operation]
    handler = getattr(importlib.import_module(f"{__package__}.{module}"), function)
    with node_lock(context.state_dir):
        return handler(context)
