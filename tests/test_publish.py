"""Publishing a personalized prompt and using it: ``dpfpl export`` and ``dpfpl predict``.

The round trip must not change a single prediction: the file's prompt, run through the model it names, has to
give the in-memory learner's predictions (labels exactly, probabilities to float precision). A prompt used
with other weights or another class list, and an edited file, must be refused with a clear reason.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from dpfpl.cli import main
from dpfpl.common.data.silo import load_images
from dpfpl.common.features import encode_images
from dpfpl.common.methods import PromptLearner, build_method
from dpfpl.common.privacy import PrivacyAccountant
from dpfpl.common.prompt import PromptTextEncoder
from dpfpl.common.wire import outside_epsilon
from dpfpl.predict import PromptClassifier, image_paths
from dpfpl.publish import (
    PromptMismatchError,
    PublishedPromptError,
    accountant_privacy,
    build_published_prompt,
    load_prompt,
)

CLASSES = ["bear", "cat", "dog", "zebra", "horse"]


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """14 random RGB images in a folder tree (PNG and JPEG), as a user's files would be."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(3)
    (root / "sub").mkdir()
    for i in range(14):
        arr = rng.integers(0, 256, (40 + i, 36, 3), dtype=np.uint8)
        Image.fromarray(arr).save(
            root / ("sub" if i % 3 == 0 else ".") / f"img{i:02d}.{'jpg' if i % 4 == 0 else 'png'}"
        )
    return root


@pytest.fixture(scope="module")
def trained(tiny_model):
    """A dpfpl prompt with a non-trivial global and local part, and a real accountant history."""
    torch.set_num_threads(1)
    encoder = PromptTextEncoder(tiny_model.model, tiny_model.tokenizer, CLASSES, n_ctx=4)
    learner = PromptLearner(build_method("dpfpl", 2), encoder, float(tiny_model.model.logit_scale.exp()))
    gen = torch.Generator().manual_seed(5)
    p_global = 0.3 * torch.randn(4, encoder.width, generator=gen)
    local = {k: v + 0.3 * torch.randn(v.shape, generator=gen) for k, v in learner.init_local(gen).items()}
    accountant = PrivacyAccountant(1e-5)
    for _ in range(20):
        accountant.record_step(3.0, 4.0, 0.05)
    privacy = accountant_privacy(accountant, True, 1e-5, 3.0, 4.0, 0.5)
    published = build_published_prompt(
        learner, tiny_model, CLASSES, p_global, local, privacy, 2, source={"test": "publish"}
    )
    return learner, p_global, local, accountant, published


def _in_memory(learner, p_global, local, model, paths):
    feats = encode_images(model, load_images(paths, model.preprocess))
    with torch.no_grad():
        text = learner.text_features(p_global, local)
    return (learner.logit_scale * feats @ text.t()).softmax(-1)


def test_file_holds_prompt_parts_and_manifest_with_the_accountants_epsilon(trained, tiny_model, tmp_path):
    learner, p_global, local, accountant, published = trained
    path = published.save(tmp_path / "p.safetensors")
    loaded = load_prompt(path)
    m = loaded.manifest
    assert (m.model_name, m.method, m.n_ctx, m.rank, m.classnames) == ("dpfpl-demo-tiny", "dpfpl", 4, 2, CLASSES)
    assert m.pretrained == "none" and len(m.weights_sha256) == 64
    assert m.privacy.dp and m.privacy.noisy_steps == 20 and m.privacy.delta == 1e-5
    assert math.isclose(m.privacy.epsilon, accountant.epsilon_published(), rel_tol=1e-9)
    assert math.isclose(m.privacy.epsilon_local, accountant.epsilon_local(), rel_tol=1e-9)
    assert m.privacy.epsilon_local < m.privacy.epsilon  # composed with the global release: larger
    torch.testing.assert_close(loaded.prompt, learner.personalized_prompt(p_global, local), rtol=0, atol=0)
    torch.testing.assert_close(loaded.parts["global"], p_global, rtol=0, atol=0)
    torch.testing.assert_close(loaded.parts["global"] + loaded.parts["local"], loaded.prompt, rtol=1e-6, atol=1e-6)
    with safe_open(str(path), framework="pt") as fh:  # no factors, no optimizer state in the published file
        assert sorted(fh.keys()) == ["global", "local", "prompt"]


