"""One audit: a federation run in this process with m gradient canaries in node 0's data, scored by two
adversaries, and the epsilon lower bound each one's guesses give, beside the accountant's epsilon.

Why its own loop and not ``run_inprocess``: the white-box adversary reads every release the accountant charges
(node 0's noisy local factor gradients, the server's noisy p_G step), which the Flower apps never hand out; the
loop calls the same pieces the apps do (``PromptNode``'s data, learner, declared q and z_L; the server's z_G,
``global_update`` and learning rate), one step per node per round with every node taking part, and the noise is
the run's: the same functions at the same multipliers, drawn from seeded generators (an audit is a repeatable
experiment; a deployed run's generators are seeded from the OS).

Threat models:

* ``white-box``: sees each round's noisy releases; score_i = sum over rounds of each release's inner product
  with canary i's clipped contribution, divided by that release's noise variance (the Gaussian likelihood-ratio
  direction), local and global added;
* ``final-prompt``: sees only the prompt node 0 publishes: the mean of its personalized prompt's last
  ``publish-average`` iterates, as a run publishes and ``dpfpl export`` writes; score_i = <p_init - p_published, u_i>
  (gradient descent moves against the canary's gradient).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from ..client_app.node import PromptNode, local_noise_multiplier
from ..common.config import NodeConfig, RunConfig
from ..common.methods import DpSettings, SgdSettings
from ..common.optim import fold_into_mean
from ..common.privacy import PrivacyAccountant
from ..common.prompt import initial_global_prompt
from ..server_app.strategy import global_learning_rate, global_noise_multiplier, global_update
from .bound import best_guesses, ceiling
from .canaries import GradientCanaries

THREAT_MODELS = ("white-box", "final-prompt")
VIOLATION = "VIOLATION: the empirical lower bound exceeds the claimed epsilon"


class AuditSettings(BaseModel):
    """What the audit adds to a run's config."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    canaries: int = Field(1000, ge=2)
    confidence: float = Field(0.95, gt=0, lt=1)
    seed: int = 0  # the canaries' directions, coins and Poisson draws, and the audit's noise generators
    with_canaries: bool = True  # False: the same loop without canaries (the cost baseline)


def _hyphenated(name: str) -> str:
    return name.replace("_", "-")


# the JSON's keys are hyphenated (epsilon-claimed, threat-model), as the run config's and the summary's are;
# the fields are still set and read by their Python names
RESULT_JSON = ConfigDict(alias_generator=_hyphenated, validate_by_name=True, serialize_by_alias=True)


class ThreatModelResult(BaseModel):
    model_config = RESULT_JSON

    threat_model: str
    epsilon_lower_bound: float
    guesses: int
    correct: int
    guessed_in: int
    guessed_out: int


class AuditResult(BaseModel):
    model_config = RESULT_JSON

    epsilon_claimed: float
    delta: float
    confidence: float
    canaries: int
    canaries_included: int
    ceiling: float  # what a perfect observer of an exactly (epsilon_claimed, delta) Gaussian could reach
    rounds: int
    sample_rate: float
    noise_multiplier_local: float
    noise_multiplier_global: float
    seconds: float
    results: list[ThreatModelResult]
    violation: bool
    # each threat model's canary scores and the secret coins (for diagnosis; not written to the JSON)
    scores: dict[str, list[float]] = Field(default_factory=dict, exclude=True)
    included: list[bool] = Field(default_factory=list, exclude=True)

    def lines(self) -> list[str]:
        out = [
            f"claimed epsilon {self.epsilon_claimed:.4f} (delta {self.delta:g}; accountant: node 0's published "
            f"prompt), {self.canaries} canaries ({self.canaries_included} in), {self.rounds} rounds, q {self.sample_rate:.4g}",
            f"ceiling for m = {self.canaries}: {self.ceiling:.3f} (perfect observer of an exact Gaussian)",
        ]
        for r in self.results:
            out.append(
                f"{r.threat_model:>12}: epsilon >= {r.epsilon_lower_bound:.3f} at {self.confidence:.0%} confidence "
                f"({r.correct} of {r.guesses} guesses correct: {r.guessed_in} in, {r.guessed_out} out)"
            )
        if self.violation:
            out.append(VIOLATION)
        return out


