"""Every method on the one engine: what it shares, where its noise goes, its FedPGP loss term."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.common import MessageType

import dpfpl.client_app.app as client_module
from dpfpl.client_app.state import NodeState
from dpfpl.common.classlist import DIGEST_KEY, class_list_digest
from dpfpl.common.config import METHOD_NAMES, RunConfig
from dpfpl.common.methods import ContrastiveLoss, DpSettings, PromptLearner, SgdSettings, build_method
from dpfpl.common.privacy import PrivacyAccountant, combined_noise_multiplier, epsilon_for
from dpfpl.common.run_classes import run_class_list

TRAINING = [m for m in METHOD_NAMES if m != "zeroshot"]
LOCAL_KEYS = {
    "coop": {"p_local"},
    "promptfl": set(),
    "fedotp": {"p_local"},
    "fedpgp": {"u", "v"},
    "dpfpl-noresidual": {"p_local"},
    "dpfpl": {"p_local"},
    "secfpp": {"p_local"},
}


def _step(learner, p_global, local, dp, gen, feats, labels):
    return learner.train_step(p_global, local, {}, feats, labels, 8, dp, SgdSettings(0.5), gen)


@pytest.mark.parametrize("name", TRAINING)
def test_local_noise_changes_only_the_local_state(name, encoder, batch):
    """Same sample, same factorization: LDP noise on vs off changes the local tensors and never the reply."""
    feats, labels = batch
    learner = PromptLearner(build_method(name, rank=2), encoder, 20.0)
    gen = torch.Generator().manual_seed(11)
    local = learner.init_local(gen)
    assert set(local) == LOCAL_KEYS[name]
    p_global = torch.randn(8, encoder.width, generator=gen) * 0.02 if learner.method.shares_global else None
    quiet = _step(learner, p_global, local, DpSettings(True, 0.0, 1.0, 1.0), copy.deepcopy(gen), feats, labels)
    noisy = _step(learner, p_global, local, DpSettings(True, 3.0, 1.0, 1.0), copy.deepcopy(gen), feats, labels)
    assert quiet.batch_size == noisy.batch_size > 0
    if learner.method.shares_global:
        assert torch.equal(quiet.global_grad, noisy.global_grad)
        assert 0 < float(quiet.global_grad.norm()) <= 1.0 * quiet.batch_size / 8 + 1e-5  # clipped to C_G = 1
    else:
        assert quiet.global_grad is None and noisy.global_grad is None
    for key in LOCAL_KEYS[name]:
        assert not torch.equal(quiet.local[key], local[key])  # the step moved it
        assert not torch.allclose(quiet.local[key], noisy.local[key], atol=1e-4)  # and the noise did too


@pytest.mark.parametrize("name", TRAINING)
def test_without_dp_the_step_is_plain_gradient_descent(name, encoder, batch):
    """dp off: the reply is the un-clipped batch gradient sum / B and the local tensors follow plain SGD
    on their own autograd gradients (FedPGP: including mu * L_con)."""
    feats, labels = batch
    learner = PromptLearner(build_method(name, rank=2), encoder, 20.0)
    gen = torch.Generator().manual_seed(4)
    local = learner.init_local(gen)
    p_global = torch.randn(8, encoder.width, generator=gen) * 0.02
    replay = copy.deepcopy(gen)
    out = _step(learner, p_global, local, DpSettings(False, 0.0, 1.0, 1.0), gen, feats, labels)
    idx = (torch.rand(len(feats), generator=replay) < 8 / len(feats)).nonzero().flatten()
    aux = learner.method.local.prepare(local, replay) if learner.method.local else None
    leaves = {k: v.clone().requires_grad_(True) for k, v in local.items()}
    pg = p_global.clone().requires_grad_(True)
    ctx = learner.method.local.context(leaves, aux) if learner.method.local else None
    if name == "dpfpl" or name == "dpfpl-noresidual":  # factors are functions of p_L: differentiate the context
        ctx = ctx.detach().requires_grad_(True)
    prompt = learner._compose(pg, ctx)
    loss = F.cross_entropy(20.0 * feats[idx] @ encoder(prompt).t(), labels[idx], reduction="sum") / 8
    if name == "fedpgp":
        hand = encoder.handcrafted_features().detach()
        loss = loss + len(idx) / 8 * 0.5 * ContrastiveLoss(0.5, 0.5).loss(encoder(pg), encoder(prompt), hand)
    wrt = [pg] if learner.method.shares_global else []
    wrt += [ctx] if name.startswith("dpfpl") else list(leaves.values())
    grads = torch.autograd.grad(loss, wrt)
    if learner.method.shares_global:
        assert torch.allclose(out.global_grad, grads[0], atol=1e-5)
        grads = grads[1:]
    if name.startswith("dpfpl"):
        u, v, _ = aux
        p_u, p_v = u @ u.t(), v.t() @ v
        g = grads[0]
        expected = {"p_local": local["p_local"] - 0.5 * (p_u @ g + g @ p_v - p_u @ g @ p_v)}
    else:
        expected = {k: local[k] - 0.5 * g for k, g in zip(leaves, grads)}
    for key, value in expected.items():
        assert torch.allclose(out.local[key], value, atol=1e-5), key


def test_fedpgp_reply_includes_the_contrastive_gradient(encoder, batch):
    """mu = 0 is plain p_G + U V; mu > 0 changes the reply by exactly the contrastive gradient's share."""
    feats, labels = batch
    gen = torch.Generator().manual_seed(9)
    p_global = torch.randn(8, encoder.width, generator=gen) * 0.02
    plain = PromptLearner(build_method("fedpgp", rank=2, contrastive_weight=0.0), encoder, 20.0)
    guided = PromptLearner(build_method("fedpgp", rank=2, contrastive_weight=0.5), encoder, 20.0)
    local = plain.init_local(gen)
    dp = DpSettings(False, 0.0, 1.0, 1.0)
    a = _step(plain, p_global, local, dp, copy.deepcopy(gen), feats, labels)
    b = _step(guided, p_global, local, dp, copy.deepcopy(gen), feats, labels)
    hand = encoder.handcrafted_features().detach()
    pg = p_global.clone().requires_grad_(True)
    l_con = ContrastiveLoss(0.5, 0.5).loss(encoder(pg), encoder(pg + local["u"] @ local["v"]), hand)
    (g_con,) = torch.autograd.grad(l_con, pg)
    assert torch.allclose(b.global_grad - a.global_grad, a.batch_size / 8 * 0.5 * g_con, atol=1e-5)


