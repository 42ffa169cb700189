"""A run that cannot succeed fails loudly, and one that partly failed says so.

* Setup: with fewer healthy nodes (model loaded, data checked) than min-clients the run stops before round 1,
  exits non-zero and names each failed node with its reason (a real Flower simulation through `dpfpl
  simulate`, whose only other node has a broken silo).
* Rounds: the summary, `dpfpl report` and the outcome count the rounds that updated the global prompt
  (k of n); a run with none fails, a run with some failed rounds ends with a warning that counts them. The
  report shows the published prompt, the worst client and, where `dpfpl demo` ran one, the no-DP reference.
* User-facing errors are one paragraph without a traceback; ``--debug`` shows it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dpfpl.cli import main
from dpfpl.common.outcome import OUTCOME_FILE, RunFailed, RunOutcome, client_error_text
from dpfpl.run_report import reference_dir, report
from tests.test_fault_tolerance import _run
from tests.test_silo import write_images

CLASSES = ["cat", "dog", "cow", "owl"]


# ------------------------------------------------------------------ rounds that fail: k of n
def test_a_run_where_some_rounds_fail_reports_k_of_n(tmp_path, cache_dir):
    # partitions 1 and 2 are down in round 2: one reply < min-clients 2, the global prompt stays as it was
    summary, _ = _run(tmp_path, rounds=3, down={1: {2}, 2: {2}})
    run_dir = tmp_path / "run"
    assert (summary["rounds-run"], summary["rounds-updated"]) == (3, 2)
    assert json.loads((run_dir / "summary.json").read_text())["rounds-updated"] == 2
    assert "global prompt updated in 2 of 3 rounds" in report(run_dir)
    outcome = RunOutcome.read(run_dir)
    assert outcome.status == "completed" and outcome.failed_rounds == 1
    assert outcome.paragraph().startswith("warning: the global prompt was updated in 2 of 3 rounds; 1 round(s)")


def test_a_run_where_no_round_updates_fails_and_still_reports_0_of_n(tmp_path, cache_dir):
    with pytest.raises(RunFailed, match="updated in 0 of 2 rounds"):
        _run(tmp_path, rounds=2, down={1: {1, 2}, 2: {1, 2}})
    run_dir = tmp_path / "run"
    assert RunOutcome.read(run_dir).status == "no-round-updated"
    assert "global prompt updated in 0 of 2 rounds" in report(run_dir)  # the table is there, and says so


def test_a_run_whose_rounds_all_update_says_n_of_n(tmp_path, cache_dir):
    summary, _ = _run(tmp_path, rounds=2)
    assert (summary["rounds-run"], summary["rounds-updated"]) == (2, 2)
    outcome = RunOutcome.read(tmp_path / "run")
    assert outcome.failed_rounds == 0 and not outcome.paragraph().startswith("warning")


def test_the_report_shows_the_published_prompt_the_no_dp_reference_and_the_worst_client(tmp_path, cache_dir):
    """`dpfpl report`: the row of the prompt the run publishes (the mean of the rounds it averages), the worst
    client's line against its own zero-shot, and the row of the same recipe without DP only where `dpfpl demo`
    ran that reference beside the run (RUN_DIR-no-dp)."""
    summary, _ = _run(tmp_path, rounds=2)  # publish-average 10 > 2 rounds: the mean of rounds 1-2
    run_dir = tmp_path / "run"
    lines = report(run_dir).splitlines()
    published = next(line for line in lines if line.startswith("published prompt (mean of rounds 1-2)"))
    assert f"{summary['published']['local-acc']:.4f}" in published
    assert not any("same recipe without DP" in line for line in lines)  # no reference beside this run
    worst = summary["worst-client"]
    assert (
        f"worst client, published prompt ({worst['client']}): local {worst['local-acc']:.4f}, its zero-shot "
        f"{worst['zeroshot-local-acc']:.4f} ({worst['gain'] * 100:+.1f} points); "
        f"{worst['clients-below-zeroshot']} of 3 clients below their zero-shot"
    ) in lines
    # the reference run's summary, where `dpfpl demo` writes it: its published prompt is the row's number
    reference = {**summary, "privacy": {"dp": False}, "published": {**summary["published"], "local-acc": 0.4321}}
    reference_dir(run_dir).mkdir()
    (reference_dir(run_dir) / "summary.json").write_text(json.dumps(reference))
    lines = report(run_dir).splitlines()
    row = next(i for i, line in enumerate(lines) if line.startswith("same recipe without DP (reference)"))
    assert "0.4321" in lines[row] and lines[row - 1].startswith("published prompt")


# ------------------------------------------------------------------ setup: too few healthy nodes
def _silos(root: Path) -> None:
    """Silo 0 is sound; silo 1 has an unknown label and a corrupt image."""
    for split, n in (("train", 6), ("test", 2)):
        for c in CLASSES[:2]:
            write_images(root / "0" / split / c, n, seed=hash((split, c)) % 1000)
    write_images(root / "1" / "cow", 4, seed=5)
    write_images(root / "1" / "horse", 2, seed=6)
    (root / "1" / "cow" / "broken.png").write_bytes(b"\x89PNG not really")


def test_a_run_whose_only_other_node_has_a_broken_silo_stops_before_round_1(tmp_path, cache_dir):
    """Real Flower simulation (SuperLink, Ray SuperNodes) through the user's command."""
    _silos(tmp_path / "silos")
    run_dir = tmp_path / "run"
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0"}
    done = subprocess.run(
        [
            str(Path(sys.executable).parent / "dpfpl"),
            "simulate",
            "--quiet",
            "--run-dir",
            str(run_dir),
            "-c",
            "dataset=silo",
            "-c",
            f"silo-root={tmp_path / 'silos'}",
            "-c",
            f"classnames={','.join(CLASSES)}",
            "-c",
            "pretrained=none",
            "-c",
            "num-clients=2",
            "-c",
            "min-clients=2",
            "-c",
            "num-server-rounds=3",
            "-c",
            "batch-size=8",
            "-c",
            "n-ctx=4",
            "-c",
            "resume=false",
        ],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=900,
    )
    print(done.stdout[-3000:], done.stderr[-3000:])
    assert done.returncode != 0
    assert "Traceback" not in done.stderr
    assert "stopped before round 1: 1 node(s) passed the setup check" in done.stderr
    assert "min-clients = 2" in done.stderr
    # the failed node, named by its partition, with the reason it reported (its silo's details stay in its log)
    assert "(partition-1): this node's data silo failed its checks" in done.stderr
    assert "partition-0" not in done.stderr
    outcome = RunOutcome.read(run_dir)
    assert outcome.status == "setup-failed" and outcome.healthy_nodes == 1
    assert [f.node.endswith("(partition-1)") for f in outcome.failed_nodes] == [True]
    # nothing trained: no round was logged, no local prompt written
    rounds = (
        [json.loads(x)["round"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
        if (run_dir / "metrics.jsonl").is_file()
        else []
    )
    assert rounds == [] and not list(run_dir.rglob("local_state*"))


def test_a_simulation_with_fewer_supernodes_than_clients_names_the_command_that_fixes_it(tmp_path, cache_dir):
    from dpfpl.client_app.app import app as client_app
    from dpfpl.common.config import RunConfig
    from dpfpl.inprocess import InProcessGrid, full_run_config
    from dpfpl.server_app.runner import run_federation

    config = full_run_config(
        {
            "num-clients": 3,
            "min-clients": 2,
            "num-server-rounds": 1,
            "pretrained": "none",
            "run-dir": str(tmp_path / "run"),
        }
    )
    grid = InProcessGrid(client_app, config, 2, {"num-threads": 1})  # 2 SuperNodes, num-clients 3
    with grid.identity(), pytest.raises(RunFailed) as err:
        run_federation(grid, RunConfig.from_flower(config))
    assert "0 node(s) passed" in str(err.value)
    assert str(err.value).count("--federation-config 'num-supernodes=3'") == 1  # one reason, both nodes named
    assert "(partition-0), node " in str(err.value) and "(partition-1): the simulation runs 2 SuperNodes" in str(
        err.value
    )


def test_flowers_wrapping_of_a_node_exception_is_removed():
    inner = "<class 'dpfpl.client_app.app.NodeUnfit'>:<'partition-1: the silo\nfailed'>"
    wrapped = (
        "<class 'flwr.clientapp.client_app.ClientAppException'>:<'\nException ClientAppException occurred. "
        f"Message: {inner}'>"
    )
    # the simulation engine's: a Ray error whose text carries the traceback, the message after its last marker
    ray = (
        "<class 'ray.exceptions.RayTaskError(ClientAppException)'>:<'ray::ClientAppActor.run() File \"app.py\", "
        'line 72, in _node raise _unfit(node_cfg, "the silo") dpfpl.client_app.app.NodeUnfit: partition-1: the silo '
        "failed The above exception was the direct cause of the following exception: ClientAppException: "
        "Exception ClientAppException occurred. Message: partition-1: the silo\nfailed'>"
    )
    assert (
        client_error_text(inner)
        == client_error_text(wrapped)
        == client_error_text(ray)
        == "partition-1: the silo failed"
    )
    assert client_error_text("plain words") == "plain words"


def test_the_outcome_file_is_validated(tmp_path):
    (tmp_path / OUTCOME_FILE).write_text(json.dumps({"status": "done?", "min_clients": 2, "healthy_nodes": 1}))
    with pytest.raises(ValueError):
        RunOutcome.read(tmp_path)


# ------------------------------------------------------------------ one-paragraph errors
@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["pretrained=/nowhere/open_clip_model.safetensors"], "weights file '/nowhere/open_clip_model.safetensors'"),
        (["dataset=folder", "data-root=/nowhere"], "/nowhere"),
        (["num-clients=-1"], "invalid run config"),  # 0 is valid: one client per SuperNode (flwr run)
    ],
)
def test_user_errors_are_one_paragraph_and_debug_shows_the_traceback(overrides, expected, capsys):
    argv = ["prepare"] + [a for o in overrides for a in ("-c", o)]
    with pytest.raises(SystemExit) as err:
        main(argv)
    text = str(err.value.code)
    assert text.startswith("dpfpl") and expected in text
    assert "Traceback" not in text and "\n\n" not in text
    assert "Traceback" not in capsys.readouterr().err
    if "invalid run config" not in text:  # the config check has no traceback to show
        with pytest.raises(Exception) as raised:
            main(argv + ["--debug"])
        assert not isinstance(raised.value, SystemExit)


def test_a_sweep_run_without_an_updated_round_is_not_done(tmp_path):
    """The sweep re-runs (and again reports as failed) a run that has a summary but no result."""
    from dpfpl.sweep import is_done

    for updated, done in ((0, False), (1, True)):
        (tmp_path / "summary.json").write_text(json.dumps({"rounds": 2, "rounds-run": 2, "rounds-updated": updated}))
        assert is_done(tmp_path, 2) is done
    (tmp_path / "summary.json").write_text(json.dumps({"rounds": 0, "rounds-run": 0, "rounds-updated": 0}))
    assert is_done(tmp_path, 0)  # zero-shot trains no round: its summary is its result
