"""The round loop: setup/zero-shot phase, calibration, rounds with evaluation, checkpoint and metrics."""

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
from dpfpl.common.evaluation import last_rounds_per_client, worst_client
from dpfpl.common.metrics import LOCAL_ACC, SUMMARY_ACCURACY_KEYS
from dpfpl.common.outcome import NodeFailure, RunFailed, RunOutcome
from dpfpl.common.prompt import initial_global_prompt
from dpfpl.common.wire import outside_epsilon

from .books import COVERS, DISCRETE_GAUSSIAN_NOTE, SAMPLE_RATE_NOTE
from .checkpoint import METRICS, RunDirectory, ServerState
from .exchange import exchange, take_tally
from .secagg_round import secure_train_round
from .secfpp_round import SecfppStrategy, clustering_phase
from .strategy import InvalidReply, PromptStrategy, global_noise_multiplier

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
    run_dir = RunDirectory(cfg.run_dir)
    fingerprint = config_fingerprint(cfg)
    state = run_dir.load() if cfg.resume else None
    if state is not None and state.config_fingerprint != fingerprint:
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
    if state is None:
        state = ServerState(
            p_global=initial_global_prompt(cfg),
            momentum=None,
            server_round=0,
            run_token=secrets.token_hex(8),
            noise_multiplier_global=0.0,
            config_fingerprint=fingerprint,
            evaluated_round=0,
        )
        (run_dir.path / METRICS).unlink(missing_ok=True)
    else:
        log.info("resuming %s after round %d", run_dir.path, state.server_round)
    strategy = SecfppStrategy(cfg, state) if cfg.method == "secfpp" else PromptStrategy(cfg, state)
    if state.evaluated_round is not None and state.evaluated_round < state.server_round:
        # the crash came after the round's checkpoint, before its evaluation and metrics line: finish that round
        # with the checkpointed p_G (nothing is trained or noised again)
        run_dir.truncate_metrics(state.server_round - 1)
        _finish_round(strategy, grid, run_dir, dict(state.last_record))
    elif cfg.resume:
        run_dir.resume_metrics(state)  # a checkpoint at round 0 means the setup phase runs again
    run_dir.write_config(cfg.model_dump_json(indent=2))  # public: lets a node export its prompt (`dpfpl export`)

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

    # zero-shot has nothing to train: its result is the setup phase's evaluation
    last_round = cfg.num_server_rounds if strategy.method.trains else 0
    for server_round in range(state.server_round + 1, last_round + 1):
        started = time.time()
        strategy.rejected.clear()
        take_tally()  # this round's exchanges only
        if cfg.secure_aggregation:  # the server sees only the noised sum (server_app/secagg_round.py)
            arrays, train_metrics = secure_train_round(strategy, grid, server_round, cfg.round_timeout or None)
        else:
            replies = exchange(
                grid,
                strategy.configure_train(server_round, strategy.current_arrays(), ConfigRecord(), grid),
                timeout=cfg.round_timeout or None,
            )  # a node that hangs is dropped from the round, not waited for
            arrays, train_metrics = strategy.aggregate_train(server_round, replies)
        record = {"round": server_round, "phase": "train", "updated": train_metrics is not None}
        record.update(dict(train_metrics) if train_metrics is not None else {})
        if cfg.method == "secfpp" and server_round % cfg.secfpp_every == 0:  # server_app/secfpp_round.py
            record.update(
                clustering_phase(strategy, grid, server_round, cfg.round_timeout or None)
                or {"secfpp-phase-failed": True}
            )
        if cfg.dp:
            record.update(strategy.privacy_maxima())
        record["round-seconds"] = round(time.time() - started, 3)
        state.server_round, state.last_record = server_round, record
        if cfg.averages_for_publication(server_round):
            state.average_for_publication()  # the published p_G's mean, checkpointed with the round
        # The new p_G leaves the server first in the evaluation messages: checkpoint it before. A crash after this
        # line resumes with this very p_G (re-sent as is); without it, the resumed run would redo the round and
        # release a second, independently noised p_G of the same replies.
        run_dir.save(state)
        _finish_round(strategy, grid, run_dir, record, tally=True)

    summary = summarize(cfg, state, run_dir.read_metrics(), strategy)
    run_dir.write_summary(summary)
    outcome = run_outcome(cfg, summary, healthy_nodes=len(state.node_sample_rates))
    outcome.write(run_dir.path)
    if outcome.status != "completed":
        log.error("%s", outcome.paragraph())
        raise RunFailed(outcome.paragraph())  # Flower then marks the run failed: it has no result
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


