"""The ClientApp's handlers, called as Flower calls them, with node state on disk."""

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.common import MessageType

import dpfpl.client_app.app as client_module
from dpfpl.client_app.prompt_handlers import prompt_node
from dpfpl.client_app.state import NodeState
from dpfpl.common.classlist import DIGEST_KEY, class_list_digest
from dpfpl.common.config import NodeConfig, RunConfig
from dpfpl.common.methods.dpfpl import factorize
from dpfpl.common.privacy import clip_per_sample, per_sample_grads
from dpfpl.common.run_classes import run_class_list

DEMO_DIGEST = class_list_digest(run_class_list(RunConfig()))  # what the server sends with every instruction
RUN = dict(num_clients=10, classes_per_client=2, batch_size=16, num_server_rounds=5, target_epsilon=1.0)


def _context(tmp_path, partition_id, **run):
    cfg = RunConfig(run_dir=str(tmp_path / "run"), **{**RUN, **run})
    return Context(
        run_id=1,
        node_id=partition_id + 100,
        node_config={"partition-id": partition_id, "num-partitions": 10},
        state=RecordDict(),
        run_config=cfg.to_flower(),
    )


def _train_msg(p_global, server_round, token="tok", z_global=2.0, digest=DEMO_DIGEST, rerelease=False):
    content = RecordDict(
        {
            "arrays": ArrayRecord({"global-prompt": p_global}),
            "config": ConfigRecord(
                {
                    "server-round": server_round,
                    "run-token": token,
                    "noise-multiplier-global": z_global,
                    "rerelease": rerelease,
                    DIGEST_KEY: digest,
                }
            ),
        }
    )
    return Message(content=content, dst_node_id=1, message_type=MessageType.TRAIN)


@pytest.fixture()
def p_global():
    return torch.randn(16, 128, generator=torch.Generator().manual_seed(0)) * 0.02


def test_local_state_persists_across_invocations_and_is_separate_per_node(tmp_path, cache_dir, p_global):
    ctx0 = _context(tmp_path, 0)
    client_module.train(_train_msg(p_global, 1), ctx0)
    dir0 = tmp_path / "run" / "nodes" / "node-0"
    first = NodeState.load(dir0)
    assert first.last_round == 1 and len(first.accountant.history) == 1
    # a new Context stands for a fresh ClientApp process: only the disk carries state
    client_module.train(_train_msg(p_global, 2), _context(tmp_path, 0))
    second = NodeState.load(dir0)
    assert second.last_round == 2 and len(second.accountant.history) == 2
    assert not torch.equal(first.local["p_local"], second.local["p_local"])
    client_module.train(_train_msg(p_global, 1), _context(tmp_path, 1))
    other = NodeState.load(tmp_path / "run" / "nodes" / "node-1")
    assert other.last_round == 1 and not torch.equal(other.local["p_local"], second.local["p_local"])
    assert NodeState.load(dir0).last_round == 2  # untouched by node 1


