"""Evaluation protocols end to end: what a node trains and is tested on under each partition, the metrics it
reports, augmented views encoded once, and a whole run on an on-disk data set with the base-to-novel protocol."""

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from dpfpl.common.config import NodeConfig, RunConfig
from dpfpl.common.evaluation import harmonic_mean


def _cfg(**overrides) -> RunConfig:
    from dpfpl.inprocess import full_run_config

    return RunConfig.from_flower(full_run_config(overrides))


def test_harmonic_mean():
    assert harmonic_mean([0.9, 0.6, 0.45]) == pytest.approx(3 / (1 / 0.9 + 1 / 0.6 + 1 / 0.45))
    assert harmonic_mean([0.9, 0.0, 0.5]) == 0.0
    assert math.isnan(harmonic_mean([0.9, math.nan, 0.5]))
    # FedPGP's Table 1 check (reference/peers.md): HM(95.67, 85.69, 81.75) = 87.33
    assert harmonic_mean([95.67, 85.69, 81.75]) == pytest.approx(87.32, abs=0.01)


def test_base_novel_node_data_uses_base_and_novel_classifiers(tiny_model, cache_dir):
    from dpfpl.common.node_data import NOVEL, load_node_data, run_partition

    cfg = _cfg(partition="base-novel", **{"num-clients": 5, "classes-per-client": 2, "num-shots": 8})
    data = load_node_data(cfg, NodeConfig(partition_id=1), tiny_model, str(cache_dir))
    part = run_partition(cfg)
    assert data.protocol == "base-novel" and len(data.classnames) == 10 and len(data.novel_classnames) == 10
    assert set(data.classnames).isdisjoint(data.novel_classnames)
    assert set(data.evals) == {"local", "base", "novel"} and data.evals["novel"].classifier == NOVEL
    assert sorted(set(data.train_labels.tolist())) == part.clients[1].classes  # its own base classes only
    assert data.num_train == 16  # 8 shots x 2 classes
    assert int(data.evals["novel"].labels.max()) < 10 and int(data.evals["novel"].labels.min()) == 0
    assert set(data.evals["base"].labels.tolist()) == set(range(10))
    assert set(data.evals["local"].labels.tolist()) == set(part.clients[1].classes)


def test_dirichlet_node_data_has_only_a_local_test_shard(tiny_model, cache_dir):
    from dpfpl.common.node_data import load_node_data, run_partition

    cfg = _cfg(partition="dirichlet", **{"num-clients": 4, "dirichlet-alpha": 0.5})
    data = load_node_data(cfg, NodeConfig(partition_id=2), tiny_model, str(cache_dir))
    part = run_partition(cfg)
    assert set(data.evals) == {"local"} and len(data.classnames) == 20
    assert data.num_train == len(part.clients[2].train) and len(data.local_labels) == len(part.clients[2].test)
    assert len(data.neighbor_labels) == 0


def test_a_node_reports_the_protocols_metrics(tmp_path, cache_dir):
    """PromptNode.evaluate on a base-novel run: local/base/novel accuracy and the per-client HM."""
    from dpfpl.client_app.node import PromptNode

    cfg = _cfg(
        partition="base-novel",
        method="dpfpl",
        **{
            "model-name": "dpfpl-demo-tiny",
            "pretrained": "none",
            "num-clients": 5,
            "classes-per-client": 2,
            "num-shots": 8,
            "n-ctx": 4,
            "rank": 2,
            "dp": False,
            "run-dir": str(tmp_path / "run"),
        },
    )
    node = PromptNode(cfg, NodeConfig(partition_id=0, cache_dir=str(cache_dir)))
    zs = node.evaluate(None, "token", zeroshot=True)
    assert {"local-acc", "base-acc", "novel-acc", "hm", "local-loss"} <= set(zs)
    assert zs["hm"] == pytest.approx(harmonic_mean([zs["local-acc"], zs["base-acc"], zs["novel-acc"]]))
    assert "neighbor-acc" not in zs


def _write_dataset(root, classes, n_train, n_test, size=40):
    """A class-per-folder data set of real PNGs whose classes differ in color, so a prompt can learn them."""
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("test", n_test)):
        for k, cls in enumerate(classes):
            hue = np.array([(k * 53) % 256, (k * 97) % 256, (k * 151) % 256])
            for i in range(n):
                img = np.clip(hue + rng.normal(0, 25, (size, size, 3)), 0, 255).astype(np.uint8)
                (root / split / cls).mkdir(parents=True, exist_ok=True)
                Image.fromarray(img).save(root / split / cls / f"{i}.png")


