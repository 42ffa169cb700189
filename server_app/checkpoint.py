"""The run directory: checkpoint (atomic), per-round metrics log (JSON lines), run summary.

After every round the server writes the global prompt, its optimizer state and the bookkeeping needed to
resume (round counter, noise multiplier, per-node sample rates and participation counts for the
accountant). Metrics lines past the checkpointed round are dropped on resume, so no round is logged or
counted twice; so is a last line torn by a kill mid-append (``dpfpl.common.metrics.read_metrics_log``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from dpfpl.common.atomic import read_state, write_bytes, write_json, write_state
from dpfpl.common.metrics import append_metrics_record, read_metrics_log
from dpfpl.common.optim import fold_into_mean

CHECKPOINT = "checkpoint.safetensors"
METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
RUN_CONFIG = "config.json"  # the validated run config: what `dpfpl export` needs (model, classes, method)


@dataclass
class ServerState:
    p_global: torch.Tensor
    momentum: torch.Tensor | None
    server_round: int
    run_token: str
    noise_multiplier_global: float
    config_fingerprint: str
    node_sample_rates: dict[str, float] = field(default_factory=dict)  # node_id -> q_i
    participation: dict[str, int] = field(default_factory=dict)  # node_id -> noisy rounds
    node_noise_local: dict[str, float] = field(default_factory=dict)  # node_id -> z_L (as the node reports it)
    node_steps: dict[str, int] = field(default_factory=dict)  # node_id -> noisy steps (as the node reports them)
    # node_id -> rounds whose replies were released twice (a checkpoint fallback re-ran them with fresh noise)
    rereleased: dict[str, int] = field(default_factory=dict)
    # the round that runs again after such a fallback: its train message tells the nodes that a reply they re-send
    # is released a second time (a round cut short before its checkpoint released nothing and is not flagged)
    rerelease_round: int = 0
    # the last round whose evaluation ran: a crash may come between a round's checkpoint and its evaluation
    # (None: a checkpoint written before this was kept, whose rounds were saved after their evaluation)
    evaluated_round: int | None = None
    zeroshot: dict[str, float] = field(default_factory=dict)
    calibrated_rounds: int = 0  # the number of rounds the noise was calibrated for (0: not calibrated)
    last_record: dict = field(default_factory=dict)  # the metrics line of server_round (see RunDirectory.resume)
    # SecFPP: one global prompt per cluster, and each node's cluster (node id -> cluster); empty otherwise
    cluster_prompts: dict[int, torch.Tensor] = field(default_factory=dict)
    assignment: dict[str, int] = field(default_factory=dict)
    # the published p_G: the running mean of p_G over the rounds that enter publication (publish-average)
    p_global_average: torch.Tensor | None = None
    averaged_rounds: int = 0

    def average_for_publication(self) -> None:
        """Fold this round's p_G into the published mean. Called once per round, before the round's checkpoint:
        a round that runs again after a crash was never folded in (its checkpoint was not written)."""
        self.p_global_average, self.averaged_rounds = fold_into_mean(
            self.p_global_average, self.averaged_rounds, self.p_global
        )

    @property
    def published_global(self) -> torch.Tensor:
        """The p_G that is published: the mean of the averaged iterates, or the current one before any."""
        return self.p_global if self.p_global_average is None else self.p_global_average


class NonFiniteStateError(ValueError):
    """A server state with a non-finite prompt, which is never checkpointed."""


def charge_lost_round(state: ServerState) -> None:
    """The checkpoint fell back to the copy before the last write: the lost round's p_G may already have
    left the server, and the resumed run releases that round again with fresh noise on the *same* replies (a node
    re-sends the reply it gave, from the same Poisson batch). Two Gaussian releases of one batch are one Gaussian
    with multiplier z_G / sqrt(2), not two independent subsampled steps (which would under-count: independent
    samples amplify more). So every booked node gets one round booked at that combined multiplier
    (``books.node_epsilons``); its nodes charge themselves the same way (``PromptNode.train``)."""
    for key in set(state.participation) | set(state.node_steps):
        state.rereleased[key] = state.rereleased.get(key, 0) + 1
    state.rerelease_round = state.server_round + 1


class RunDirectory:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)

    def save(self, state: ServerState) -> None:
        """Checkpoint the state, refusing a prompt or optimizer state that is not finite: the checkpoint is what a
        resumed run sends the nodes, and what the strategy's own check (``strategy.finite_update``) missed must
        not become the run's state. The previous checkpoint then stays as it is."""
        tensors = {"p_global": state.p_global}
        if state.momentum is not None:
            tensors["momentum"] = state.momentum
        tensors.update({f"cluster-{s}": p.clone() for s, p in state.cluster_prompts.items()})  # p_global may alias one
        if state.p_global_average is not None:
            tensors["p_global_average"] = state.p_global_average
        bad = sorted(name for name, t in tensors.items() if not bool(torch.isfinite(t).all()))
        if bad:
            raise NonFiniteStateError(
                f"{self.path / CHECKPOINT}: not saving round {state.server_round}: {', '.join(bad)} holds NaN or "
                "Inf; the previous checkpoint stays as it is"
            )
        meta = {
            k: getattr(state, k)
            for k in (
                "server_round",
                "run_token",
                "noise_multiplier_global",
                "config_fingerprint",
                "node_sample_rates",
                "participation",
                "node_noise_local",
                "node_steps",
                "evaluated_round",
                "zeroshot",
                "calibrated_rounds",
                "last_record",
                "assignment",
                "averaged_rounds",
                "rereleased",
                "rerelease_round",
            )
        }
        write_state(self.path / CHECKPOINT, tensors, {"state": json.dumps(meta)})

    def load(self) -> ServerState | None:
        loaded = read_state(self.path / CHECKPOINT)  # falls back to the previous checkpoint if damaged
        if loaded is None:
            return None
        tensors, meta = loaded.tensors, json.loads(loaded.metadata["state"])
        clusters = {int(k.split("-", 1)[1]): v for k, v in tensors.items() if k.startswith("cluster-")}
        state = ServerState(
            p_global=tensors["p_global"],
            momentum=tensors.get("momentum"),
            cluster_prompts=clusters,
            p_global_average=tensors.get("p_global_average"),
            **meta,
        )
        if loaded.from_previous and (state.evaluated_round is None or state.evaluated_round >= state.server_round):
            # the lost write was the next round's first checkpoint, after which that round's p_G may have left
            # (a lost write of this round's second checkpoint loses no p_G: this one is already the round's)
            charge_lost_round(state)
        return state

    def append_metrics(self, record: dict) -> None:
        append_metrics_record(self.path / METRICS, record)

    def read_metrics(self) -> list[dict]:
        return read_metrics_log(self.path / METRICS)

    def resume_metrics(self, state: ServerState) -> None:
        """Make the metrics log end at the checkpointed round: drop lines of rounds after it (they will run
        again) and restore its own line when a crash came between the checkpoint and the line (the
        checkpoint carries it), so every round is logged exactly once."""
        self.truncate_metrics(state.server_round if state.server_round > 0 else -1)
        logged = {r["round"] for r in self.read_metrics()}
        if (
            state.server_round > 0
            and state.server_round not in logged
            and state.last_record.get("round") == state.server_round
        ):
            self.append_metrics(state.last_record)

    def truncate_metrics(self, last_round: int) -> None:
        kept = [r for r in self.read_metrics() if r["round"] <= last_round]
        write_bytes(self.path / METRICS, "".join(json.dumps(r) + "\n" for r in kept).encode())

    def write_config(self, config_json: str) -> None:
        write_bytes(self.path / RUN_CONFIG, config_json.encode())

    def write_summary(self, summary: dict) -> None:
        write_json(self.path / SUMMARY, summary)