@pytest.mark.parametrize("name", METHOD_NAMES)
def test_reply_carries_exactly_what_the_method_shares(name, tmp_path, cache_dir):
    cfg = RunConfig(
        run_dir=str(tmp_path / "run"),
        method=name,
        num_clients=10,
        batch_size=8,
        n_ctx=4,
        rank=2,
        num_server_rounds=3,
        target_epsilon=1.0,
    )
    ctx = Context(
        run_id=1,
        node_id=5,
        node_config={"partition-id": 0, "num-partitions": 10},
        state=RecordDict(),
        run_config=cfg.to_flower(),
    )
    method = build_method(name)
    records = {
        "config": ConfigRecord(
            {
                "server-round": 1,
                "run-token": "tok",
                "noise-multiplier-global": 2.0 if method.shares_global else math.inf,
                DIGEST_KEY: class_list_digest(run_class_list(cfg)),
            }
        )
    }
    if method.shares_global:
        records["arrays"] = ArrayRecord({"global-prompt": torch.zeros(4, 128)})
    msg = Message(content=RecordDict(records), dst_node_id=1, message_type=MessageType.TRAIN)
    if not method.trains:
        with pytest.raises(ValueError, match="does not train"):
            client_module.train(msg, ctx)
        return
    reply = client_module.train(msg, ctx)
    arrays = {k: list(reply.content[k].keys()) for k in reply.content.array_records}
    assert arrays == ({"arrays": ["global-grad"]} if method.shares_global else {})
    assert list(reply.content.config_records.keys()) == []
    metrics = dict(reply.content["metrics"])
    assert ("epsilon-local" in metrics) == (method.local is not None)
    assert metrics["epsilon-published"] > 0
    state = NodeState.load(tmp_path / "run" / "nodes" / "node-0")
    assert set(state.local) == LOCAL_KEYS[name]


