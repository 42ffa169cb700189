"""The train and evaluate handlers: a node's prompt-learning step and its evaluation (``PromptNode``).

What leaves the node: for methods with a global prompt, the ``global-grad`` array (the clipped, averaged
global gradient); for every method, numeric metrics. Never p_L, its factors, features, labels or raw data.
"""

from __future__ import annotations

import logging
import time

import torch
from flwr.app import ArrayRecord, MetricRecord, RecordDict

from dpfpl.common.classlist import DIGEST_KEY, ClassListMismatch, check_class_list
from dpfpl.common.config import NodeConfig, RunConfig
from dpfpl.common.data.images import DatasetError
from dpfpl.common.data.silo import SiloError
from dpfpl.common.models import WeightsMismatchError, WeightsUnavailableError
from dpfpl.common.run_classes import node_class_list
from dpfpl.common.runtag import RUN_TAG_KEY, run_tag

from . import secagg_handlers
from .context import MessageContext
from .errors import NodeUnfit
from .node import PromptNode
from .policy import charge_evaluation

# Reply metrics computed from the training data without noise: the training loss of the Poisson batch, its
# realized size, and the step's wall time (which grows with that size). No epsilon covers them, so they leave a
# node only when there is no guarantee to keep: never under DP, never under secure aggregation.
OUTSIDE_EPSILON_TRAIN_METRICS = ("train-loss", "batch-size", "client-seconds")
log = logging.getLogger("dpfpl.client")


def _check_classes(context: MessageContext) -> None:
    """Before any data or model is loaded: a node whose class list is not the server's refuses the message."""
    config = context.config
    own, source = node_class_list(context.node, context.cfg)
    try:
        check_class_list(str(config[DIGEST_KEY]) if DIGEST_KEY in config else None, own, source)
    except ClassListMismatch as err:
        log.error("%s; this node's classes: %s", err, own)
        raise


def _unfit(node_cfg: NodeConfig, reason: str) -> NodeUnfit:
    where = f"partition-{node_cfg.partition_id}: " if node_cfg.partition_id is not None else ""
    return NodeUnfit(where + reason)


def prompt_node(cfg: RunConfig, node_cfg: NodeConfig) -> PromptNode:
    """This node for the run: its model, data and encoder from the process's caches (built on first use)."""
    torch.set_num_threads(node_cfg.num_threads)
    if node_cfg.num_partitions is not None and node_cfg.num_partitions != cfg.num_clients:
        # a simulation with fewer SuperNodes than clients would silently train only some of the partitions
        raise _unfit(
            node_cfg,
            f"the simulation runs {node_cfg.num_partitions} SuperNodes but num-clients is "
            f"{cfg.num_clients}; give each client its own SuperNode: flwr run . --federation-config "
            f"'num-supernodes={cfg.num_clients}' (dpfpl simulate matches them itself)",
        )
    try:
        return PromptNode(cfg, node_cfg)
    except SiloError as err:
        # The details name this organization's files and labels: they stay in the node's own log. The
        # server (which receives the exception text as the error reply) only learns that the check failed.
        log.error("%s", err)
        raise _unfit(
            node_cfg,
            "this node's data silo failed its checks against the run's class list; "
            "the node's own log lists the files and labels involved",
        ) from None
    except (WeightsUnavailableError, WeightsMismatchError, DatasetError) as err:
        log.error("%s", err)
        raise _unfit(node_cfg, " ".join(str(err).split())) from err


def _global_prompt(content: RecordDict) -> torch.Tensor | None:
    """The server's p_G, or None for methods without a global prompt (the message then carries no arrays)."""
    if "arrays" not in content.array_records:
        return None
    return torch.from_numpy(content["arrays"]["global-prompt"].numpy().copy())


def train(context: MessageContext) -> RecordDict:
    _check_classes(context)
    started = time.perf_counter()
    node = prompt_node(context.cfg, context.node)
    config = context.config
    outcome = node.train(
        _global_prompt(context.content),
        int(config["server-round"]),
        str(config["run-token"]),
        float(config["noise-multiplier-global"]),
        rerelease=bool(config.get("rerelease", False)),
    )
    # client-seconds: this handler's own compute (node from its caches + the step), so the server can tell
    # Flower's share of a round from the clients' (dpfpl/bench/step.py, docs/performance.md)
    metrics = {
        **outcome.metrics,
        RUN_TAG_KEY: run_tag(str(config["run-token"])),
        "client-seconds": time.perf_counter() - started,
    }
    if context.request.clientapp_age is not None:  # the ClientApp process's start-up share (says nothing about data)
        metrics["clientapp-age-seconds"] = context.request.clientapp_age
    if node.cfg.dp or node.cfg.secure_aggregation:
        metrics = {k: v for k, v in metrics.items() if k not in OUTSIDE_EPSILON_TRAIN_METRICS}
    if node.cfg.secure_aggregation and outcome.global_grad is not None:
        # secure aggregation: the reply carries public keys; the gradient leaves only masked (client_app/secagg_handlers.py)
        return secagg_handlers.advertise_reply(context, outcome.global_grad.numpy(), metrics)
    records = {"metrics": MetricRecord({**metrics, "server-round": int(config["server-round"])})}
    if outcome.global_grad is not None:
        records["arrays"] = ArrayRecord({"global-grad": outcome.global_grad})
    return RecordDict(records)


def evaluate(context: MessageContext) -> RecordDict:
    _check_classes(context)
    config = context.config
    # before the node is built: a refused evaluation costs a ledger read, not a model and a data set
    charge_evaluation(context.state_dir, str(config["run-token"]), context.cfg, context.node)
    node = prompt_node(context.cfg, context.node)
    metrics = node.evaluate(
        _global_prompt(context.content),
        str(config["run-token"]),
        zeroshot=config["phase"] == "zeroshot",
        published=config["phase"] == "published",
    )
    metrics = {**metrics, RUN_TAG_KEY: run_tag(str(config["run-token"])), "server-round": int(config["server-round"])}
    return RecordDict({"metrics": MetricRecord(metrics)})