PROTOCOL_DESCRIPTIONS = {
    "pathological": "pathological (DP-FPL): disjoint classes per client; local = own classes' test images, "
    "neighbor = the other clients' classes; classifier over all classes",
    "dirichlet": "dirichlet (CIFAR): label skew Dir(alpha) on train and test; local = the client's own test "
    "shard; classifier over all classes",
    "base-novel": "base-novel (FedPGP): local = own base classes, base = all base classes (base classifier), "
    "novel = unseen classes (novel classifier); hm = per-client HM(local, base, novel), "
    "hm-of-means = HM of the three means",
    "multi-domain": "multi-domain (SecFPP): client k draws from domain k mod D (contiguous class blocks), label skew "
    "Dir(alpha) within it; local = the client's own test shard; classifier over all classes",
    "silo": "silo: each organization's own test images (local only)",
}


def evaluation_protocol(cfg: RunConfig) -> dict:
    protocol = "silo" if cfg.dataset == "silo" else cfg.partition
    out = {
        "name": protocol,
        "description": PROTOCOL_DESCRIPTIONS[protocol],
        "dataset": cfg.dataset,
        "mean-over": "clients, unweighted",
        "last-rounds": cfg.eval_last,
    }
    if protocol in ("dirichlet", "multi-domain"):
        out["dirichlet-alpha"] = cfg.dirichlet_alpha
    if protocol == "multi-domain":
        out["num-domains"] = cfg.num_domains
    if protocol in ("pathological", "base-novel"):
        out["classes-per-client"] = cfg.classes_per_client or "round(C/N)"
    if cfg.num_shots:
        out["num-shots"] = cfg.num_shots
    if cfg.augment_views:
        out["augment-views"] = cfg.augment_views
    return out


def last_rounds_mean(evals: list[dict], count: int) -> dict:
    """Mean of each accuracy over the evaluations of the last ``count`` rounds (the papers' number)."""
    if not evals or count <= 0:
        return {}
    last_round = evals[-1]["round"]
    window = [m for m in evals if m["round"] > last_round - count]
    out: dict = {"rounds": [window[0]["round"], last_round], "evaluations": len(window)}
    for key in SUMMARY_ACCURACY_KEYS:
        values = [m[key] for m in window if key in m]
        if values:
            out[key] = sum(values) / len(values)
    return out