def test_reply_carries_only_the_clipped_global_gradient(tmp_path, cache_dir, p_global):
    """What leaves the node: exactly 'global-grad' = sum_j clip(g_j) / B, plus numeric metrics."""
    ctx = _context(tmp_path, 3)
    client_module.train(_train_msg(p_global, 1), ctx)  # creates p_L on disk
    state_dir = tmp_path / "run" / "nodes" / "node-3"
    before = NodeState.load(state_dir)
    reply = client_module.train(_train_msg(p_global, 2), ctx)

    assert list(reply.content.array_records.keys()) == ["arrays"]
    assert list(reply.content["arrays"].keys()) == ["global-grad"]
    assert list(reply.content.config_records.keys()) == []
    metrics = dict(reply.content["metrics"])
    assert all(isinstance(v, (int, float)) for v in metrics.values())
    assert "train-loss" not in metrics  # a non-private function of the batch stays on the node under DP
    sent = torch.from_numpy(reply.content["arrays"]["global-grad"].numpy().copy())

    # Recompute independently: replay the node's Poisson sample at p_G + p_L, clip per sample, divide by B.
    node = prompt_node(RunConfig.from_flower(dict(ctx.run_config)), NodeConfig.from_flower(dict(ctx.node_config)))
    gen = before.generator
    n = node.data.num_train
    idx = (torch.rand(n, generator=gen) < 16 / n).nonzero().flatten()
    factorize(before.local["p_local"], 8, gen)
    feats, labels = node.data.train_features[idx], node.data.train_labels[idx]
    scale = float(node.model.model.logit_scale.exp())
    fn = lambda p: torch.nn.functional.cross_entropy(scale * feats @ node.encoder(p).t(), labels, reduction="none")
    g, _ = per_sample_grads(fn, p_global + before.local["p_local"])
    expected = clip_per_sample(g, 10.0).sum(0) / 16
    assert torch.allclose(sent, expected, atol=1e-5)

    # No private vector is in the message: no row of p_L (before or after the step), of its factor v, or of the
    # node's features appears anywhere in the sent bytes as a contiguous run. (Single float values can
    # coincide by chance; a whole 128-value row cannot.)
    after = NodeState.load(state_dir)
    blob = np.concatenate([np.asarray(a.numpy()).ravel() for a in reply.content["arrays"].values()])
    windows = np.lib.stride_tricks.sliding_window_view(blob, 128)
    _, v, _ = factorize(before.local["p_local"], 8, torch.Generator().manual_seed(0))
    for private in (before.local["p_local"], after.local["p_local"], v, node.data.train_features[:5]):
        rows = private.numpy().reshape(-1, 128)
        assert not (windows[:, None, :] == rows[None]).all(-1).any()


def test_zero_shot_and_personalized_evaluation(tmp_path, cache_dir, p_global):
    ctx = _context(tmp_path, 2)
    msg = Message(
        content=RecordDict(
            {
                "config": ConfigRecord(
                    {"phase": "zeroshot", "server-round": 0, "run-token": "tok", DIGEST_KEY: DEMO_DIGEST}
                )
            }
        ),
        dst_node_id=1,
        message_type=MessageType.EVALUATE,
    )
    metrics = dict(client_module.evaluate(msg, ctx).content["metrics"])
    assert 0.0 <= metrics["local-acc"] <= 1.0 and 0.0 <= metrics["neighbor-acc"] <= 1.0
    # the declared sample rate (public) leaves, the training-set size does not
    assert 0 < metrics["sample-rate"] <= 1 and "num-examples" not in metrics


def test_a_message_parses_its_configuration_once_and_an_evaluation_reads_the_state_once(
    tmp_path, cache_dir, p_global, monkeypatch
):
    """The ClientApp parses a message's run and node configuration once, whichever handlers and checks read it
    (client_app/context.py); an evaluation under DP reads the node's state once for its prompt and its books."""
    import dpfpl.client_app.node as node_module

    parsed, loads = [], []
    for model in (RunConfig, NodeConfig):
        original = model.from_flower.__func__
        monkeypatch.setattr(
            model, "from_flower", classmethod(lambda cls, c, f=original: parsed.append(cls.__name__) or f(cls, c))
        )
    original_load = node_module.load_run_state
    monkeypatch.setattr(node_module, "load_run_state", lambda *a: loads.append(a) or original_load(*a))
    ctx = _context(tmp_path, 4)
    client_module.train(_train_msg(p_global, 1), ctx)
    assert sorted(parsed) == ["NodeConfig", "RunConfig"]
    parsed.clear()
    config = {"phase": "round", "server-round": 1, "run-token": "tok", DIGEST_KEY: DEMO_DIGEST}
    msg = Message(
        content=RecordDict({"arrays": ArrayRecord({"global-prompt": p_global}), "config": ConfigRecord(config)}),
        dst_node_id=1,
        message_type=MessageType.EVALUATE,
    )
    metrics = dict(client_module.evaluate(msg, ctx).content["metrics"])
    assert sorted(parsed) == ["NodeConfig", "RunConfig"]
    assert len(loads) == 1 and metrics["noisy-steps"] == 1.0


