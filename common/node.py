"""What a node trains and evaluates on: its silo's cached image features, split into train, local test
and neighbor test (DP-FPL's protocol), for the embedded demo data set."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .config import NodeConfig, RunConfig
from .data.demo import load_demo_dataset
from .data.partition import pathological_partition
from .features import demo_features
from .models import LoadedModel


@dataclass
class NodeData:
    classnames: list[str]
    own_classes: list[int]
    train_features: torch.Tensor
    train_labels: torch.Tensor
    local_features: torch.Tensor
    local_labels: torch.Tensor
    neighbor_features: torch.Tensor
    neighbor_labels: torch.Tensor

    @property
    def num_train(self) -> int:
        return len(self.train_labels)


def load_node_data(cfg: RunConfig, node: NodeConfig, model: LoadedModel, cache: str | None = None) -> NodeData:
    if cfg.dataset == "silo":
        return load_silo_data(cfg, node, model, cache)
    if node.partition_id is None:
        raise ValueError("the demo data set is partitioned in simulation: the node config needs 'partition-id'")
    data = load_demo_dataset()
    parts = pathological_partition(len(data.classnames), cfg.num_clients, cfg.classes_per_client, cfg.seed)
    if node.partition_id >= len(parts):
        raise ValueError(f"partition-id {node.partition_id} >= num-clients {cfg.num_clients}")
    own = parts[node.partition_id]
    others = sorted({c for i, p in enumerate(parts) if i != node.partition_id for c in p})
    feats = demo_features(model, cache)
    labels = torch.from_numpy(data.labels)
    is_test = torch.from_numpy(data.is_test)

    def select(classes: list[int], test: bool) -> tuple[torch.Tensor, torch.Tensor]:
        mask = torch.from_numpy(np.isin(data.labels, classes)) & (is_test if test else ~is_test)
        return feats[mask], labels[mask]

    return NodeData(data.classnames, own, *select(own, False), *select(own, True), *select(others, True))


def load_silo_data(cfg: RunConfig, node: NodeConfig, model: LoadedModel, cache: str | None = None) -> NodeData:
    """Silo mode: the node's own images (checked against the run's class list), no neighbor test set."""
    from .data.silo import SiloError, load_silo
    from .features import silo_features

    data_dir = node.data_dir
    if not data_dir and cfg.silo_root and node.partition_id is not None:
        data_dir = f"{cfg.silo_root}/{node.partition_id}"
    if not data_dir:
        raise SiloError("dataset = 'silo' needs the node config key 'data-dir' (the organization's image folder), "
                        "or silo-root in the run config when simulating")
    classnames = cfg.class_list()
    silo = load_silo(data_dir, classnames, seed=cfg.seed)
    feats = silo_features(model, silo, cache)
    labels = torch.from_numpy(silo.labels)
    test = torch.from_numpy(silo.is_test)
    own = sorted(set(silo.labels.tolist()))
    empty_f, empty_l = feats[:0], labels[:0]
    return NodeData(classnames, own, feats[~test], labels[~test], feats[test], labels[test], empty_f, empty_l)
