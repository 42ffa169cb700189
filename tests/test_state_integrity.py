"""Damaged state files: a node's local prompt and the server's checkpoint survive a torn or corrupted write
by falling back to the previous copy, and say so; when no copy is intact they refuse with a clear error."""

import logging
import os

import pytest
import torch

from dpfpl.client_app.state import STATE_FILE, NodeState
from dpfpl.common.atomic import CorruptStateError, previous_path
from dpfpl.common.privacy import PrivacyAccountant
from dpfpl.server_app.checkpoint import CHECKPOINT, RunDirectory, ServerState


def _node_state(round_: int) -> NodeState:
    acc = PrivacyAccountant(1e-5)
    for _ in range(round_):
        acc.record_step(2.0, 3.0, 0.1)
    return NodeState(
        local={"p_local": torch.full((4, 8), float(round_))},
        generator=torch.Generator().manual_seed(1),
        accountant=acc,
        last_round=round_,
        run_key="run",
    )


def _flip_a_byte(path, offset_from_end=5):
    data = bytearray(path.read_bytes())
    data[-offset_from_end] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", ["flip", "truncate", "missing"])
def test_a_damaged_local_state_falls_back_to_the_previous_round(tmp_path, caplog, damage):
    _node_state(1).save(tmp_path)
    _node_state(2).save(tmp_path)
    path = tmp_path / STATE_FILE
    assert previous_path(path).is_file()
    if damage == "flip":
        _flip_a_byte(path)  # inside the tensor bytes: the file still parses, the digest catches it
    elif damage == "truncate":
        path.write_bytes(path.read_bytes()[:-40])
    else:
        os.remove(path)  # a crash between keeping .prev and writing the new file
    with caplog.at_level(logging.WARNING, logger="dpfpl.state"):
        state = NodeState.load(tmp_path)
    assert state.last_round == 1 and torch.equal(state.local["p_local"], torch.full((4, 8), 1.0))
    # the lost write may have followed a release: it is charged again, never forgotten
    assert len(state.accountant.history) == 2
    assert "previous state" in caplog.text


def test_no_intact_copy_is_refused_with_both_files_named(tmp_path):
    _node_state(1).save(tmp_path)
    _node_state(2).save(tmp_path)
    path = tmp_path / STATE_FILE
    _flip_a_byte(path)
    _flip_a_byte(previous_path(path))
    with pytest.raises(CorruptStateError) as err:
        NodeState.load(tmp_path)
    assert str(path) in str(err.value) and str(previous_path(path)) in str(err.value)
    assert "backup" in str(err.value)


def test_an_intact_state_round_trips_and_a_fresh_directory_has_none(tmp_path):
    assert NodeState.load(tmp_path) is None
    _node_state(3).save(tmp_path)
    state = NodeState.load(tmp_path)
    assert state.last_round == 3 and torch.equal(state.local["p_local"], torch.full((4, 8), 3.0))


def test_a_damaged_server_checkpoint_resumes_from_the_previous_round(tmp_path):
    run = RunDirectory(tmp_path)
    for r in (1, 2):
        run.save(
            ServerState(
                p_global=torch.full((4, 8), float(r)),
                momentum=None,
                server_round=r,
                run_token="t",
                noise_multiplier_global=2.0,
                config_fingerprint="f",
                participation={"1": r},
            )
        )
    _flip_a_byte(tmp_path / CHECKPOINT)
    state = run.load()
    # round 2's p_G may have left before its checkpoint was lost: the resumed run releases round 2 again with
    # fresh noise on the same replies, so the books charge that round as a second release of its batch, and the
    # round's train message tells the nodes so (they book their re-sent reply the same way)
    assert state.server_round == 1 and state.participation == {"1": 1}
    assert state.rereleased == {"1": 1} and state.rerelease_round == 2
    assert torch.equal(state.p_global, torch.full((4, 8), 1.0))
