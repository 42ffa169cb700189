"""What a node trains and evaluates on: cached image features of its share of a data set (simulation with a
partitioner) or of its own silo (deployment), split into training records and the evaluation sets of the
run's protocol:

* pathological (DP-FPL): ``local`` (own classes) and ``neighbor`` (the other clients' classes), classifier over
  all C classes;
* dirichlet (CIFAR): ``local`` (own Dirichlet test shard), classifier over all C classes;
* base-novel (FedPGP): ``local`` and ``base`` with the base-class classifier, ``novel`` with the novel-class
  classifier (novel class names are never seen in training);
* silo: ``local`` (the organization's own test images).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from functools import lru_cache

import numpy as np
import torch

from .config import NodeConfig, RunConfig
from .data.images import ImageDataset
from .data.partition import Partition, partition_dataset
from .data.registry import load_dataset
from .data.silo import SiloError, load_silo
from .features import augmented_train_features, dataset_features, silo_features
from .models import LoadedModel
from .run_classes import run_class_list

log = logging.getLogger("dpfpl.node")

NOVEL = "novel"  # an evaluation set scored with the novel-class classifier


@dataclass
class EvalSet:
    features: torch.Tensor
    labels: torch.Tensor  # indices into the classifier's class list
    classifier: str = "task"  # "task": the training classifier; "novel": the novel classes' classifier


@dataclass
class NodeData:
    classnames: list[str]  # the training classifier (all classes; base-novel: the base classes)
    own_classes: list[int]
    train_features: torch.Tensor  # (N, D), or (views, N, D) with augmentation
    train_labels: torch.Tensor
    evals: dict[str, EvalSet]
    protocol: str
    novel_classnames: list[str] = field(default_factory=list)

    @property
    def num_train(self) -> int:
        return len(self.train_labels)

    def to(self, device: torch.device) -> NodeData:
        return replace(
            self,
            train_features=self.train_features.to(device),
            train_labels=self.train_labels.to(device),
            evals={k: EvalSet(e.features.to(device), e.labels.to(device), e.classifier) for k, e in self.evals.items()},
        )

    def _eval(self, name: str) -> EvalSet:
        if name in self.evals:
            return self.evals[name]
        d = self.train_features.shape[-1]
        return EvalSet(self.train_features.new_zeros(0, d), self.train_labels[:0])

    # the DP-FPL protocol's two sets, by name (empty when the protocol has none)
    @property
    def local_features(self) -> torch.Tensor:
        return self._eval("local").features

    @property
    def local_labels(self) -> torch.Tensor:
        return self._eval("local").labels

    @property
    def neighbor_features(self) -> torch.Tensor:
        return self._eval("neighbor").features

    @property
    def neighbor_labels(self) -> torch.Tensor:
        return self._eval("neighbor").labels


def run_dataset(cfg: RunConfig) -> ImageDataset:
    return load_dataset(cfg.dataset, cfg.data_root, tuple(cfg.explicit_classnames()), cfg.seed)


def validation_flags(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Hold out ``fraction`` of each class's records (seeded): the validation split of a training set.

    Hyperparameters are chosen on it, never on test images; the held-out records are not trained on."""
    rng = np.random.default_rng(seed * 7_919 + 17)
    flags = np.zeros(len(labels), dtype=bool)
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        flags[idx[: int(round(fraction * len(idx)))]] = True
    return flags


def evaluation_indices(cfg: RunConfig, data: ImageDataset) -> np.ndarray:
    """The records the run evaluates on: the test split, or (evaluation = "validation") the held-out part of
    the training split. With validation, test images are never read by training or evaluation."""
    if cfg.evaluation == "test":
        return data.test_indices()
    train = data.train_indices()
    return train[validation_flags(data.labels[train], cfg.validation_fraction, cfg.seed)]


