"""Secure aggregation wired into the app: the real ServerApp round loop and ClientApps (in-process transport,
every message serialized as over the wire), 2 rounds, with dropouts and a failing round."""

from __future__ import annotations

import json

import numpy as np
import pytest
from flwr.app import Message

from dpfpl.common.config import RunConfig
from dpfpl.inprocess import InProcessGrid, full_run_config

BASE = {
    "method": "promptfl",
    "num-clients": 4,
    "classes-per-client": 2,
    "min-clients": 4,
    "num-server-rounds": 2,
    "eval-every": 2,
    "eval-last": 1,
    "batch-size": 32,
    "lr-global": 0.05,
    "lr-local": 0.05,
    "secagg-dropout-tolerance": 1,
    "resume": False,
}


class Wiretap:
    """The ClientApp as deployed, plus: what each node sent back (the server's view), and nodes that fail
    ('drop out') on a chosen action in a chosen round."""

    def __init__(self, drop: dict[tuple[int, str], set[int]] | None = None) -> None:
        from dpfpl.client_app.app import app

        self.app, self.drop, self.replies = app, drop or {}, []

    def __call__(self, message: Message, context):
        rnd = int(message.content["config"]["server-round"]) if "config" in message.content.config_records else -1
        if context.node_config["partition-id"] in self.drop.get((rnd, message.metadata.message_type), set()):
            raise ConnectionError("node went away")
        reply = self.app(message=message, context=context)
        self.replies.append((message.metadata.message_type, reply))
        return reply


def _run(tmp_path, overrides: dict, drop=None, nodes: int = 4):
    from dpfpl.server_app.runner import run_federation

    config = full_run_config({**BASE, "run-dir": str(tmp_path / "run"), **overrides})
    tap = Wiretap(drop)
    grid = InProcessGrid(tap, config, nodes, {"num-threads": 1})
    with grid.identity():
        summary = run_federation(grid, RunConfig.from_flower(config))
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    return summary, [m for m in metrics if m.get("phase") == "train"], tap


def _p_global(tmp_path):
    from dpfpl.server_app.checkpoint import RunDirectory

    return RunDirectory(tmp_path / "run").load().p_global


def test_two_secure_rounds_without_dp_match_clear_aggregation(tmp_path, cache_dir):
    """Without noise the only difference to clear aggregation is the (unbiased) rounding: below 1/gamma."""
    _, clear_rounds, _ = _run(tmp_path / "clear", {"dp": False})
    summary, rounds, tap = _run(tmp_path / "sec", {"dp": False, "secure-aggregation": True})
    assert [r["updated"] for r in rounds] == [True, True]
    assert all(r["num-replies"] == 4 and r["secagg-threshold"] == 3 and r["secagg-dropped"] == 0 for r in rounds)
    gamma = 2.0**16 * 32 / 10.0
    delta = (_p_global(tmp_path / "sec") - _p_global(tmp_path / "clear")).abs().max().item()
    # two SGD steps of lr 0.05, each mean off by < 1/gamma per coordinate (plus float32 rounding)
    assert delta < 2 * 0.05 / gamma + 1e-6
    # the server's view: no reply of any stage carries a clear gradient
    trains = [r for t, r in tap.replies if t == "train"]
    assert trains and all("arrays" not in r.content.array_records for r in trains)
    # nor any noise-free statistic of the training data (loss, realized batch size, step time)
    from dpfpl.client_app.prompt_handlers import OUTSIDE_EPSILON_TRAIN_METRICS

    assert all(k not in r.content["metrics"] for r in trains for k in OUTSIDE_EPSILON_TRAIN_METRICS)
    masked = [r.content["secagg"]["masked"].numpy() for t, r in tap.replies if t == "train.secagg_masked"]
    assert len(masked) == 8 and all(y.dtype == np.uint64 for y in masked)
    # round 1 advertises as it trains (four exchanges); its unmasking announces round 2's keys, so round 2's train
    # replies carry the shares and no share-keys exchange is needed (three)
    assert sorted(trains[0].content["secagg"].keys()) == ["c-pk", "s-pk"]
    assert all(sorted(r.content["secagg"].keys()) == ["ct", "dst"] for r in trains[4:])
    assert [t for t, _ in tap.replies].count("train.secagg_shares") == 4
    unmasks = [r.content["secagg"] for t, r in tap.replies if t == "train.secagg_unmask"]
    assert all("next-c-pk" in u for u in unmasks[:4]) and not any("next-c-pk" in u for u in unmasks[4:])  # no round 3
    assert summary["final"]["local-acc"] == pytest.approx(
        json.loads((tmp_path / "clear" / "run" / "summary.json").read_text())["final"]["local-acc"], abs=0.02
    )


