"""The server strategy of every method: validate replies, average the clipped global gradients with equal
weights, add the global DP noise, step p_G with the server optimizer, and keep the books for the accountant.
Methods without a global prompt (CoOp) only drive the rounds: their replies must carry no array at all.

Follows ``flwr.serverapp.strategy.Strategy`` (configure_*/aggregate_*). ``dpfpl.server_app.runner.run_federation``
drives the rounds instead of ``Strategy.start`` because a DP run needs a zero-shot/setup phase before round 1 (the nodes' sample rates
calibrate the global noise), evaluation every ``eval-every`` rounds, and resume from a checkpoint.

What differs between runs plugs in here, chosen once when the strategy is built (``server_app/build.py``), so that
the round loop names no method: how a round's train exchange is done (``train_round``, through the strategy's
``TrainExchange``: in the clear, ``ClearTrainExchange``, or under secure aggregation, ``server_app/secagg_round.py``),
what follows a round's aggregation (``after_aggregation``: SecFPP's clustering phase, ``server_app/secfpp_round.py``),
and how the summary words what the run published and what its epsilons assume.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Protocol

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common import MessageType
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from flwr.serverapp.strategy.strategy_utils import sample_nodes

from dpfpl.common.classlist import DIGEST_KEY, class_list_digest
from dpfpl.common.config import RunConfig
from dpfpl.common.evaluation import harmonic_mean
from dpfpl.common.methods import Method, build_method
from dpfpl.common.metrics import BASE_ACC, EVALUATION_KEYS, GLOBAL_NOISE_STD, HM_OF_MEANS, LOCAL_ACC, NOVEL_ACC
from dpfpl.common.models import cached_clip
from dpfpl.common.optim import noise_bounded_lr, sgd_update
from dpfpl.common.outcome import client_error_text
from dpfpl.common.privacy import add_gaussian_noise, calibration, dp_generator
from dpfpl.common.prompt import TextTower, reference_context_norm
from dpfpl.common.run_classes import run_class_list
from dpfpl.common.runtag import RUN_TAG_KEY, run_tag

from .books import privacy_maxima
from .checkpoint import ServerState
from .exchange import exchange
from .federation import NUM_CLIENTS_KEY
from .replies import InvalidReply, reply_metrics

log = logging.getLogger("dpfpl.server")


def client_label(node_id: int | str, metrics: dict) -> str:
    """How a client is named in the per-client table: its partition id where it has one (stable across runs and
    resumes, and the name the partition summary uses), else its node id (a silo without a partition)."""
    pid = metrics.get("partition-id")
    if isinstance(pid, (int, float)) and math.isfinite(pid) and pid >= 0 and float(pid).is_integer():
        return f"partition-{int(pid)}"
    return f"node-{node_id}"


# How far beyond its declared size a node's data set may have grown before its reply's norm is implausible
REPLY_BATCH_SLACK = 2.0
NOISE_NORM_MARGIN = 10.0  # standard deviations above sqrt(d) a Gaussian vector's norm reaches w.p. exp(-50)


@dataclass
class Reply:
    """One accepted reply: the Flower node it came from, the key the books use for it, its metrics, and what the
    round's validation took from it (a clipped gradient, a secure-aggregation key pair, or nothing)."""

    node_id: int
    key: str
    metrics: dict
    payload: Any = None


# validate(msg, server_round) -> (payload, metrics), or InvalidReply
Validator = Callable[[Message, int], tuple[Any, dict]]


def node_key(msg: Message, metrics: dict) -> str:
    """The key the server books a node under: the stable ``node-key`` the node reports (see
    ``dpfpl.client_app.state.node_key``), else Flower's node id. Like the training-set size a node reports, the key is
    taken on trust from an admitted node; two replies under one key in a round are both rejected
    (``PromptStrategy.accept_replies``)."""
    if "node-key" not in metrics:
        return str(msg.metadata.src_node_id)
    return parse_node_key(metrics["node-key"])


def parse_node_key(key: object) -> str:
    """A reported ``node-key`` as the server books it, or InvalidReply."""
    if isinstance(key, bool) or not isinstance(key, int) or not 0 < key < 2**62:
        raise InvalidReply(f"node-key {key!r} is not a positive 62-bit integer")
    return str(key)


