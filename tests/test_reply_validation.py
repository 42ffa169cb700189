"""Property-based: whatever a node sends, the strategy aggregates exactly the valid replies and p_G stays
finite. The oracle below restates the rules independently of the strategy's code."""

import math

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict
from flwr.common import MessageType
from hypothesis import given, settings
from hypothesis import strategies as st

from dpfpl.common.config import RunConfig
from dpfpl.common.runtag import run_tag
from dpfpl.server_app.checkpoint import ServerState
from dpfpl.server_app.strategy import PromptStrategy

SHAPE, ROUND, CLIP, BATCH, Q = (4, 16), 3, 10.0, 8, 0.5


def _strategy():
    cfg = RunConfig(
        run_dir="/nonexistent",
        num_clients=8,
        min_clients=1,
        batch_size=BATCH,
        lr_global=1.0,
        target_epsilon=0,
        noise_multiplier_local=1.0,
        noise_multiplier_global=1.0,
        max_grad_norm_global=CLIP,
    )
    state = ServerState(
        p_global=torch.zeros(SHAPE),
        momentum=None,
        server_round=ROUND - 1,
        run_token="t",
        noise_multiplier_global=1.0,
        config_fingerprint="f",
    )
    state.node_sample_rates = {str(n): Q for n in range(1, 9)}  # declared: about B / q = 16 records each
    return PromptStrategy(cfg, state)


VALID = {
    "error": False,
    "record": "arrays",
    "keys": ("global-grad",),
    "shape": SHAPE,
    "dtype": np.float32,
    "poison": None,
    "round": ROUND,
    "run": "t",
    "extra_config": False,
}
# Each reply is valid but for at most one corruption (independent draws would make a fully valid reply rare),
# with its norm (scale) and a claimed batch drawn independently: only the norm may matter.
CORRUPTIONS = st.sampled_from(
    [
        {},
        {},
        {},
        {"error": True},
        {"record": "params"},
        {"record": None},
        {"keys": ("global-grad", "p-local")},
        {"keys": ("p-local",)},
        {"keys": ()},
        {"shape": (4, 17)},
        {"shape": (16, 4)},
        {"shape": (64,)},
        {"dtype": np.float64},
        {"dtype": np.float16},
        {"dtype": np.int32},
        {"poison": math.nan},
        {"poison": math.inf},
        {"poison": -math.inf},
        {"round": ROUND - 1},
        {"round": ROUND + 1},
        {"round": None},
        {"run": "an-earlier-run"},
        {"run": None},
        {"extra_config": True},
    ]
)
reply_spec = st.builds(
    lambda corruption, scale, batch: {**VALID, **corruption, "scale": scale, "batch": batch},
    CORRUPTIONS,
    st.sampled_from([0.0, 0.1, 1.0, 1.3, 2.6, 4.9, 5.0, 5.1, 50.0]),  # norm of ones(4, 16) * s is 8 s; bound 40
    st.sampled_from([8.0, 8.0, 4.0, 16.0, 40.0, 0.0, None]),
)


def _message(spec: dict, node: int) -> Message:
    request = Message(content=RecordDict(), dst_node_id=node, message_type=MessageType.TRAIN)
    request.metadata.__dict__["_src_node_id"] = 0
    if spec["error"]:
        msg = Message(Error(code=0, reason="node failed"), reply_to=request)
    else:
        records = {}
        if spec["record"] is not None:
            value = np.ones(spec["shape"], dtype=spec["dtype"]) * np.asarray(spec["scale"]).astype(spec["dtype"])
            if spec["poison"] is not None and np.issubdtype(spec["dtype"], np.floating):
                value.flat[0] = spec["poison"]
            records[spec["record"]] = ArrayRecord({k: Array(value.copy()) for k in spec["keys"]})
        metrics = {}
        if spec["round"] is not None:
            metrics["server-round"] = spec["round"]
        if spec["run"] is not None:
            metrics["run-tag"] = run_tag(spec["run"])
        if spec["batch"] is not None:
            metrics["batch-size"] = spec["batch"]
        records["metrics"] = MetricRecord(metrics)
        if spec["extra_config"]:
            records["config"] = ConfigRecord({"note": "hello"})
        msg = Message(RecordDict(records), reply_to=request)
    msg.metadata.__dict__["_src_node_id"] = node
    return msg


def _valid(spec: dict) -> bool:
    """The rules, restated: exactly one 'global-grad' in an 'arrays' record, right shape, float32, finite, for
    this round and this run, and no larger than C_G * 2 / q: a batch of at most twice the declared B / q records
    (a claimed batch size changes nothing: the server does not read one)."""
    if spec["error"] or spec["record"] != "arrays" or spec["keys"] != ("global-grad",):
        return False
    if spec["shape"] != SHAPE or spec["dtype"] is not np.float32 or spec["poison"] is not None:
        return False
    if spec["round"] != ROUND or spec["run"] != "t" or spec["extra_config"]:
        return False
    return 8.0 * spec["scale"] <= CLIP * 2 / Q * (1 + 1e-4) + 1e-6


@settings(max_examples=150, deadline=None)
@given(st.lists(reply_spec, min_size=1, max_size=6))
def test_only_valid_replies_are_aggregated_and_the_prompt_stays_finite(specs):
    strategy = _strategy()
    strategy.noise_generator = torch.Generator().manual_seed(0)
    replies = [_message(spec, node) for node, spec in enumerate(specs, start=1)]
    arrays, metrics = strategy.aggregate_train(ROUND, replies)
    valid = [node for node, spec in enumerate(specs, start=1) if _valid(spec)]
    assert sorted(int(n) for n in strategy.state.participation) == valid
    assert (arrays is not None) == bool(valid)
    if valid:
        assert metrics["num-replies"] == len(valid)
    assert torch.isfinite(strategy.state.p_global).all()


def _evaluation_reply(node: int, server_round: int | None, run: str | None, acc: float) -> Message:
    request = Message(content=RecordDict(), dst_node_id=node, message_type=MessageType.EVALUATE)
    request.metadata.__dict__["_src_node_id"] = 0
    metrics = {"local-acc": acc, "sample-rate": 0.5}
    if server_round is not None:
        metrics["server-round"] = server_round
    if run is not None:
        metrics["run-tag"] = run_tag(run)
    msg = Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=request)
    msg.metadata.__dict__["_src_node_id"] = node
    return msg


def test_evaluation_replies_for_another_round_or_run_are_left_out_of_the_means():
    strategy = _strategy()
    replies = [
        _evaluation_reply(1, ROUND, "t", 0.8),
        _evaluation_reply(2, ROUND - 1, "t", 0.1),
        _evaluation_reply(3, ROUND, "an-earlier-run", 0.1),
        _evaluation_reply(4, ROUND, None, 0.1),
        _evaluation_reply(5, None, "t", 0.1),
        _evaluation_reply(6, ROUND, "t", 0.6),
    ]
    result = strategy.aggregate_evaluate(ROUND, replies)
    assert result["num-clients"] == 2
    assert result["local-acc"] == pytest.approx(0.7)
    # at setup (round 0) the replies' declared sample rates feed the accountant: a stale one must not
    strategy.state.node_sample_rates = {}
    strategy.aggregate_evaluate(0, [_evaluation_reply(1, 0, "t", 0.5), _evaluation_reply(2, 0, "old", 0.5)])
    assert set(strategy.state.node_sample_rates) == {"1"}
