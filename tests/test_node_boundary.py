"""The node holds its own line: it checks every release with its own accountant, keeps every run's state and a
ledger across runs, and never lets its training-set size leave. The ClientApp's handlers are called as Flower
calls them (the real-process versions of these checks are in tests/test_node_boundary_flower.py)."""

import json
import math
import subprocess
import sys

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.common import MessageType

import dpfpl.client_app.app as client_module
from dpfpl.client_app.node import PrivacyBudgetSpent, declared_sample_rate
from dpfpl.client_app.state import NodeState, load_run_state
from dpfpl.common.classlist import DIGEST_KEY, class_list_digest
from dpfpl.common.config import NodeConfig, RunConfig
from dpfpl.common.privacy import (
    accounting_sample_rate,
    calibrate_noise_multiplier,
    combined_noise_multiplier,
    epsilon_for,
)
from dpfpl.common.privacy.calibration import global_noise_multiplier
from dpfpl.common.privacy.ledger import LEDGER_FILE, PrivacyLedger
from dpfpl.common.run_classes import run_class_list

DIGEST = class_list_digest(run_class_list(RunConfig()))
ROUNDS, TARGET, BATCH, Q = 3, 1.0, 16, 0.02
RUN = dict(
    num_clients=10,
    classes_per_client=2,
    batch_size=BATCH,
    num_server_rounds=ROUNDS,
    target_epsilon=TARGET,
    sample_rate=Q,
)


def _context(tmp_path, run_dir="run", node=None, **run):
    cfg = RunConfig(run_dir=str(tmp_path / run_dir), **{**RUN, **run})
    state_dir = tmp_path / "node"
    return Context(
        run_id=1,
        node_id=100,
        node_config={"partition-id": 0, "num-partitions": 10, "state-dir": str(state_dir), **(node or {})},
        state=RecordDict(),
        run_config=cfg.to_flower(),
    )


def _calibrated_z_global(q=Q, rounds=ROUNDS):
    return global_noise_multiplier(TARGET, q, rounds, 1e-5, "published", True)


def _msg(kind, server_round, token="run-a", z_global=None, p_global=None):
    config = {"server-round": server_round, "run-token": token, DIGEST_KEY: DIGEST}
    if kind == MessageType.TRAIN:
        config["noise-multiplier-global"] = _calibrated_z_global() if z_global is None else z_global
    else:
        config["phase"] = "zeroshot" if server_round == 0 else "evaluate"
    records = {"config": ConfigRecord(config)}
    if p_global is not None:
        records["arrays"] = ArrayRecord({"global-prompt": p_global})
    return Message(content=RecordDict(records), dst_node_id=1, message_type=kind)


@pytest.fixture()
def p_global():
    return torch.randn(16, 128, generator=torch.Generator().manual_seed(0)) * 0.02


def _train(ctx, server_round, p_global, **kw):
    return client_module.train(_msg(MessageType.TRAIN, server_round, p_global=p_global, **kw), ctx)


def _snapshot(state_dir):
    """Every file of the node's state, by content (what 'nothing of its state is lost' means)."""
    return {p.relative_to(state_dir): p.read_bytes() for p in sorted(state_dir.rglob("*")) if p.is_file()}


def test_the_sample_rate_is_declared_never_computed_from_the_records():
    cfg = RunConfig(batch_size=32)
    assert declared_sample_rate(cfg, NodeConfig(sample_rate=0.07), 10_000) == 0.07
    assert declared_sample_rate(RunConfig(batch_size=32, sample_rate=0.05), NodeConfig(), 10_000) == 0.05
    # simulation: the simulated operator declares B / its partition's planned size
    assert declared_sample_rate(cfg, NodeConfig(partition_id=3), 640) == pytest.approx(0.05)
    # a deployed node under DP with nothing declared is refused, with what to do
    with pytest.raises(ValueError, match="sample-rate"):
        declared_sample_rate(cfg, NodeConfig(state_dir="/x"), 640)