def test_predict_round_trip_equals_the_in_memory_model(trained, tiny_model, images, tmp_path):
    learner, p_global, local, _, published = trained
    path = published.save(tmp_path / "p.safetensors")
    paths = image_paths([images])
    assert len(paths) == 14
    expected = _in_memory(learner, p_global, local, tiny_model, paths)
    # the library path
    got = PromptClassifier(load_prompt(path), tiny_model).predict_files(paths, k=3, batch=5)
    # the command (a fresh model load by name and weights from the manifest)
    out = tmp_path / "pred.json"
    main(["predict", str(path), str(images), "-k", "3", "--out", str(out)])
    cli = json.loads(out.read_text())
    top_p, top_i = expected.topk(3, dim=-1)
    assert [p.source for p in got] == [str(p) for p in paths] == [r["image"] for r in cli]
    for row_p, row_i, lib, cmd in zip(top_p, top_i, got, cli):
        names = [CLASSES[i] for i in row_i.tolist()]
        assert lib.labels == names and cmd["labels"] == names
        np.testing.assert_allclose(lib.probabilities, row_p.tolist(), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(cmd["probabilities"], row_p.tolist(), rtol=1e-5, atol=1e-6)
    # the predictions are not trivial: the prompt separates the images into several classes
    assert len({r["labels"][0] for r in cli}) >= 2


def test_predict_prints_csv_and_top_k(trained, images, tmp_path, capsys):
    path = trained[-1].save(tmp_path / "p.safetensors")
    main(["predict", str(path), str(images / "img01.png"), str(images / "img02.png"), "-k", "2"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and all(sum(c in line.split() for c in CLASSES) == 2 for line in lines)
    main(["predict", str(path), str(images), "--out", str(tmp_path / "p.csv"), "-k", "1"])
    rows = (tmp_path / "p.csv").read_text().strip().splitlines()
    assert rows[0] == "image,rank,label,probability" and len(rows) == 15


def test_other_weights_are_refused_with_the_reason(trained, tiny_model, images, tmp_path, capsys):
    from safetensors.torch import save_file

    path = trained[-1].save(tmp_path / "p.safetensors")
    state = {k: v.clone().contiguous() for k, v in tiny_model.model.state_dict().items()}
    same = tmp_path / "same.safetensors"
    save_file(state, str(same))
    # the same weights at another path: accepted (content, not name, is checked)
    main(["predict", str(path), str(images / "img01.png"), "--pretrained", str(same)])
    assert "img01.png" in capsys.readouterr().out
    state["text_projection"] = state["text_projection"] + 1e-3
    other = tmp_path / "other.safetensors"
    save_file(state, str(other))
    with pytest.raises(SystemExit, match="not the ones the prompt was trained with"):
        main(["predict", str(path), str(images / "img01.png"), "--pretrained", str(other)])
    with pytest.raises(SystemExit, match="trained for 'dpfpl-demo-tiny'"):
        main(["predict", str(path), str(images), "--model", "ViT-B-32"])


def test_class_list_mismatch_is_refused(trained, tiny_model, images, tmp_path):
    published = trained[-1]
    PromptClassifier(published, tiny_model, CLASSES)  # the same list: fine
    with pytest.raises(PromptMismatchError, match="same names, different order"):
        PromptClassifier(published, tiny_model, list(reversed(CLASSES)))
    with pytest.raises(PromptMismatchError, match=r"not in the prompt: \['wolf'\]"):
        PromptClassifier(published, tiny_model, CLASSES[:-1] + ["wolf"])
    path = published.save(tmp_path / "p.safetensors")
    with pytest.raises(SystemExit, match="class list mismatch"):
        main(["predict", str(path), str(images), "--classnames", "cat,dog"])


def test_damaged_or_foreign_files_are_refused(trained, tmp_path, images):
    path = trained[-1].save(tmp_path / "p.safetensors")
    raw = bytearray(path.read_bytes())
    raw[-3] ^= 0xFF  # flip a bit of tensor data
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(bytes(raw))
    with pytest.raises(PublishedPromptError, match="digest"):
        load_prompt(bad)
    with pytest.raises(SystemExit, match="digest"):
        main(["predict", str(bad), str(images)])
    from safetensors.torch import save_file

    foreign = tmp_path / "foreign.safetensors"
    save_file({"prompt": torch.zeros(4, 8)}, str(foreign))
    with pytest.raises(PublishedPromptError, match="no dpfpl manifest"):
        load_prompt(foreign)
    with pytest.raises(SystemExit, match="does not exist"):
        main(["predict", str(path), str(tmp_path / "missing-folder")])


TINY_RUN = {
    "num-clients": 2,
    "classes-per-client": 2,
    "min-clients": 2,
    "num-server-rounds": 2,
    "eval-every": 2,
    "eval-last": 1,
    "batch-size": 8,
    "n-ctx": 4,
    "rank": 2,
    "lr-global": 0.05,
    "lr-local": 0.05,
    "pretrained": "none",
    "dp": True,
    "target-epsilon": 2.0,
    "calibrate-for": "published",
    "resume": False,
}


def test_export_of_a_federated_run_predicts_as_the_node(cache_dir, tmp_path, images, tiny_model):
    """A real (in-process) federation: node 1's exported prompt is the published prompt, the mean of p_G's and
    of its own p_L's last two iterates (not the final ones), its epsilon is the node's accountant's, its
    predictions are the node's, and its accuracy on the node's test records is the one the summary reports."""
    from dpfpl.client_app.node import PromptNode
    from dpfpl.client_app.state import NodeState
    from dpfpl.common.config import NodeConfig, RunConfig
    from dpfpl.common.evaluation import accuracy
    from dpfpl.inprocess import run_inprocess
    from dpfpl.server_app.checkpoint import RunDirectory

    run_dir = tmp_path / "run"
    config = {**TINY_RUN, "num-server-rounds": 3, "eval-every": 3, "publish-average": 2, "run-dir": str(run_dir)}
    summary = run_inprocess(config, 2, {"cache-dir": str(cache_dir)})
    out = tmp_path / "node1.safetensors"
    main(["export", str(run_dir), "--node", "1", "--out", str(out)])
    published = load_prompt(out)
    state = NodeState.load(run_dir / "nodes" / "node-1")
    server = RunDirectory(run_dir).load()
    m = published.manifest
    assert m.method == "dpfpl" and m.rank == 2 and m.n_ctx == 4 and len(m.classnames) == 20
    assert m.source["server-round"] == 3 and m.privacy.noisy_steps == len(state.accountant.history) == 3
    assert m.source["global-averaged-rounds"] == server.averaged_rounds == 2 == state.averaged_rounds
    assert math.isclose(m.privacy.epsilon, state.accountant.epsilon_published(), rel_tol=1e-9)
    assert m.privacy.epsilon <= 2.0 * 1.001  # calibrated for the published prompt's target
    # what the epsilon does not cover is named in the file, as in the run's summary: for a DP-FPL run that
    # evaluates, its evaluation replies and its reply timing
    assert m.privacy.excludes == outside_epsilon("dpfpl", True) == summary["privacy"]["excludes"]
    assert [text.split(":")[0] for text in m.privacy.excludes] == ["evaluation replies", "reply timing"]
    # the published parts are the means of the last two iterates, which differ from the final iterates
    torch.testing.assert_close(published.parts["global"], server.p_global_average, rtol=0, atol=0)
    torch.testing.assert_close(published.parts["local"], state.local_average, rtol=0, atol=0)
    assert not torch.equal(server.p_global_average, server.p_global)
    learner_final = build_method("dpfpl", 2).local.eval_context(state.local)
    assert not torch.equal(state.local_average, learner_final)
    encoder = PromptTextEncoder(tiny_model.model, tiny_model.tokenizer, m.classnames, 4)
    learner = PromptLearner(build_method("dpfpl", 2), encoder, float(tiny_model.model.logit_scale.exp()))
    paths = image_paths([images])
    feats = encode_images(tiny_model, load_images(paths, tiny_model.preprocess))
    with torch.no_grad():
        text = learner.text_features(server.p_global_average, state.local, local_context=state.local_average)
    expected = (feats @ text.t()).argmax(-1)
    got = PromptClassifier(published, tiny_model).predict_files(paths)
    assert [p.labels[0] for p in got] == [m.classnames[i] for i in expected.tolist()]
    # the summary's published accuracy of this node is the exported file's accuracy on its local test records
    node = PromptNode(
        RunConfig.from_flower(config), NodeConfig.from_flower({"partition-id": 1, "cache-dir": str(cache_dir)})
    )
    local_eval = node.data.evals["local"]
    with torch.no_grad():
        file_text = node.encoder(published.prompt.to(node.device))
    file_acc = accuracy(file_text, local_eval.features, local_eval.labels)
    assert summary["published-per-client"]["partition-1"]["local-acc"] == pytest.approx(file_acc, abs=1e-9)
    assert summary["published-prompt"]["average-of-last"] == 2 and summary["published-prompt"]["evaluated"]
    # node 0's prompt differs (its own local prompt), and a wrong node is a clear error
    main(["export", str(run_dir), "--node", "0", "--out", str(tmp_path / "node0.safetensors")])
    assert not torch.equal(load_prompt(tmp_path / "node0.safetensors").prompt, published.prompt)
    with pytest.raises(SystemExit, match="no node state"):
        main(["export", str(run_dir), "--node", "7", "--out", str(tmp_path / "x.safetensors")])
    with pytest.raises(SystemExit, match="not a dpfpl run directory"):
        main(["export", str(tmp_path), "--node", "0", "--out", str(tmp_path / "x.safetensors")])
