"""Durable state under faults: a kill mid-append, a damaged cache or session file, a full disk.

Each test puts the fault where it really happens (the metrics log's last line, the bytes of a cached file, the
secure-aggregation session between two stages, the write of a state file) and calls the code a run uses there,
in this process: the fault must cost at most the one message or line it hit, say so, and never lose, replay or
double-charge anything when the run goes on."""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, RecordDict

from dpfpl.client_app.context import MessageContext
from dpfpl.client_app.request import NodeRequest
from dpfpl.client_app.state import STATE_FILE, NodeState
from dpfpl.common.atomic import DiskFullError, previous_path
from dpfpl.common.config import RunConfig
from dpfpl.common.metrics import MetricsLogError, append_metrics_record, read_metrics_log
from dpfpl.common.privacy.ledger import LEDGER_FILE, PrivacyLedger
from dpfpl.server_app.checkpoint import CHECKPOINT, METRICS, RunDirectory, ServerState
from tests.test_node_boundary import _context, _snapshot, _train

# ------------------------------------------------------------------------------------------ helpers


@pytest.fixture()
def p_global():
    return torch.randn(16, 128, generator=torch.Generator().manual_seed(0)) * 0.02


def _server_state(server_round: int) -> ServerState:
    return ServerState(
        p_global=torch.full((4, 8), float(server_round)),
        momentum=None,
        server_round=server_round,
        run_token="run",
        noise_multiplier_global=1.0,
        config_fingerprint="fp",
        node_sample_rates={"a": 0.1},
        participation={"a": server_round},
        evaluated_round=server_round,
        last_record={"round": server_round, "phase": "train"},
    )


def _temporary_files(directory):
    """What an interrupted write could leave behind: the atomic writes' temporary files (and hard links)."""
    return sorted(p.name for p in directory.rglob(".*") if ".tmp" in p.name)