def _server_class_list(cfg: RunConfig) -> list[str]:
    """The class list the server holds every node against. An explicit run-config ``classnames`` is used as is
    (every node's loader checks its data set against it); otherwise the server reads the data set's own list,
    which needs the data set's index files (not the images) under its data-root."""
    if cfg.dataset not in ("demo", "silo") and cfg.explicit_classnames():
        return cfg.explicit_classnames()
    try:
        return run_class_list(cfg)
    except (OSError, ValueError) as err:
        raise ValueError(
            f"the server checks every node's class list against the run's, and could not read the class list of "
            f"dataset '{cfg.dataset}' (data-root '{cfg.data_root}'): {err}. Either give the ServerApp's machine "
            "the data set's index/split files under the same data-root, or put the ordered class list in the "
            "run config's 'classnames'"
        ) from err


def global_noise_multiplier(cfg: RunConfig, max_sample_rate: float, method: Method) -> float:
    """z_G: given, or calibrated for the largest declared sample rate among the nodes
    (``dpfpl.common.privacy.calibration``); ``inf`` when the method shares nothing (CoOp: no global release)."""
    if not cfg.dp:
        return 0.0
    if not method.shares_global:
        return math.inf
    if not cfg.uses_calibration:
        return cfg.noise_multiplier_global
    return calibration.global_noise_multiplier(
        cfg.target_epsilon,
        max_sample_rate,
        cfg.num_server_rounds,
        cfg.delta,
        cfg.calibrate_for,
        method.local is not None,
    )


@lru_cache(maxsize=4)
def _reference_context_norm(model_name: str, pretrained: str, n_ctx: int) -> float:
    return reference_context_norm(TextTower.of(cached_clip(model_name, pretrained, None).model).token_embedding, n_ctx)


def global_learning_rate(cfg: RunConfig, noise_multiplier: float, num_replies: int, shape: tuple[int, ...]) -> float:
    """lr-global, lowered under DP so that p_G's accumulated global noise stays within global-noise-radius
    (the same rule the nodes apply to their local step; only public quantities enter). The noise of one
    step on the mean of n replies has std z_G C_G / (B n) per coordinate."""
    if not cfg.dp or cfg.global_noise_radius <= 0:
        return cfg.lr_global
    reference = _reference_context_norm(cfg.model_name, cfg.pretrained, cfg.n_ctx)
    return noise_bounded_lr(
        lr=cfg.lr_global,
        radius=cfg.global_noise_radius,
        reference_norm=reference,
        noise_multiplier=noise_multiplier,
        max_grad_norm=cfg.max_grad_norm_global,
        expected_batch=cfg.batch_size * num_replies,
        steps=cfg.num_server_rounds,
        noised_size=math.prod(shape),
    )


def global_update(
    cfg: RunConfig,
    p_global: torch.Tensor,
    momentum: torch.Tensor | None,
    grads: list[torch.Tensor],
    noise_multiplier: float,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor | None, float]:
    """The server's step on p_G: equal-weight mean of the n replies' clipped gradients, global DP noise, SGD.
    Returns (p_G, momentum buffer, noise std). Also used by the membership-inference experiment's targets."""
    n = len(grads)
    mean = torch.stack(grads).mean(0)
    # One record of node i moves the average by at most C_G / (B n): noise std z_G C_G / (B n), with n the
    # number of replies actually aggregated.
    std = noise_multiplier * cfg.max_grad_norm_global / (cfg.batch_size * n) if cfg.dp else 0.0
    noisy = add_gaussian_noise(mean, std, generator, cfg.secure_noise)
    lr = global_learning_rate(cfg, noise_multiplier, n, tuple(p_global.shape))
    p_global, momentum = sgd_update(p_global, noisy, momentum, lr, cfg.momentum, cfg.weight_decay)
    return p_global, momentum, std


def max_noisy_steps(server_round: int) -> int:
    """The most noisy steps an honest node can report in a reply for ``server_round``: one per train message it was
    sent (one per round: the rounds up to this one, and the next, which a crash may have cut off after the node's
    step and before the server's checkpoint; a round sent again gets the stored reply, no second step), and for
    each such step at most one more, the lost-step charge of a fallback to the node's previous state copy
    (``client_app/state.py``). A re-release changes a step's noise, not the count."""
    return 2 * (server_round + 1)


