import numpy as np
from safetensors.torch import load_file

from dpfpl.common.data.demo import DEMO_CLASSES, TRAIN, load_demo_dataset
from dpfpl.common.data.partition import pathological_partition
from dpfpl.common.data.registry import demo_image_dataset
from dpfpl.common.models import build_demo_backbone


def test_demo_dataset_has_20_named_classes_and_a_per_class_split():
    data = load_demo_dataset()
    assert data.classnames == DEMO_CLASSES and len(DEMO_CLASSES) == 20
    assert data.images.shape[1:] == (32, 32) and len(data.images) == 10_000 + 1_797
    for c in range(20):
        in_class = data.labels == c
        assert 0.15 < data.is_test[in_class].mean() < 0.25  # every class is split, ~20% test
        assert 0.25 < data.is_public[in_class].mean() < 0.35  # ~30% public (the backbone's)
        assert (data.split[in_class] == TRAIN).mean() > 0.4  # the rest: the clients' training records


def _image_set(images: np.ndarray) -> set[bytes]:
    return {x.tobytes() for x in images}


def test_no_client_or_test_image_is_seen_in_pretraining(tmp_path, monkeypatch):
    """The backbone is pretrained on exactly the public part; no image a client trains or is evaluated on (not
    even an exact duplicate of one) is in it, and the clients' view of the data holds no public image."""
    import dpfpl.common.models as models

    data = load_demo_dataset()
    pretrained_on = []
    real_pixels = models.demo_pixels
    monkeypatch.setattr(
        models, "demo_pixels", lambda images: pretrained_on.append(images.copy()) or real_pixels(images)
    )
    build_demo_backbone(seed=0, cache=str(tmp_path), progress=False, steps=1)
    assert len(pretrained_on) == 1
    assert np.array_equal(pretrained_on[0], data.images[data.public_records()])
    seen = _image_set(pretrained_on[0])
    clients = demo_image_dataset()
    client_images = data.images[data.private_records()]
    assert len(clients) == len(client_images) == len(data.images) - len(data.public_records())
    assert np.array_equal(clients.source.arrays, client_images)
    assert not seen & _image_set(client_images)  # neither train nor test records, nor copies of them
    train_images = _image_set(clients.source.arrays[~clients.is_test])
    assert not train_images & _image_set(clients.source.arrays[clients.is_test])  # train and test disjoint too
    assert set(clients.labels.tolist()) == set(range(20))


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
