"""A node's work for one message: load state, run the method, save state. Flower-free, so it is testable
and the ClientApp handlers stay thin."""

from __future__ import annotations

import hashlib
import logging
import math
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache

import torch

from dpfpl.common.atomic import DiskFullError
from dpfpl.common.config import NodeConfig, RunConfig
from dpfpl.common.evaluation import accuracy, cross_entropy, harmonic_mean
from dpfpl.common.methods import DpSettings, Method, PromptLearner, SgdSettings, StepResult, build_method
from dpfpl.common.metrics import BASE_ACC, HM, LOCAL_ACC, LOCAL_LOSS, NOVEL_ACC
from dpfpl.common.models import LoadedModel, cached_clip
from dpfpl.common.node_data import NOVEL, NodeData, load_node_data
from dpfpl.common.optim import noise_bounded_lr
from dpfpl.common.privacy import PrivacyAccountant, calibration, combined_noise_multiplier, dp_generator
from dpfpl.common.privacy.ledger import PrivacyLedger
from dpfpl.common.prompt import PromptTextEncoder

from .errors import PrivacyBudgetSpent
from .identity import node_key
from .state import NodeState, activate_run, load_run_state

log = logging.getLogger("dpfpl.client")
# Backbone loads in this process, per "model/pretrained": a resident worker reports them (client_app/worker.py),
# so that "loaded once per node per run" is a number an operator and a test can read.
MODEL_LOADS: Counter[str] = Counter()


@lru_cache(maxsize=4)
def _model(model_name: str, pretrained: str, cache: str | None, device: torch.device) -> LoadedModel:
    MODEL_LOADS[f"{model_name}/{pretrained}"] += 1
    log.info("loading %s (%s) on %s", model_name, pretrained, device)
    model = cached_clip(model_name, pretrained, cache)
    model.model.to(device)
    return model


@lru_cache(maxsize=8)
def _encoder(model: LoadedModel, n_ctx: int, classnames: tuple[str, ...], device: torch.device) -> PromptTextEncoder:
    """Token ids and frozen prefix/suffix embeddings of a class list: built once per process, not per round."""
    return PromptTextEncoder(model.model, model.tokenizer, list(classnames), n_ctx).to(device)


@lru_cache(maxsize=16)
def _node_data(cfg: RunConfig, node: NodeConfig, model: LoadedModel, device: torch.device) -> NodeData:
    return load_node_data(cfg, node, model, node.cache_dir).to(device)


def release_run_caches() -> None:
    """Drop the per-run caches (the node's features on its device, the text encoders), keep the model. A
    resident worker calls this when a new run starts, so that a worker serving run after run for weeks holds
    one run's features, not the last sixteen; they come back from the feature cache on disk when needed."""
    _node_data.cache_clear()
    _encoder.cache_clear()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _digest(p_global: torch.Tensor | None) -> str:
    """Identifies the global prompt a reply answered (a re-sent round gets the old reply only for the same p_G)."""
    if p_global is None:
        return "none"
    return hashlib.sha256(p_global.detach().cpu().contiguous().numpy().tobytes()).hexdigest()


@dataclass
class TrainOutcome:
    global_grad: torch.Tensor | None  # None: the method shares nothing
    metrics: dict[str, float]


def local_noise_multiplier(cfg: RunConfig, sample_rate: float, z_global: float, method: Method) -> float:
    """z_L for this node: given directly, or calibrated by the accountant for this node's declared q and the
    planned number of rounds (``dpfpl.common.privacy.calibration``). ``inf`` when the method has no local
    release (PromptFL)."""
    if not cfg.dp:
        return 0.0
    if method.local is None:
        return math.inf
    if not cfg.uses_calibration:
        return cfg.noise_multiplier_local
    return calibration.local_noise_multiplier(
        cfg.target_epsilon, sample_rate, cfg.num_server_rounds, cfg.delta, cfg.calibrate_for, z_global
    )