def test_a_bad_silo_fails_before_training_without_sending_file_names(tmp_path, caplog):
    from PIL import Image

    silo = tmp_path / "silo"
    (silo / "cat").mkdir(parents=True)
    (silo / "unicorn").mkdir()
    Image.new("RGB", (32, 32)).save(silo / "cat" / "patient-0042.png")
    Image.new("RGB", (32, 32)).save(silo / "unicorn" / "patient-0043.png")
    cfg = RunConfig(
        run_dir=str(tmp_path / "run"),
        dataset="silo",
        classnames="cat,dog",
        model_name="dpfpl-demo-tiny",
        pretrained="none",
        num_clients=2,
        classes_per_client=1,
        target_epsilon=1.0,
    )
    ctx = Context(
        run_id=1,
        node_id=7,
        node_config={"data-dir": str(silo), "state-dir": str(tmp_path / "state")},
        state=RecordDict(),
        run_config=cfg.to_flower(),
    )
    with caplog.at_level("ERROR"), pytest.raises(RuntimeError) as err:
        client_module.train(_train_msg(torch.zeros(16, 128), 1, digest=class_list_digest(["cat", "dog"])), ctx)
    assert "patient" not in str(err.value) and "unicorn" not in str(err.value)
    assert "unicorn" in caplog.text  # the node's own log says what is wrong
    assert not (tmp_path / "state" / "local_state.safetensors").exists()


def test_a_re_sent_round_gets_the_same_reply_without_a_new_step(tmp_path, cache_dir, p_global):
    """After a server restart the last round may be sent again: the node answers with what it already sent,
    so the local prompt is not stepped twice and the accountant counts one release. A round the server re-runs
    after falling back to an older checkpoint is flagged: that reply is released a second time, and booked so."""
    ctx = _context(tmp_path, 4, num_server_rounds=20)  # room in the budget for the re-release
    first = client_module.train(_train_msg(p_global, 1), ctx)
    state_dir = tmp_path / "run" / "nodes" / "node-4"
    after_first = NodeState.load(state_dir)
    again = client_module.train(_train_msg(p_global, 1), _context(tmp_path, 4, num_server_rounds=20))  # a fresh process
    after_again = NodeState.load(state_dir)
    sent = lambda m: m.content["arrays"]["global-grad"].numpy()  # noqa: E731
    np.testing.assert_array_equal(sent(first), sent(again))
    # the same metrics, except the handler's own wall time (client-seconds, the benchmark's measure)
    same = lambda m: {k: v for k, v in dict(m.content["metrics"]).items() if k != "client-seconds"}  # noqa: E731
    assert same(first) == same(again)
    assert after_again.accountant.history == after_first.accountant.history  # a round cut short: nothing new
    assert torch.equal(after_again.local["p_local"], after_first.local["p_local"])
    # the server fell back and re-runs round 1: the same reply gets fresh global noise, booked as one release of
    # the batch at the combined multiplier 2 / sqrt(2), in the run's books and in the node's ledger
    client_module.train(_train_msg(p_global, 1, rerelease=True), ctx)
    rebooked = NodeState.load(state_dir)
    assert len(rebooked.accountant.history) == 1
    assert rebooked.accountant.history[0][1] == pytest.approx(2.0 / np.sqrt(2.0))
    assert rebooked.accountant.epsilon_published() > after_first.accountant.epsilon_published()
    from dpfpl.common.privacy.ledger import PrivacyLedger

    assert [m[1] for m in PrivacyLedger.of(state_dir).runs["tok"].steps] == [pytest.approx(2.0 / np.sqrt(2.0))]
    client_module.train(_train_msg(p_global + 1.0, 1), ctx)  # same round, another p_G: a real step
    assert len(NodeState.load(state_dir).accountant.history) == 2
    client_module.train(_train_msg(p_global, 2), ctx)  # the next round trains as usual
    assert len(NodeState.load(state_dir).accountant.history) == 3


def test_a_node_refuses_steps_beyond_its_calibrated_budget(tmp_path, cache_dir, p_global):
    from dpfpl.client_app.node import PrivacyBudgetSpent

    ctx = _context(tmp_path, 6, num_server_rounds=2)
    for r in (1, 2):
        client_module.train(_train_msg(p_global, r), ctx)
    with pytest.raises(PrivacyBudgetSpent, match="privacy budget spent"):
        client_module.train(_train_msg(p_global, 3), ctx)
    assert len(NodeState.load(tmp_path / "run" / "nodes" / "node-6").accountant.history) == 2
