"""A real Flower simulation: managed SuperLink in simulation mode, Ray SuperNodes, ServerApp + ClientApps."""

import json
from pathlib import Path

import pytest

from dpfpl.launch import run_simulation

pytestmark = pytest.mark.flower


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, cache_dir):
    work = tmp_path_factory.mktemp("sim")
    config = {
        "num-clients": 3,
        "classes-per-client": 2,
        "min-clients": 3,
        "num-server-rounds": 3,
        "eval-every": 1,
        "dp": False,
        "lr-global": 0.05,
        "lr-local": 0.05,
        "batch-size": 64,
        "ctx-init": "",
        "run-dir": str(work / "run"),
        "resume": False,
    }
    run_simulation(config, 3, work, stream=False, timeout=900)
    return work / "run"


def test_three_round_simulation_completes_and_beats_zero_shot(finished_run):
    metrics = [json.loads(line) for line in (finished_run / "metrics.jsonl").read_text().splitlines()]
    assert [m["round"] for m in metrics] == [0, 1, 2, 3]
    assert all(m["updated"] and m["num-replies"] == 3 for m in metrics[1:])
    summary = json.loads((finished_run / "summary.json").read_text())
    assert summary["rounds"] == 3
    assert summary["final"]["local-acc"] > summary["zeroshot"]["local-acc"]
    for node in range(3):
        assert (finished_run / "nodes" / f"node-{node}" / "local_state.safetensors").is_file()


def test_no_flower_process_is_left_running(finished_run):
    """Every process of the launch (SuperLink, simulation, Ray workers) inherited FLWR_HOME: none may remain."""
    needle = f"FLWR_HOME={finished_run.parent / '.flwr'}".encode()
    left = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if needle in (entry / "environ").read_bytes().split(b"\0"):
                    left.append(int(entry.name))
            except OSError:
                pass
    assert left == []


def test_resume_continues_from_the_checkpoint_without_repeating_rounds(finished_run):
    """A second launch on the same run directory with one more round runs only that round."""
    from dpfpl.client_app.state import NodeState
    from dpfpl.server_app.checkpoint import RunDirectory

    before = RunDirectory(finished_run).load()
    config = {
        "num-clients": 3,
        "classes-per-client": 2,
        "min-clients": 3,
        "num-server-rounds": 4,
        "eval-every": 1,
        "dp": False,
        "lr-global": 0.05,
        "lr-local": 0.05,
        "batch-size": 64,
        "ctx-init": "",
        "run-dir": str(finished_run),
        "resume": True,
    }
    run_simulation(config, 3, finished_run.parent / "resume", stream=False, timeout=900)
    after = RunDirectory(finished_run).load()
    assert (before.server_round, after.server_round) == (3, 4)
    assert after.run_token == before.run_token
    metrics = [json.loads(line) for line in (finished_run / "metrics.jsonl").read_text().splitlines()]
    assert [m["round"] for m in metrics] == [0, 1, 2, 3, 4]
    for node in range(3):
        assert NodeState.load(finished_run / "nodes" / f"node-{node}").last_round == 4


def test_a_method_that_shares_nothing_runs_through_real_flower_messages(tmp_path, cache_dir):
    """CoOp's messages carry no array at all (only config and metrics): Flower must carry them as they are."""
    config = {
        "method": "coop",
        "num-clients": 3,
        "classes-per-client": 2,
        "min-clients": 3,
        "num-server-rounds": 2,
        "eval-every": 1,
        "dp": True,
        "target-epsilon": 1.0,
        "lr-local": 0.05,
        "batch-size": 32,
        "run-dir": str(tmp_path / "run"),
        "resume": False,
    }
    run_simulation(config, 3, tmp_path, stream=False, timeout=900)
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["round"] for m in metrics] == [0, 1, 2]
    assert all(m["updated"] and m["num-replies"] == 3 for m in metrics[1:])
    assert all(0 < m["epsilon-local-max"] <= 1.0 and m["epsilon-global-max"] == 0.0 for m in metrics[1:])
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["method"] == "coop" and summary["rounds"] == 2