def test_train_and_evaluate_replies_carry_the_declared_rate_and_not_the_training_set_size(
    tmp_path, cache_dir, p_global
):
    ctx = _context(tmp_path)
    train = dict(_train(ctx, 1, p_global).content["metrics"])
    evaluation = dict(client_module.evaluate(_msg(MessageType.EVALUATE, 1, p_global=p_global), ctx).content["metrics"])
    for metrics in (train, evaluation):
        assert metrics["sample-rate"] == Q
        assert "num-examples" not in metrics and "batch-size" not in metrics and "client-seconds" not in metrics
    assert "train-loss" not in train  # under DP the batch's loss stays on the node
    assert evaluation["noisy-steps"] == 1.0


def test_a_node_refuses_half_the_global_noise_and_loses_nothing(tmp_path, cache_dir, p_global):
    ctx = _context(tmp_path)
    _train(ctx, 1, p_global)
    before = _snapshot(tmp_path / "node")
    with pytest.raises(PrivacyBudgetSpent, match="past its limit 1.0000"):
        _train(ctx, 2, p_global, z_global=_calibrated_z_global() / 2)
    assert _snapshot(tmp_path / "node") == before  # nothing released, nothing charged, nothing lost
    _train(ctx, 2, p_global)  # the calibrated z_G is still taken
    assert len(NodeState.load(tmp_path / "node").accountant.history) == 2


def test_a_node_refuses_one_round_more_than_calibrated(tmp_path, cache_dir, p_global):
    ctx = _context(tmp_path)
    for r in range(1, ROUNDS + 1):
        _train(ctx, r, p_global)
    state = NodeState.load(tmp_path / "node")
    assert state.accountant.epsilon_published() <= TARGET * (1 + 1e-6)
    before = _snapshot(tmp_path / "node")
    with pytest.raises(PrivacyBudgetSpent, match="privacy budget spent"):
        _train(ctx, ROUNDS + 1, p_global)
    assert _snapshot(tmp_path / "node") == before


def test_a_node_refuses_a_larger_sample_rate_than_its_noise_was_calibrated_for(tmp_path, cache_dir, p_global):
    """The server's run config cannot buy a larger q: z_L was calibrated at the first step, and the limit holds
    for the rate actually used."""
    _train(_context(tmp_path), 1, p_global)
    with pytest.raises(PrivacyBudgetSpent):
        _train(_context(tmp_path, sample_rate=0.5), 2, p_global)


def test_a_to_b_to_a_resumes_a_with_its_prompt_optimizer_and_books(tmp_path, cache_dir, p_global):
    ctx_a, ctx_b = _context(tmp_path, "run-a", momentum=0.9), _context(tmp_path, "run-b", momentum=0.9)
    _train(ctx_a, 1, p_global, token="A")
    _train(ctx_a, 2, p_global, token="A")
    a = NodeState.load(tmp_path / "node")
    _train(ctx_b, 1, p_global, token="B")
    assert NodeState.load(tmp_path / "node").run_key == "B"
    kept = load_run_state(tmp_path / "node", "A")
    assert torch.equal(kept.local["p_local"], a.local["p_local"])
    _train(ctx_a, 3, p_global, token="A")  # A comes back
    back = NodeState.load(tmp_path / "node")
    assert back.run_key == "A" and back.last_round == 3 and len(back.accountant.history) == 3
    assert not torch.equal(back.local["p_local"], a.local["p_local"])  # it trained on from A's prompt
    assert set(back.momentum) == set(a.momentum) and back.momentum  # its optimizer state came back
    assert len(load_run_state(tmp_path / "node", "B").accountant.history) == 1  # B is kept in turn
    ledger = PrivacyLedger.of(tmp_path / "node")
    assert {k: r.count for k, r in ledger.runs.items()} == {"A": 3, "B": 1}


def test_the_ledger_composes_every_run_on_the_same_records(tmp_path, cache_dir, p_global):
    _train(_context(tmp_path, "run-a"), 1, p_global, token="A")
    _train(_context(tmp_path, "run-b"), 1, p_global, token="B")
    ledger = PrivacyLedger.of(tmp_path / "node")
    one = ledger.epsilon(1e-5, "A")
    z = combined_noise_multiplier(*next(iter(ledger.runs["A"].steps))[:2])
    assert one == pytest.approx(epsilon_for(z, accounting_sample_rate(Q), 1, 1e-5), rel=1e-6)
    # two runs of one step each: the composition of both, more than either alone
    assert ledger.epsilon(1e-5) == pytest.approx(epsilon_for(z, accounting_sample_rate(Q), 2, 1e-5), rel=1e-6)
    assert ledger.epsilon(1e-5) > one