@pytest.fixture()
def disk_full(monkeypatch):
    """``disk_full(name, let_through=0)``: from then on, writes of files named ``name`` fail the way a full disk
    makes them fail, after ``let_through`` such writes succeeded. JSON and bytes go through ``os.write`` (the
    first call writes part of the data, the next raises ENOSPC); tensor files through safetensors, which writes
    half of the file and raises its own error with the OS's message, as it does on a full disk. ``stop()``
    frees the space."""
    real_write = os.write
    from safetensors import SafetensorError
    from safetensors import torch as st_torch

    real_save_file = st_torch.save_file
    full: dict[str, int] = {}
    started: set[int] = set()

    def target(temporary_name: str) -> str | None:
        # the atomic writes name their temporary file ".<name>.<random>.tmp"
        for name in full:
            if temporary_name.startswith(f".{name}."):
                return name
        return None

    def should_fail(name: str) -> bool:
        if full[name] > 0:
            full[name] -= 1
            return False
        return True

    def write(fd, data):
        try:
            name = target(os.path.basename(os.readlink(f"/proc/self/fd/{fd}")))
        except OSError:
            name = None
        if name is None or (fd not in started and not should_fail(name)):
            return real_write(fd, data)
        if fd not in started:
            started.add(fd)
            return real_write(fd, bytes(data)[: max(1, len(data) // 2)])
        raise OSError(errno.ENOSPC, "No space left on device")

    def save_file(tensors, filename, metadata=None):
        name = target(os.path.basename(str(filename)))
        if name is None or not should_fail(name):
            return real_save_file(tensors, filename, metadata=metadata)
        data = st_torch.save(tensors, metadata=metadata)
        with open(filename, "wb") as fh:
            fh.write(data[: len(data) // 2])
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(os, "write", write)
    monkeypatch.setattr(st_torch, "save_file", save_file)

    class Disk:
        def __call__(self, name: str, let_through: int = 0) -> None:
            full[name] = let_through

        def stop(self) -> None:
            full.clear()

    return Disk()


# ------------------------------------------------------------------------------------------ 1. torn metrics line

TORN = '{"round": 3, "phase": "train", "upd'  # what a kill mid-append leaves: a record cut short, no newline


def _metrics_log(run_dir: RunDirectory, rounds: int, tail: str = TORN) -> None:
    for r in range(rounds + 1):
        run_dir.append_metrics({"round": r, "phase": "zeroshot" if r == 0 else "train", "local-acc": 0.5})
    with open(run_dir.path / METRICS, "a") as fh:
        fh.write(tail)


def test_a_torn_last_metrics_line_is_dropped_on_resume_with_a_warning(tmp_path, caplog):
    """A server killed while appending round 3's line resumes from its round-2 checkpoint: the torn line must
    cost only itself (round 3 runs again), not the resume; the record logged after it starts its own line."""
    run_dir = RunDirectory(tmp_path)
    _metrics_log(run_dir, rounds=2)
    with caplog.at_level(logging.WARNING, logger="dpfpl.metrics"):
        run_dir.resume_metrics(_server_state(2))  # what run_federation calls on resume
    assert "torn" in caplog.text and "line 4" in caplog.text
    assert [r["round"] for r in run_dir.read_metrics()] == [0, 1, 2]
    run_dir.append_metrics({"round": 3, "phase": "train"})
    assert [r["round"] for r in run_dir.read_metrics()] == [0, 1, 2, 3]
    assert (tmp_path / METRICS).read_text().endswith('{"round": 3, "phase": "train"}\n')


def test_a_crash_between_checkpoint_and_evaluation_resumes_past_a_torn_line(tmp_path):
    """The other resume path (round checkpointed, its evaluation not run): it cuts the log at the round
    before, through the same reader."""
    run_dir = RunDirectory(tmp_path)
    _metrics_log(run_dir, rounds=2)
    run_dir.truncate_metrics(1)
    assert [r["round"] for r in run_dir.read_metrics()] == [0, 1]


@pytest.mark.parametrize("tail", [TORN, '{"round": 3}', "\0" * 24], ids=["torn", "whole-without-newline", "zeros"])
def test_appending_never_glues_a_record_onto_the_last_line(tmp_path, tail):
    """Appending without a resume in between (e.g. the setup phase's line after a kill): a torn fragment is cut
    off, a whole record that lost only its newline is kept, and the new record gets a line of its own."""
    path = tmp_path / METRICS
    append_metrics_record(path, {"round": 1})
    path.write_bytes(path.read_bytes() + tail.encode())
    append_metrics_record(path, {"round": 4})
    kept = [1, 3, 4] if tail == '{"round": 3}' else [1, 4]
    assert [r["round"] for r in read_metrics_log(path)] == kept
    assert all(json.loads(line) for line in path.read_text().splitlines())  # every line whole


def test_a_damaged_line_before_the_last_is_an_error_naming_file_and_line(tmp_path):
    """Only the last line can be torn by an append; a bad line before it is damage of another kind, which
    dropping would hide (a round missing from the log and from the summary)."""
    path = tmp_path / METRICS
    path.write_text('{"round": 0}\n{"round": 1, "pha\n{"round": 2}\n')
    with pytest.raises(MetricsLogError, match=rf"{path}, line 2: not a JSON object"):
        read_metrics_log(path)
    with pytest.raises(MetricsLogError, match="line 2"):
        RunDirectory(tmp_path).resume_metrics(_server_state(2))


def test_every_reader_of_the_metrics_log_drops_the_torn_last_line(tmp_path):
    """The run's summary (server), `dpfpl plot`, and the sweep report all read the log through one reader."""
    from dpfpl.run_report import plot
    from dpfpl.sweep_grid import RUN_LABEL
    from dpfpl.sweep_report import load_record

    run_dir = RunDirectory(tmp_path)
    _metrics_log(run_dir, rounds=2)
    assert len(run_dir.read_metrics()) == 3
    (tmp_path / RUN_LABEL).write_text(json.dumps({"name": "r", "method": "dpfpl", "epsilon": 1.0, "seed": 1}))
    assert [r["round"] for r in load_record(tmp_path).metrics] == [0, 1, 2]
    assert plot(tmp_path).is_file()


def test_a_full_disk_mid_append_is_named_and_the_torn_line_costs_only_itself(tmp_path, monkeypatch):
    """A full disk cuts the append of round 3's line short: a clear error, and once space is freed the resumed
    run (checkpoint at round 2) logs round 3 again on a line of its own."""
    import dpfpl.common.metrics as metrics

    run_dir = RunDirectory(tmp_path)
    _metrics_log(run_dir, rounds=2, tail="")
    real_append = metrics._append

    def append_until_full(path, record):
        with open(path, "ab") as fh:
            fh.write(json.dumps(record).encode()[:10])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(metrics, "_append", append_until_full)
    with pytest.raises(DiskFullError, match=rf"no space left on device while appending to {tmp_path / METRICS}"):
        run_dir.append_metrics({"round": 3, "phase": "train"})
    monkeypatch.setattr(metrics, "_append", real_append)
    run_dir.resume_metrics(_server_state(2))
    run_dir.append_metrics({"round": 3, "phase": "train"})
    assert [r["round"] for r in run_dir.read_metrics()] == [0, 1, 2, 3]


# ------------------------------------------------------------------------------------------ 2. feature cache


class _Model:  # what the cache key needs of a model
    name, weights_id = "tiny", "w0"


@pytest.mark.parametrize("damage", ["truncate", "garbage", "flip", "no-features"])
def test_a_damaged_feature_cache_is_logged_removed_and_encoded_again(tmp_path, caplog, damage):
    """The cache is only a cache: a damaged file must cost one encoding, not every message that needs it."""
    from dpfpl.common.atomic import write_tensors
    from dpfpl.common.features import _cached

    feats = torch.nn.functional.normalize(torch.randn(40, 16, generator=torch.Generator().manual_seed(3)), dim=-1)
    calls = []

    def compute():
        calls.append(1)
        return feats.clone()

    assert torch.equal(_cached(_Model, "data", str(tmp_path), compute), feats)
    assert torch.equal(_cached(_Model, "data", str(tmp_path), compute), feats) and len(calls) == 1  # read back
    (path,) = (tmp_path / "features").glob("*.safetensors")
    data = bytearray(path.read_bytes())
    if damage == "truncate":
        path.write_bytes(bytes(data[: len(data) // 2]))
    elif damage == "garbage":
        path.write_bytes(os.urandom(len(data)))
    elif damage == "flip":  # inside the tensor bytes: the file still parses, only the digest tells
        data[-7] ^= 0x10
        path.write_bytes(bytes(data))
    else:  # a file that parses but is not a feature cache
        write_tensors(path, {"other": feats})
    with caplog.at_level(logging.WARNING, logger="dpfpl.features"):
        again = _cached(_Model, "data", str(tmp_path), compute)
    assert torch.equal(again, feats) and len(calls) == 2
    assert "damaged feature cache" in caplog.text and str(path) in caplog.text
    assert torch.equal(_cached(_Model, "data", str(tmp_path), compute), feats) and len(calls) == 2  # rebuilt
    assert _temporary_files(tmp_path) == []


def test_a_feature_cache_written_before_digests_is_still_used(tmp_path):
    from dpfpl.common.atomic import write_tensors
    from dpfpl.common.features import _cached

    feats = torch.ones(3, 4)
    write_tensors(tmp_path / "features" / "tiny-w0-data.safetensors", {"features": feats})  # no digest
    assert torch.equal(_cached(_Model, "data", str(tmp_path), lambda: pytest.fail("encoded again")), feats)


def test_a_feature_cache_that_cannot_be_written_for_lack_of_space_is_skipped(tmp_path, caplog, disk_full):
    from dpfpl.common.features import _cached

    disk_full("tiny-w0-data.safetensors")
    with caplog.at_level(logging.WARNING, logger="dpfpl.features"):
        assert torch.equal(_cached(_Model, "data", str(tmp_path), lambda: torch.ones(2, 2)), torch.ones(2, 2))
    assert "no space left on device" in caplog.text
    assert not (tmp_path / "features" / "tiny-w0-data.safetensors").exists() and _temporary_files(tmp_path) == []


# ------------------------------------------------------------------------------------------ 3. secagg session file

NODES = (11, 12, 13)


def _secagg_context(tmp_path, node_id: int, operation: str, config: dict) -> MessageContext:
    cfg = RunConfig(run_dir=str(tmp_path / "run"), secure_aggregation=True, num_clients=3, min_clients=3)
    request = NodeRequest(
        operation=operation,
        content=RecordDict({"config": ConfigRecord({"run-token": "tok", "secagg-group": 0, **config})}),
        run_config=cfg.to_flower(),
        node_config={"state-dir": str(tmp_path / f"node{node_id}")},
        node_id=node_id,
    )
    return MessageContext.of(request)


def _advertise(tmp_path, server_round: int) -> dict[int, tuple[bytes, bytes]]:
    from dpfpl.client_app.secagg_handlers import advertise_reply

    config = {
        "server-round": server_round,
        "secagg-threshold": 2,
        "secagg-num-clients": 3,
        "noise-multiplier-global": 1.0,
    }
    keys = {}
    for node in NODES:
        grad = np.full(8, 0.01 * node, dtype=np.float32)
        reply = advertise_reply(_secagg_context(tmp_path, node, "train", config), grad, {})
        keys[node] = (bytes(reply["secagg"]["c-pk"]), bytes(reply["secagg"]["s-pk"]))
    return keys


def _share_keys(tmp_path, server_round: int, keys) -> dict[int, dict[int, bytes]]:
    """Every node's stage-2 reply: ciphertexts by destination, then turned into each node's inbox."""
    from dpfpl.client_app.secagg_handlers import share_keys

    roster = {
        "server-round": server_round,
        "secagg-threshold": 2,
        "nodes": list(NODES),
        "c-pk": [keys[n][0] for n in NODES],
        "s-pk": [keys[n][1] for n in NODES],
    }
    inbox: dict[int, dict[int, bytes]] = {n: {} for n in NODES}
    for src in NODES:
        reply = share_keys(_secagg_context(tmp_path, src, "train.secagg_shares", roster))["secagg"]
        for dst, ct in zip(reply["dst"], reply["ct"]):
            inbox[int(dst)][src] = bytes(ct)
    return inbox


def _masked(tmp_path, node: int, server_round: int, inbox):
    from dpfpl.client_app.secagg_handlers import masked_input

    config = {
        "server-round": server_round,
        "src": list(inbox[node]),
        "ct": list(inbox[node].values()),
        "senders": list(NODES),
    }
    return masked_input(_secagg_context(tmp_path, node, "train.secagg_masked", config))


def _damage_session(path, damage: str) -> None:
    from dpfpl.client_app.secagg_handlers import _digest

    saved = json.loads(path.read_text())
    if damage == "garbage":
        path.write_bytes(os.urandom(300))
    elif damage == "list":
        path.write_text("[]")
    elif damage == "no-values":
        del saved["values"]
        path.write_text(json.dumps(saved))
    elif damage == "flip":  # one hex digit of a private key: valid JSON, a plausible session, a wrong key
        key = saved["session"]["c_sk"]
        saved["session"]["c_sk"] = ("1" if key[0] != "1" else "2") + key[1:]
        path.write_text(json.dumps(saved))
    elif damage == "session-key-missing":  # consistent digest, but a session without its keys
        del saved["session"]["s_sk"]
        content = {"session": saved["session"], "values": saved["values"]}
        path.write_text(json.dumps({**content, "sha256": _digest(content)}))
    elif damage == "matrix":  # consistent digest, but the encoded input is not a vector
        saved["values"] = [saved["values"], saved["values"]]
        content = {"session": saved["session"], "values": saved["values"]}
        path.write_text(json.dumps({**content, "sha256": _digest(content)}))


@pytest.mark.parametrize("damage", ["garbage", "list", "no-values", "flip", "session-key-missing", "matrix"])
def test_a_damaged_secagg_session_ends_the_round_for_that_node_only(tmp_path, damage):
    """The session file is damaged between two stages: that node's stage fails with an error naming the file
    (the ClientApp answers it with an error reply, and the server drops the node from this round's secure
    aggregation), the other nodes' stages go on, and the next round starts a fresh session on that node."""
    from dpfpl.client_app.secagg_handlers import SESSION_FILE, CorruptSessionError
    from dpfpl.common.secagg.protocol import SecAggError

    inbox = _share_keys(tmp_path, 1, _advertise(tmp_path, 1))
    path = tmp_path / f"node{NODES[0]}" / SESSION_FILE
    _damage_session(path, damage)
    with pytest.raises(CorruptSessionError, match=rf"state {path} is damaged") as failed:
        _masked(tmp_path, NODES[0], 1, inbox)
    assert isinstance(failed.value, SecAggError)  # the protocol's own error: a per-round failure
    assert "next round starts a fresh session" in str(failed.value)
    for node in NODES[1:]:  # the others are not affected
        assert _masked(tmp_path, node, 1, inbox)["secagg"]["masked"].numpy().shape == (8,)
    # the next round: the damaged node advertises fresh keys over the damaged file and goes through stage 2
    keys = _advertise(tmp_path, 2)
    assert len(set(keys.values())) == 3
    inbox = _share_keys(tmp_path, 2, keys)
    assert _masked(tmp_path, NODES[0], 2, inbox)["secagg"]["masked"].numpy().shape == (8,)


def test_a_damaged_secagg_session_fails_the_key_sharing_stage_too(tmp_path):
    from dpfpl.client_app.secagg_handlers import SESSION_FILE, CorruptSessionError

    keys = _advertise(tmp_path, 1)
    path = tmp_path / f"node{NODES[0]}" / SESSION_FILE
    _damage_session(path, "garbage")
    with pytest.raises(CorruptSessionError, match=str(path)):
        _share_keys(tmp_path, 1, keys)


# ------------------------------------------------------------------------------------------ 4. full disk


def _assert_same_node_state(a_dir, b_dir):
    a, b = NodeState.load(a_dir), NodeState.load(b_dir)
    assert not a.from_previous and not b.from_previous
    assert a.last_round == b.last_round
    assert a.accountant.history == b.accountant.history
    assert torch.equal(a.generator.get_state(), b.generator.get_state())
    for part in ("local", "momentum", "last_reply"):
        x, y = getattr(a, part), getattr(b, part)
        assert set(x) == set(y) and all(torch.equal(x[k], y[k]) for k in x), part
    ledger_a, ledger_b = PrivacyLedger.of(a_dir), PrivacyLedger.of(b_dir)
    assert {k: r.steps for k, r in ledger_a.runs.items()} == {k: r.steps for k, r in ledger_b.runs.items()}


@pytest.mark.parametrize("full_file", [STATE_FILE, LEDGER_FILE])
def test_a_full_disk_during_a_step_stops_it_cleanly_and_the_retry_charges_it_once(
    tmp_path, cache_dir, p_global, disk_full, full_file
):
    """The disk fills up during round 2's step, on the write of the node's state (after the ledger took the
    step's charge) or of the ledger itself (before the step). Either way the step's reply was never built, so
    nothing of it left the node. Expected: a clear error naming the file and saying to free space and resume;
    both copies of every state file as they were, no temporary file left; and once space is freed, round 2
    sent again gives exactly what a node that never saw the fault gives from the same state (its twin: the
    state directory copied before round 2, so the same generator state, hence the same Poisson sample and
    noise): the same local prompt, optimizer state, reply and books, the step charged once in the run's
    accountant and in the ledger."""
    node_dir, twin_dir = tmp_path / "node", tmp_path / "twin"
    ctx, twin = _context(tmp_path, momentum=0.9), _context(tmp_path, node={"state-dir": str(twin_dir)}, momentum=0.9)
    _train(ctx, 1, p_global)
    shutil.copytree(node_dir, twin_dir)
    before = _snapshot(node_dir)

    disk_full(full_file)
    with pytest.raises(DiskFullError, match="no space left on device") as stopped:
        _train(ctx, 2, p_global)
    message = str(stopped.value)
    assert str(node_dir / full_file) in message and "Free space" in message and "resume" in message
    after = _snapshot(node_dir)
    state_files = lambda files: {k: v for k, v in files.items() if k.name.startswith(STATE_FILE)}  # noqa: E731
    assert state_files(after) == state_files(before)  # the node's state (and its previous copy): untouched
    if full_file == LEDGER_FILE:
        assert after == before  # refused before the step: nothing at all changed
    assert _temporary_files(node_dir) == []
    state = NodeState.load(node_dir)
    assert not state.from_previous and state.last_round == 1 and len(state.accountant.history) == 1

    disk_full.stop()  # space freed; the server sends round 2 again
    retried = _train(ctx, 2, p_global).content
    reference = _train(twin, 2, p_global).content
    assert torch.equal(
        torch.from_numpy(retried["arrays"]["global-grad"].numpy()),
        torch.from_numpy(reference["arrays"]["global-grad"].numpy()),
    )
    assert dict(retried["metrics"]) == dict(reference["metrics"])
    _assert_same_node_state(node_dir, twin_dir)
    assert len(NodeState.load(node_dir).accountant.history) == 2
    assert PrivacyLedger.of(node_dir).runs["run-a"].count == 2


def test_a_full_disk_after_the_reply_is_stored_keeps_the_step(tmp_path, cache_dir, p_global, disk_full, caplog):
    """The ledger's last write of a step only marks its charge settled: a full disk there must not fail a step
    whose state and reply are stored (the round, sent again, is answered from them, uncharged)."""
    ctx = _context(tmp_path)
    _train(ctx, 1, p_global)
    disk_full(LEDGER_FILE, let_through=1)  # the charge is written, the settling is not
    with caplog.at_level(logging.WARNING, logger="dpfpl.client"):
        first = _train(ctx, 2, p_global).content
    assert "stays marked pending" in caplog.text
    disk_full.stop()
    again = _train(ctx, 2, p_global).content
    assert torch.equal(
        torch.from_numpy(first["arrays"]["global-grad"].numpy()),
        torch.from_numpy(again["arrays"]["global-grad"].numpy()),
    )
    assert PrivacyLedger.of(tmp_path / "node").runs["run-a"].count == 2
    assert len(NodeState.load(tmp_path / "node").accountant.history) == 2


@pytest.mark.parametrize("how", ["restored-from-backup", "damaged", "damaged-while-its-charge-is-pending"])
def test_a_step_whose_reply_was_stored_is_never_taken_over_by_a_retry(tmp_path, cache_dir, p_global, disk_full, how):
    """The other side of charging a failed step once: a step whose reply was stored may have left, so when the
    node's state goes back to before it (an operator restores an older copy, or the current file is damaged and
    the node falls back to ``.prev``) and the server sends that round again, the new step is charged anew, even
    where a full disk left the stored step's charge marked pending (only a fallback tells it apart then)."""
    node_dir = tmp_path / "node"
    ctx = _context(tmp_path)
    _train(ctx, 1, p_global)
    backup = (node_dir / STATE_FILE).read_bytes()
    if how == "damaged-while-its-charge-is-pending":
        disk_full(LEDGER_FILE, let_through=1)  # round 2 is charged and stored; settling its charge fails
    _train(ctx, 2, p_global)
    disk_full.stop()
    if how == "restored-from-backup":
        (node_dir / STATE_FILE).write_bytes(backup)
        accountant = 1 + 1  # the backup's step, then the new one
    else:
        (node_dir / STATE_FILE).write_bytes(b"damaged")
        accountant = 1 + 1 + 1  # the previous copy's step, the lost step charged again, the new one
    _train(ctx, 2, p_global)
    assert PrivacyLedger.of(node_dir).runs["run-a"].count == 3
    assert len(NodeState.load(node_dir).accountant.history) == accountant


def test_a_full_disk_during_the_server_checkpoint_keeps_the_last_one_and_charges_nothing_again(tmp_path, disk_full):
    """Were the failed write to leave only the previous checkpoint, resuming would take it as a checkpoint lost
    after its round's p_G may have left, and charge every node a re-release that never happened. The full disk
    leaves the last checkpoint current instead: the resumed run simply runs the round again."""
    run_dir = RunDirectory(tmp_path)
    run_dir.save(_server_state(1))
    run_dir.save(_server_state(2))
    disk_full(CHECKPOINT)
    with pytest.raises(DiskFullError, match=rf"no space left on device while writing {tmp_path / CHECKPOINT}"):
        run_dir.save(_server_state(3))
    assert _temporary_files(tmp_path) == []
    disk_full.stop()
    state = run_dir.load()
    assert state.server_round == 2 and state.rereleased == {} and state.rerelease_round == 0
    assert torch.equal(state.p_global, torch.full((4, 8), 2.0))
    assert RunDirectory(tmp_path).load().server_round == 2
    assert previous_path(tmp_path / CHECKPOINT).is_file()