def summarize(cfg: RunConfig, state: ServerState, metrics: list[dict], strategy: PromptStrategy) -> dict:
    evals = [m for m in metrics if m.get("phase") == "train" and LOCAL_ACC in m]
    if not strategy.method.trains:  # zero-shot: the hand-crafted prompts' evaluation is the result
        evals = [{"round": 0, **state.zeroshot}] if state.zeroshot else []
    last = evals[-1] if evals else {}
    train = [m for m in metrics if m.get("phase") == "train"]
    zeroshot_per_client = next((m.get("per-client", {}) for m in metrics if m.get("phase") == "zeroshot"), {})
    final_per_client = last.get("per-client", {})
    # the published prompt (the mean of the last iterates) is what a user takes away, so it is the result; a
    # method without one (zero-shot) is its final evaluation
    published_record = next((m["published"] for m in reversed(metrics) if "published" in m), None)
    final = {k: last[k] for k in SUMMARY_ACCURACY_KEYS if k in last}
    published = (
        {k: published_record[k] for k in SUMMARY_ACCURACY_KEYS if k in published_record} if published_record else final
    )
    published_per_client = published_record.get("per-client", {}) if published_record else final_per_client
    last_rounds_per = (
        last_rounds_per_client(evals, cfg.eval_last, SUMMARY_ACCURACY_KEYS)
        if cfg.eval_last and strategy.method.trains
        else final_per_client
    )
    return {
        "method": cfg.method,
        "model": f"{cfg.model_name} ({cfg.pretrained})",
        "rounds": state.server_round,
        # rounds that ran and rounds whose replies (at least min-clients valid ones) updated the global prompt
        "rounds-run": len(train),
        "rounds-updated": sum(1 for m in train if m.get("updated") is True),
        "num-clients": cfg.num_clients,
        "evaluation-protocol": evaluation_protocol(cfg),
        "zeroshot": state.zeroshot,
        "published": published,
        "published-per-client": published_per_client,
        "published-prompt": published_prompt_note(cfg, state, strategy, published_record is not None),
        # the worst client of the published prompt, against its own zero-shot accuracy
        "worst-client": worst_client(zeroshot_per_client, published_per_client),
        "zeroshot-per-client": zeroshot_per_client,
        # diagnostics: the final iterate, and the papers' mean over the last rounds' iterates
        "final": final,
        "final-round": last.get("round"),
        "final-per-client": final_per_client,
        "worst-client-final-round": worst_client(zeroshot_per_client, final_per_client),
        "last-rounds-mean": last_rounds_mean(evals, cfg.eval_last),
        "worst-client-last-rounds": worst_client(zeroshot_per_client, last_rounds_per),
        "privacy": {
            "dp": cfg.dp,
            "delta": cfg.delta,
            "neighbouring-relation": "add/remove one record",
            "accountant": "dp-accounting PLD, Poisson-subsampled Gaussian",
            "target-epsilon": cfg.target_epsilon if cfg.uses_calibration else None,
            "calibrate-for": cfg.calibrate_for,
            "noise-multiplier-global": state.noise_multiplier_global,
            **privacy_block(cfg, strategy),
        },
    }


def published_prompt_note(cfg: RunConfig, state: ServerState, strategy: PromptStrategy, evaluated: bool) -> dict:
    """What the published prompt is, in words and rounds."""
    if not strategy.method.trains:
        return {"what": "the hand-crafted prompts (nothing is learned)"}
    rounds = [max(1, cfg.num_server_rounds - cfg.publish_average + 1), cfg.num_server_rounds]
    shared = (
        "each cluster's final p_G (SecFPP's cluster prompts are not averaged)"
        if cfg.method == "secfpp"
        else f"the mean of p_G over {state.averaged_rounds} rounds"
        if strategy.method.shares_global
        else "no p_G"
    )
    return {
        "what": f"{shared} plus each node's mean p_L over the rounds it trained in {rounds[0]}..{rounds[1]}; "
        "a mean of released iterates is post-processing and costs no epsilon",
        "average-of-last": cfg.publish_average,
        "rounds": rounds,
        "evaluated": evaluated,
    }


def privacy_block(cfg: RunConfig, strategy: PromptStrategy) -> dict:
    """Each epsilon (worst case over every node in the server's books), what it covers, and what it does not."""
    if not cfg.dp:
        return {key: None for key in COVERS}
    excludes = outside_epsilon(cfg.method, cfg.dp)  # what leaves the nodes that no epsilon covers
    return {
        **strategy.privacy_maxima(),
        "epsilon-covers": dict(COVERS),
        "sample-rate": SAMPLE_RATE_NOTE,
        "excludes": excludes,
        "secure-noise": cfg.secure_noise,
        **({"approximation": DISCRETE_GAUSSIAN_NOTE} if cfg.secure_aggregation else {}),
    }