def declared_sample_rate(cfg: RunConfig, node: NodeConfig, planned_size: int) -> float:
    """This node's Poisson sample rate, public by declaration: its node config's ``sample-rate``, else the run
    config's, else (simulation only: the node has a partition id) B / its partition's planned size, the
    simulated operator's declaration. Never recomputed from the records a deployed node holds."""
    if node.sample_rate is not None:
        return node.sample_rate
    if cfg.sample_rate > 0:
        return cfg.sample_rate
    if node.partition_id is not None or not cfg.dp:  # simulation, or no guarantee to keep: follow the plan
        return min(1.0, cfg.batch_size / max(planned_size, 1))
    raise ValueError(
        "this node has no declared sample rate: under DP the Poisson rate q is public and must not be computed "
        "from the records. Declare it in the node config, chosen without reading the data, e.g. "
        f"--node-config 'sample-rate=0.05' (batch-size {cfg.batch_size} / a public, approximate silo size), "
        "or set the run config's sample-rate"
    )


class PromptNode:
    """One organization's side of any method: its data, its private state, its step and its evaluation."""

    def __init__(self, cfg: RunConfig, node: NodeConfig) -> None:
        self.cfg = cfg
        self.node = node
        self.state_dir = node.resolved_state_dir(cfg.run_dir)
        self.device = node.resolved_device()
        self.model = _model(cfg.model_name, cfg.pretrained, node.cache_dir, self.device)
        self.data = _node_data(cfg, node, self.model, self.device)
        self.encoder = _encoder(self.model, cfg.n_ctx, tuple(self.data.classnames), self.device)
        self.method = build_method(cfg.method, cfg.rank, cfg.contrastive_weight, cfg.contrastive_temperature)
        self.learner = PromptLearner(self.method, self.encoder, float(self.model.model.logit_scale.exp()))

    @property
    def sample_rate(self) -> float:
        """q, public by declaration (``declared_sample_rate``): the rate the Poisson sample and the accountant use."""
        return declared_sample_rate(self.cfg, self.node, self.data.num_train)

    @property
    def _seed(self) -> int:
        return self.cfg.seed * 100_003 + (self.node.partition_id or 0) + 1

    def _fresh_local(self) -> dict[str, torch.Tensor]:
        text = self.encoder.init_context(self.cfg.ctx_init) if self.cfg.ctx_init else None
        return self.learner.init_local(torch.Generator().manual_seed(self._seed), self.cfg.local_init_std, text)

    def local_learning_rate(self, noise_multiplier_local: float) -> float:
        """lr-local, lowered under DP so that this node's accumulated noise stays within local-noise-radius."""
        if not self.cfg.dp:
            return self.cfg.lr_local
        return noise_bounded_lr(
            lr=self.cfg.lr_local,
            radius=self.cfg.local_noise_radius,
            reference_norm=self.encoder.reference_context_norm(),
            noise_multiplier=noise_multiplier_local,
            max_grad_norm=self.cfg.max_grad_norm_local,
            expected_batch=self.cfg.batch_size,
            steps=self.cfg.num_server_rounds,
            noised_size=self.learner.noised_size(),
        )

    def _state(self, run_token: str, z_global: float) -> NodeState:
        state = activate_run(self.state_dir, run_token)
        if state is not None:
            if state.from_previous and self.cfg.dp:
                # the previous copy's generator would replay the lost step's Poisson sample and noise, which the
                # books charge as a fresh, independent step: draw a fresh secret seed instead
                state.generator = dp_generator(True, 0)
            return state
        # The local init may follow the seed; the noise and the Poisson sample may not under DP (dp_generator).
        local = self._fresh_local()
        gen = dp_generator(self.cfg.dp, self._seed + 7919)
        return NodeState(
            local=local,
            generator=gen,
            accountant=PrivacyAccountant(self.cfg.delta),
            noise_multiplier_local=local_noise_multiplier(self.cfg, self.sample_rate, z_global, self.method),
            run_key=run_token,
        )

    # ------------------------------------------------------------------ the node's own line
    def global_noise_at_node(self, z_global: float) -> float:
        """The global noise multiplier this node adds itself to the clear-text global gradient: z_G when its
        operator trusts no aggregator (``global-noise = "node"``), else 0 (the server adds it to the sum; under
        secure aggregation the node's share goes into its masked input instead, ``client_app/secagg_handlers.py``)."""
        node_adds = self.node.global_noise == "node" and not self.cfg.secure_aggregation
        return z_global if self.cfg.dp and node_adds and math.isfinite(z_global) else 0.0

    def run_limit(self) -> float | None:
        """The composed epsilon this run may spend on this node (None: no target; only the lifetime applies)."""
        if not self.cfg.uses_calibration:
            return None
        return calibration.run_epsilon_limit(
            self.cfg.target_epsilon,
            self.sample_rate,
            self.cfg.num_server_rounds,
            self.cfg.delta,
            self.cfg.calibrate_for,
            self.method.local is not None,
            self.method.shares_global,
        )

    def _planned_mechanism(self) -> tuple[float, float, float]:
        """(z_L, z_G, q) a run's every step is expected to use, for the setup check against the lifetime: the
        calibration's combined multiplier (as one release) or the configured multipliers."""
        q = self.sample_rate
        if self.cfg.uses_calibration:
            z = calibration.calibrate_noise_multiplier(self.run_limit(), q, self.cfg.num_server_rounds, self.cfg.delta)
            return z, math.inf, q
        z_l = math.inf if self.method.local is None else self.cfg.noise_multiplier_local
        z_g = math.inf if not self.method.shares_global else self.cfg.noise_multiplier_global
        return z_l, z_g, q

    def check_lifetime_at_setup(self, run_token: str) -> None:
        """Refuse a run whose planned releases, composed with everything in the ledger, would go past the node's
        lifetime-epsilon (the run's own earlier steps count once: they are in the ledger)."""
        if not self.cfg.dp or self.node.lifetime_epsilon is None:
            return
        ledger = PrivacyLedger.of(self.state_dir)
        done = ledger.runs[run_token].count if run_token in ledger.runs else 0
        remaining = max(self.cfg.num_server_rounds - done, 0)
        planned = ledger.epsilon_with(self.node.lifetime_delta, {self._planned_mechanism(): remaining})
        if not calibration.within(planned, self.node.lifetime_epsilon):
            raise PrivacyBudgetSpent(
                f"refused at setup: this run's {remaining} planned noisy steps would bring the composed epsilon of "
                f"this node's records to {planned:.4f} (delta {self.node.lifetime_delta:g}), past its "
                f"lifetime-epsilon {self.node.lifetime_epsilon:g}. The node's ledger:\n"
                + ledger.describe(self.node.lifetime_delta, self.node.lifetime_epsilon)
            )

    def _refuse_past_limits(self, history: list, ledger: PrivacyLedger, what: str) -> None:
        """Raise ``PrivacyBudgetSpent`` if this run's books as they would be (``history``) pass the run's limit,
        or the ledger as it would be (``ledger``, not yet saved) passes the node's lifetime-epsilon."""
        limit = self.run_limit()
        if limit is not None:
            after = PrivacyAccountant(self.cfg.delta)
            after.history = list(history)
            spent = after.epsilon_published()
            if not calibration.within(spent, limit):
                raise PrivacyBudgetSpent(
                    f"privacy budget spent, {what} refused: it would bring this run's published epsilon to "
                    f"{spent:.4f} after {len(history)} noisy steps, past its limit {limit:.4f} (target-epsilon "
                    f"{self.cfg.target_epsilon}, calibrate-for {self.cfg.calibrate_for}, {self.cfg.num_server_rounds} "
                    f"rounds, delta {self.cfg.delta:g}). Nothing was released; the node trains no further in this run"
                )
        if self.node.lifetime_epsilon is not None:
            total = ledger.epsilon(self.node.lifetime_delta)
            if not calibration.within(total, self.node.lifetime_epsilon):
                raise PrivacyBudgetSpent(
                    f"privacy budget spent, {what} refused: it would bring the composed epsilon of this node's "
                    f"records to {total:.4f}, past its lifetime-epsilon {self.node.lifetime_epsilon:g}. The ledger "
                    "before it:\n"
                    + PrivacyLedger.of(self.state_dir).describe(self.node.lifetime_delta, self.node.lifetime_epsilon)
                )

    def charge_release(self, run_token: str, state: NodeState, z_global: float, server_round: int = 0) -> None:
        """Before a noisy release: with this node's own accountant and the noise this step really adds (its
        z_L, the z_G the server says it adds or this node adds its share of, its declared q), the epsilon of
        everything released so far plus this step must stay within the run's limit and the node's lifetime.
        Whatever the server sends (a lower z_G, a round more, another q), a release past either is refused;
        otherwise the step is written into the ledger before anything of it is released (see PrivacyLedger).

        A retry of a round whose earlier attempt was charged here but never got its reply built and stored (the
        state write after the step failed: a full disk, a crash) takes that charge over instead of adding one:
        the charge is still pending in the ledger (``_settle`` clears it once the reply is stored), so nothing of
        that attempt left. Never after a fallback to the previous state copy, which may have lost a step whose
        reply did leave: that step is charged again (``NodeState.load``) and this one anew."""
        step = (state.noise_multiplier_local, z_global, self.sample_rate)
        ledger = PrivacyLedger.of(self.state_dir)
        retry = (
            not state.from_previous
            and state.last_round < server_round
            and ledger.reuse_pending(run_token, server_round, *step)
        )
        if not retry:
            ledger.charge(run_token, *step, server_round=server_round)
        self._refuse_past_limits([*state.accountant.history, step], ledger, "release")
        ledger.save()

    def _charge_rerelease(self, run_token: str, state: NodeState, z_global: float) -> None:
        """A re-sent reply released again with fresh global noise: the last step becomes one release of its batch
        at the combined global multiplier (z_G_first^-2 + z_G^-2)^-1/2, in the run's books and in the ledger,
        checked against both limits first (a re-send past them is refused like a step)."""
        if not state.accountant.history:
            return
        z_l, z_g, q = state.accountant.history[-1]
        again = (z_l, combined_noise_multiplier(z_g, z_global), q)
        ledger = PrivacyLedger.of(self.state_dir)
        ledger.move(run_token, state.accountant.history[-1], again)
        self._refuse_past_limits([*state.accountant.history[:-1], again], ledger, "re-send")
        ledger.save()
        state.accountant.history[-1] = again
        state.save(self.state_dir)

    def train(
        self, p_global: torch.Tensor | None, server_round: int, run_token: str, z_global: float, rerelease: bool = False
    ) -> TrainOutcome:
        """One round's step: the reply already sent when the round was answered, else a fresh step, charged to the
        books before it is taken and stored with its reply in one write before anything of it leaves."""
        self._check_release(p_global, z_global)
        state = self._state(run_token, z_global)
        asked = _digest(p_global)
        if (
            state.last_round == server_round
            and state.extra.get("reply-round") == server_round
            and state.extra.get("reply-to") == asked
        ):
            return self._resend(state, server_round, run_token, z_global, rerelease)
        if self.cfg.dp:
            self.charge_release(run_token, state, z_global, server_round)
        result, dp = self._step(state, p_global, z_global, server_round)
        metrics = self._reply_metrics(state, result, dp)
        global_grad = None if result.global_grad is None else result.global_grad.cpu()
        state.last_reply = {} if global_grad is None else {"global-grad": global_grad}
        state.extra.update({"reply-round": server_round, "reply-metrics": metrics, "reply-to": asked})
        state.save(self.state_dir)  # one atomic write: the step, the accountant and the reply together
        if self.cfg.dp:
            self._settle(run_token, server_round)
        return TrainOutcome(global_grad, metrics)

    def _check_release(self, p_global: torch.Tensor | None, z_global: float) -> None:
        """Refuse a message this node cannot answer with a step: no global prompt for a method that trains on one,
        or, under DP, a global noise multiplier that is no noise."""
        if self.method.shares_global and p_global is None:
            raise ValueError(f"method '{self.method.name}' trains on a global prompt but the message carried none")
        if self.cfg.dp and not (z_global > 0 or (not self.method.shares_global and math.isinf(z_global))):
            raise PrivacyBudgetSpent(f"release refused: the server's global noise multiplier {z_global!r} is no noise")

    def _resend(
        self, state: NodeState, server_round: int, run_token: str, z_global: float, rerelease: bool
    ) -> TrainOutcome:
        """This round was already answered: send the same reply again, no new step and no new local noise. A
        round cut short (the server or the SuperLink died before the round's checkpoint) released nothing. A round
        the server runs again after falling back to an older checkpoint (``rerelease``) may have been released:
        in the central mode the server adds fresh global noise to the same reply, and this node books that second
        release of the same batch. (The server's word on this is trusted as its word on the noise it adds is: the
        central mode trusts the aggregator; secure aggregation does not need it.)"""
        log.warning("node %s: round %d already trained; re-sending its reply", self.node.partition_id, server_round)
        central = self.method.shares_global and not self.cfg.secure_aggregation
        if self.cfg.dp and central and rerelease:
            self._charge_rerelease(run_token, state, z_global)
        return TrainOutcome(state.last_reply.get("global-grad"), dict(state.extra["reply-metrics"]))

    def _step(
        self, state: NodeState, p_global: torch.Tensor | None, z_global: float, server_round: int
    ) -> tuple[StepResult, DpSettings]:
        """The method's step on this node's data, taken into ``state`` (its p_L, momentum, round, books); not
        saved yet. Returns the step's result and the DP settings it ran under."""
        dp = DpSettings(
            self.cfg.dp,
            state.noise_multiplier_local,
            self.cfg.max_grad_norm_local,
            self.cfg.max_grad_norm_global,
            self.cfg.secure_noise,
            noise_multiplier_global_at_node=self.global_noise_at_node(z_global),
        )
        to_device = lambda ts: {k: v.to(self.device) for k, v in ts.items()}  # noqa: E731
        result = self.learner.train_step(
            None if p_global is None else p_global.to(self.device),
            to_device(state.local),
            to_device(state.momentum),
            self.data.train_features,
            self.data.train_labels,
            self.cfg.batch_size,
            dp,
            SgdSettings(
                self.local_learning_rate(state.noise_multiplier_local), self.cfg.momentum, self.cfg.weight_decay
            ),
            state.generator,
            sample_rate=self.sample_rate,
        )
        cpu = lambda ts: {k: v.cpu() for k, v in ts.items()}  # noqa: E731
        state.local, state.momentum, state.last_round = cpu(result.local), cpu(result.momentum), server_round
        if self.method.local is not None and self.cfg.averages_for_publication(server_round):
            state.average_for_publication(self.method.local.eval_context(state.local))
        if self.cfg.dp:
            state.accountant.record_step(state.noise_multiplier_local, z_global, self.sample_rate)
        log.info(
            "node %s round %d: loss %.4f on %d samples",
            self.node.partition_id,
            server_round,
            result.loss,
            result.batch_size,
        )
        return result, dp

    def _reply_metrics(self, state: NodeState, result: StepResult, dp: DpSettings) -> dict[str, float]:
        """What leaves: the node's key, its declared (public) sample rate and z_L, and its books (functions of the
        noise it added and the steps the server asked for). Not its training-set size, not its Poisson batch."""
        metrics: dict[str, float] = {
            "node-key": node_key(self.state_dir),
            "sample-rate": self.sample_rate,
            "noise-multiplier-local": state.noise_multiplier_local,
        }
        if dp.noise_multiplier_global_at_node > 0:  # the server's norm check allows for the noise already in it
            metrics["noise-multiplier-global-node"] = dp.noise_multiplier_global_at_node
        if self.cfg.dp:
            # the server's books: every step this node took counts for p_G too (it moved p_L, which the next
            # replies read), even one whose reply the server never aggregated
            metrics["noisy-steps"] = float(len(state.accountant.history))
            if self.method.local is not None:
                metrics["epsilon-local"] = state.accountant.epsilon_local()
            metrics["epsilon-published"] = state.accountant.epsilon_published()
        else:
            # Without DP there is no guarantee to protect: the batch's loss and size help the user follow training.
            metrics["train-loss"] = result.loss
            metrics["batch-size"] = float(result.batch_size)
        return metrics

    def _settle(self, run_token: str, server_round: int) -> None:
        """The step's reply is built and stored: its ledger charge stops being pending, so that no later attempt
        at the round can take it over (the reply may leave from now on). A full disk here costs nothing: the
        round is answered from the stored reply if sent again, and a charge left pending is only ever reused by
        an attempt whose state has not taken the round in."""
        ledger = PrivacyLedger.of(self.state_dir)
        if ledger.settle(run_token, server_round):
            try:
                ledger.save()
            except DiskFullError as err:
                log.warning("%s; the step is taken and its reply stored, its ledger charge stays marked pending", err)

    def evaluate(
        self, p_global: torch.Tensor | None, run_token: str, zeroshot: bool = False, published: bool = False
    ) -> dict[str, float]:
        """Zero-shot or personalized-prompt accuracy on local and neighbor test images. A node that has not
        trained yet (no local state of this run) is evaluated with the method's freshly initialized local part.
        ``published``: the published prompt, whose p_L is the mean of the node's last iterates (``p_global`` is
        then the server's mean of p_G's)."""
        if zeroshot:  # the setup phase: a run the node's lifetime budget cannot cover is refused here
            self.check_lifetime_at_setup(run_token)
        d = self.data
        encoders = {"task": self.encoder}
        if d.novel_classnames:
            encoders[NOVEL] = _encoder(self.model, self.cfg.n_ctx, tuple(d.novel_classnames), self.device)
        prompted = not zeroshot and self.method.trains
        # read once, read-only: the prompt to evaluate and, under DP, the steps this run took on this node
        state = load_run_state(self.state_dir, run_token) if prompted or self.cfg.dp else None
        with torch.no_grad():
            if not prompted:
                text = {k: enc.handcrafted_features() for k, enc in encoders.items()}
            else:
                local = state.local if state is not None else self._fresh_local()
                p_g = None if p_global is None else p_global.to(self.device)
                local = {k: v.to(self.device) for k, v in local.items()}
                average = state.local_average if published and state is not None else None
                average = None if average is None else average.to(self.device)
                text = {k: self.learner.text_features(p_g, local, enc, average) for k, enc in encoders.items()}
        metrics = {f"{name}-acc": accuracy(text[e.classifier], e.features, e.labels) for name, e in d.evals.items()}
        metrics[LOCAL_LOSS] = cross_entropy(text["task"], d.local_features, d.local_labels, self.learner.logit_scale)
        if d.protocol == "base-novel":
            metrics[HM] = harmonic_mean([metrics[LOCAL_ACC], metrics[BASE_ACC], metrics[NOVEL_ACC]])
        # public by declaration: the rate the server calibrates z_G for (never the training-set size)
        metrics["sample-rate"] = self.sample_rate
        metrics["node-key"] = node_key(self.state_dir)  # the key the server books this node under
        if self.cfg.dp:  # the steps this node took in this run (counted by the server's books, even unaccepted ones)
            metrics["noisy-steps"] = float(len(state.accountant.history)) if state is not None else 0.0
        if self.node.partition_id is not None:  # a stable, human-readable name for the per-client table
            metrics["partition-id"] = float(self.node.partition_id)
        return metrics
