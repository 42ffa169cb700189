"""What each printed epsilon covers, from the server's books: p_G's guarantee where the reply reads local state,
worst case over every node ever booked, a lost checkpoint write charged, and a server killed after it sent a
new p_G never releasing a second, independently noised version of it."""

from __future__ import annotations

import hashlib
import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dpfpl.common.config import RunConfig
from dpfpl.common.privacy import accounted_epsilon
from dpfpl.common.wire import outside_epsilon
from dpfpl.server_app import books
from dpfpl.server_app.books import COVERS, privacy_maxima, worst
from dpfpl.server_app.checkpoint import CHECKPOINT, RunDirectory, ServerState
from dpfpl.server_app.strategy import PromptStrategy
from dpfpl.server_app.summary import summarize

ROOT = Path(__file__).resolve().parent.parent
Q_SMALL, Q_LARGE = 0.05, 0.2


def _state(**books) -> ServerState:
    return ServerState(
        p_global=torch.zeros(4, 16),
        momentum=None,
        server_round=2,
        run_token="t",
        noise_multiplier_global=2.0,
        config_fingerprint="f",
        evaluated_round=2,
        **books,
    )


def _independent_combined(z_local: float, z_global: float) -> float:
    """The published-prompt multiplier written out, not through the code under test."""
    return (z_local**-2 + z_global**-2) ** -0.5


def test_p_global_epsilon_composes_both_releases_where_the_reply_reads_local_state():
    state = _state(
        node_sample_rates={"a": Q_SMALL}, participation={"a": 5}, node_noise_local={"a": 1.5}, node_steps={"a": 5}
    )
    gdp = accounted_epsilon(2.0, Q_SMALL, 5, 1e-5)
    composed = accounted_epsilon(_independent_combined(1.5, 2.0), Q_SMALL, 5, 1e-5)
    with_local = privacy_maxima(state, 1e-5, has_local=True, shares_global=True)
    assert with_local["epsilon-gdp-mechanism-max"] == pytest.approx(gdp)
    assert with_local["epsilon-global-max"] == pytest.approx(composed) and composed > gdp * 1.2
    assert with_local["epsilon-published-max"] == pytest.approx(composed)
    promptfl = privacy_maxima(state, 1e-5, has_local=False, shares_global=True)  # the reply reads no local state
    assert promptfl["epsilon-global-max"] == pytest.approx(gdp) == promptfl["epsilon-published-max"]
    assert promptfl["epsilon-local-max"] == 0.0


def test_a_step_whose_reply_was_never_aggregated_still_counts_for_p_global():
    """The node stepped 4 times (its reply was dropped once): p_L, read by the next replies, moved 4 times."""
    state = _state(
        node_sample_rates={"a": Q_SMALL}, participation={"a": 3}, node_noise_local={"a": 1.5}, node_steps={"a": 4}
    )
    eps = privacy_maxima(state, 1e-5, has_local=True, shares_global=True)
    assert eps["epsilon-global-max"] == pytest.approx(
        accounted_epsilon(_independent_combined(1.5, 2.0), Q_SMALL, 4, 1e-5)
    )
    assert eps["epsilon-gdp-mechanism-max"] == pytest.approx(accounted_epsilon(2.0, Q_SMALL, 3, 1e-5))


def test_an_epsilon_the_accountant_could_not_compute_makes_the_maximum_infinite(monkeypatch):
    """``max`` keeps whichever argument comes first when the other is NaN, so a node whose epsilon came out NaN
    would drop out of the worst case; it counts as no guarantee (inf) instead, wherever it comes in the order."""
    assert worst(1.0, math.nan) == worst(math.nan, 1.0) == math.inf and worst(0.5, 2.0) == 2.0
    honest = books.node_epsilons

    def nan_for_b(z_local, *rest):  # node b (z_L 1.25): an epsilon the accountant could not compute
        eps = honest(z_local, *rest)
        return {k: math.nan for k in eps} if z_local == 1.25 else eps

    monkeypatch.setattr(books, "node_epsilons", nan_for_b)
    for order in (("a", "b"), ("b", "a")):
        state = _state(
            node_sample_rates={k: Q_SMALL for k in order},
            participation={k: 2 for k in order},
            node_noise_local={k: 1.5 if k == "a" else 1.25 for k in order},
            node_steps={k: 2 for k in order},
        )
        maxima = privacy_maxima(state, 1e-5, has_local=True, shares_global=True)
        assert all(maxima[key] == math.inf for key in COVERS), (order, maxima)


