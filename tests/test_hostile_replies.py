"""Fuzz on the real round loop: one hostile node among honest ones answers every message with a seeded corruption
of its honest reply (wrong types, lists, NaN and Inf, huge numbers, arrays of the wrong shape or dtype, extra,
missing or foreign records and keys, bytes where numbers belong). Every corruption is rejected, never fatal:
the run finishes, and the honest nodes' p_G is the one of a run in which the hostile node is silent."""

import math
import random

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from dpfpl.client_app.app import app as client_app
from dpfpl.common.config import RunConfig
from dpfpl.inprocess import InProcessGrid, full_run_config
from dpfpl.server_app.checkpoint import RunDirectory
from dpfpl.server_app.runner import run_federation

HOSTILE = 3
NODES = 4
BASE = {
    "num-clients": NODES,
    "classes-per-client": 2,
    "min-clients": 3,
    "pretrained": "none",
    "n-ctx": 4,
    "rank": 2,
    "batch-size": 8,
    "eval-every": 1,
    "eval-last": 0,
    "dp": False,
    "lr-global": 0.05,
    "lr-local": 0.05,
}
ROUNDS = 20


# Metrics whose honest values include NaN (a loss over an empty batch) or inf (an epsilon without noise, PromptFL's
# z_L): the fuzz does not send those there, since the server must accept them.
MAY_BE_NAN = {"train-loss", "local-loss"}
MAY_BE_INF = {"epsilon-local", "epsilon-published", "noise-multiplier-local"}


def _numbers(rng: random.Random, key: str) -> list:
    """Values that the metric ``key`` never takes: wrong types, and non-finite or out-of-range numbers."""
    out = [[1.0, 2.0], [rng.randint(-5, 5)], -rng.random() * 10 ** rng.randint(1, 30), -rng.randint(1, 2**62)]
    if key not in MAY_BE_NAN:
        out.append(math.nan)
    if key not in MAY_BE_INF:
        out += [math.inf, float(10 ** rng.randint(19, 300))]
    out.append(-math.inf)
    return out


def corrupt(content: RecordDict, rng: random.Random) -> tuple[RecordDict, tuple]:
    """One corruption of a reply's content, and a description of it (the fuzz counts distinct ones)."""
    records = {name: record for name, record in content.items()}
    kind = rng.choice(["value", "value", "value", "drop-record", "extra-record", "foreign-key", "array"])
    if kind == "drop-record" and records:
        name = rng.choice(sorted(records))
        del records[name]
        return RecordDict(records), (kind, name)
    if kind == "extra-record":
        name = rng.choice(["extra", "metrics-2", "secagg-x"])
        records[name] = rng.choice([MetricRecord({"x": 1.0}), ConfigRecord({"x": b"\x00" * rng.randint(1, 64)})])
        return RecordDict(records), (kind, name, type(records[name]).__name__)
    if kind == "foreign-key" and records:
        name = rng.choice(sorted(records))
        record = records[name]
        key = f"foreign-{rng.randint(0, 999)}"
        if isinstance(record, MetricRecord):
            records[name] = MetricRecord({**dict(record), key: rng.random()})
        elif isinstance(record, ConfigRecord):
            records[name] = ConfigRecord({**dict(record), key: rng.randint(0, 9)})
        else:
            records[name] = ArrayRecord({**{k: v for k, v in record.items()}, key: Array(np.zeros(2, np.float32))})
        return RecordDict(records), (kind, name, key)
    arrays = [n for n, r in records.items() if isinstance(r, ArrayRecord)]
    if kind == "array" and arrays:
        name = rng.choice(arrays)
        key = rng.choice(sorted(records[name].keys()))
        shape = records[name][key].shape
        variant = rng.choice(["shape", "dtype", "nan", "inf", "huge", "empty"])
        base = np.asarray(records[name][key].numpy())
        if variant == "shape":
            bad = np.zeros((shape[0] + rng.randint(1, 3),) + tuple(shape[1:]), dtype=base.dtype)
        elif variant == "dtype":
            bad = base.astype(rng.choice([np.float64, np.int32, np.float16]))
        elif variant == "empty":
            bad = np.zeros((0,), dtype=base.dtype)
        else:
            floating = variant == "huge" or base.dtype.kind in "iu"  # an integer vector cannot hold NaN or Inf
            bad = base.astype(np.float64 if floating else base.dtype, copy=True)
            if bad.size:
                bad.flat[rng.randrange(bad.size)] = {"nan": np.nan, "inf": np.inf, "huge": 1e300}[variant]
        records[name] = ArrayRecord({**{k: v for k, v in records[name].items() if k != key}, key: Array(bad)})
        return RecordDict(records), (kind, name, key, variant, bad.dtype.name, bad.shape)
    # a value of a metric or config record replaced
    fields = [(n, k) for n, r in records.items() if not isinstance(r, ArrayRecord) for k in r.keys()]
    if not fields:
        return RecordDict({}), ("empty",)
    name, key = rng.choice(sorted(fields))
    record = records[name]
    if isinstance(record, MetricRecord):
        value = rng.choice(_numbers(rng, key))
        records[name] = MetricRecord({**dict(record), key: value})
    else:
        value = rng.choice(
            _numbers(rng, key) + ["text", b"\x00" * rng.randint(0, 70000), [b"x"], [5], True, rng.randint(-(2**62), -1)]
        )
        records[name] = ConfigRecord({**dict(record), key: value})
    return RecordDict(records), ("value", name, key, type(value).__name__, repr(value)[:24])


