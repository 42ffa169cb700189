"""The in-process Grid (dpfpl.inprocess) and the experiment sweep (dpfpl.sweep): delivery and reply metadata,
error replies, a tiny real sweep (2 methods x 2 epsilons x 2 seeds), resumability, and the table's numbers."""

import csv
import json
import logging
import re
import shutil
import statistics

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common import MessageType
from flwr.common.constant import SUPERLINK_NODE_ID, ErrorCode

from dpfpl.inprocess import InProcessGrid, node_id_for
from dpfpl.server_app.checkpoint import RunDirectory
from dpfpl.sweep import SweepSpec, expand, run_dir_of, run_sweep
from dpfpl.sweep_report import format_cell, report

# ------------------------------------------------------------------------------------------------ (a) the grid

tiny_app = ClientApp()


@tiny_app.train()
def _tiny_train(msg: Message, context) -> Message:
    """Counts its calls in the node's context; scribbles on the array it received; fails on request."""
    calls = int(context.state["calls"]["n"]) + 1 if "calls" in context.state.config_records else 1
    context.state["calls"] = ConfigRecord({"n": calls})
    msg.content["arrays"]["w"].data = b"overwritten by the client"  # must not reach the server's message
    if msg.content["config"]["fail"]:
        raise RuntimeError("this node has no data")
    metrics = {
        "partition-id": int(context.node_config["partition-id"]),
        "calls": calls,
        "num-partitions": int(context.node_config["num-partitions"]),
    }
    return Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)


def _instructions(grid: InProcessGrid, fail_partition: int) -> list[Message]:
    messages = []
    for node_id in grid.get_node_ids():
        partition = grid.contexts[node_id].node_config["partition-id"]
        content = RecordDict(
            {
                "arrays": ArrayRecord({"w": torch.arange(4.0)}),
                "config": ConfigRecord({"fail": partition == fail_partition}),
            }
        )
        messages.append(Message(content, node_id, MessageType.TRAIN, group_id="7"))
    return messages


def test_in_process_grid_replies_like_flower_and_turns_exceptions_into_error_replies(caplog):
    grid = InProcessGrid(tiny_app, {"some-key": 1}, num_nodes=3, node_config={"cache-dir": "/nowhere"})
    node_ids = list(grid.get_node_ids())
    assert len(set(node_ids)) == 3 and SUPERLINK_NODE_ID not in node_ids
    assert node_ids == [node_id_for(i) for i in range(3)]  # stable across runs: resume meets the same nodes
    assert grid.contexts[node_ids[2]].node_config == {"partition-id": 2, "num-partitions": 3, "cache-dir": "/nowhere"}
    assert grid.contexts[node_ids[0]].run_config == {"some-key": 1}

    with grid.identity(), caplog.at_level(logging.ERROR, logger="dpfpl.inprocess"):
        messages = _instructions(grid, fail_partition=1)
        replies = list(grid.send_and_receive(messages))
        assert len(replies) == 3
        by_request = {m.metadata.message_id: m for m in messages}
        assert set(by_request) == {r.metadata.reply_to_message_id for r in replies}
        for reply in replies:
            request = by_request[reply.metadata.reply_to_message_id]
            md = reply.metadata
            assert request.metadata.src_node_id == SUPERLINK_NODE_ID
            assert (md.run_id, md.src_node_id, md.dst_node_id) == (
                grid.run.run_id,
                request.metadata.dst_node_id,
                SUPERLINK_NODE_ID,
            )
            assert (md.message_type, md.group_id) == (MessageType.TRAIN, "7")
            assert md.message_id and md.message_id != request.metadata.message_id and md.ttl > 0
            # the client scribbled on its copy only
            np.testing.assert_array_equal(request.content["arrays"]["w"].numpy(), np.arange(4))
        failed = [r for r in replies if r.has_error()]
        assert len(failed) == 1
        assert failed[0].error.code == ErrorCode.CLIENT_APP_RAISED_EXCEPTION
        assert failed[0].error.reason == "<class 'RuntimeError'>:<'this node has no data'>"
        assert failed[0].metadata.src_node_id == node_ids[1]
        assert any("raised an exception" in rec.getMessage() and rec.exc_info for rec in caplog.records)

        # a second round: each node's context persisted; the failed call left its node's context unchanged
        replies = list(grid.send_and_receive(_instructions(grid, fail_partition=-1)))
        calls = {int(r.content["metrics"]["partition-id"]): int(r.content["metrics"]["calls"]) for r in replies}
        assert calls == {0: 2, 1: 1, 2: 2}
        assert {int(r.content["metrics"]["num-partitions"]) for r in replies} == {3}

        # as the SuperLink: a message for a node that is not connected is not delivered
        lost = Message(RecordDict({"config": ConfigRecord({"fail": False})}), 12345, MessageType.TRAIN)
        assert list(grid.push_messages([lost])) == []
        assert list(grid.pull_messages(["no-such-id"])) == []


