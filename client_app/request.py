"""One message as this node's handlers see it, with nothing of Flower's transport in it.

Why a class of its own: the same handler runs in two places. In simulation, or on a node without a resident
worker, the ClientApp runs it in its own process; on a deployed node with a worker (``client_app/worker.py``),
the ClientApp forwards the request over a local socket and the worker runs it. Either way the handler reads
what the server sent (``content``), the run's and the node's configuration, and Flower's id of this node, and
returns the reply's content: exactly what the ClientApp would send.

Light on purpose: flwr and the standard library only, so that a ClientApp that forwards never loads torch.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field

from flwr.app import Context, Message, RecordDict

# Every message type this ClientApp answers (Flower's names: "<type>" or "<type>.<action>"). The worker answers
# these and nothing else: it is no new way into the node.
OPERATIONS = (
    "train",
    "evaluate",
    "train.secagg_shares",
    "train.secagg_masked",
    "train.secagg_unmask",
    "train.secfpp_keys",
    "train.secfpp_shares",
    "train.secfpp_distances",
    "train.secfpp_decide",
    "query.node_key",
)


@dataclass(frozen=True)
class NodeRequest:
    operation: str  # one of OPERATIONS
    content: RecordDict  # what the server sent
    run_config: dict = field(default_factory=dict)  # the run's configuration (Flower's run config)
    node_config: dict = field(default_factory=dict)  # this node's own (its operator's --node-config)
    node_id: int = 0  # Flower's id of this node: secure aggregation binds its keys to it
    # how long the ClientApp process had been alive when the message reached its handler: the share of a
    # deployed round that is process start-up, reported next to the handler's own seconds
    clientapp_age: float | None = None

    @classmethod
    def from_flower(cls, msg: Message, context: Context) -> NodeRequest:
        return cls(
            operation=msg.metadata.message_type,
            content=msg.content,
            run_config=run_config_for(msg.content, dict(context.run_config)),
            node_config=dict(context.node_config),
            node_id=int(msg.metadata.dst_node_id),
            clientapp_age=process_age() if _own_clientapp_process() else None,
        )


def _own_clientapp_process() -> bool:
    """Deployment: this process is the ``flwr-clientapp`` a SuperNode started for this one message (in a
    simulation the process serves many messages, and its age says nothing)."""
    return os.path.basename(sys.argv[0] if sys.argv else "") == "flwr-clientapp"


def process_age() -> float | None:
    """Seconds since this process started (Linux: from /proc), or None where that cannot be read."""
    try:
        with open(f"/proc/{os.getpid()}/stat") as fh:
            started_ticks = int(fh.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as fh:
            uptime = float(fh.read().split()[0])
        return max(0.0, uptime - started_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return None


def run_config_for(content: RecordDict, run_config: dict) -> dict:
    """Flower's run config, with the number of clients the server counted when the run config leaves it to the
    federation (``num-clients = 0``, as in a plain ``flwr run .``). The number only picks which partition of the
    embedded data set a simulated node trains on (``num-partitions`` must match it); it sets no noise, so a node
    takes it from the message."""
    config = content.config_records.get("config")
    if run_config.get("num-clients") == 0 and config is not None and "num-clients" in config:
        return {**run_config, "num-clients": int(config["num-clients"])}
    return run_config
