import numpy as np
from safetensors.torch import load_file

from dpfpl.common.data.demo import DEMO_CLASSES, load_demo_dataset
from dpfpl.common.data.partition import pathological_partition
from dpfpl.common.models import build_demo_backbone


def test_demo_dataset_has_20_named_classes_and_a_per_class_split():
    data = load_demo_dataset()
    assert data.classnames == DEMO_CLASSES and len(DEMO_CLASSES) == 20
    assert data.images.shape[1:] == (32, 32) and len(data.images) == 10_000 + 1_797
    for c in range(20):
        in_class = data.labels == c
        frac = data.is_test[in_class].mean()
        assert 0.15 < frac < 0.25  # every class is split, ~20% test


def test_pathological_partition_is_disjoint_seeded_and_complete():
    parts = pathological_partition(20, 10, 2, seed=0)
    flat = [c for p in parts for c in p]
    assert sorted(flat) == list(range(20)) and all(len(p) == 2 for p in parts)
    assert parts == pathological_partition(20, 10, 2, seed=0)
    assert parts != pathological_partition(20, 10, 2, seed=1)


def test_demo_backbone_build_is_deterministic_for_a_seed(tmp_path):
    a = build_demo_backbone(seed=3, cache=str(tmp_path / "a"), progress=False, steps=5)
    b = build_demo_backbone(seed=3, cache=str(tmp_path / "b"), progress=False, steps=5)
    c = build_demo_backbone(seed=4, cache=str(tmp_path / "c"), progress=False, steps=5)
    wa, wb, wc = load_file(str(a)), load_file(str(b)), load_file(str(c))
    assert all(np.array_equal(wa[k].numpy(), wb[k].numpy()) for k in wa)
    assert any(not np.array_equal(wa[k].numpy(), wc[k].numpy()) for k in wa)
    assert build_demo_backbone(seed=3, cache=str(tmp_path / "a"), progress=False, steps=5) == a  # cached