def _nodes(cfg: RunConfig, cache_dir: str | None) -> list[PromptNode]:
    return [
        PromptNode(
            cfg,
            NodeConfig(
                partition_id=i,
                num_partitions=cfg.num_clients,
                cache_dir=cache_dir,
                num_threads=torch.get_num_threads(),
                device="cpu",
            ),
        )
        for i in range(cfg.num_clients)
    ]


@dataclass
class _CanaryFederation:
    """The audited federation while it trains: every node's state, the server's, the canaries in node 0's
    data, and the white-box adversary's running scores (one per canary)."""

    cfg: RunConfig
    settings: AuditSettings
    nodes: list[PromptNode]
    rates: list[float]  # each node's sample rate q
    z_g: float
    z_l: list[float]
    p_global: torch.Tensor | None
    locals_: list[dict]
    momenta: list[dict]
    noise: list[torch.Generator]  # each node's, seeded: an audit is a repeatable experiment
    server_noise: torch.Generator
    hook: GradientCanaries
    white: torch.Tensor
    accountant: PrivacyAccountant
    server_momentum: torch.Tensor | None = None

    @classmethod
    def start(cls, cfg: RunConfig, settings: AuditSettings, cache_dir: str | None) -> _CanaryFederation:
        """The nodes, the noise multipliers the apps would calibrate, and the canaries, before round 1."""
        nodes = _nodes(cfg, cache_dir)
        method = nodes[0].method
        rates = [node.sample_rate for node in nodes]
        z_g = global_noise_multiplier(cfg, max(rates), method)
        z_l = [local_noise_multiplier(cfg, q, z_g, method) for q in rates]
        p_global = initial_global_prompt(cfg) if method.shares_global else None
        locals_ = [node._fresh_local() for node in nodes]
        noise = [torch.Generator().manual_seed(settings.seed * 1_000_003 + 17 + i) for i in range(len(nodes))]
        server_noise = torch.Generator().manual_seed(settings.seed * 1_000_003 + 5)
        hook = GradientCanaries(
            settings.canaries,
            (cfg.n_ctx, nodes[0].learner.encoder.width),
            rates[0],
            cfg.max_grad_norm_global,
            cfg.max_grad_norm_local,
            method.local,
            seed=settings.seed * 1_000_003 + 101,
        )
        return cls(
            cfg,
            settings,
            nodes,
            rates,
            z_g,
            z_l,
            p_global,
            locals_,
            [{} for _ in nodes],
            noise,
            server_noise,
            hook,
            torch.zeros(settings.canaries, dtype=torch.float64),
            PrivacyAccountant(cfg.delta),
        )

    @property
    def directions(self) -> torch.Tensor:
        """Each canary's direction, flattened (m x prompt size)."""
        return self.hook.directions.flatten(1)

    def current_prompt(self) -> torch.Tensor:
        """Node 0's personalized prompt now (p_G + p_L: linear in both, so the mean of these iterates is the mean of
        p_G's plus the mean of p_L's, which is what a run publishes)."""
        return self.nodes[0].learner.personalized_prompt(self.p_global, self.locals_[0])

    def train_round(self) -> None:
        """One round: a step of every node (node 0 with the canaries), the accountant's record of node 0's
        releases, and the server's step on p_G."""
        grads = self._node_steps()
        self.accountant.record_step(self.z_l[0], self.z_g, self.rates[0])
        if grads:
            self._server_step(grads)

    def _node_steps(self) -> list[torch.Tensor]:
        """Each node's train step; the white-box adversary scores node 0's noisy local releases."""
        cfg, b, grads = self.cfg, self.cfg.batch_size, []
        for i, node in enumerate(self.nodes):
            dp = DpSettings(True, self.z_l[i], cfg.max_grad_norm_local, cfg.max_grad_norm_global, cfg.secure_noise)
            opt = SgdSettings(node.local_learning_rate(self.z_l[i]), cfg.momentum, cfg.weight_decay)
            canaries = self.hook if (i == 0 and self.settings.with_canaries) else None
            res = node.learner.train_step(
                self.p_global,
                self.locals_[i],
                self.momenta[i],
                node.data.train_features,
                node.data.train_labels,
                b,
                dp,
                opt,
                self.noise[i],
                sample_rate=self.rates[i],
                canaries=canaries,
            )
            self.locals_[i], self.momenta[i] = res.local, res.momentum
            if res.global_grad is not None:
                grads.append(res.global_grad)
            if canaries is not None and math.isfinite(self.z_l[0]) and res.local_grads:
                weight = b / (self.z_l[0] * cfg.max_grad_norm_local) ** 2  # canary / B over (sigma / B)^2
                for release, directions in zip(res.local_grads, self.hook.local_directions):
                    self.white += weight * (directions.flatten(1) @ release.flatten()).double()
        return grads

    def _server_step(self, grads: list[torch.Tensor]) -> None:
        """The server's noisy step on p_G; the white-box adversary scores the noisy mean it released."""
        cfg, n, before = self.cfg, len(grads), self.p_global
        self.p_global, self.server_momentum, _ = global_update(
            cfg, self.p_global, self.server_momentum, grads, self.z_g, self.server_noise
        )
        if self.settings.with_canaries:
            lr = global_learning_rate(cfg, self.z_g, n, tuple(self.p_global.shape))
            release = (before - self.p_global) / lr  # the noisy mean (exactly, at momentum 0 and weight decay 0)
            weight = (
                cfg.batch_size * n / (self.z_g**2 * cfg.max_grad_norm_global)
            )  # C_G / (B n) over (z_G C_G / (B n))^2
            self.white += weight * (self.directions @ release.flatten()).double()