def _strategy(tmp_path, method: str = "dpfpl") -> PromptStrategy:
    cfg = RunConfig(
        run_dir=str(tmp_path),
        method=method,
        num_clients=3,
        min_clients=1,
        target_epsilon=0,
        noise_multiplier_local=1.5,
        noise_multiplier_global=2.0,
        **({"secfpp_min_cluster_size": 1} if method == "secfpp" else {}),
    )
    # node "b" has the larger sample rate and missed the last round; the last round then failed altogether
    state = _state(
        node_sample_rates={"a": Q_SMALL, "b": Q_LARGE},
        participation={"a": 2, "b": 1},
        node_noise_local={"a": 1.5, "b": 1.5},
        node_steps={"a": 2, "b": 1},
    )
    return PromptStrategy(cfg, state)


def test_summary_maxima_are_over_every_node_even_when_the_last_round_failed(tmp_path):
    strategy = _strategy(tmp_path)
    metrics = [
        {"round": 1, "phase": "train", "updated": True, "epsilon-local-max": 0.01},
        {"round": 2, "phase": "train", "updated": False},
    ]  # failed: no reply, no epsilon in the line
    privacy = summarize(strategy.cfg, strategy.state, metrics, strategy)["privacy"]
    worst = {  # node b: larger q, one step; node a: smaller q, two steps
        "epsilon-local-max": max(accounted_epsilon(1.5, q, n, 1e-5) for q, n in ((Q_SMALL, 2), (Q_LARGE, 1))),
        "epsilon-published-max": max(
            accounted_epsilon(_independent_combined(1.5, 2.0), q, n, 1e-5) for q, n in ((Q_SMALL, 2), (Q_LARGE, 1))
        ),
    }
    for key, value in worst.items():
        assert privacy[key] == pytest.approx(value)
    assert privacy["epsilon-global-max"] == pytest.approx(worst["epsilon-published-max"])
    assert set(COVERS) <= set(privacy["epsilon-covers"]) and "public" in privacy["sample-rate"]
    # a DP-FPL run: what leaves outside epsilon is its evaluation metrics and its reply timing, named as such
    assert privacy["excludes"] == outside_epsilon("dpfpl", True)
    assert [text.split(":")[0] for text in privacy["excludes"]] == ["evaluation replies", "reply timing"]


def test_secfpp_says_its_epsilon_does_not_cover_the_clustering(tmp_path):
    from dpfpl.run_report import report

    strategy = _strategy(tmp_path, "secfpp")
    summary = summarize(strategy.cfg, strategy.state, [], strategy)
    excludes = summary["privacy"]["excludes"]
    assert excludes == outside_epsilon("secfpp", True) and any("clustering" in text for text in excludes)
    RunDirectory(tmp_path).write_summary(summary)
    text = report(tmp_path)
    assert "NOT COVERED: SecFPP's clustering" in text and "GDP mechanism alone" in text


def _save_round(run: RunDirectory, server_round: int, evaluated: bool) -> None:
    run.save(
        _state(participation={"a": server_round}, node_steps={"a": server_round})
        if evaluated
        else ServerState(
            p_global=torch.zeros(4, 16),
            momentum=None,
            server_round=server_round,
            run_token="t",
            noise_multiplier_global=2.0,
            config_fingerprint="f",
            evaluated_round=server_round - 1,
            participation={"a": server_round},
            node_steps={"a": server_round},
        )
    )


