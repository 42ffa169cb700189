"""Partitioners for simulation: which records each client trains and is tested on, reproducible from a seed.

* ``pathological`` (DP-FPL): disjoint classes per client. ``classes-per-client = k`` deals k classes to each
  client; ``0`` is the papers' rule: round(C/N) classes each, the last client takes the remainder (so with
  OxfordPets' 37 classes and 10 clients the last client has one class, as in the official code).
  Evaluation: *local* = test images of the client's own classes, *neighbor* = test images of the other
  clients' classes; the classifier spans all C classes.
* ``dirichlet`` (CIFAR protocol, NIID-Bench's ``noniid-labeldir`` as the DP-FPL code uses it): for each class,
  proportions p ~ Dir(alpha * 1_N), clients already holding more than n/N training records get none of the
  next class; the same proportions split that class's training *and* test records. Redrawn until every
  client has at least ``min-samples-per-client`` training records. Evaluation: *local* only (the client's own
  test shard, as in the paper; there is no neighbor set).
* ``base-novel`` (FedPGP / CoCoOp protocol): the classes sorted by label, base = the first ceil(C/2), novel =
  the rest. Base classes are dealt pathologically (disjoint per client); novel classes are never trained on.
  Evaluation: *local* (own base classes, base classifier), *base* (all base test images, base classifier),
  *novel* (all novel test images, novel classifier) and HM(local, base, novel).

* ``multi-domain`` (SecFPP): the classes, in label order, are cut into ``num-domains`` contiguous blocks (the
  embedded default: the 10 animal silhouettes and the 10 digits); client k draws only from domain k mod D, and
  within its domain the records are split among that domain's clients with label skew Dir(alpha) (as
  ``dirichlet``, train and test alike). Evaluation: *local* (the client's own test shard; classifier over all
  classes). ``Partition.domains`` holds each client's domain, the ground truth a clustering is scored against.

``num-shots = k > 0`` keeps k training records per class of each client (few-shot; a class with fewer keeps
all it has, and the summary says so).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from .images import DatasetError

Protocol = Literal["pathological", "dirichlet", "base-novel", "multi-domain"]
PROTOCOLS: tuple[str, ...] = ("pathological", "dirichlet", "base-novel", "multi-domain")
MAX_DIRICHLET_DRAWS = 1000


def pathological_partition(num_classes: int, num_clients: int, classes_per_client: int, seed: int) -> list[list[int]]:
    """Disjoint classes per client: shuffle the class list with ``seed`` and deal them in turn
    (``classes_per_client = 0``: round(C/N) each, remainder to the last client)."""
    order = np.random.default_rng(seed).permutation(num_classes).tolist()
    if classes_per_client == 0:
        per = max(1, round(num_classes / num_clients))
        if per * (num_clients - 1) >= num_classes:
            raise DatasetError(
                f"pathological partition: {num_classes} classes cannot give each of {num_clients} "
                f"clients round(C/N) = {per} classes with some left for the last; use fewer clients"
            )
        parts = [order[i * per : (i + 1) * per] for i in range(num_clients - 1)] + [order[(num_clients - 1) * per :]]
        return [sorted(p) for p in parts]
    if num_clients * classes_per_client > num_classes:
        raise DatasetError(
            f"pathological partition needs num-clients x classes-per-client <= number of classes "
            f"({num_clients} x {classes_per_client} > {num_classes}); lower classes-per-client, or set it to 0 "
            "(the papers' round(C/N) rule)"
        )
    return [sorted(order[i * classes_per_client : (i + 1) * classes_per_client]) for i in range(num_clients)]


def dirichlet_partition(
    train_labels: np.ndarray, test_labels: np.ndarray, num_clients: int, alpha: float, min_samples: int, seed: int
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Positions into ``train_labels`` / ``test_labels`` for each client (train, test), label skew Dir(alpha)."""
    if alpha <= 0:
        raise DatasetError(f"dirichlet-alpha must be > 0, got {alpha}")
    if num_clients * min_samples > len(train_labels):
        raise DatasetError(
            f"dirichlet partition: {num_clients} clients x min-samples-per-client {min_samples} > "
            f"{len(train_labels)} training records"
        )
    rng = np.random.default_rng(seed)
    classes = np.unique(np.concatenate([train_labels, test_labels]))
    fair_share = len(train_labels) / num_clients
    for _ in range(MAX_DIRICHLET_DRAWS):
        train_parts: list[list[int]] = [[] for _ in range(num_clients)]
        test_parts: list[list[int]] = [[] for _ in range(num_clients)]
        for c in classes:
            tr = rng.permutation(np.flatnonzero(train_labels == c))
            te = rng.permutation(np.flatnonzero(test_labels == c))
            p = rng.dirichlet(np.full(num_clients, alpha))
            p = p * np.array([len(part) < fair_share for part in train_parts])  # balance, as NIID-Bench does
            p = p / p.sum() if p.sum() > 0 else np.full(num_clients, 1 / num_clients)
            cum = np.cumsum(p)[:-1]
            for parts, idx in ((train_parts, tr), (test_parts, te)):
                for k, chunk in enumerate(np.split(idx, (cum * len(idx)).astype(int))):
                    parts[k].extend(chunk.tolist())
        if min(len(p) for p in train_parts) >= min_samples:
            return [
                (np.sort(np.array(a, dtype=np.int64)), np.sort(np.array(b, dtype=np.int64)))
                for a, b in zip(train_parts, test_parts)
            ]
    raise DatasetError(
        f"dirichlet partition: no draw in {MAX_DIRICHLET_DRAWS} gave every one of {num_clients} "
        f"clients >= {min_samples} training records at alpha = {alpha}; raise dirichlet-alpha, lower "
        "min-samples-per-client or use fewer clients"
    )


