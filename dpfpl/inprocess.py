"""An in-process Flower Grid: the same ServerApp round loop and ClientApp handlers, without a SuperLink.

Why it exists: an experiment sweep runs ~100 federations on 2 CPU cores. Through Flower's simulation engine
every run pays the SuperLink and Ray start-up (~15 s) and every round the gRPC/HTTP round trips of each
message; that overhead is larger than the tiny-backbone rounds themselves. ``InProcessGrid`` implements
Flower's ``Grid`` interface by handing each message to the ClientApp object in this process, so
``dpfpl.server_app.runner.run_federation`` and ``dpfpl.client_app.app.app`` run unchanged: only the transport differs.

What is kept from Flower so that a run behaves as it does there:

* messages are built by Flower's own ``Message`` (run id, source node = the SuperLink's node id, TTL) and
  checked with the SuperLink's validator before delivery; an invalid one is logged and not delivered;
* each message crosses a serialization boundary (deflate/inflate of Flower's object tree, as between the
  SuperLink and a SuperNode), so the ClientApp never shares tensors or records with the server;
* message ids are the content-addressed object ids the deployment runtime uses;
* every node has one persistent ``Context`` (node id, node config with ``partition-id`` /
  ``num-partitions``, run config, state) for the whole run, like a SuperNode; a ClientApp exception is
  logged and becomes an error reply ``Message(Error(CLIENT_APP_RAISED_EXCEPTION, reason), reply_to=msg)``
  in the format of ``flwr.supernode.runtime.run_clientapp``, and leaves the node's context unchanged.

Node ids are derived from the partition id (not drawn at random as Flower's simulation does), so a run
resumed from its checkpoint meets the same node ids that its server-side bookkeeping (per-node sample rates
and participation counts for the accountant) was written with.

Delivery is synchronous: ``push_messages`` runs the ClientApp for each message, in order, and keeps the
replies until ``pull_messages`` collects them.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import secrets
from collections.abc import Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager

import torch
from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import SUPERLINK_NODE_ID, ErrorCode
from flwr.server.utils.validator import validate_message
from flwr.serverapp import Grid
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects, no_object_id_recompute
from flwr.supercore.inflatable.inflatable_utils import inflate_object_from_contents
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

from .client_app.app import app as client_app
from .common.config import RunConfig
from .common.secfpp.protocol import check_run_config
from .overrides import full_run_config
from .server_app.runner import run_federation

log = logging.getLogger("dpfpl.inprocess")


def node_id_for(partition_id: int) -> int:
    """A stable, Flower-like 63-bit node id for a partition (never the SuperLink's id)."""
    digest = hashlib.sha256(f"dpfpl-inprocess-node-{partition_id}".encode()).digest()
    return (int.from_bytes(digest[:8], "big") >> 1) or SUPERLINK_NODE_ID + 1


def error_reason(ex: BaseException) -> str:
    """The reason string Flower's ClientApp runtime reports for an exception."""
    return str(type(ex)) + ":<'" + str(ex) + "'>"


def _over_the_wire(message: Message, message_id: str) -> Message:
    """A copy of ``message`` as the receiving side of Flower's transport rebuilds it: deflated to its object
    tree, inflated again, and given its message id (which is not part of the serialized object)."""
    with no_object_id_recompute():
        objects = get_all_nested_objects(message)
        contents = {object_id: obj.deflate() for object_id, obj in objects.items()}
        received = inflate_object_from_contents(message.object_id, contents)
    received.metadata.__dict__["_message_id"] = message_id
    return received


@contextmanager
def task_identity(run_id: int, node_id: int, task_id: int) -> Iterator[None]:
    """Flower's ``Message`` constructor stamps run id and source node from ``TaskIdentity`` (set per process
    by Flower's runtimes); set it for the duration of a block and restore what was there."""
    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = run_id, node_id, task_id
    try:
        yield
    finally:
        TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved


class InProcessGrid(Grid):
    """A ``Grid`` whose nodes are ClientApp calls in this process (see the module docstring)."""

    def __init__(
        self,
        client_app: ClientApp,
        run_config: dict,
        num_nodes: int,
        node_config: dict | None = None,
        run_id: int | None = None,
    ) -> None:
        if num_nodes < 1:
            raise ValueError("num_nodes must be at least 1")
        self.client_app = client_app
        run = Run.create_empty(run_id if run_id is not None else secrets.randbits(63))
        run.override_config = dict(run_config)
        run.primary_task_id = secrets.randbits(63)
        self._run = run
        self.contexts: dict[int, Context] = {}
        for partition_id in range(num_nodes):
            node_id = node_id_for(partition_id)
            config = {"partition-id": partition_id, "num-partitions": num_nodes, **(node_config or {})}
            self.contexts[node_id] = Context(
                run_id=run.run_id, node_id=node_id, node_config=config, state=RecordDict(), run_config=dict(run_config)
            )
        self._replies: dict[str, Message] = {}

    # ------------------------------------------------------------------ run
    def set_run(self, run: Run) -> None:
        if not isinstance(run, Run):
            raise TypeError(f"`run` must be an instance of Run, got {type(run).__name__}")
        self._run = run

    @property
    def run(self) -> Run:
        return Run(**vars(self._run))

    def identity(self) -> AbstractContextManager[None]:
        """The ServerApp side's task identity (source node = the SuperLink), as Flower's runtime sets it."""
        return task_identity(self._run.run_id, SUPERLINK_NODE_ID, self._run.primary_task_id or 1)

    # ------------------------------------------------------------------ nodes and messages
    def create_message(
        self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str, ttl: float | None = None
    ) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def _admissible(self, message: Message) -> bool:
        """The SuperLink's checks on an instruction message; a rejected one is logged and not delivered."""
        errors = validate_message(message, is_reply_message=False)
        if message.metadata.run_id != self._run.run_id:
            errors.append(f"run id {message.metadata.run_id} is not this run's ({self._run.run_id})")
        if message.metadata.dst_node_id not in self.contexts:
            errors.append(f"destination node {message.metadata.dst_node_id} is not connected")
        if errors:
            log.error("message to node %s not delivered: %s", message.metadata.dst_node_id, "; ".join(errors))
        return not errors

    def _deliver(self, message: Message) -> Message:
        """Run the ClientApp of the destination node on ``message``; return its reply (or an error reply)."""
        context = self.contexts[message.metadata.dst_node_id]
        state_before = copy.deepcopy(context.state)
        received = _over_the_wire(message, message.metadata.message_id)
        try:
            with task_identity(self._run.run_id, context.node_id, self._run.primary_task_id or 1):
                reply = self.client_app(message=received, context=context)
            if not isinstance(reply, Message):
                raise TypeError(f"the ClientApp returned {type(reply).__name__}, not a Message")
            reply.metadata.__dict__["_message_id"] = reply.object_id
            problems = validate_message(reply, is_reply_message=True)
            if reply.metadata.reply_to_message_id != received.metadata.message_id:
                problems.append(
                    "it does not reply to the message it received (build it with Message(content, reply_to=message))"
                )
            if problems:
                raise ValueError(f"the ClientApp's reply is invalid: {'; '.join(problems)}")
        except Exception as ex:  # as Flower's runtime: any exception becomes an error reply
            log.error(
                "ClientApp of node %s (partition %s) raised an exception",
                context.node_id,
                context.node_config.get("partition-id"),
                exc_info=ex,
            )
            context.state = state_before  # Flower keeps the node's context of before the failed message
            reply = Message(
                Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=error_reason(ex)), reply_to=received
            )
            reply.metadata.__dict__["_message_id"] = reply.object_id
        return _over_the_wire(reply, reply.metadata.message_id)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        message_ids: list[str] = []
        for message in messages:
            message.metadata.__dict__["_message_id"] = message.object_id
            if not self._admissible(message):
                continue
            reply = self._deliver(message)
            self._replies[message.metadata.message_id] = reply
            message_ids.append(message.metadata.message_id)
        return message_ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self._replies.pop(i) for i in message_ids if i in self._replies]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        """Deliver every message and return every reply (delivery is synchronous: ``timeout`` never cuts)."""
        return self.pull_messages(self.push_messages(messages))


def run_inprocess(run_config: dict, num_nodes: int, node_config: dict | None = None) -> dict:
    """Run one federation with ``num_nodes`` in-process nodes; return the run's summary.

    ``run_config`` holds run-config overrides (hyphenated keys), applied to pyproject's defaults as
    ``flwr run --run-config`` does. ``node_config`` is added to every node's config (e.g. ``cache-dir``,
    ``num-threads``; by default the ClientApp uses as many threads as this process, since the nodes take
    turns instead of sharing the cores).
    """
    config = full_run_config(run_config)
    cfg = RunConfig.from_flower(config)  # fail fast, with the key's name
    check_run_config(cfg)
    node_config = {"num-threads": torch.get_num_threads(), **(node_config or {})}
    grid = InProcessGrid(client_app, config, num_nodes, node_config)
    with grid.identity():
        return run_federation(grid, cfg)