def _damage(run: RunDirectory) -> None:
    (run.path / CHECKPOINT).write_bytes(b"damaged")


def test_falling_back_to_the_previous_checkpoint_charges_the_lost_round(tmp_path):
    run = RunDirectory(tmp_path)
    _save_round(run, 2, evaluated=True)
    _save_round(run, 3, evaluated=False)  # round 3's p_G is checkpointed, then leaves; this file is then lost
    _damage(run)
    state = run.load()
    assert state.server_round == 2  # round 3 runs again, with fresh noise: its first p_G is already out
    # round 3's replies will be released a second time: booked as one same-batch release at z_G / sqrt(2)
    assert state.participation == {"a": 2} and state.node_steps == {"a": 2} and state.rereleased == {"a": 1}


def test_a_rerelease_stays_booked_across_the_next_checkpoint_and_a_restart(tmp_path):
    """After a fallback the round runs again and is checkpointed; a later restart must still find the re-release in
    the books (and the round to flag), or the server's epsilon would drop back to a single release."""
    run = RunDirectory(tmp_path)
    _save_round(run, 2, evaluated=True)
    _save_round(run, 3, evaluated=False)
    _damage(run)
    state = run.load()
    run.save(state)  # the re-run round's first checkpoint
    again = RunDirectory(tmp_path).load()  # a restart after it
    assert again.rereleased == {"a": 1} and again.rerelease_round == state.rerelease_round == 3


def test_a_rereleased_round_is_booked_as_one_release_at_the_combined_multiplier():
    """Two releases of one batch with fresh noise are one Gaussian at z / sqrt(2) on that batch: more than the
    single release, and more than two independently subsampled steps (which would under-count)."""
    from dpfpl.common.privacy import accounted_epsilon
    from dpfpl.server_app.books import node_epsilons

    z, q = 2.0, 0.1
    once = node_epsilons(1.5, z, q, 3, 3, 1e-5)
    twice = node_epsilons(1.5, z, q, 3, 3, 1e-5, rereleased=1)
    assert twice["epsilon-gdp-mechanism-max"] > accounted_epsilon(z, q, 4, 1e-5) > once["epsilon-gdp-mechanism-max"]
    assert twice["epsilon-published-max"] > once["epsilon-published-max"]


def test_losing_a_rounds_second_checkpoint_loses_no_release(tmp_path):
    run = RunDirectory(tmp_path)
    _save_round(run, 3, evaluated=False)
    _save_round(run, 3, evaluated=True)
    _damage(run)
    state = run.load()  # the round's p_G is in the previous copy: it is re-sent as is, nothing to charge
    assert state.server_round == 3 and state.participation == {"a": 3}


# ---------------------------------------------------------------- a real kill between broadcast and checkpoint
TINY = {
    "num-clients": 2,
    "classes-per-client": 2,
    "min-clients": 2,
    "pretrained": "none",
    "n-ctx": 4,
    "batch-size": 8,
    "eval-every": 1,
    "eval-last": 0,
    "rank": 2,
    "dp": True,
    "target-epsilon": 0.0,
    "noise-multiplier-local": 1.0,
    "noise-multiplier-global": 1.5,
    "num-server-rounds": 2,
}

CHILD = """
import os, signal, sys
sys.path.insert(0, {root!r})
from tests.test_privacy_books import run_logged
run_logged({run_dir!r}, kill_at_evaluation=1)
"""


def _digest(array) -> str:
    return hashlib.sha256(array.numpy().tobytes()).hexdigest()