def test_a_run_past_the_lifetime_epsilon_is_refused_at_setup_with_the_ledger(tmp_path, cache_dir, p_global):
    node = {"lifetime-epsilon": 1.1}  # one run fits (1.0), two compose to 1.16
    ctx_a = _context(tmp_path, "run-a", node=node)
    client_module.evaluate(_msg(MessageType.EVALUATE, 0, token="A", p_global=p_global), ctx_a)  # fits
    for r in range(1, ROUNDS + 1):
        _train(ctx_a, r, p_global, token="A")
    ctx_b = _context(tmp_path, "run-b", node=node)
    with pytest.raises(PrivacyBudgetSpent, match="lifetime-epsilon 1.1") as refused:
        client_module.evaluate(_msg(MessageType.EVALUATE, 0, token="B", p_global=p_global), ctx_b)
    assert "composed, all runs" in str(refused.value) and "A" in str(refused.value)
    # a server that sends B's train messages anyway gets steps only while the lifetime holds
    with pytest.raises(PrivacyBudgetSpent, match="lifetime-epsilon"):
        for r in range(1, ROUNDS + 1):
            _train(ctx_b, r, p_global, token="B")
    ledger = PrivacyLedger.of(tmp_path / "node")
    assert ledger.runs["B"].count < ROUNDS and ledger.epsilon(1e-5) <= 1.1


def test_a_damaged_ledger_falls_back_and_charges_one_more_step(tmp_path, cache_dir, p_global):
    ctx = _context(tmp_path)
    _train(ctx, 1, p_global)
    _train(ctx, 2, p_global)
    path = tmp_path / "node" / LEDGER_FILE
    path.write_text(path.read_text()[:-20])  # torn
    ledger = PrivacyLedger.of(tmp_path / "node")
    # the previous copy (2 steps: the ledger's last write of a step only settles its charge, see
    # tests/test_durable_state.py) + the conservative charge: the reader cannot tell which write was lost
    assert ledger.runs["run-a"].count == 3
    data = json.loads((tmp_path / "node" / (LEDGER_FILE + ".prev")).read_text())
    data["sha256"] = "0" * 64
    (tmp_path / "node" / (LEDGER_FILE + ".prev")).write_text(json.dumps(data))
    with pytest.raises(Exception, match="refuses to train rather than forget"):
        PrivacyLedger.of(tmp_path / "node")


def test_a_fallback_to_the_previous_state_draws_a_fresh_secret_seed(tmp_path, cache_dir, p_global):
    from dpfpl.client_app.node import PromptNode
    from dpfpl.common.atomic import read_state

    ctx = _context(tmp_path)
    _train(ctx, 1, p_global)
    _train(ctx, 2, p_global)
    previous_rng = read_state(tmp_path / "node" / "local_state.safetensors.prev").tensors["rng_state"]
    state_file = tmp_path / "node" / "local_state.safetensors"
    state_file.write_bytes(state_file.read_bytes()[:100])  # damaged: the node falls back to .prev
    node = PromptNode(RunConfig.from_flower(ctx.run_config), NodeConfig.from_flower(ctx.node_config))
    state = node._state("run-a", _calibrated_z_global())
    assert state.from_previous
    assert not torch.equal(state.generator.get_state(), previous_rng)  # not the lost step's sample again
    assert len(state.accountant.history) == 2  # the previous copy's step + the lost step charged again


