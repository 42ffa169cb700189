"""Partitioner invariants: disjointness, every record assigned once, seeded reproducibility, alpha behaviour,
base/novel separation and few-shot counts."""

import math

import numpy as np
import pytest

from dpfpl.common.data.images import DatasetError
from dpfpl.common.data.partition import (
    base_novel_classes,
    dirichlet_partition,
    few_shot,
    partition_dataset,
    pathological_partition,
)


def toy_labels(num_classes=20, per_class_train=30, per_class_test=10, seed=0):
    rng = np.random.default_rng(seed)
    labels = np.concatenate(
        [np.repeat(np.arange(num_classes), per_class_train), np.repeat(np.arange(num_classes), per_class_test)]
    )
    is_test = np.concatenate(
        [np.zeros(num_classes * per_class_train, bool), np.ones(num_classes * per_class_test, bool)]
    )
    order = rng.permutation(len(labels))  # records in no particular order, as on disk
    return labels[order], is_test[order], [f"c{i}" for i in range(num_classes)]


def _assert_exact_cover(parts, universe):
    joined = np.concatenate(parts)
    assert len(joined) == len(set(joined.tolist())), "a record is assigned twice"
    assert set(joined.tolist()) == set(universe.tolist()), "a record is not assigned"


def test_pathological_classes_are_disjoint_and_seeded():
    parts = pathological_partition(20, 10, 2, seed=3)
    assert all(len(p) == 2 for p in parts)
    assert sorted(c for p in parts for c in p) == list(range(20))
    assert pathological_partition(20, 10, 2, seed=3) == parts
    assert pathological_partition(20, 10, 2, seed=4) != parts
    with pytest.raises(DatasetError, match="num-clients x classes-per-client"):
        pathological_partition(20, 10, 3, seed=0)


def test_pathological_papers_rule_gives_the_remainder_to_the_last_client():
    pets = pathological_partition(37, 10, 0, seed=0)  # OxfordPets: 4 classes each, the last client only 1
    assert [len(p) for p in pets] == [4] * 9 + [1]
    flowers = pathological_partition(102, 10, 0, seed=0)
    assert [len(p) for p in flowers] == [10] * 9 + [12]
    assert sorted(c for p in flowers for c in p) == list(range(102))


def test_pathological_partition_assigns_each_record_of_a_clients_classes_once():
    labels, is_test, names = toy_labels()
    part = partition_dataset(labels, is_test, names, "pathological", 5, seed=1, classes_per_client=4)
    _assert_exact_cover([c.train for c in part.clients], np.flatnonzero(~is_test))
    _assert_exact_cover([c.test for c in part.clients], np.flatnonzero(is_test))
    for c in part.clients:
        assert set(labels[c.train].tolist()) == set(c.classes) == set(labels[c.test].tolist())
        assert not is_test[c.train].any() and is_test[c.test].all()
    assert "client classes   train" in part.summary() and "c" in part.summary()


def test_dirichlet_covers_train_and_test_once_with_min_samples_and_is_seeded():
    labels, is_test, names = toy_labels(num_classes=10, per_class_train=60, per_class_test=20)
    part = partition_dataset(labels, is_test, names, "dirichlet", 8, seed=5, alpha=0.3, min_samples=10)
    _assert_exact_cover([c.train for c in part.clients], np.flatnonzero(~is_test))
    _assert_exact_cover([c.test for c in part.clients], np.flatnonzero(is_test))
    assert min(len(c.train) for c in part.clients) >= 10
    again = partition_dataset(labels, is_test, names, "dirichlet", 8, seed=5, alpha=0.3, min_samples=10)
    assert all(
        np.array_equal(a.train, b.train) and np.array_equal(a.test, b.test) for a, b in zip(part.clients, again.clients)
    )
    other = partition_dataset(labels, is_test, names, "dirichlet", 8, seed=6, alpha=0.3, min_samples=10)
    assert any(not np.array_equal(a.train, b.train) for a, b in zip(part.clients, other.clients))


def _mean_label_entropy(labels, parts, num_classes):
    ent = []
    for idx in parts:
        p = np.bincount(labels[idx], minlength=num_classes) / max(1, len(idx))
        ent.append(-(p[p > 0] * np.log(p[p > 0])).sum())
    return float(np.mean(ent))


def test_dirichlet_alpha_controls_the_label_skew_and_test_follows_train():
    labels, is_test, _ = toy_labels(num_classes=10, per_class_train=100, per_class_test=40)
    tr_labels, te_labels = labels[~is_test], labels[is_test]
    skewed = dirichlet_partition(tr_labels, te_labels, 10, alpha=0.05, min_samples=5, seed=0)
    uniform = dirichlet_partition(tr_labels, te_labels, 10, alpha=100.0, min_samples=5, seed=0)
    h_skewed = _mean_label_entropy(tr_labels, [tr for tr, _ in skewed], 10)
    h_uniform = _mean_label_entropy(tr_labels, [tr for tr, _ in uniform], 10)
    assert h_uniform > math.log(10) - 0.1  # near-uniform label mix per client
    assert h_skewed < h_uniform - 0.8
    # the same proportions split each class's train and test records (up to integer rounding, < 1 record each)
    n_tr, n_te = np.bincount(tr_labels, minlength=10), np.bincount(te_labels, minlength=10)
    for tr, te in skewed:
        share_tr = np.bincount(tr_labels[tr], minlength=10) / n_tr
        share_te = np.bincount(te_labels[te], minlength=10) / n_te
        assert np.all(np.abs(share_tr - share_te) <= 1 / n_tr + 1 / n_te + 1e-12)


def test_dirichlet_gives_a_clear_error_when_no_draw_satisfies_the_minimum():
    labels, is_test, _ = toy_labels(num_classes=4, per_class_train=5, per_class_test=2)
    with pytest.raises(DatasetError, match="min-samples-per-client"):
        dirichlet_partition(labels[~is_test], labels[is_test], 6, alpha=0.3, min_samples=4, seed=0)


def test_base_novel_split_keeps_novel_classes_out_of_training():
    assert base_novel_classes(37) == (list(range(19)), list(range(19, 37)))
    labels, is_test, names = toy_labels(num_classes=21)
    part = partition_dataset(labels, is_test, names, "base-novel", 5, seed=2, classes_per_client=2)
    assert part.base_classes == list(range(11)) and part.novel_classes == list(range(11, 21))
    owned = [c for client in part.clients for c in client.classes]
    assert len(owned) == len(set(owned)) == 10 and set(owned) <= set(part.base_classes)
    trained = np.concatenate([c.train for c in part.clients])
    assert set(labels[trained].tolist()).isdisjoint(part.novel_classes)
    assert "novel classes: 10" in part.summary()


def test_few_shot_keeps_k_records_per_class_and_reports_short_classes():
    labels, is_test, names = toy_labels(num_classes=6, per_class_train=12)
    train = np.flatnonzero(~is_test)
    kept, short = few_shot(train, labels, 4, seed=0)
    assert np.bincount(labels[kept]).tolist() == [4] * 6 and set(kept.tolist()) <= set(train.tolist())
    assert short == []
    kept16, short16 = few_shot(train, labels, 16, seed=0)
    assert len(kept16) == len(train) and short16 == list(range(6))
    assert not np.array_equal(few_shot(train, labels, 4, seed=1)[0], kept)
    part = partition_dataset(labels, is_test, names, "pathological", 3, seed=0, classes_per_client=2, num_shots=4)
    assert all(np.bincount(labels[c.train], minlength=6)[c.classes].tolist() == [4, 4] for c in part.clients)
    assert "4-shot" in part.summary()