def run_audit(
    cfg: RunConfig,
    settings: AuditSettings,
    cache_dir: str | None = None,
    progress: Callable[[int], None] | None = None,
) -> AuditResult:
    """Train cfg's federation for its rounds with the canaries in node 0 and audit it (``progress(round)``)."""
    if not cfg.dp:
        raise ValueError("an audit needs dp = true: without DP there is no claimed epsilon to audit")
    started = time.time()
    fed = _CanaryFederation.start(cfg, settings, cache_dir)
    start_prompt = fed.current_prompt()
    published, averaged = None, 0  # the mean of the iterates that enter publication (publish-average)
    for rnd in range(1, cfg.num_server_rounds + 1):
        fed.train_round()
        if cfg.averages_for_publication(rnd):
            published, averaged = fold_into_mean(published, averaged, fed.current_prompt())
        if progress is not None:
            progress(rnd)
    final = -(fed.directions @ (published - start_prompt).flatten()).double()
    return _audit_result(fed, final, time.time() - started)


def _threat_model_results(fed: _CanaryFederation, final: torch.Tensor) -> list[ThreatModelResult]:
    """Each adversary's best guesses from its canary scores, and the lower bound they give."""
    if not fed.settings.with_canaries:
        return []
    results = []
    for name, scores in zip(THREAT_MODELS, (fed.white, final)):
        g = best_guesses(scores.numpy(), fed.hook.included.numpy(), fed.cfg.delta, fed.settings.confidence)
        results.append(
            ThreatModelResult(
                threat_model=name,
                epsilon_lower_bound=g.epsilon,
                guesses=g.guesses,
                correct=g.correct,
                guessed_in=g.k_in,
                guessed_out=g.k_out,
            )
        )
    return results


def _audit_result(fed: _CanaryFederation, final: torch.Tensor, seconds: float) -> AuditResult:
    """The lower bounds beside the accountant's epsilon for node 0's published prompt, and its ceiling."""
    cfg, settings = fed.cfg, fed.settings
    claimed = fed.accountant.epsilon_published()
    included = fed.hook.included.numpy()
    results = _threat_model_results(fed, final)
    return AuditResult(
        epsilon_claimed=claimed,
        delta=cfg.delta,
        confidence=settings.confidence,
        canaries=settings.canaries,
        canaries_included=int(np.sum(included)),
        ceiling=ceiling(claimed, settings.canaries, cfg.delta, settings.confidence)
        if math.isfinite(claimed)
        else math.inf,
        rounds=cfg.num_server_rounds,
        sample_rate=fed.rates[0],
        noise_multiplier_local=fed.z_l[0],
        noise_multiplier_global=fed.z_g,
        seconds=seconds,
        results=results,
        scores={"white-box": fed.white.tolist(), "final-prompt": final.tolist()},
        included=included.tolist(),
        violation=any(r.epsilon_lower_bound > claimed * (1 + 1e-9) for r in results),
    )