# ------------------------------------------------------------------------------------------------ (b, c) a tiny sweep

TINY = {
    "num-clients": 3,
    "classes-per-client": 2,
    "min-clients": 3,
    "num-server-rounds": 2,
    "eval-every": 1,
    "eval-last": 2,
    "batch-size": 8,
    "n-ctx": 4,
    "lr-global": 0.05,
    "lr-local": 0.05,
    "pretrained": "none",
    "resume": True,
}
METHODS = ["dpfpl", "dpfpl-noresidual"]


def _spec(out, **changes) -> SweepSpec:
    fields = {
        "methods": METHODS,
        "epsilons": ["none", 1.0],
        "seeds": [0, 1],
        "ranks": [2],
        "base": TINY,
        "out": str(out),
        "command": "dpfpl sweep (tests/test_sweep.py)",
    }
    return SweepSpec(**{**fields, **changes})


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, cache_dir):
    out = tmp_path_factory.mktemp("sweep")
    spec = _spec(out)
    outcome = run_sweep(spec, progress=False)
    return spec, out, outcome


def test_expansion_zeroshot_once_per_seed_and_rank_only_for_factorized_methods():
    spec = SweepSpec(
        methods=["zeroshot", "promptfl", "dpfpl"], epsilons=["none", 0.4], seeds=[0, 1], ranks=[2, 8], base={}, out="x"
    )
    names = [r.name for r in expand(spec)]
    assert len(names) == 2 * (1 + 2 + 2 * 2)
    assert "zeroshot_eps-none_rank-na_seed-1" in names and "promptfl_eps-0.4_rank-na_seed-0" in names
    assert "dpfpl_eps-0.4_rank-8_seed-1" in names
    run = next(r for r in expand(spec) if r.name == "dpfpl_eps-0.4_rank-8_seed-1")
    overrides = run.overrides(spec, run_dir_of(spec.out, run))
    assert (overrides["dp"], overrides["target-epsilon"], overrides["rank"], overrides["seed"]) == (True, 0.4, 8, 1)
    with pytest.raises(ValueError, match="seed"):
        SweepSpec(methods=["dpfpl"], epsilons=["none"], seeds=[0], base={"seed": 3})
    with pytest.raises(ValueError):
        SweepSpec(methods=["dpfpl"], epsilons=[0.0], seeds=[0])


