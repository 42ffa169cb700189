"""ClientApp: thin Flower handlers around ``DpFplNode``.

What leaves the node: the ``global-grad`` array (the clipped, averaged global gradient) and numeric
metrics. Never p_L, its factors, features, labels or raw data.
"""

from __future__ import annotations

import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from common.config import NodeConfig, RunConfig

from .node import DpFplNode

app = ClientApp()


def _node(context: Context) -> DpFplNode:
    torch.set_num_threads(max(1, int(context.node_config.get("num-threads", 1))))
    return DpFplNode(RunConfig.from_flower(dict(context.run_config)), NodeConfig.from_flower(dict(context.node_config)))


def _global_prompt(msg: Message) -> torch.Tensor:
    return torch.from_numpy(msg.content["arrays"]["global-prompt"].numpy().copy())


@app.train()
def train(msg: Message, context: Context) -> Message:
    node = _node(context)
    config = msg.content["config"]
    outcome = node.train(_global_prompt(msg), int(config["server-round"]), str(config["run-token"]),
                         float(config["noise-multiplier-global"]))
    content = RecordDict({
        "arrays": ArrayRecord({"global-grad": outcome.global_grad}),
        "metrics": MetricRecord({**outcome.metrics, "server-round": int(config["server-round"])}),
    })
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    node = _node(context)
    config = msg.content["config"]
    p_global = None if config["phase"] == "zeroshot" else _global_prompt(msg)
    metrics = node.evaluate(p_global, str(config["run-token"]))
    content = RecordDict({"metrics": MetricRecord({**metrics, "server-round": int(config["server-round"])})})
    return Message(content=content, reply_to=msg)
