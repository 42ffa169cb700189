"""ClientApp: thin Flower handlers around ``PromptNode``.

What leaves the node: for methods with a global prompt, the ``global-grad`` array (the clipped, averaged
global gradient); for every method, numeric metrics. Never p_L, its factors, features, labels or raw data.
"""

from __future__ import annotations

import logging
import time

import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from common.config import NodeConfig, RunConfig
from common.data.silo import SiloError

from .node import PromptNode

app = ClientApp()
log = logging.getLogger("dpfpl.client")


def _node(context: Context) -> PromptNode:
    torch.set_num_threads(max(1, int(context.node_config.get("num-threads", 1))))
    try:
        return PromptNode(RunConfig.from_flower(dict(context.run_config)),
                         NodeConfig.from_flower(dict(context.node_config)))
    except SiloError as err:
        # The details name this organization's files and labels: they stay in the node's own log. The
        # server (which receives the exception text as the error reply) only learns that the check failed.
        log.error("%s", err)
        raise RuntimeError("this node's data silo failed its checks against the run's class list; "
                           "the node's own log lists the files and labels involved") from None


def _global_prompt(msg: Message) -> torch.Tensor | None:
    """The server's p_G, or None for methods without a global prompt (the message then carries no arrays)."""
    if "arrays" not in msg.content.array_records:
        return None
    return torch.from_numpy(msg.content["arrays"]["global-prompt"].numpy().copy())


@app.train()
def train(msg: Message, context: Context) -> Message:
    started = time.perf_counter()
    node = _node(context)
    config = msg.content["config"]
    outcome = node.train(_global_prompt(msg), int(config["server-round"]), str(config["run-token"]),
                         float(config["noise-multiplier-global"]))
    # client-seconds: this handler's own compute (node from its caches + the step), so the server can tell
    # Flower's share of a round from the clients' (bench/step.py, docs/performance.md)
    records = {"metrics": MetricRecord({**outcome.metrics, "server-round": int(config["server-round"]),
                                        "client-seconds": time.perf_counter() - started})}
    if outcome.global_grad is not None:
        records["arrays"] = ArrayRecord({"global-grad": outcome.global_grad})
    return Message(content=RecordDict(records), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    node = _node(context)
    config = msg.content["config"]
    metrics = node.evaluate(_global_prompt(msg), str(config["run-token"]), zeroshot=config["phase"] == "zeroshot")
    content = RecordDict({"metrics": MetricRecord({**metrics, "server-round": int(config["server-round"])})})
    return Message(content=content, reply_to=msg)