SECAGG_STAGES = ("train", "train.secagg_shares", "train.secagg_masked", "train.secagg_unmask")


def _setup(message: Message) -> bool:
    config = message.content["config"] if "config" in message.content.config_records else {}
    return message.metadata.message_type == "evaluate" and config.get("server-round") == 0


class HostileGrid(InProcessGrid):
    """The node of partition HOSTILE corrupts every reply (``mode = "hostile"``) or answers nothing ("silent")."""

    def __init__(self, *args, mode: str, seed: int, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.mode, self.rng, self.tried = mode, random.Random(seed), set()
        self.stage: dict[int, str] = {}

    def _hostile(self, message: Message) -> bool:
        return self.contexts[message.metadata.dst_node_id].node_config["partition-id"] == HOSTILE

    def push_messages(self, messages):
        if self.mode == "silent":
            messages = [m for m in messages if not self._hostile(m)]
        return super().push_messages(messages)

    def _corrupts(self, message: Message) -> bool:
        """Under secure aggregation the hostile node answers the stages before one it picks per round honestly,
        then corrupts that one (key advertisement, shares or masked input: after each the round goes on without
        it, as without a silent node). Everywhere else it corrupts every reply."""
        kind = message.metadata.message_type
        if kind not in SECAGG_STAGES:
            return True
        config = message.content["config"]
        server_round = int(config["server-round"])
        if kind == "train" and "secagg-threshold" not in config:
            return True  # not a secure round
        if server_round not in self.stage:
            self.stage[server_round] = self.rng.choice(SECAGG_STAGES[:3])
        return SECAGG_STAGES.index(kind) >= SECAGG_STAGES.index(self.stage[server_round])

    def _deliver(self, message: Message) -> Message:
        reply = super()._deliver(message)
        if self.mode != "hostile" or not self._hostile(message) or reply.has_error() or _setup(message):
            return reply  # the hostile node passes the setup check, then corrupts what it sends
        if not self._corrupts(message):
            return reply
        content, what = corrupt(reply.content, self.rng)
        self.tried.add((message.metadata.message_type, *what))
        bad = Message(content=content, reply_to=message)
        bad.metadata.__dict__["_message_id"] = bad.object_id
        bad.metadata.__dict__["_src_node_id"] = reply.metadata.src_node_id
        return bad


def _run(tmp_path, name: str, mode: str, seed: int, **overrides) -> tuple[RunDirectory, HostileGrid]:
    config = full_run_config(
        {**BASE, "num-server-rounds": ROUNDS, "seed": seed, "run-dir": str(tmp_path / name), **overrides}
    )
    grid = HostileGrid(client_app, config, NODES, {"num-threads": 1}, mode=mode, seed=seed)
    with grid.identity():
        run_federation(grid, RunConfig.from_flower(config))
    return RunDirectory(tmp_path / name), grid


def _deterministic_secure_rounding(monkeypatch) -> None:
    """Secure aggregation rounds each node's update stochastically with OS randomness (the server must not predict
    it); in this test, without DP, the rounding is seeded by the update itself, so that the hostile and the silent
    run sum the very same integers and their p_G can be compared exactly (rounding differences would otherwise
    grow round after round)."""
    import hashlib

    import dpfpl.client_app.secagg_handlers as node_secagg

    original = node_secagg.encode_update

    def encode(grad, **kwargs):
        seed = int.from_bytes(hashlib.sha256(np.ascontiguousarray(grad).tobytes()).digest()[:8], "little")
        return original(grad, rng=np.random.default_rng(seed), **kwargs)

    monkeypatch.setattr(node_secagg, "encode_update", encode)


PATHS = {
    "plain": {},
    "secure-aggregation": {"secure-aggregation": True, "secagg-dropout-tolerance": 1},
    "secfpp": {"method": "secfpp", "secfpp-every": 4, "secfpp-reduced-dim": 8, "secfpp-max-iter": 2},
}
# seeds per path: the plain and the secure path compare p_G with a run whose hostile node is silent (two runs per
# seed); SecFPP's p_G depends on the clustering, which the hostile node may change, so its runs stand alone and
# it affords twice the seeds for the same time
SEEDS = {"plain": range(12), "secure-aggregation": range(12), "secfpp": range(24)}


@pytest.mark.slow
def test_a_hostile_node_is_rejected_every_round_and_changes_nothing(tmp_path, cache_dir, monkeypatch):
    """Every path, several seeds: the run finishes, the hostile node is never counted, p_G is exactly the silent
    run's (clear and secure aggregation), and across seeds the fuzz tried at least
    1,000 distinct corruptions."""
    _deterministic_secure_rounding(monkeypatch)
    tried = set()
    for path, overrides in PATHS.items():
        for seed in SEEDS[path]:
            work = tmp_path / f"{path}-{seed}"
            hostile_run, grid = _run(work, "hostile", "hostile", seed, **overrides)
            hostile = hostile_run.load()
            assert hostile.server_round == ROUNDS, (path, seed)  # the run finished
            tried.update((path, *t) for t in grid.tried)
            rounds = [m for m in hostile_run.read_metrics() if m.get("phase") == "train"]
            assert all(m.get("num-replies", 0) <= NODES - 1 for m in rounds), (path, seed)
            if path == "secfpp":
                continue
            silent = _run(work, "silent", "silent", seed, **overrides)[0].load()
            # the very same p_G (without DP; under secure aggregation the same inputs and rounding); that nothing
            # is booked for a rejected reply under DP: tests/test_server.py
            torch.testing.assert_close(hostile.p_global, silent.p_global, rtol=0, atol=0)
    print(f"distinct corruptions tried: {len(tried)}")
    assert len(tried) >= 1000


class UnmaskingHostileGrid(HostileGrid):
    """The hostile node answers every stage honestly up to its masked input (so its input is in the sum), then
    corrupts its unmasking reply: the t honest survivors' shares must unmask the sum without it."""

    def _corrupts(self, message: Message) -> bool:
        return message.metadata.message_type == "train.secagg_unmask"


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(3))
def test_a_corrupt_unmasking_reply_is_rejected_and_the_honest_shares_unmask_the_sum(tmp_path, cache_dir, seed):
    overrides = {**PATHS["secure-aggregation"], "num-server-rounds": 6, "seed": seed, "run-dir": str(tmp_path / "r")}
    config = full_run_config({**BASE, **overrides})
    grid = UnmaskingHostileGrid(client_app, config, NODES, {"num-threads": 1}, mode="hostile", seed=seed)
    with grid.identity():
        run_federation(grid, RunConfig.from_flower(config))
    rounds = [m for m in RunDirectory(tmp_path / "r").read_metrics() if m.get("phase") == "train"]
    assert len(rounds) == 6 and all(m["updated"] for m in rounds)
    # its masked input is in every sum (4 survivors, t = 3 honest unmasking replies suffice) ...
    assert all(m["num-replies"] == NODES and m["secagg-dropped"] == 0 for m in rounds)
    # ... and every round lists its rejected unmasking reply
    rejected = [r for m in rounds for r in m.get("rejected", []) if "unmasking reply" in r]
    assert len(rejected) == 6 and len(grid.tried) == 6