def few_shot(indices: np.ndarray, labels: np.ndarray, shots: int, seed: int) -> tuple[np.ndarray, list[int]]:
    """At most ``shots`` records per class from ``indices`` (seeded); also the classes that had fewer."""
    rng = np.random.default_rng(seed)
    keep, short = [], []
    for c in np.unique(labels[indices]):
        idx = indices[labels[indices] == c]
        if len(idx) < shots:
            short.append(int(c))
        keep.append(rng.permutation(idx)[:shots])
    return (np.sort(np.concatenate(keep)) if keep else indices[:0]), short


def domain_blocks(num_classes: int, num_domains: int) -> list[list[int]]:
    """Classes 0..C-1 in label order cut into ``num_domains`` contiguous, nearly equal blocks."""
    if not 2 <= num_domains <= num_classes:
        raise DatasetError(f"multi-domain partition needs 2 <= num-domains <= {num_classes}, got {num_domains}")
    return [b.tolist() for b in np.array_split(np.arange(num_classes), num_domains)]


def multi_domain_partition(
    labels: np.ndarray,
    is_test: np.ndarray,
    num_classes: int,
    num_clients: int,
    num_domains: int,
    alpha: float,
    min_samples: int,
    seed: int,
) -> tuple[list[tuple[np.ndarray, np.ndarray]], list[int]]:
    """(train, test) record indices per client and each client's domain (client k: domain k mod D)."""
    if num_clients < num_domains:
        raise DatasetError(f"multi-domain partition: {num_clients} clients cannot cover {num_domains} domains")
    blocks = domain_blocks(num_classes, num_domains)
    domains = [k % num_domains for k in range(num_clients)]
    train_idx, test_idx = np.flatnonzero(~is_test), np.flatnonzero(is_test)
    out: list[tuple[np.ndarray, np.ndarray]] = [(np.empty(0, np.int64), np.empty(0, np.int64))] * num_clients
    for d, classes in enumerate(blocks):
        members = [k for k in range(num_clients) if domains[k] == d]
        tr = train_idx[np.isin(labels[train_idx], classes)]
        te = test_idx[np.isin(labels[test_idx], classes)]
        if len(members) == 1:
            out[members[0]] = (tr, te)
            continue
        positions = dirichlet_partition(labels[tr], labels[te], len(members), alpha, min_samples, seed * 31 + d)
        for k, (ptr, pte) in zip(members, positions):
            out[k] = (tr[ptr], te[pte])
    return out, domains


def base_novel_classes(num_classes: int) -> tuple[list[int], list[int]]:
    """CoOp's subsample_classes: labels sorted, base = the first ceil(C/2), novel = the rest."""
    n_base = math.ceil(num_classes / 2)
    return list(range(n_base)), list(range(n_base, num_classes))


@dataclass(frozen=True)
class ClientPart:
    classes: list[int]  # classes present in its training records
    train: np.ndarray  # record indices into the data set
    test: np.ndarray  # its local test records
    short_classes: list[int] = field(default_factory=list)  # few-shot: classes with fewer than num-shots records


