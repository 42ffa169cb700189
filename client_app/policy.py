"""What a node with separated privileges answers, whoever asks: its operator's policy, enforced by its worker.

Why a policy at all: anyone who can submit a run to the SuperLink runs a ClientApp of their own on every node
(Flower's Control API has no accounts in its open-source edition, docs/control-api.md). With privileges
separated, that ClientApp runs as the SuperNode's user and cannot read the data or the node's state; all it can
do is ask the node's worker, which can. So the worker treats every request as possibly hostile:

* it uses the node configuration its operator gave it, never the one in the request (no other data directory,
  no larger lifetime budget, no other noise policy);
* a train release needs differential privacy, the node's own global noise and its lifetime budget
  (``PromptNode.charge_release`` refuses past it);
* the data come from the node's own silo or the public embedded demo set, never from a path in the run config,
  and weights files only from the directory its operator approved;
* evaluation replies, which are outside epsilon, are counted in the node's ledger and bounded per run (the
  run's schedule, which is the requester's own claim) and per day (``evaluations-per-day``, the operator's: the
  bound that holds against a rogue app);
* SecFPP is refused unless its operator opted in (``allow-secfpp``): its clustering phase releases shares of an
  un-noised vector of the training features, encrypted to keys the caller names, which no budget bounds;
* error texts that could carry the node's details stay in its log (``public_error``).
"""

from __future__ import annotations

from pathlib import Path

from dpfpl.common.config import NodeConfig, RunConfig
from dpfpl.common.pretrained import names_weights_file

# The data sets a separated worker serves: the node's silo (its own data-dir) and the public embedded demo set.
# The others read a path the run config names, which a submitted app chooses.
SERVED_DATASETS = ("silo", "demo")
BUILT_IN_WEIGHTS = ("demo", "none", "")
# the message types of SecFPP's clustering phase (client_app/request.py OPERATIONS), whose replies are outside epsilon
SECFPP_PREFIX = "train.secfpp_"
SECFPP_REFUSAL = (
    "this node does not take part in SecFPP: its clustering phase releases shares of a vector computed from the "
    "training features without noise, encrypted to keys the requester names (outside epsilon, not bounded by "
    "the node's budget). Its operator opts in with node config allow-secfpp = true"
)


class PolicyRefusal(RuntimeError):
    """The request is outside what this node's operator allows."""


class EvaluationQuotaSpent(PolicyRefusal):
    """This node has answered as many evaluations as it allows (per run, or in the last 24 hours)."""


def separated_node_problems(node: NodeConfig) -> list[str]:
    """What a worker serving a separated node needs in its own node config, as readable lines (empty: ready)."""
    problems = []
    if not node.state_dir:
        problems.append("state-dir: the directory of the node's private state")
    if node.lifetime_epsilon is None:
        problems.append("lifetime-epsilon: the node's budget over every run (a submitted app can start any run)")
    if node.global_noise != "node":
        problems.append('global-noise="node": the node adds the global noise itself (it trusts no aggregator)')
    if node.evaluations_per_day is None:
        problems.append("evaluations-per-day: how many evaluation replies (outside epsilon) the node answers a day")
    return problems


def _reads_a_file(pretrained: str) -> bool:
    """What the model loader takes for a weights file, and, to be safe, any name that exists as a file."""
    return names_weights_file(pretrained) or Path(pretrained).exists()


def check_request(operation: str, cfg: RunConfig, node: NodeConfig) -> None:
    """Raise ``PolicyRefusal`` for a request a separated node does not serve."""
    if operation == "query.node_key":  # a random key, nothing from the data
        return
    # by the operation as well as the method: a request may name any method beside a clustering message
    if (operation.startswith(SECFPP_PREFIX) or cfg.method == "secfpp") and not node.allow_secfpp:
        raise PolicyRefusal(SECFPP_REFUSAL)
    if cfg.dataset not in SERVED_DATASETS:
        raise PolicyRefusal(
            f"this node serves its own silo or the public demo set only (dataset '{cfg.dataset}' reads a path the "
            "run names)"
        )
    if operation.startswith("train") and not cfg.dp:
        raise PolicyRefusal(
            "this node trains only under differential privacy (dp = false would release un-noised values)"
        )
    if cfg.pretrained not in BUILT_IN_WEIGHTS and _reads_a_file(cfg.pretrained):
        approved = Path(node.weights_dir).resolve() if node.weights_dir else None
        if approved is None or not Path(cfg.pretrained).resolve().is_relative_to(approved):
            raise PolicyRefusal(
                "this node loads weights files only from the directory its operator approved (node config "
                f"weights-dir{f' = {approved}' if approved else ', not set'})"
            )


def charge_evaluation(state_dir: Path, run_key: str, cfg: RunConfig, node: NodeConfig) -> None:
    """Before an evaluation reply: count it in the ledger, or refuse it past the run's schedule or the day's quota.
    Written ahead, like a charge: a crash after it over-counts, never under-counts."""
    if node.evaluations_per_day is None:
        return
    # here, not at the top: the worker imports this module before it listens, and the ledger brings the
    # accountant (torch, dp_accounting: seconds), which would keep a restarted worker's socket closed that long
    from dpfpl.common.privacy.ledger import PrivacyLedger  # lazy: torch and dp_accounting, after the worker listens

    ledger = PrivacyLedger.of(state_dir)
    if ledger.evaluations_of(run_key) >= cfg.scheduled_evaluations:
        raise EvaluationQuotaSpent(
            f"evaluation refused: this run's schedule has {cfg.scheduled_evaluations} evaluations, all answered"
        )
    if ledger.evaluations_since(24.0) >= node.evaluations_per_day:
        raise EvaluationQuotaSpent(
            f"evaluation refused: this node answers at most {node.evaluations_per_day} evaluations a day "
            "(node config evaluations-per-day), all answered in the last 24 hours"
        )
    ledger.record_evaluation(run_key)
    ledger.save()
