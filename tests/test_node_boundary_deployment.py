"""The node holds its own line on real processes: a SuperLink, three authenticated SuperNodes with resident
workers (deploy/start-supernode.sh, each with a lifetime budget), and runs submitted with ``flwr run``:

* a rogue ServerApp (the app's server side edited; the nodes' code is unchanged, so their workers serve it)
  sends half the global noise multiplier in round 2 and runs two rounds more than the noise was calibrated for:
  every node refuses round 2 and round 4, and trains rounds 1 and 3 (within its budget);
* run A, then run B, then A again on the same nodes: A resumes with its own local prompt and books;
* a run whose plan would take a node's records past its lifetime-epsilon is refused at setup, with the ledger.
"""

import json
import shutil
import subprocess
import sys

import pytest

from dpfpl.client_app.state import NodeState, load_run_state
from dpfpl.common.outcome import RunOutcome
from dpfpl.common.privacy.ledger import PrivacyLedger
from dpfpl.launch import PROJECT_ROOT, submit_run
from dpfpl.server_app.checkpoint import RunDirectory

from .test_deployment import CLASSES, federation  # noqa: F401  (the fixture: SuperLink + 4 SuperNodes)

pytestmark = pytest.mark.deployment
LIFETIME = 6.0
BASE = {
    "dataset": "silo",
    "classnames": ",".join(CLASSES),
    "model-name": "dpfpl-demo-tiny",
    "pretrained": "none",
    "num-clients": 3,
    "min-clients": 3,
    "eval-every": 1,
    "eval-last": 0,
    "batch-size": 8,
    "sample-rate": 0.34,
    "round-timeout": 120.0,
    "setup-timeout": 120.0,
}


@pytest.fixture()
def bounded_federation(monkeypatch, request):
    """The deployment fixture, every SuperNode declaring a lifetime budget in its node config."""
    monkeypatch.setenv("DPFPL_LIFETIME_EPSILON", str(LIFETIME))
    return request.getfixturevalue("federation")


def _rogue_app(tmp):
    """The app with its server side edited: z_G halved in round 2, and two rounds past the calibrated count."""
    app = tmp / "app-rogue"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("dpfpl", "common", "server_app", "client_app"):
        shutil.copytree(PROJECT_ROOT / name, app / name, ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(PROJECT_ROOT / name, app / name)
    for rel, old, new in (
        (
            "server_app/runner.py",
            "last_round = cfg.num_server_rounds if strategy.method.trains else 0",
            "last_round = cfg.num_server_rounds + 2",
        ),
        (
            "server_app/strategy.py",
            '"noise-multiplier-global": self.state.noise_multiplier_global,',
            '"noise-multiplier-global": self.state.noise_multiplier_global * (0.5 if server_round == 2 else 1.0),',
        ),
    ):
        path = app / rel
        text = path.read_text()
        assert text.count(old) == 1, f"the rogue edit no longer applies to {rel}"
        path.write_text(text.replace(old, new))
    return app


def _records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]


def test_the_nodes_hold_their_line_against_a_rogue_server_and_keep_every_run(bounded_federation):
    tmp, env = bounded_federation["tmp"], bounded_federation["env"]
    states = [tmp / f"org{i}" / "state" for i in range(3)]

    # ---- a rogue server: half z_G in round 2, rounds 3 and 4 past the 2 the noise was calibrated for
    rogue_dir = tmp / "rogue"
    rogue = {**BASE, "num-server-rounds": 2, "target-epsilon": 1.0, "run-dir": str(rogue_dir), "resume": False}
    submit_run("org", rogue, env=env, timeout=600, stream=False, cwd=tmp, app=_rogue_app(tmp))
    updated = {r["round"]: r["updated"] for r in _records(rogue_dir) if r.get("phase") == "train"}
    assert updated == {1: True, 2: False, 3: True, 4: False}
    token = RunDirectory(rogue_dir).load().run_token
    for state_dir in states:
        state = NodeState.load(state_dir)
        assert state.run_key == token and len(state.accountant.history) == 2
        assert state.accountant.epsilon_published() <= 1.0 * (1 + 1e-6)
        worker_log = (state_dir / "worker.log").read_text()
        assert "past its limit" in worker_log

    # ---- A -> B -> A on the same nodes (explicit multipliers: a run without a calibrated round count resumes)
    explicit = {**BASE, "target-epsilon": 0.0, "noise-multiplier-local": 4.0, "noise-multiplier-global": 4.0}
    run_a = {**explicit, "num-server-rounds": 2, "run-dir": str(tmp / "A"), "resume": False}
    submit_run("org", run_a, env=env, timeout=600, stream=False, cwd=tmp)
    token_a = RunDirectory(tmp / "A").load().run_token
    a_before = [NodeState.load(d) for d in states]
    submit_run(
        "org",
        {**explicit, "num-server-rounds": 1, "run-dir": str(tmp / "B"), "resume": False},
        env=env,
        timeout=600,
        stream=False,
        cwd=tmp,
    )
    token_b = RunDirectory(tmp / "B").load().run_token
    submit_run("org", {**run_a, "num-server-rounds": 3, "resume": True}, env=env, timeout=600, stream=False, cwd=tmp)
    for state_dir, before in zip(states, a_before):
        back = NodeState.load(state_dir)
        assert back.run_key == token_a and len(back.accountant.history) == 3 and back.last_round == 3
        assert back.local.keys() == before.local.keys()
        assert len(load_run_state(state_dir, token_b).accountant.history) == 1
        assert len(load_run_state(state_dir, token).accountant.history) == 2  # the rogue run is kept too
        ledger = PrivacyLedger.of(state_dir)
        assert {k: r.count for k, r in ledger.runs.items()} == {token: 2, token_a: 3, token_b: 1}

    # ---- a run past the lifetime budget is refused at setup, with the ledger in the reason
    greedy_dir = tmp / "greedy"
    greedy = {**BASE, "num-server-rounds": 5, "target-epsilon": 8.0, "run-dir": str(greedy_dir), "resume": False}
    with pytest.raises(RuntimeError):
        submit_run("org", greedy, env=env, timeout=600, stream=False, cwd=tmp)
    outcome = RunOutcome.read(greedy_dir)
    assert outcome is not None and outcome.status == "setup-failed"
    assert len(outcome.failed_nodes) == 3 and all("lifetime-epsilon" in f.reason for f in outcome.failed_nodes)
    printed = subprocess.run(
        [sys.executable, "-m", "dpfpl.cli", "ledger", "--state-dir", str(states[0]), "--lifetime-epsilon", "6"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert token in printed and token_a in printed and token_b in printed and "composed, all runs" in printed
    for state_dir in states:  # the refused run released nothing
        assert set(PrivacyLedger.of(state_dir).runs) == {token, token_a, token_b}
        assert PrivacyLedger.of(state_dir).epsilon(1e-5) <= LIFETIME
