"""Every field of every reply that leaves a node, captured on real Flower simulations (managed SuperLink in
simulation mode, Ray SuperNodes, the real ClientApp), is classified: covered by the printed epsilon, public by
declaration, or outside epsilon and labelled so. The runs cover every message type: round-0 setup, train,
evaluate, every secure-aggregation stage, every SecFPP phase, and the node-key query (on resume)."""

import json

import pytest

from dpfpl.client_app.app import WIRE_LOG_ENV
from dpfpl.client_app.request import OPERATIONS
from dpfpl.common.wire import INVENTORY, OUTSIDE, check_reply, outside_epsilon
from dpfpl.launch import run_simulation

pytestmark = pytest.mark.flower

BASE = {
    "num-clients": 6,
    "classes-per-client": 0,
    "min-clients": 6,
    "num-server-rounds": 2,
    "eval-every": 1,
    "eval-last": 1,
    "batch-size": 16,
    "target-epsilon": 4.0,
    "n-ctx": 4,
    "rank": 2,
    "resume": False,
}
SECFPP = {
    "method": "secfpp",
    "secure-aggregation": True,
    "secfpp-every": 1,
    "secfpp-min-cluster-size": 3,
    "secfpp-privacy": 1,
    "secfpp-reduced-dim": 8,
    "secfpp-max-iter": 2,
    "min-clients": 4,
    # explicit multipliers (no target): a run without a calibrated round count may be resumed for one more round
    "target-epsilon": 0.0,
    "noise-multiplier-local": 2.0,
    "noise-multiplier-global": 2.0,
}


@pytest.fixture(scope="module")
def wire(tmp_path_factory, cache_dir):
    """The wire log of three runs: DP-FPL in the clear (central DP), SecFPP with secure aggregation, and that
    SecFPP run resumed for one more round (a resumed server asks every node for its key)."""
    work = tmp_path_factory.mktemp("wire")
    log = work / "wire.jsonl"
    mp = pytest.MonkeyPatch()
    mp.setenv(WIRE_LOG_ENV, str(log))
    try:
        run_simulation({**BASE, "run-dir": str(work / "dpfpl")}, 6, work / "sim-a", stream=False, timeout=900)
        secfpp = {**BASE, **SECFPP, "run-dir": str(work / "secfpp")}
        run_simulation(secfpp, 6, work / "sim-b", stream=False, timeout=900)
        resumed = {**secfpp, "num-server-rounds": 3, "resume": True}
        run_simulation(resumed, 6, work / "sim-c", stream=False, timeout=900)
    finally:
        mp.undo()
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    return {"lines": lines, "work": work}


def test_every_message_type_was_answered_and_every_field_is_classified(wire):
    seen = {line["operation"] for line in wire["lines"]}
    assert seen == set(OPERATIONS), f"not covered: {set(OPERATIONS) - seen}"
    for line in wire["lines"]:
        for record, key, klass in line["fields"]:
            assert INVENTORY[(line["operation"], record, key)][0] == klass


def test_nothing_of_the_training_set_size_or_the_batch_leaves_under_dp(wire):
    keys = {(line["operation"], r, k) for line in wire["lines"] for r, k, _ in line["fields"]}
    names = {k for _, _, k in keys}
    assert not names & {"num-examples", "batch-size", "client-seconds", "train-loss"}
    assert ("train", "metrics", "sample-rate") in keys  # the declared rate instead


def test_what_leaves_outside_epsilon_is_labelled_in_the_summary(wire):
    outside = {(line["operation"], r, k) for line in wire["lines"] for r, k, c in line["fields"] if c == OUTSIDE}
    assert outside  # evaluation metrics and SecFPP's clustering did leave
    for run, method in (("dpfpl", "dpfpl"), ("secfpp", "secfpp")):
        summary = json.loads((wire["work"] / run / "summary.json").read_text())
        assert summary["privacy"]["excludes"] == outside_epsilon(method, True)
    labels = " ".join(outside_epsilon("secfpp", True))
    assert "evaluation replies" in labels and "clustering" in labels and "timing" in labels


def test_a_field_outside_the_inventory_is_refused():
    with pytest.raises(Exception, match="no privacy class covers: metrics/num-examples"):
        check_reply("train", {"metrics": ["server-round", "num-examples"]})