def finite_update(server_round: int, what: str, updated: torch.Tensor) -> bool:
    """Whether the server step's result may replace ``what``: a non-finite prompt (an overflow of the mean of
    replies that each passed the checks, or a decoding gone wrong) would be sent to every node and checkpointed,
    and the next rounds could not recover from it. Refused, logged; the caller keeps the previous value. The
    replies stay booked, which is conservative: the nodes' steps happened and the server saw their replies (under
    secure aggregation, their noisy sum), so refusing the update must not lower an epsilon."""
    if bool(torch.isfinite(updated).all()):
        return True
    log.error(
        "round %d: the server step made %s non-finite (NaN or Inf); it keeps its previous value, this round "
        "counts as not updated, and its replies stay booked",
        server_round,
        what,
    )
    return False


def summarize_node_metrics(rows: list[dict]) -> dict[str, float]:
    """The round's summary of the nodes' own metrics. The epsilons come from the server's books over every node
    (``privacy_maxima``), not from this round's replies."""
    out = {}
    seconds = [float(m["client-seconds"]) for m in rows if "client-seconds" in m]
    if seconds:  # the clients' own compute this round, against the round's wall time
        out["client-seconds-sum"], out["client-seconds-max"] = float(sum(seconds)), float(max(seconds))
    ages = [float(m["clientapp-age-seconds"]) for m in rows if "clientapp-age-seconds" in m]
    if ages:  # deployment: how old each fresh ClientApp process was when its handler ran
        out["clientapp-age-max"] = float(max(ages))
    losses = [m["train-loss"] for m in rows if "train-loss" in m and not math.isnan(m["train-loss"])]
    if losses:
        out["train-loss"] = float(np.mean(losses))
    return out