@lru_cache(maxsize=8)
def run_partition(cfg: RunConfig) -> Partition:
    """The run's partition: every node computes the same one from the seed (nothing about it is sent).

    With ``evaluation = "validation"`` the partition is drawn over the training split alone, its held-out
    records playing the test split's part; indices are mapped back to the data set's."""
    data = run_dataset(cfg)
    labels, is_test, back = data.labels, data.is_test, None
    if cfg.evaluation == "validation":
        back = data.train_indices()
        labels = data.labels[back]
        is_test = validation_flags(labels, cfg.validation_fraction, cfg.seed)
    part = partition_dataset(
        labels,
        is_test,
        data.classnames,
        cfg.partition,
        cfg.num_clients,
        cfg.seed,
        cfg.classes_per_client,
        cfg.dirichlet_alpha,
        cfg.min_samples_per_client,
        cfg.num_shots,
        cfg.num_domains,
    )
    if back is None:
        return part
    clients = [replace(c, train=back[c.train], test=back[c.test]) for c in part.clients]
    return replace(part, clients=clients, detail=part.detail + f", validation split {cfg.validation_fraction:g}")


def load_node_data(cfg: RunConfig, node: NodeConfig, model: LoadedModel, cache: str | None = None) -> NodeData:
    if cfg.dataset == "silo":
        return load_silo_data(cfg, node, model, cache)
    if node.partition_id is None:
        raise ValueError(
            f"dataset '{cfg.dataset}' is partitioned among simulated clients: the node config needs "
            "'partition-id' (an organization with its own data uses dataset = 'silo' and data-dir)"
        )
    data = run_dataset(cfg)
    part = run_partition(cfg)
    if node.partition_id >= len(part.clients):
        raise ValueError(f"partition-id {node.partition_id} >= num-clients {cfg.num_clients}")
    me = part.clients[node.partition_id]
    feats = dataset_features(model, data, cache)
    labels = torch.from_numpy(data.labels)
    if cfg.augment_views:
        views = augmented_train_features(model, data, cfg.augment_views, cfg.seed, cache)
        train_feats = views[:, torch.from_numpy(np.searchsorted(data.train_indices(), me.train))]
    else:
        train_feats = feats[torch.from_numpy(me.train)]
    test_idx = evaluation_indices(cfg, data)

    def records(idx: np.ndarray, offset: int = 0, classifier: str = "task") -> EvalSet:
        t = torch.from_numpy(idx)
        return EvalSet(feats[t], labels[t] - offset, classifier)

    def test_of(classes: list[int]) -> np.ndarray:
        return test_idx[np.isin(data.labels[test_idx], classes)]

    classnames, novel_names = list(data.classnames), []
    evals = {"local": records(me.test)}
    if part.protocol == "pathological":
        others = sorted({c for i, p in enumerate(part.clients) if i != node.partition_id for c in p.classes})
        evals["neighbor"] = records(test_of(others))
    elif part.protocol == "base-novel":
        base, novel = part.base_classes or [], part.novel_classes or []
        classnames, novel_names = [data.classnames[c] for c in base], [data.classnames[c] for c in novel]
        evals["base"] = records(test_of(base))
        evals["novel"] = records(test_of(novel), offset=len(base), classifier=NOVEL)  # novel labels start at 0
    log.info(
        "node %d: %d training records of %d classes (%s partition)",
        node.partition_id,
        len(me.train),
        len(me.classes),
        part.protocol,
    )
    return NodeData(
        classnames, list(me.classes), train_feats, labels[torch.from_numpy(me.train)], evals, part.protocol, novel_names
    )


def load_silo_data(cfg: RunConfig, node: NodeConfig, model: LoadedModel, cache: str | None = None) -> NodeData:
    """Silo mode: the node's own images (checked against the run's class list), local test set only."""
    data_dir = node.data_dir
    if not data_dir and cfg.silo_root and node.partition_id is not None:
        data_dir = f"{cfg.silo_root}/{node.partition_id}"
    if not data_dir:
        raise SiloError(
            "dataset = 'silo' needs the node config key 'data-dir' (the organization's image folder), "
            "or silo-root in the run config when simulating"
        )
    classnames = run_class_list(cfg)
    silo = load_silo(data_dir, classnames, seed=cfg.seed)
    feats = silo_features(model, silo, cache)
    labels = torch.from_numpy(silo.labels)
    test = torch.from_numpy(silo.is_test)
    own = sorted(set(silo.labels.tolist()))
    return NodeData(classnames, own, feats[~test], labels[~test], {"local": EvalSet(feats[test], labels[test])}, "silo")