def test_augmented_views_are_encoded_once_per_view_and_seeded(tmp_path, tiny_model, cache_dir, monkeypatch):
    from dpfpl.common import features
    from dpfpl.common.data.folder import load_folder_dataset

    _write_dataset(tmp_path, ["red", "green"], n_train=3, n_test=1)
    data = load_folder_dataset(tmp_path)
    views = features.augmented_train_features(tiny_model, data, 3, seed=0, cache=str(cache_dir))
    assert views.shape == (3, 6, tiny_model.model.text_projection.shape[1])
    plain = features.dataset_features(tiny_model, data, str(cache_dir))[torch.from_numpy(data.train_indices())]
    assert not torch.allclose(views[0], views[1]) and not torch.allclose(views[0], plain)
    # second call: read from the cache, the image tower does not run again
    monkeypatch.setattr(features, "_encode_records", lambda *a, **k: pytest.fail("encoded twice"))
    assert torch.equal(features.augmented_train_features(tiny_model, data, 3, seed=0, cache=str(cache_dir)), views)


def test_the_engine_draws_one_view_per_sampled_record(encoder, tiny_model):
    from dpfpl.common.methods import DpSettings, PromptLearner, SgdSettings, build_method

    learner = PromptLearner(build_method("coop", 2, 0.5, 0.5), encoder, 10.0)
    gen = torch.Generator().manual_seed(0)
    d = tiny_model.model.text_projection.shape[1]
    feats = torch.nn.functional.normalize(torch.randn(2, 30, d, generator=gen), dim=-1)
    labels = torch.randint(0, 6, (30,), generator=gen)
    local = learner.init_local(gen)
    out = learner.train_step(
        None, local, {}, feats, labels, 8, DpSettings(True, 1.0, 10.0, 10.0), SgdSettings(0.1, 0.0, 0.0), gen
    )
    assert out.batch_size > 0 and torch.isfinite(out.local["p_local"]).all()


def test_a_run_on_an_on_disk_data_set_with_the_base_to_novel_protocol(tmp_path, cache_dir):
    """The whole app (ServerApp round loop + ClientApps, in-process transport) on a class-folder data set:
    the summary states the protocol and reports local/base/novel/HM; novel classes never enter training."""
    from dpfpl.inprocess import run_inprocess

    classes = ["red", "green", "blue", "yellow", "purple", "orange", "teal", "pink"]
    _write_dataset(tmp_path / "data", classes, n_train=6, n_test=3)
    summary = run_inprocess(
        {
            "dataset": "folder",
            "data-root": str(tmp_path / "data"),
            "partition": "base-novel",
            "model-name": "dpfpl-demo-tiny",
            "pretrained": "none",
            "method": "dpfpl",
            "num-clients": 2,
            "classes-per-client": 2,
            "min-clients": 2,
            "num-server-rounds": 2,
            "eval-every": 1,
            "eval-last": 2,
            "dp": True,
            "target-epsilon": 0.0,
            "noise-multiplier-local": 1.0,
            "noise-multiplier-global": 1.0,
            "batch-size": 4,
            "n-ctx": 4,
            "rank": 2,
            "augment-views": 2,
            "run-dir": str(tmp_path / "run"),
            "resume": False,
        },
        num_nodes=2,
        node_config={"cache-dir": str(cache_dir)},
    )
    assert summary["evaluation-protocol"]["name"] == "base-novel"
    assert summary["evaluation-protocol"]["augment-views"] == 2
    for key in ("local-acc", "base-acc", "novel-acc", "hm", "hm-of-means"):
        assert key in summary["final"] and 0.0 <= summary["final"][key] <= 1.0
    assert summary["last-rounds-mean"]["evaluations"] == 2
    per_client = summary["final-per-client"]
    assert sorted(per_client) == ["partition-0", "partition-1"]  # named by partition, stable across runs
    for key in ("local-acc", "base-acc", "novel-acc", "hm"):
        assert np.mean([c[key] for c in per_client.values()]) == pytest.approx(summary["final"][key])
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert "novel-acc" in rows[0] and rows[0]["phase"] == "zeroshot"