class TrainExchange(Protocol):
    """How a round's train messages are sent and their replies turned into the round's update."""

    def run(
        self, strategy: PromptStrategy, grid: Grid, server_round: int, timeout: float | None
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """The round's configure_train, exchange and aggregation; (None, None) when nothing was updated."""
        ...

    def privacy_notes(self) -> dict[str, str]:
        """What the summary's privacy block adds about how the global noise reached the sum."""
        ...


class ClearTrainExchange:
    """The replies' clipped gradients reach the server in the clear: one exchange of ``configure_train``'s
    messages, then ``aggregate_train`` (validation, the global noise, the server step)."""

    def run(
        self, strategy: PromptStrategy, grid: Grid, server_round: int, timeout: float | None
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        messages = strategy.configure_train(server_round, strategy.current_arrays(), ConfigRecord(), grid)
        replies = exchange(grid, messages, timeout=timeout)  # a node that hangs is dropped, not waited for
        return strategy.aggregate_train(server_round, replies)

    def privacy_notes(self) -> dict[str, str]:
        return {}


class PromptStrategy(Strategy):
    def __init__(self, cfg: RunConfig, state: ServerState, train_exchange: TrainExchange | None = None) -> None:
        self.cfg = cfg
        self.state = state
        self.train_exchange = train_exchange or ClearTrainExchange()
        self.method = build_method(cfg.method, cfg.rank, cfg.contrastive_weight, cfg.contrastive_temperature)
        self.client_evaluations: dict[str, dict[str, float]] = {}  # the last evaluation, per node
        # the replies rejected since the runner last cleared it ("node N: why"): the round's metrics line lists
        # them, so that a node that failed a round (an error, a hung worker, a malformed reply) is on record
        self.rejected: list[str] = []
        # DP noise must be unpredictable: seeded from the OS, never from the (public) run config.
        self.noise_generator = dp_generator(cfg.dp, cfg.seed)
        self.classes_digest = class_list_digest(_server_class_list(cfg))

    # ---------------------------------------------------------------- the round's hooks (server_app/runner.py)
    def train_round(self, grid: Grid, server_round: int) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """How this run does a round's train exchange and aggregation (``self.train_exchange``)."""
        return self.train_exchange.run(self, grid, server_round, self.cfg.round_timeout or None)

    def after_aggregation(self, grid: Grid, server_round: int) -> dict:
        """What follows a round's aggregation, before the round is checkpointed; its entries go into the round's
        metrics line. Nothing for a method with one global prompt."""
        return {}

    def published_global_note(self) -> str:
        """What the published prompt's shared part is, in the summary's words."""
        return f"the mean of p_G over {self.state.averaged_rounds} rounds" if self.method.shares_global else "no p_G"

    def privacy_notes(self) -> dict[str, str]:
        """What the summary's privacy block adds for this run's train exchange."""
        return self.train_exchange.privacy_notes()

    # ---------------------------------------------------------------- messages
    def round_config(self, server_round: int, config: dict) -> dict:
        """The config every train and evaluation message carries: the round, the run, the class list's digest and
        the number of clients the run partitions its data set for (``server_app/federation.py``: resolved from
        the federation when the run config leaves it to it, so that a node always sees an explicit number)."""
        return {
            **config,
            "server-round": server_round,
            "run-token": self.state.run_token,
            DIGEST_KEY: self.classes_digest,
            NUM_CLIENTS_KEY: self.cfg.num_clients,
        }

    def _messages(
        self, server_round: int, arrays: ArrayRecord | None, config: dict, grid: Grid, message_type: str
    ) -> list[Message]:
        # DP-FPL: every connected node takes part; wait until at least min-clients are connected
        _, node_ids = sample_nodes(grid, self.cfg.min_clients, self.cfg.min_clients)
        record = {"config": ConfigRecord(self.round_config(server_round, config))}
        if arrays is not None:
            record["arrays"] = arrays
        return [Message(content=RecordDict(record), message_type=message_type, dst_node_id=n) for n in node_ids]

    # ---------------------------------------------------------------- secure aggregation (server_app/secagg_round.py)
    def secagg_groups(self, node_ids: list[int]) -> dict[int, list[int]]:
        """Which nodes are summed together: all of them, into the one p_G."""
        return {0: list(node_ids)}

    def apply_secure_mean(self, server_round: int, group: int, noisy_mean: torch.Tensor, num_members: int) -> bool:
        """The server step with a group's decoded mean (its noise was added by the clients); False when its result
        is not finite and p_G keeps its value (``finite_update``)."""
        lr = global_learning_rate(
            self.cfg, self.state.noise_multiplier_global, num_members, tuple(self.state.p_global.shape)
        )
        p_global, momentum = sgd_update(
            self.state.p_global, noisy_mean, self.state.momentum, lr, self.cfg.momentum, self.cfg.weight_decay
        )
        if not finite_update(server_round, "p_G", p_global):
            return False
        self.state.p_global, self.state.momentum = p_global, momentum
        return True

    def group_metrics(self, group: int, values: dict[str, float]) -> dict[str, float]:
        """A group's numbers in the round's metrics line (one group: under their own names)."""
        return values

    def current_arrays(self) -> ArrayRecord | None:
        """What the nodes receive: p_G, or nothing for methods without a global prompt."""
        return ArrayRecord({"global-prompt": self.state.p_global}) if self.method.shares_global else None

    def published_arrays(self) -> ArrayRecord | None:
        """What the published prompt's evaluation sends: the mean of p_G's last iterates (publish-average)."""
        return ArrayRecord({"global-prompt": self.state.published_global}) if self.method.shares_global else None

    def configure_train(
        self, server_round: int, arrays: ArrayRecord | None, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        cfg = {
            **dict(config),
            "noise-multiplier-global": self.state.noise_multiplier_global,
            # this round ran before and its p_G may have left: a node's re-sent reply is released a second time
            "rerelease": server_round == self.state.rerelease_round,
        }
        return self._messages(server_round, arrays, cfg, grid, MessageType.TRAIN)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord | None, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return self._messages(server_round, arrays, dict(config), grid, MessageType.EVALUATE)

    # ---------------------------------------------------------------- validation
    def check_round_and_run(self, metrics: dict, server_round: int) -> None:
        """A reply must answer this round of this run: a late reply from an earlier round, or one from a previous
        run that reused the SuperLink, would otherwise be counted as current (for evaluation replies at round 0
        that would feed a stale training-set size to the accountant's sample rates). What it asks the books to take
        must be possible as well (``check_book_entries``)."""
        if int(metrics.get("server-round", -1)) != server_round:
            raise InvalidReply(f"reply is for round {metrics.get('server-round')}, not {server_round}")
        if metrics.get(RUN_TAG_KEY) != run_tag(self.state.run_token):
            raise InvalidReply(
                f"reply is for another run ({RUN_TAG_KEY} {metrics.get(RUN_TAG_KEY)!r}, this run's is "
                f"{run_tag(self.state.run_token)})"
            )
        self.check_book_entries(metrics, server_round)

    def check_book_entries(self, metrics: dict, server_round: int) -> None:
        """What a reply asks the books to take must be possible for an honest node: the books take the noisy steps
        and z_L on trust, so a claim that would lower an epsilon (an infinite z_L) or that no node could have made
        (more steps than ``max_noisy_steps``) marks the reply as hostile. The step count also bounds the
        accountant's work: a reply claiming 10^9 steps kept the round waiting for the accountant for half a
        minute."""
        steps = metrics.get("noisy-steps")
        if steps is not None and steps > (most := max_noisy_steps(server_round)):
            raise InvalidReply(
                f"noisy-steps = {steps:g} is more than a node can have taken by round {server_round} ({most})"
            )
        z_local = metrics.get("noise-multiplier-local")
        if self.cfg.dp and self.method.local is not None and z_local is not None and not math.isfinite(z_local):
            # an honest node of a method with a local prompt adds finite local noise under DP; inf would book its
            # local releases as free (NaN is the parser's refusal already)
            raise InvalidReply(
                f"noise-multiplier-local = {z_local}: under DP method '{self.method.name}' releases its local "
                "prompt with finite noise"
            )

    def validate_train_reply(self, msg: Message, server_round: int) -> tuple[torch.Tensor | None, dict]:
        if msg.has_error():
            raise InvalidReply(f"node reported an error: {client_error_text(msg.error.reason)}")
        content = msg.content
        metrics = reply_metrics(msg, "train")  # layout, names, types and ranges: server_app/replies.py
        self.check_round_and_run(metrics, server_round)
        if len(content.config_records) or set(content.metric_records.keys()) != {"metrics"}:
            raise InvalidReply("a reply carries one metric record 'metrics' (and the method's arrays), nothing else")
        node_key(msg, metrics)  # a malformed key is rejected here
        if not self.method.shares_global:
            if len(content.array_records):
                raise InvalidReply(f"method '{self.method.name}' shares nothing, but the reply carries arrays")
            return None, metrics
        if set(content.array_records.keys()) != {"arrays"} or set(content["arrays"].keys()) != {"global-grad"}:
            raise InvalidReply("reply must carry exactly one array record with the key 'global-grad'")
        array = content["arrays"]["global-grad"]
        if tuple(array.shape) != tuple(self.state.p_global.shape) or array.dtype != "float32":
            raise InvalidReply(
                f"global-grad has shape {array.shape}/{array.dtype}, expected "
                f"{tuple(self.state.p_global.shape)}/float32"
            )
        grad = torch.from_numpy(np.array(array.numpy(), copy=True))
        if not torch.isfinite(grad).all():
            raise InvalidReply("global-grad contains NaN or Inf")
        if self.cfg.dp:
            # A reply is a sum of clipped per-record gradients over B: its norm is at most C_G |batch| / B. The
            # server knows neither the batch nor the data set's size (both private); it knows the declared rate
            # q_i = B / (the operator's size estimate), so a batch beyond REPLY_BATCH_SLACK x B / q_i records
            # marks the reply as malformed. A robustness check only: the noise is calibrated to C_G / B per record.
            q = self.sample_rate(node_key(msg, metrics), metrics)
            bound = self.cfg.max_grad_norm_global * REPLY_BATCH_SLACK / q
            if z_node := metrics.get("noise-multiplier-global-node"):
                # the node added N(0, (z C_G / B)^2) per coordinate: its norm stays below z C_G / B (sqrt(d) + 10)
                # except with probability exp(-50) (Gaussian concentration)
                per_coordinate = z_node * self.cfg.max_grad_norm_global / self.cfg.batch_size
                bound += per_coordinate * (math.sqrt(grad.numel()) + NOISE_NORM_MARGIN)
            if not grad.norm() <= bound * (1 + 1e-4) + 1e-6:
                raise InvalidReply(f"global-grad norm {float(grad.norm()):.4g} exceeds the clipping bound {bound:.4g}")
        return grad, metrics

    def validate_evaluate_reply(self, msg: Message, server_round: int) -> tuple[None, dict]:
        """(None, metrics) of a usable evaluation reply, or InvalidReply saying why it is not. At round 0 this is
        the setup check: a node whose reply passes has loaded the model and checked its data."""
        if msg.has_error():
            raise InvalidReply(client_error_text(msg.error.reason))
        if len(msg.content.array_records) or len(msg.content.config_records):
            raise InvalidReply("an evaluation reply carries one metric record 'metrics', nothing else")
        metrics = reply_metrics(msg, "evaluate")
        self.check_round_and_run(metrics, server_round)
        return None, metrics

    # ---------------------------------------------------------------- the one reply path
    def accept_replies(
        self, server_round: int, replies: Iterable[Message], validate: Validator | None = None, what: str = "reply"
    ) -> list[Reply]:
        """The replies of one round that pass ``validate`` (by default ``validate_train_reply``), each under its
        node key. The clear, secure-aggregation and SecFPP rounds all take their replies through here.

        One identity, one reply per round: two replies under one key (a node cloned with its state directory,
        or one claiming another's key) would be counted twice in the mean and once in the books, and the server
        cannot tell which is genuine, so all replies that share a key are rejected."""
        validate = validate or self.validate_train_reply
        accepted = []
        for msg in replies:
            try:
                payload, metrics = validate(msg, server_round)
                accepted.append(Reply(msg.metadata.src_node_id, node_key(msg, metrics), metrics, payload))
            except InvalidReply as err:
                log.warning("round %d: %s from node %s rejected: %s", server_round, what, msg.metadata.src_node_id, err)
                self.rejected.append(f"node {msg.metadata.src_node_id}: {str(err)[:300]}")
            except Exception as err:  # noqa: BLE001  a hostile reply is rejected, never fatal
                log.warning(
                    "round %d: %s from node %s rejected: malformed (%s: %s)",
                    server_round,
                    what,
                    msg.metadata.src_node_id,
                    type(err).__name__,
                    str(err)[:200],
                )
                self.rejected.append(f"node {msg.metadata.src_node_id}: malformed ({type(err).__name__})")
        count = Counter(r.key for r in accepted)
        shared = sorted(k for k, c in count.items() if c > 1)
        if shared:
            log.warning(
                "round %d: %d replies share a node key (%s); all of them rejected",
                server_round,
                sum(count[k] for k in shared),
                ", ".join(shared),
            )
        return [r for r in accepted if count[r.key] == 1]

    def enough_replies(self, server_round: int, replies: list[Reply]) -> bool:
        if len(replies) >= self.cfg.min_clients:
            return True
        log.error(
            "round %d: only %d valid replies (< min-clients %d); no prompt updated",
            server_round,
            len(replies),
            self.cfg.min_clients,
        )
        return False

    def close_round(self, replies: list[Reply], released_global: bool = True) -> dict[str, float]:
        """Book the nodes whose data is in this round's release, and summarize their metrics."""
        for reply in replies:
            self.book(reply.key, reply.metrics, released_global)
        return {"num-replies": float(len(replies)), **summarize_node_metrics([r.metrics for r in replies])}

    # ---------------------------------------------------------------- aggregation
    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        accepted = self.accept_replies(server_round, replies)
        if not self.enough_replies(server_round, accepted):
            return None, None
        if not self.method.shares_global:
            return None, MetricRecord(self.close_round(accepted, released_global=False))
        p_global, momentum, std = global_update(
            self.cfg,
            self.state.p_global,
            self.state.momentum,
            [r.payload for r in accepted],
            self.state.noise_multiplier_global,
            self.noise_generator,
        )
        summary = self.close_round(accepted)  # booked even if the update is refused (``finite_update``)
        if not finite_update(server_round, "p_G", p_global):
            return None, None
        self.state.p_global, self.state.momentum = p_global, momentum
        summary[GLOBAL_NOISE_STD] = std
        return self.current_arrays(), MetricRecord(summary)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        rows = [
            (r.key, r.metrics)
            for r in self.accept_replies(server_round, replies, self.validate_evaluate_reply, "evaluation reply")
        ]
        # each client's own numbers (metrics.jsonl keeps them next to the means), named by partition id where
        # there is one, else by the stable node key the books use
        self.client_evaluations = {
            client_label(key, m): {k: float(m[k]) for k in EVALUATION_KEYS if k in m} for key, m in rows
        }
        if not rows:
            return None
        if server_round == 0:  # setup: the nodes' declared sample rates feed the accountant
            for key, m in rows:
                self.state.node_sample_rates[key] = self.sample_rate(None, m)
        elif self.cfg.dp:  # the steps each node says it took, also those whose replies never reached the books
            for key, m in rows:
                self.book_steps(key, m)
        # unweighted mean over the clients that have the metric (a silo has no neighbor test set)
        out = {"num-clients": float(len(rows))}
        for k in EVALUATION_KEYS:
            values = [float(m[k]) for _, m in rows if k in m and math.isfinite(float(m[k]))]
            if values:
                out[k] = float(np.mean(values))
        if all(k in out for k in (LOCAL_ACC, BASE_ACC, NOVEL_ACC)):
            # FedPGP's HM: of the three means (``hm`` above is the mean of the clients' own HMs)
            out[HM_OF_MEANS] = harmonic_mean([out[LOCAL_ACC], out[BASE_ACC], out[NOVEL_ACC]])
        return MetricRecord(out)

    # ---------------------------------------------------------------- accounting
    def sample_rate(self, key: str | None, metrics: dict) -> float:
        """q_i as booked for this node, else the rate it declares (public by declaration: node or run config, never
        its training-set size), else 1 (the worst case)."""
        if key is not None and key in self.state.node_sample_rates:
            return self.state.node_sample_rates[key]
        q = metrics.get("sample-rate")
        if isinstance(q, (int, float)) and not isinstance(q, bool) and math.isfinite(q) and 0 < q <= 1:
            return float(q)
        return 1.0

    def book(self, key: str, metrics: dict, released_global: bool = True) -> None:
        """Enter one aggregated reply in the accountant's books (under DP): one more round whose release holds
        the node's data, its sample rate (a node that missed the setup phase is booked with the rate it declares
        now), its z_L and the noisy steps it says it took (both taken on trust from an admitted node)."""
        if not self.cfg.dp:
            return
        books = self.state
        if released_global:
            books.participation[key] = books.participation.get(key, 0) + 1
        books.node_sample_rates.setdefault(key, self.sample_rate(key, metrics))
        z_local = metrics.get("noise-multiplier-local")
        if isinstance(z_local, (int, float)) and not isinstance(z_local, bool):
            books.node_noise_local[key] = float(z_local)
        self.book_steps(key, metrics)

    def book_steps(self, key: str, metrics: dict) -> None:
        """A node's noisy steps in the books: the most it ever reported (train or evaluation reply), and at least
        the rounds it was aggregated in."""
        books = self.state
        if key not in books.node_sample_rates and key not in books.participation:
            return  # a node never booked (it never trained) has nothing to add
        steps = metrics.get("noisy-steps")
        steps = int(steps) if isinstance(steps, (int, float)) and math.isfinite(steps) and steps >= 0 else 0
        books.node_steps[key] = max(books.node_steps.get(key, 0), steps, books.participation.get(key, 0))

    def privacy_maxima(self) -> dict[str, float]:
        """Worst case over every booked node of each epsilon (``dpfpl.server_app.books.COVERS`` says what each covers)."""
        return privacy_maxima(self.state, self.cfg.delta, self.method.local is not None, self.method.shares_global)

    def epsilon_global(self) -> float:
        """p_G's guarantee, worst client (see ``dpfpl.server_app.books``); inf without DP."""
        return self.privacy_maxima()["epsilon-global-max"] if self.cfg.dp else math.inf

    def summary(self) -> None:
        log.info(
            "%s strategy: z_G=%.4g, C_G=%g, B=%d, min-clients=%d",
            self.method.name,
            self.state.noise_multiplier_global,
            self.cfg.max_grad_norm_global,
            self.cfg.batch_size,
            self.cfg.min_clients,
        )
