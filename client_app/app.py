"""ClientApp: a thin adapter between Flower's messages and this node's handlers.

Each message becomes a ``NodeRequest``. On a deployed node with a resident worker (``dpfpl worker``, started by
``deploy/start-supernode.sh``), the request is forwarded over the node's own Unix socket and the worker's
reply is sent back: the worker keeps the model and the features warm across messages, while Flower starts a
fresh ClientApp process for every message. Without a worker (simulation, or a node started without one), the
ClientApp runs the same handler itself. Either way the reply is the handler's, so what leaves the node does not
depend on who computed it (``client_app/prompt_handlers.py`` says what that is).

This module imports flwr and the standard library only; torch is loaded only where a handler that needs it
runs in this process.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp

from dpfpl.common.config import NodeConfig
from dpfpl.common.console import flower_lines_once
from dpfpl.common.wire import INVENTORY, check_reply

from .context import MessageContext
from .handlers import handle
from .request import OPERATIONS, NodeRequest
from .worker_link import WorkerUnavailable, forward, socket_path

app = ClientApp()
log = logging.getLogger("dpfpl.client")
flower_lines_once()  # OpenCLIP's root-level logging would print each of Flower's lines here a second time


# An operator's audit log of what leaves this node: with DPFPL_WIRE_LOG=PATH set, every reply appends one JSON
# line to PATH naming its operation and each field with its privacy class (names only, never values).
WIRE_LOG_ENV = "DPFPL_WIRE_LOG"


def _fields(content: RecordDict) -> dict[str, list[str]]:
    return {name: list(record.keys()) for name, record in content.items()}


def leave(request: NodeRequest, content: RecordDict) -> RecordDict:
    """The last check before a reply leaves: every field must be in the inventory (``dpfpl.common.wire``)."""
    fields = _fields(content)
    check_reply(request.operation, fields)
    if path := os.environ.get(WIRE_LOG_ENV):
        line = {
            "operation": request.operation,
            "fields": [[r, k, INVENTORY[(request.operation, r, k)][0]] for r, keys in fields.items() for k in keys],
        }
        with open(path, "a") as fh:  # one short line per reply: O_APPEND keeps concurrent nodes' lines whole
            fh.write(json.dumps(line) + "\n")
    return content


def answer(request: NodeRequest) -> RecordDict:
    """The reply's content for ``request``: from this node's worker when it has one, else computed here."""
    return leave(request, _compute(request))


def _compute(request: NodeRequest) -> RecordDict:
    node = NodeConfig.from_flower(request.node_config)
    if node.worker_socket:  # privileges separated: only the worker can read the data; no answer without it
        content = forward(request, Path(node.worker_socket), expect_worker=True)
        if content is None:
            raise WorkerUnavailable(
                f"no node worker answers at {node.worker_socket}, and this node's privileges are separated: its "
                "ClientApp cannot read the data and does not answer itself. The node's operator restarts the worker "
                "(systemctl restart dpfpl-worker, or deploy/start-supernode.sh)"
            )
        return content
    context = MessageContext.of(request, node)
    content = forward(request, socket_path(context.state_dir))
    if content is not None:
        return content
    if node.state_dir:  # a deployed node (simulation has no workers)
        log.warning(
            "no node worker answers at %s: this ClientApp answers %s itself (slower: it loads the model for this "
            "one message); start `dpfpl worker --state-dir %s` to keep it warm",
            socket_path(context.state_dir),
            request.operation,
            context.state_dir,
        )
    return handle(context)


def _serve(msg: Message, context: Context) -> Message:
    return Message(content=answer(NodeRequest.from_flower(msg, context)), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    return _serve(msg, context)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    return _serve(msg, context)


# secure aggregation's stages and SecFPP's clustering phase: actions of the train message type, and the node-key
# query (the handlers are in client_app/secagg_handlers.py and client_app/secfpp_handlers.py)
for _operation in OPERATIONS:
    _kind, _, _action = _operation.partition(".")
    if _action:
        getattr(app, _kind)(_action)(_serve)