def test_dpfpl_ledger_prints_every_run_and_the_composed_total(tmp_path, cache_dir, p_global):
    _train(_context(tmp_path, "run-a"), 1, p_global, token="A")
    _train(_context(tmp_path, "run-b"), 1, p_global, token="B")
    out = subprocess.run(
        [sys.executable, "-m", "dpfpl.cli", "ledger", "--state-dir", str(tmp_path / "node")],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    total = PrivacyLedger.of(tmp_path / "node").epsilon(1e-5)
    assert "A" in out and "B" in out and f"{total:.4f}" in out and "composed, all runs" in out


def test_each_calibration_limits_the_node_to_what_its_own_calibration_promises(tmp_path, cache_dir, p_global):
    """calibrate-for = each: the node allows the composed epsilon of both releases calibrated at its own rate,
    and refuses a z_G below that calibration."""
    z = calibrate_noise_multiplier(TARGET, Q, ROUNDS, 1e-5)
    ctx = _context(tmp_path, calibrate_for="each")
    _train(ctx, 1, p_global, z_global=z)
    with pytest.raises(PrivacyBudgetSpent):
        _train(ctx, 2, p_global, z_global=z * 0.5)
    assert math.isfinite(NodeState.load(tmp_path / "node").accountant.epsilon_published())


def test_the_clientapp_refuses_to_send_a_field_the_inventory_does_not_classify():
    from flwr.app import MetricRecord

    from dpfpl.client_app.app import leave
    from dpfpl.client_app.request import NodeRequest
    from dpfpl.common.wire import UnclassifiedField

    request = NodeRequest(
        content=RecordDict(), run_config={}, node_config={}, node_id=1, operation="train", clientapp_age=None
    )
    ok = RecordDict({"metrics": MetricRecord({"server-round": 1, "sample-rate": 0.1})})
    assert leave(request, ok) is ok
    leaking = RecordDict({"metrics": MetricRecord({"server-round": 1, "num-examples": 640.0})})
    with pytest.raises(UnclassifiedField, match="metrics/num-examples"):
        leave(request, leaking)


def test_steps_whose_replies_never_reached_the_books_are_booked_from_the_evaluation_reply():
    """A node's last train replies may be rejected or lost; the evaluation reply reports its step count, and the
    server's books (and so epsilon-published-max) take it."""
    from flwr.app import MetricRecord

    from dpfpl.common.runtag import run_tag

    from .test_reply_validation import ROUND, _strategy

    strategy = _strategy()
    before = strategy.privacy_maxima()["epsilon-published-max"]
    request = Message(content=RecordDict(), dst_node_id=1, message_type=MessageType.EVALUATE)
    request.metadata.__dict__["_src_node_id"] = 0
    metrics = {"server-round": ROUND, "run-tag": run_tag("t"), "noisy-steps": 4.0, "local-acc": 0.5}
    reply = Message(content=RecordDict({"metrics": MetricRecord(metrics)}), reply_to=request)
    reply.metadata.__dict__["_src_node_id"] = 1
    strategy.aggregate_evaluate(ROUND, [reply])
    assert strategy.state.node_steps["1"] == 4
    assert strategy.privacy_maxima()["epsilon-published-max"] > before


@pytest.mark.parametrize("key", ["target_epsilon", "lr_global", "noise_multiplier_local", "delta"])
def test_a_non_finite_config_value_is_refused_with_its_key(key):
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match=key):
        RunConfig(**{key: math.inf})
    with pytest.raises(ValidationError, match="lifetime_epsilon"):
        NodeConfig(lifetime_epsilon=math.nan)


def test_a_re_sent_reply_released_again_is_refused_past_the_lifetime(tmp_path, cache_dir, p_global):
    """The second release of a re-sent reply is checked against the lifetime budget as a step is: one step
    composes to about 1.6 here, its re-release to about 3.0, and the node's lifetime is 2."""
    ctx = _context(tmp_path, target_epsilon=3.0, num_server_rounds=30, node={"lifetime-epsilon": 2.0})
    z = global_noise_multiplier(3.0, Q, 30, 1e-5, "published", True)
    _train(ctx, 1, p_global, z_global=z)
    before = _snapshot(tmp_path / "node")
    msg = _msg(MessageType.TRAIN, 1, p_global=p_global, z_global=z)
    msg.content["config"]["rerelease"] = True
    with pytest.raises(PrivacyBudgetSpent, match="re-send refused.*lifetime-epsilon 2"):
        client_module.train(msg, ctx)
    assert _snapshot(tmp_path / "node") == before