@dataclass(frozen=True)
class Partition:
    protocol: str
    classnames: list[str]
    clients: list[ClientPart]
    seed: int
    base_classes: list[int] | None = None
    novel_classes: list[int] | None = None
    num_shots: int = 0
    detail: str = ""
    domains: list[int] | None = None  # multi-domain: each client's domain

    def summary(self, max_names: int = 6) -> str:
        """What each client holds: the printed check a user wants before hours of training."""
        head = f"partition: {self.protocol}{self.detail}, seed {self.seed}, {len(self.clients)} clients"
        if self.num_shots:
            head += f", {self.num_shots}-shot"
        lines = [head]
        if self.base_classes is not None:
            lines.append(
                f"  base classes: {len(self.base_classes)}, novel classes: {len(self.novel_classes or [])} "
                "(never trained on)"
            )
        lines.append(f"  {'client':>6} {'classes':>7} {'train':>7} {'test':>6}  class names")
        for i, part in enumerate(self.clients):
            names = [self.classnames[c] for c in part.classes[:max_names]]
            more = f", ... (+{len(part.classes) - max_names})" if len(part.classes) > max_names else ""
            short = f"  [{len(part.short_classes)} classes below {self.num_shots} shots]" if part.short_classes else ""
            domain = f"  [domain {self.domains[i]}]" if self.domains is not None else ""
            lines.append(
                f"  {i:>6} {len(part.classes):>7} {len(part.train):>7} {len(part.test):>6}  "
                f"{', '.join(names)}{more}{short}{domain}"
            )
        return "\n".join(lines)


def partition_dataset(
    labels: np.ndarray,
    is_test: np.ndarray,
    classnames: list[str],
    protocol: str,
    num_clients: int,
    seed: int,
    classes_per_client: int = 0,
    alpha: float = 0.3,
    min_samples: int = 10,
    num_shots: int = 0,
    num_domains: int = 2,
) -> Partition:
    """The partition of one data set (labels + test flags) for ``num_clients`` simulated clients."""
    train_idx, test_idx = np.flatnonzero(~is_test), np.flatnonzero(is_test)
    num_classes = len(classnames)

    def shots(part_train: np.ndarray, k: int) -> tuple[np.ndarray, list[int]]:
        return few_shot(part_train, labels, num_shots, seed * 7919 + k) if num_shots > 0 else (part_train, [])

    def by_classes(groups: list[list[int]]) -> list[ClientPart]:
        parts = []
        for k, classes in enumerate(groups):
            train, short = shots(train_idx[np.isin(labels[train_idx], classes)], k)
            parts.append(ClientPart(classes, train, test_idx[np.isin(labels[test_idx], classes)], short))
        return parts

    if protocol == "pathological":
        groups = pathological_partition(num_classes, num_clients, classes_per_client, seed)
        detail = f" ({classes_per_client} classes each)" if classes_per_client else " (round(C/N) classes each)"
        return Partition(protocol, classnames, by_classes(groups), seed, num_shots=num_shots, detail=detail)
    if protocol == "base-novel":
        base, novel = base_novel_classes(num_classes)
        try:
            local_order = pathological_partition(len(base), num_clients, classes_per_client, seed)
        except DatasetError as err:  # the split deals only the base half: say so
            raise DatasetError(
                f"base-novel partition deals the {len(base)} base classes of {num_classes} "
                f"(the other {len(novel)} are novel) -- {err}"
            ) from None
        groups = [[base[c] for c in g] for g in local_order]
        return Partition(protocol, classnames, by_classes(groups), seed, base, novel, num_shots)
    if protocol == "dirichlet":
        positions = dirichlet_partition(labels[train_idx], labels[test_idx], num_clients, alpha, min_samples, seed)
        parts = []
        for k, (tr, te) in enumerate(positions):
            train, short = shots(train_idx[tr], k)
            parts.append(ClientPart(sorted(set(labels[train].tolist())), train, test_idx[te], short))
        return Partition(protocol, classnames, parts, seed, num_shots=num_shots, detail=f" (alpha {alpha:g})")
    if protocol == "multi-domain":
        positions, domains = multi_domain_partition(
            labels, is_test, num_classes, num_clients, num_domains, alpha, min_samples, seed
        )
        parts = []
        for k, (tr, te) in enumerate(positions):
            train, short = shots(np.sort(tr), k)
            parts.append(ClientPart(sorted(set(labels[train].tolist())), train, np.sort(te), short))
        return Partition(
            protocol,
            classnames,
            parts,
            seed,
            num_shots=num_shots,
            detail=f" ({num_domains} domains, alpha {alpha:g})",
            domains=domains,
        )
    raise DatasetError(f"unknown partition '{protocol}'; choose one of {PROTOCOLS}")