def test_a_missing_release_costs_nothing_in_the_accountant():
    acc = PrivacyAccountant(1e-5)
    for _ in range(5):
        acc.record_step(math.inf, 2.0, 0.1)  # PromptFL: no local release
    assert acc.epsilon_local() == 0.0
    assert (
        acc.epsilon_published() == pytest.approx(acc.epsilon_global()) == pytest.approx(epsilon_for(2.0, 0.1, 5, 1e-5))
    )
    assert combined_noise_multiplier(math.inf, 3.0) == pytest.approx(3.0)
    assert math.isinf(combined_noise_multiplier(math.inf, math.inf))


def test_zeroshot_has_nothing_to_learn(encoder):
    learner = PromptLearner(build_method("zeroshot"), encoder, 20.0)
    assert learner.init_local(torch.Generator()) == {} and learner.personalized_prompt(None, {}) is None
    assert torch.allclose(learner.text_features(None, {}), encoder.handcrafted_features())


def test_unknown_method_is_rejected_with_the_list():
    with pytest.raises(ValueError, match="choose one of zeroshot, coop"):
        build_method("fedavg")


def test_the_residual_makes_the_forward_context_exactly_p_local():
    """DP-FPL's context U v + r is p_L. Without r (the ablation, as the official code runs it) U and v are both
    orthonormalized, so the context U v has k unit singular values whatever the scale of p_L: a random
    rank-k partial isometry drawn afresh every step. On the demo backbone (token embeddings of norm ~0.2)
    it swamps the prompt and the ablation does not learn; docs/results explains it."""
    from dpfpl.common.methods import RefactorizedLocal

    gen = torch.Generator().manual_seed(0)
    state = {"p_local": torch.randn(16, 64, generator=gen) * 0.02}
    with_r, without_r = RefactorizedLocal(4, residual=True), RefactorizedLocal(4, residual=False)
    assert torch.allclose(with_r.context(state, with_r.prepare(state, gen)), state["p_local"], atol=1e-6)
    singular = torch.linalg.svdvals(without_r.context(state, without_r.prepare(state, gen)))
    assert torch.allclose(singular[:4], torch.ones(4), atol=1e-5) and float(singular[4:].abs().max()) < 1e-5


@pytest.mark.parametrize("name", [m for m in TRAINING if m != "dpfpl-noresidual"])
def test_a_few_rounds_without_dp_beat_zero_shot_on_local_classes(name, tmp_path, cache_dir):
    """The whole app (ServerApp round loop + ClientApps, in-process transport) on the embedded default."""
    from dpfpl.inprocess import run_inprocess

    summary = run_inprocess(
        {
            "method": name,
            "num-clients": 3,
            "classes-per-client": 2,
            "min-clients": 3,
            "num-server-rounds": 3,
            "eval-every": 1,
            "eval-last": 2,
            "dp": False,
            "lr-global": 0.05,
            "lr-local": 0.05,
            "batch-size": 64,
            "run-dir": str(tmp_path / "run"),
            "resume": False,
        },
        num_nodes=3,
    )
    assert summary["rounds"] == 3 and summary["method"] == name
    assert summary["last-rounds-mean"]["evaluations"] == 2
    assert summary["final"]["local-acc"] > summary["zeroshot"]["local-acc"] + 0.02


def test_zeroshot_run_reports_the_handcrafted_prompts(tmp_path, cache_dir):
    from dpfpl.inprocess import run_inprocess

    summary = run_inprocess(
        {
            "method": "zeroshot",
            "num-clients": 3,
            "classes-per-client": 2,
            "min-clients": 3,
            "num-server-rounds": 5,
            "run-dir": str(tmp_path / "run"),
            "resume": False,
        },
        num_nodes=3,
    )
    assert summary["rounds"] == 0
    assert summary["final"]["local-acc"] == summary["zeroshot"]["local-acc"]
    assert summary["last-rounds-mean"]["local-acc"] == summary["zeroshot"]["local-acc"]