def run_logged(run_dir: str, kill_at_evaluation: int | None = None) -> dict:
    """Run the federation in process, logging every p_G that leaves (round it follows, digest); with
    ``kill_at_evaluation`` the process SIGKILLs itself right after that round's first evaluation message left."""
    from dpfpl.client_app.app import app as client_app
    from dpfpl.inprocess import InProcessGrid, full_run_config
    from dpfpl.server_app.runner import run_federation

    log = Path(run_dir).parent / "released.jsonl"

    class LoggingGrid(InProcessGrid):
        def push_messages(self, messages):
            ids = []
            for message in messages:
                content = message.content
                if "arrays" in content.array_records:
                    server_round = int(content["config"]["server-round"])
                    after = server_round if message.metadata.message_type == "evaluate" else server_round - 1
                    prompt = torch.from_numpy(content["arrays"]["global-prompt"].numpy())
                    row = {"after-round": after, "p_G": _digest(prompt), "phase": content["config"].get("phase")}
                    if row["phase"] == "published" or message.metadata.message_type == "evaluate":
                        row["values"] = prompt.flatten().tolist()
                    with open(log, "a") as fh:
                        fh.write(json.dumps(row) + "\n")
                ids += list(super().push_messages([message]))
                if (
                    message.metadata.message_type == "evaluate"
                    and kill_at_evaluation is not None
                    and int(content["config"]["server-round"]) == kill_at_evaluation
                ):
                    os.kill(os.getpid(), signal.SIGKILL)  # p_G of this round has left the server
            return ids

    config = full_run_config({**TINY, "run-dir": run_dir})
    grid = LoggingGrid(client_app, config, 2, {"num-threads": 1})
    with grid.identity():
        return run_federation(grid, RunConfig.from_flower(config))


def test_a_server_killed_after_sending_p_global_never_releases_a_second_version(tmp_path, cache_dir):
    run_dir = str(tmp_path / "run")
    child = subprocess.run(
        [sys.executable, "-c", CHILD.format(root=str(ROOT), run_dir=run_dir)],
        cwd=ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert child.returncode == -signal.SIGKILL, child.stderr[-3000:]
    summary = run_logged(run_dir)  # resume = true (the default): the run restarts from its checkpoint
    released: dict[int, set[str]] = {}
    values: dict[int, list[float]] = {}
    published = []
    for line in (tmp_path / "released.jsonl").read_text().splitlines():
        row = json.loads(line)
        if row["phase"] == "published":  # the published prompt's evaluation: a mean of released iterates
            published.append(row["values"])
            continue
        released.setdefault(row["after-round"], set()).add(row["p_G"])
        if "values" in row:
            values[row["after-round"]] = row["values"]
    assert set(released) == {0, 1, 2}
    assert all(len(versions) == 1 for versions in released.values()), released  # one noisy p_G per round
    # what the run publishes is no new release: exactly the mean of the iterates already sent (both rounds here)
    expected = (torch.tensor(values[1]) + torch.tensor(values[2])) / 2
    assert published and all(torch.allclose(torch.tensor(p), expected, rtol=0, atol=1e-6) for p in published)
    metrics = RunDirectory(run_dir).read_metrics()
    assert [m["round"] for m in metrics] == [0, 1, 2] and all("local-acc" in m for m in metrics)
    assert summary["rounds"] == 2


def test_the_server_and_the_export_word_each_epsilon_from_one_home():
    """The summary's and the export manifest's "covers" texts are the same mechanism's wording, scoped to the
    worst client or to the exporting node: changing what an epsilon means changes both."""
    from dpfpl.common.privacy.covers import MANIFEST_COVERS, MECHANISMS
    from dpfpl.publish import accountant_privacy

    for text in [*COVERS.values(), *MANIFEST_COVERS.values()]:
        assert any(text.startswith(mechanism) for mechanism in MECHANISMS.values()), text
    assert COVERS["epsilon-published-max"].startswith(MECHANISMS["published"])
    assert MANIFEST_COVERS["epsilon"].startswith(MECHANISMS["published"])
    assert accountant_privacy.__globals__["MANIFEST_COVERS"] is MANIFEST_COVERS
