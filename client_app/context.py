"""One message as every handler takes it: the request, with the run's and the node's configuration validated and
the node's state directory resolved, once.

Why once: a message's configuration is the same for every step that reads it (the router's lock, the class-list
check, the privacy policy, the handler, secure aggregation's session file), so it is parsed where the message
enters the node (the ClientApp that answers itself, or the worker) and a validation error fails the message
there, before any handler runs. Light like the request: no torch, so that a ClientApp that forwards never loads it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from flwr.app import ConfigRecord, RecordDict

from dpfpl.common.config import NodeConfig, RunConfig

from .request import NodeRequest


@dataclass(frozen=True)
class MessageContext:
    request: NodeRequest
    cfg: RunConfig  # the run's configuration, validated
    node: NodeConfig  # this node's own configuration, validated
    state_dir: Path  # the node's state directory (its ``state-dir``, or its place in the run directory in simulation)

    @classmethod
    def of(cls, request: NodeRequest, node: NodeConfig | None = None) -> MessageContext:
        """Parse and validate the request's configuration (``ValueError`` naming the key when it does not).
        ``node``: the node configuration, when the caller has already parsed ``request.node_config``."""
        cfg = RunConfig.from_flower(request.run_config)
        node = NodeConfig.from_flower(request.node_config) if node is None else node
        return cls(request, cfg, node, node.resolved_state_dir(cfg.run_dir))

    @property
    def operation(self) -> str:
        return self.request.operation

    @property
    def content(self) -> RecordDict:
        return self.request.content

    @property
    def config(self) -> ConfigRecord:
        """The server's instructions for this message (its ``config`` record; ``KeyError`` when it sent none)."""
        return self.request.content["config"]

    @property
    def node_id(self) -> int:
        return self.request.node_id
