"""The run's class list and the one a node holds it against: from the run config, the node config or the data
set's own index files.

A module apart from ``classlist`` (the digest and its check): reading a data set's class list needs the data
loaders, which the resident worker must not import before it listens (it needs only the check's error).
"""

from __future__ import annotations

from .classlist import parse_classnames
from .config import NodeConfig, RunConfig
from .data.demo import DEMO_CLASSES
from .data.registry import load_dataset


def run_class_list(cfg: RunConfig) -> list[str]:
    """All class names of the task (the data set's own list; silo: ``classnames``)."""
    if cfg.dataset == "demo":
        return list(DEMO_CLASSES)
    if cfg.dataset == "silo":
        return cfg.explicit_classnames()
    return list(load_dataset(cfg.dataset, cfg.data_root, tuple(cfg.explicit_classnames()), cfg.seed).classnames)


def node_class_list(node: NodeConfig, cfg: RunConfig) -> tuple[list[str], str]:
    """The class list this node holds the server's digest against, and where it comes from."""
    if node.classnames:
        return parse_classnames(node.classnames), "node config 'classnames'"
    source = "run config 'classnames'" if cfg.dataset == "silo" else f"this node's {cfg.dataset} data set"
    return run_class_list(cfg), source