def test_a_node_dropping_mid_round_is_recovered_and_the_accountant_charges_survivors(tmp_path, cache_dir):
    # node 3 dies after sending its shares (before its masked input) in round 1; min-clients 3 allows that
    summary, rounds, tap = _run(
        tmp_path,
        {"dp": True, "target-epsilon": 1.0, "secure-aggregation": True, "min-clients": 3},
        drop={(1, "train.secagg_masked"): {3}},
    )
    assert [r["updated"] for r in rounds] == [True, True]
    assert rounds[0]["num-replies"] == 3 and rounds[0]["secagg-dropped"] == 1 and rounds[0]["secagg-masks-removed"] == 1
    # node 3 was not asked to unmask, so it announced no keys for round 2: round 2 advertises as it trains
    assert [t for t, _ in tap.replies].count("train.secagg_shares") == 8
    assert rounds[1]["num-replies"] == 4 and rounds[1]["secagg-dropped"] == 0
    # the noise the sum carries is never below what the accountant is told: z sqrt(m / t) >= z_G
    from dpfpl.server_app.checkpoint import RunDirectory

    state = RunDirectory(tmp_path / "run").load()
    z = state.noise_multiplier_global
    assert rounds[0]["noise-multiplier-global-effective"] == pytest.approx(z)  # m = t = 3
    assert rounds[1]["noise-multiplier-global-effective"] == pytest.approx(z * (4 / 3) ** 0.5)
    assert sorted(state.participation.values()) == [1, 2, 2, 2]  # the dropped node was charged once
    assert np.isfinite(rounds[-1]["epsilon-global-max"])


def test_a_node_lost_in_a_round_keyed_ahead_leaves_the_others_round_intact(tmp_path, cache_dir):
    """Round 2 goes out with the roster of the keys announced in round 1; node 3 dies on its train message, so it
    is in the roster but sends no shares: the three others mask with each other only and their sum unmasks."""
    summary, rounds, tap = _run(
        tmp_path,
        {"dp": True, "target-epsilon": 1.0, "secure-aggregation": True, "min-clients": 3},
        drop={(2, "train"): {3}},
    )
    assert [r["updated"] for r in rounds] == [True, True]
    assert rounds[1]["num-replies"] == 3 and rounds[1]["secagg-dropped"] == 1
    assert rounds[1]["secagg-masks-removed"] == 0  # it never masked: nothing of it to remove
    assert [t for t, _ in tap.replies].count("train.secagg_shares") == 4  # round 1 only
    from dpfpl.server_app.checkpoint import RunDirectory

    assert sorted(RunDirectory(tmp_path / "run").load().participation.values()) == [1, 2, 2, 2]


def test_fewer_masked_inputs_than_min_clients_update_nothing(tmp_path, cache_dir):
    """The threshold lets the protocol unmask 3 of 4, but the run asked for 4: as in a clear round, nothing moves."""
    _, rounds, _ = _run(
        tmp_path,
        {"dp": True, "target-epsilon": 1.0, "secure-aggregation": True, "min-clients": 4},
        drop={(1, "train.secagg_masked"): {3}},
    )
    assert [r["updated"] for r in rounds] == [False, True]
    from dpfpl.server_app.checkpoint import RunDirectory

    assert sorted(RunDirectory(tmp_path / "run").load().participation.values()) == [1, 1, 1, 1]


def test_too_many_dropouts_fail_the_round_safely(tmp_path, cache_dir):
    summary, rounds, tap = _run(
        tmp_path,
        {"dp": True, "target-epsilon": 1.0, "secure-aggregation": True},
        drop={(1, "train.secagg_masked"): {2, 3}},
    )
    assert rounds[0]["updated"] is False and rounds[1]["updated"] is True
    # round 1 revealed no share: nobody was asked to unmask it
    unmasks = [r for t, r in tap.replies if t == "train.secagg_unmask"]
    assert len(unmasks) == 4  # round 2's four survivors only
    from dpfpl.server_app.checkpoint import RunDirectory

    assert sorted(RunDirectory(tmp_path / "run").load().participation.values()) == [1, 1, 1, 1]


def test_a_non_finite_decoded_mean_leaves_p_global_and_its_survivors_charged(tmp_path, cache_dir, monkeypatch):
    """Round 1's decoded mean is made NaN: p_G keeps its value, the round counts as not updated and the run goes
    on; the survivors are charged all the same, since their noisy sum was unmasked (the release happened)."""
    import torch

    from dpfpl.server_app import secagg_round
    from dpfpl.server_app.checkpoint import RunDirectory

    decode, calls = secagg_round.decode_sum, []

    def poisoned(*args, **kwargs):
        mean = decode(*args, **kwargs)
        calls.append(mean)
        return np.full_like(mean, np.nan) if len(calls) == 1 else mean

    monkeypatch.setattr(secagg_round, "decode_sum", poisoned)
    _, rounds, _ = _run(tmp_path, {"dp": True, "target-epsilon": 1.0, "secure-aggregation": True})
    assert len(calls) == 2 and [r["updated"] for r in rounds] == [False, True]
    state = RunDirectory(tmp_path / "run").load()
    assert torch.isfinite(state.p_global).all()
    assert sorted(state.participation.values()) == [2, 2, 2, 2]  # round 1 is booked for all four


def test_secure_aggregation_needs_a_shared_tensor():
    with pytest.raises(ValueError, match="shares no tensor"):
        RunConfig.from_flower(full_run_config({"method": "coop", "secure-aggregation": True}))
