"""The run's stages (``run_federation``): open -> set up and calibrate -> train rounds -> close.

Open: the number of clients (``server_app/federation.py``), the checkpoint or a fresh state, and the strategy
(``server_app/build.py``). Set up and calibrate: round 0, in which every node checks its model and data and
declares its sample rate, and z_G is calibrated for them. Train rounds: each round's exchange, update and what
follows it, as the strategy does them, checkpointed before its p_G leaves the server, then evaluated. Close:
the summary (``server_app/summary.py``) and the run's outcome.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
import secrets
import time

from flwr.app import ArrayRecord, ConfigRecord
from flwr.serverapp import Grid

from dpfpl.common.config import RunConfig
from dpfpl.common.outcome import NodeFailure, RunFailed, RunOutcome
from dpfpl.common.prompt import initial_global_prompt

from .build import build_strategy
from .checkpoint import METRICS, RunDirectory, ServerState
from .exchange import exchange, take_tally
from .federation import resolve_num_clients
from .strategy import InvalidReply, PromptStrategy, global_noise_multiplier
from .summary import summarize

log = logging.getLogger("dpfpl.server")

RESUME_IRRELEVANT = {
    "num_server_rounds",
    "eval_every",
    "resume",
    "run_dir",
    "min_clients",
    "round_timeout",
    "setup_timeout",
    "secure_noise",
}  # how the noise is drawn, not how much: a resumed run may switch it


def config_fingerprint(cfg: RunConfig) -> str:
    relevant = {k: v for k, v in cfg.model_dump().items() if k not in RESUME_IRRELEVANT}
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:16]


def _evaluate(
    strategy: PromptStrategy, grid: Grid, server_round: int, phase: str, arrays: ArrayRecord | None = None
) -> dict:
    arrays = strategy.current_arrays() if arrays is None else arrays
    replies = exchange(
        grid,
        strategy.configure_evaluate(server_round, arrays, ConfigRecord({"phase": phase}), grid),
        timeout=strategy.cfg.round_timeout or None,
    )
    result = strategy.aggregate_evaluate(server_round, replies)
    return dict(result) if result is not None else {}


def setup_phase(strategy: PromptStrategy, grid: Grid, run_dir: RunDirectory) -> dict:
    """Round 0: every connected node loads the model, checks its data and evaluates the hand-crafted prompt.
    A node whose reply passes is healthy. With fewer healthy nodes than min-clients no round could ever
    update the global prompt, so the run stops here (``RunFailed``) with every failed node and its reason,
    instead of running its rounds for nothing."""
    cfg = strategy.cfg  # a node's first contact (model load, feature encoding) has its own, longer wait
    messages = list(
        strategy.configure_evaluate(0, strategy.current_arrays(), ConfigRecord({"phase": "zeroshot"}), grid)
    )
    replies = exchange(grid, messages, timeout=cfg.setup_timeout or None)
    failures, answered = [], set()
    for msg in replies:
        answered.add(msg.metadata.src_node_id)
        try:
            strategy.validate_evaluate_reply(msg, 0)
        except InvalidReply as err:
            failures.append(node_failure(msg.metadata.src_node_id, str(err)))
    waited = f"within setup-timeout = {cfg.setup_timeout:g} s" if cfg.setup_timeout else "before the run ended"
    failures += [
        node_failure(m.metadata.dst_node_id, f"no reply {waited}")
        for m in messages
        if m.metadata.dst_node_id not in answered
    ]
    result = strategy.aggregate_evaluate(0, replies)
    healthy = int(result["num-clients"]) if result is not None else 0
    for failure in failures:
        log.error("setup: %s failed: %s", failure.node, failure.reason)
    if healthy < cfg.min_clients:
        outcome = RunOutcome(
            status="setup-failed", min_clients=cfg.min_clients, healthy_nodes=healthy, failed_nodes=failures
        )
        outcome.write(run_dir.path)
        log.error("%s", outcome.paragraph())
        raise RunFailed(outcome.paragraph())
    return dict(result)


_PARTITION_PREFIX = re.compile(r"^(partition-\d+): (.*)$", re.DOTALL)


def node_failure(node_id: int, reason: str) -> NodeFailure:
    """A failed node under the name the server knows (Flower's node id), plus the partition it names itself
    by in simulation (Flower's simulated node ids are random; the partition is what the user configured)."""
    match = _PARTITION_PREFIX.match(reason)
    if match:
        return NodeFailure(node=f"node {node_id} ({match.group(1)})", reason=match.group(2))
    return NodeFailure(node=f"node {node_id}", reason=reason)


def run_federation(grid: Grid, cfg: RunConfig) -> dict:
    """One run, as its stages: open it (or resume it from its checkpoint), set up and calibrate (round 0), train
    its rounds, close it (summary and outcome). Returns the summary; raises ``RunFailed`` for a run without a
    result."""
    strategy, run_dir = open_run(grid, cfg)
    set_up_and_calibrate(strategy, grid, run_dir)
    train_rounds(strategy, grid, run_dir)
    return close_run(strategy, run_dir)


def open_run(grid: Grid, cfg: RunConfig) -> tuple[PromptStrategy, RunDirectory]:
    """The run's strategy over its checkpointed state (``resume``) or a fresh one, and its run directory.

    ``num-clients`` is resolved first (``server_app/federation.py``): the checkpoint's fingerprint, the public
    ``config.json`` and the nodes all see the number the run partitions for. A round that was checkpointed but
    not yet evaluated when the last process stopped is finished here."""
    cfg = resolve_num_clients(grid, cfg)
    run_dir = RunDirectory(cfg.run_dir)
    state = checkpointed_state(cfg, run_dir) if cfg.resume else None
    if state is None:
        state = fresh_state(cfg)
        (run_dir.path / METRICS).unlink(missing_ok=True)
    else:
        log.info("resuming %s after round %d", run_dir.path, state.server_round)
    strategy = build_strategy(cfg, state)
    if state.evaluated_round is not None and state.evaluated_round < state.server_round:
        # the crash came after the round's checkpoint, before its evaluation and metrics line: finish that round
        # with the checkpointed p_G (nothing is trained or noised again)
        run_dir.truncate_metrics(state.server_round - 1)
        _finish_round(strategy, grid, run_dir, dict(state.last_record))
    elif cfg.resume:
        run_dir.resume_metrics(state)  # a checkpoint at round 0 means the setup phase runs again
    run_dir.write_config(cfg.model_dump_json(indent=2))  # public: lets a node export its prompt (`dpfpl export`)
    return strategy, run_dir


def checkpointed_state(cfg: RunConfig, run_dir: RunDirectory) -> ServerState | None:
    """The run directory's checkpoint, if any, once it is known to be this configuration's and within the
    rounds its noise was calibrated for."""
    state = run_dir.load()
    if state is not None and state.config_fingerprint != config_fingerprint(cfg):
        raise RuntimeError(
            f"{run_dir.path} holds a checkpoint of a different configuration; choose another run-dir or "
            "set resume = false to start over (the old run would then be overwritten)"
        )
    if (
        state is not None
        and cfg.uses_calibration
        and state.calibrated_rounds
        and cfg.num_server_rounds > state.calibrated_rounds
    ):
        raise RuntimeError(
            f"{run_dir.path}: the noise of this run was calibrated for {state.calibrated_rounds} rounds at target "
            f"epsilon {cfg.target_epsilon}; {cfg.num_server_rounds} rounds would spend more than that budget. "
            "Start a new run (another run-dir, or resume = false) to train longer."
        )
    return state


def fresh_state(cfg: RunConfig) -> ServerState:
    return ServerState(
        p_global=initial_global_prompt(cfg),
        momentum=None,
        server_round=0,
        run_token=secrets.token_hex(8),
        noise_multiplier_global=0.0,
        config_fingerprint=config_fingerprint(cfg),
        evaluated_round=0,
    )


def set_up_and_calibrate(strategy: PromptStrategy, grid: Grid, run_dir: RunDirectory) -> None:
    """A run at round 0: the setup phase (``setup_phase``), whose declared sample rates calibrate z_G, checkpointed
    with the zero-shot metrics line. A resumed run has done this already."""
    state, cfg = strategy.state, strategy.cfg
    if state.server_round == 0:
        zs = setup_phase(strategy, grid, run_dir)
        state.zeroshot = zs
        q_max = max(state.node_sample_rates.values())
        state.noise_multiplier_global = global_noise_multiplier(cfg, q_max, strategy.method)
        state.calibrated_rounds = cfg.num_server_rounds if cfg.uses_calibration else 0
        log.info(
            "zero-shot: local %.4f neighbor %.4f; z_G = %.4g (q_max = %.4g)",
            zs.get("local-acc", math.nan),
            zs.get("neighbor-acc", math.nan),
            state.noise_multiplier_global,
            q_max,
        )
        run_dir.append_metrics(
            {
                "round": 0,
                "phase": "zeroshot",
                **zs,
                "noise-multiplier-global": state.noise_multiplier_global,
                "per-client": strategy.client_evaluations,
            }
        )
        run_dir.save(state)
    strategy.summary()


def train_rounds(strategy: PromptStrategy, grid: Grid, run_dir: RunDirectory) -> None:
    """The rounds left to train, each checkpointed before its p_G leaves the server, then evaluated."""
    cfg, state = strategy.cfg, strategy.state
    # zero-shot has nothing to train: its result is the setup phase's evaluation
    last_round = cfg.num_server_rounds if strategy.method.trains else 0
    for server_round in range(state.server_round + 1, last_round + 1):
        record = train_round(strategy, grid, server_round)
        state.server_round, state.last_record = server_round, record
        if cfg.averages_for_publication(server_round):
            state.average_for_publication()  # the published p_G's mean, checkpointed with the round
        # The new p_G leaves the server first in the evaluation messages: checkpoint it before. A crash after this
        # line resumes with this very p_G (re-sent as is); without it, the resumed run would redo the round and
        # release a second, independently noised p_G of the same replies.
        run_dir.save(state)
        _finish_round(strategy, grid, run_dir, record, tally=True)


def train_round(strategy: PromptStrategy, grid: Grid, server_round: int) -> dict:
    """One round's train exchange and update (``strategy.train_round``: in the clear or under secure aggregation)
    and what follows it (``strategy.after_aggregation``: SecFPP's clustering phase), as its metrics line."""
    started = time.time()
    strategy.rejected.clear()
    take_tally()  # this round's exchanges only
    _, train_metrics = strategy.train_round(grid, server_round)
    record = {"round": server_round, "phase": "train", "updated": train_metrics is not None}
    record.update(dict(train_metrics) if train_metrics is not None else {})
    record.update(strategy.after_aggregation(grid, server_round))
    if strategy.cfg.dp:
        record.update(strategy.privacy_maxima())
    record["round-seconds"] = round(time.time() - started, 3)
    return record


def close_run(strategy: PromptStrategy, run_dir: RunDirectory) -> dict:
    """The summary and the run's outcome, written to the run directory; ``RunFailed`` for a run without a
    result (Flower then marks the run failed)."""
    cfg, state = strategy.cfg, strategy.state
    summary = summarize(cfg, state, run_dir.read_metrics(), strategy)
    run_dir.write_summary(summary)
    outcome = run_outcome(cfg, summary, healthy_nodes=len(state.node_sample_rates))
    outcome.write(run_dir.path)
    if outcome.status != "completed":
        log.error("%s", outcome.paragraph())
        raise RunFailed(outcome.paragraph())
    log.log(logging.WARNING if outcome.failed_rounds else logging.INFO, "%s", outcome.paragraph())
    return summary


def _finish_round(
    strategy: PromptStrategy, grid: Grid, run_dir: RunDirectory, record: dict, tally: bool = False
) -> None:
    """Evaluate the checkpointed round if due, then checkpoint again with its full metrics line and log it.

    The checkpoint comes before the metrics line: a crash before the append is repaired on resume by
    ``RunDirectory.resume_metrics``."""
    state, cfg = strategy.state, strategy.cfg
    if cfg.evaluates_after(state.server_round):
        started = time.time()
        record.update(_evaluate(strategy, grid, state.server_round, "personalized"))
        record["per-client"] = strategy.client_evaluations
        if state.server_round == cfg.num_server_rounds and strategy.method.trains:
            # what the run publishes (and `dpfpl export` writes): the mean of p_G's and each p_L's last iterates
            published = _evaluate(strategy, grid, state.server_round, "published", strategy.published_arrays())
            record["published"] = {**published, "per-client": strategy.client_evaluations}
        record["round-seconds"] = round(record.get("round-seconds", 0.0) + time.time() - started, 3)
    if tally:  # how many exchanges the round took, and their time (server_app/exchange.py)
        record.update(take_tally())
    if strategy.rejected:  # train and evaluation replies this round left out, and why
        record["rejected"] = list(strategy.rejected)
    state.last_record, state.evaluated_round = record, state.server_round
    run_dir.save(state)
    run_dir.append_metrics(record)
    log.info(
        "round %d/%d %s",
        state.server_round,
        cfg.num_server_rounds,
        " ".join(f"{k}={v:.4g}" for k, v in record.items() if isinstance(v, float)),
    )


def run_outcome(cfg: RunConfig, summary: dict, healthy_nodes: int) -> RunOutcome:
    """A run whose training rounds all left the global prompt untouched has no result (its "final" prompt is
    the initialization), whatever its table would show."""
    run, updated = summary["rounds-run"], summary["rounds-updated"]
    return RunOutcome(
        status="no-round-updated" if run and not updated else "completed",
        min_clients=cfg.min_clients,
        healthy_nodes=healthy_nodes,
        rounds_run=run,
        rounds_updated=updated,
    )