def test_tiny_sweep_writes_results_table_and_plots(sweep):
    spec, out, outcome = sweep
    assert outcome.failed == {} and len(outcome.ran) == 8 and outcome.skipped == []
    with open(out / "results.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert {"method", "epsilon", "rank", "seed", "round", "phase", "local-acc", "neighbor-acc"} <= set(rows[0])
    got = sorted((r["method"], r["epsilon"], r["seed"], r["round"]) for r in rows if r["phase"] != "published")
    expected = sorted((m, e, s, rnd) for m in METHODS for e in ("none", "1") for s in ("0", "1") for rnd in "012")
    assert got == expected
    # one row per run for the prompt it published, at its last round: the number the table reports
    published = [r for r in rows if r["phase"] == "published"]
    assert sorted((r["method"], r["epsilon"], r["seed"]) for r in published) == sorted(
        (m, e, s) for m in METHODS for e in ("none", "1") for s in ("0", "1")
    )
    last = {(r["method"], r["epsilon"], r["seed"]): r["round"] for r in rows if r["phase"] != "published"}
    assert all(r["round"] == last[r["method"], r["epsilon"], r["seed"]] for r in published)  # zero-shot: round 0
    assert all(0.0 <= float(r["local-acc"]) <= 1.0 for r in published)
    assert {r["rank"] for r in rows} == {"2"}
    assert {r["phase"] for r in rows if r["round"] == "0"} == {"zeroshot"}
    assert all(r["epsilon-global-max"] for r in rows if r["epsilon"] == "1" and r["phase"] == "train")
    assert not any(r.get("epsilon-global-max") for r in rows if r["epsilon"] == "none")

    table = (out / "table.md").read_text()
    assert "Command: `dpfpl sweep (tests/test_sweep.py)`" in table and "seeds: 2" in table
    local = table.split("## Local accuracy (%)")[1].split("##")[0]
    lines = [line for line in local.splitlines() if line.startswith("|")]
    assert [c.strip() for c in lines[0].strip("|").split("|")] == ["ε", *METHODS]
    assert [line.split("|")[1].strip() for line in lines[2:]] == ["none (no DP)", "1", "zero-shot"]
    for line in lines[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")[1:]]
        assert all(re.fullmatch(r"(\*\*)?\d+\.\d\d ± \d+\.\d\d(\*\*)?", c) for c in cells), line
    assert "## Neighbor accuracy (%)" in table
    for name in ("acc_vs_epsilon.png", "acc_vs_round.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert SweepSpec.model_validate_json((out / "sweep.json").read_text()) == spec


def test_sweep_rerun_skips_finished_runs_and_resumes_only_the_unfinished_one(sweep):
    spec, out, _ = sweep
    names = [r.name for r in expand(spec)]
    summaries = {n: out / "runs" / n / "summary.json" for n in names}
    mtimes = {n: p.stat().st_mtime_ns for n, p in summaries.items()}

    again = run_sweep(spec, progress=False)
    assert again.ran == [] and again.failed == {} and again.skipped == names
    assert {n: p.stat().st_mtime_ns for n, p in summaries.items()} == mtimes

    victim = "dpfpl-noresidual_eps-1_rank-2_seed-1"
    run_dir = out / "runs" / victim
    checkpoint_mtime = (run_dir / "checkpoint.safetensors").stat().st_mtime_ns
    token = RunDirectory(run_dir).load().run_token
    summaries[victim].unlink()
    third = run_sweep(spec, progress=False)
    assert third.ran == [victim] and third.failed == {}
    assert json.loads(summaries[victim].read_text())["rounds"] == 2
    # resumed after its checkpointed last round: no round ran again, nothing was restarted
    assert (run_dir / "checkpoint.safetensors").stat().st_mtime_ns == checkpoint_mtime
    assert RunDirectory(run_dir).load().run_token == token
    rounds = [json.loads(line)["round"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert rounds == [0, 1, 2]
    assert all(summaries[n].stat().st_mtime_ns == mtimes[n] for n in names if n != victim)


def test_a_failing_run_is_recorded_and_the_sweep_goes_on(sweep, tmp_path):
    _, out, _ = sweep
    spec = _spec(tmp_path, methods=["dpfpl"], epsilons=["none"])
    bad = run_dir_of(tmp_path, expand(spec)[0])  # seed 0: holds the checkpoint of another configuration
    bad.mkdir(parents=True)
    shutil.copy(out / "runs" / "dpfpl_eps-1_rank-2_seed-0" / "checkpoint.safetensors", bad)
    outcome = run_sweep(spec, progress=False)
    assert list(outcome.failed) == [bad.name] and "different configuration" in outcome.failed[bad.name]
    assert outcome.ran == ["dpfpl_eps-none_rank-2_seed-1"]
    assert (bad / "error.txt").is_file()
    table = (tmp_path / "table.md").read_text()
    assert f"failed: `{bad.name}`" in table and "(1/2 seeds)" in table


# ------------------------------------------------------------------------------------------------ (d) the table


def _write_run(out, run, local, neighbor, zeroshot_local):
    run_dir = run_dir_of(out, run)
    run_dir.mkdir(parents=True)
    (run_dir / "sweep-run.json").write_text(json.dumps(run.label()))
    summary = {
        "method": run.method,
        "model": "tiny",
        "rounds": 10,
        "num-clients": 4,
        "zeroshot": {"local-acc": zeroshot_local, "neighbor-acc": 0.1},
        "final": {"local-acc": local, "neighbor-acc": neighbor},
        "last-rounds-mean": {"rounds": [6, 10], "evaluations": 5, "local-acc": local, "neighbor-acc": neighbor},
        "privacy": {"dp": run.epsilon is not None, "delta": 1e-5, "calibrate-for": "each"},
    }
    (run_dir / "summary.json").write_text(json.dumps(summary))
    metrics = [
        {"round": 0, "phase": "zeroshot", "local-acc": zeroshot_local},
        {"round": 10, "phase": "train", "local-acc": local, "neighbor-acc": neighbor},
    ]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))


LOCAL = {  # (method, epsilon) -> local accuracy of seeds 0, 1, 2 (None: that run never started)
    ("promptfl", None): [0.50, 0.60, 0.70],
    ("dpfpl", None): [0.80, 0.82, 0.84],
    ("promptfl", 0.4): [0.71, 0.73, 0.75],
    ("dpfpl", 0.4): [0.70, 0.70, 0.70],
    ("promptfl", 0.1): [0.40, 0.40, 0.40],
    ("dpfpl", 0.1): [0.60, 0.62, None],
}


def test_table_cells_are_mean_and_std_over_seeds_with_the_best_in_bold(tmp_path):
    spec = SweepSpec(
        methods=["zeroshot", "promptfl", "dpfpl"],
        epsilons=["none", 0.4, 0.1],
        seeds=[0, 1, 2],
        ranks=[8],
        base={},
        out=str(tmp_path),
    )
    (tmp_path / "sweep.json").write_text(spec.model_dump_json())
    for run in expand(spec):
        zeroshot_local = 0.30 + 0.01 * run.seed
        if run.method == "zeroshot":
            _write_run(tmp_path, run, 0.0, 0.0, zeroshot_local)
            continue
        local = LOCAL[(run.method, run.epsilon)][run.seed]
        if local is not None:
            _write_run(tmp_path, run, local, local / 2, zeroshot_local)
    report(tmp_path)
    table = (tmp_path / "table.md").read_text()
    local = table.split("## Local accuracy (%)")[1].split("##")[0]
    rows = {
        line.split("|")[1].strip(): [c.strip() for c in line.strip().strip("|").split("|")[1:]]
        for line in local.splitlines()
        if line.startswith("|") and not line.startswith("|---")
    }
    assert rows["ε"] == ["zeroshot", "promptfl", "dpfpl"]
    assert list(rows)[1:] == ["none (no DP)", "0.4", "0.1", "zero-shot"]
    assert rows["none (no DP)"] == ["31.00 ± 1.00", "60.00 ± 10.00", "**82.00 ± 2.00**"]
    assert rows["0.4"] == ["31.00 ± 1.00", "**73.00 ± 2.00**", "70.00 ± 0.00"]
    std = 100 * statistics.stdev([0.60, 0.62])
    assert rows["0.1"] == ["31.00 ± 1.00", "40.00 ± 0.00", f"**61.00 ± {std:.2f}** (2/3 seeds)"]
    assert rows["zero-shot"] == ["31.00 ± 1.00"] * 3
    neighbor = table.split("## Neighbor accuracy (%)")[1].split("##")[0]
    assert "| none (no DP) | 10.00 ± 0.00 | 30.00 ± 5.00 | **41.00 ± 1.00** |" in neighbor
    assert "not started: `dpfpl_eps-0.1_rank-8_seed-2`" in table
    assert format_cell([0.5], expected=1) == "50.00" and format_cell([], expected=3) == "–"
    with open(tmp_path / "results.csv") as fh:
        assert len(list(csv.DictReader(fh))) == 2 * (3 + 17)


@pytest.mark.slow
def test_parallel_workers_reproduce_the_sequential_non_dp_results(sweep, tmp_path):
    """Without DP a run is deterministic (seeded sampling), so two worker processes must give exactly the
    per-round accuracies of the sequential sweep."""
    spec, out, _ = sweep
    parallel = _spec(tmp_path, epsilons=["none"], seeds=[0], workers=2)
    outcome = run_sweep(parallel, progress=False)
    assert outcome.failed == {} and len(outcome.ran) == 2
    for run in expand(parallel):
        ours = RunDirectory(run_dir_of(tmp_path, run)).read_metrics()
        theirs = RunDirectory(run_dir_of(out, run)).read_metrics()
        # same samples, same noise-free updates: equal up to float summation order (thread counts differ)
        ours, theirs = _flat(ours), _flat(theirs)
        assert ours.keys() == theirs.keys()
        numbers = [k for k, v in theirs.items() if isinstance(v, float)]
        assert {k: v for k, v in ours.items() if k not in numbers} == {
            k: v for k, v in theirs.items() if k not in numbers
        }
        assert [ours[k] for k in numbers] == pytest.approx([theirs[k] for k in numbers], rel=1e-5)


def _flat(rows: list[dict]) -> dict:
    """One flat {round/key/...: value} map of metrics rows (pytest.approx compares flat maps only)."""
    out = {}

    def walk(prefix: str, value):
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}/{k}", v)
        elif "seconds" not in prefix.rsplit("/", 1)[-1]:  # wall-clock timings (round-, client-seconds-*) vary
            out[prefix] = value

    for i, row in enumerate(rows):
        walk(str(i), row)
    return out


def test_zeroshot_runs_once_and_is_not_repeated_by_a_second_sweep(cache_dir, tmp_path):
    spec = _spec(tmp_path, methods=["zeroshot"], seeds=[0])
    first = run_sweep(spec, progress=False)
    again = run_sweep(spec, progress=False)
    assert first.ran == ["zeroshot_eps-none_rank-na_seed-0"] and again.ran == [] and again.skipped == first.ran
    rows = RunDirectory(run_dir_of(tmp_path, expand(spec)[0])).read_metrics()
    assert [r["round"] for r in rows] == [0]
    table = (tmp_path / "table.md").read_text()
    assert "| none (no DP) |" in table


def test_worst_client_and_published_epsilon_tables(tmp_path):
    """A mean can hide a collapsed node: the table shows each cell's worst client (worst seed) and the
    published prompt's epsilon the accountant reported."""
    from dpfpl.common.evaluation import last_rounds_per_client, worst_client

    zeroshot = {"partition-0": {"local-acc": 0.80}, "partition-1": {"local-acc": 0.90}}
    final = {"partition-0": {"local-acc": 0.95}, "partition-1": {"local-acc": 0.70}}
    worst = worst_client(zeroshot, final)
    assert worst["client"] == "partition-1" and worst["gain"] == pytest.approx(-0.20)
    assert worst["clients-below-zeroshot"] == 1 and worst_client({}, final) == {}
    # per client, the table's measure: the mean of the evaluations in the last rounds
    evals = [{"round": r, "per-client": {"partition-0": {"local-acc": a}}} for r, a in ((5, 0.1), (9, 0.6), (10, 0.8))]
    assert last_rounds_per_client(evals, 2)["partition-0"]["local-acc"] == pytest.approx(0.7)

    spec = SweepSpec(
        methods=["zeroshot", "dpfpl"], epsilons=["none", 1.0], seeds=[0, 1], ranks=[2], base={}, out=str(tmp_path)
    )
    (tmp_path / "sweep.json").write_text(spec.model_dump_json())
    for run in expand(spec):
        _write_run(tmp_path, run, 0.9, 0.8, 0.85)
        if run.method == "dpfpl":
            path = run_dir_of(tmp_path, run) / "summary.json"
            summary = json.loads(path.read_text())
            if run.epsilon is not None:
                summary["privacy"]["epsilon-published-max"] = 0.9 + 0.05 * run.seed
            path.write_text(json.dumps(summary))
            # partition-1 loses 1 + 2 x seed points on average over the last rounds (6-10); round 5 is outside
            drop = 0.01 + 0.02 * run.seed
            clients = lambda a: {"partition-0": {"local-acc": 0.95}, "partition-1": {"local-acc": a}}  # noqa: E731
            metrics = [
                {"round": 0, "phase": "zeroshot", "per-client": clients(0.90)},
                {"round": 5, "phase": "train", "local-acc": 0.1, "per-client": clients(0.10)},
                {"round": 8, "phase": "train", "local-acc": 0.9, "per-client": clients(0.90 - 2 * drop)},
                {"round": 10, "phase": "train", "local-acc": 0.9, "per-client": clients(0.90)},
            ]
            (path.parent / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
    report(tmp_path)
    table = (tmp_path / "table.md").read_text()
    worst_section = table.split("## Worst client")[1].split("##")[0]
    assert "| none (no DP) | -3.0 |" in worst_section and "| 1 | -3.0 |" in worst_section
    eps_section = table.split("## Published prompt")[1]
    assert "| 1 | 0.95 |" in eps_section and "none" not in eps_section.split("|---")[1]
