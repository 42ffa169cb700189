"""One training round under secure aggregation: the server never sees a client's clear gradient.

Drives ``dpfpl.common.secagg.protocol.ServerSession`` over Flower messages (Message API, custom actions of the
``train`` type, routed to ``client_app/secagg_handlers.py``):

  train                 p_G -> local step; reply: metrics + two X25519 public keys (no gradient)
  train.secagg_shares   roster of public keys -> ciphertexts of Shamir shares, one per other client
  train.secagg_masked   the ciphertexts addressed to the client -> its masked input y (uint64 field vector)
  train.secagg_unmask   survivors / dropped -> shares of b_v (survivors) or s_sk_v (dropped), and, when another
                        round follows, two fresh public keys for it

Keys announced ahead: a node's unmasking reply carries the public keys it drew for the next round. When every
member of a group announced its keys, the next round's train message already carries the group's roster and the
node answers it with its encrypted shares: three exchanges instead of four (the train exchange does the work of
advertise keys and share keys). A group with a member that announced nothing (it joined, dropped before
unmasking, or the server restarted) runs the four exchanges. The keys are still fresh for every round and used
in one round only (docs/secure-aggregation.md, "Keys announced one round ahead").

The nodes are split into groups by ``strategy.secagg_groups``: one group for the methods with one global prompt,
one per cluster for SecFPP (the server learns each cluster's noised sum, never a member's input). Each group has
its own roster, threshold and session (context ``<run token>/<round>/g<group>``); the groups' messages of one
stage go out together. A group that fails fails alone: its prompt keeps its value and its members are not charged.

The unmasked integer sum already carries the global noise (each client added a discrete-Gaussian share), so
the server adds none; it decodes the noisy mean, steps p_G and charges the accountant for the survivors only.
A round that falls below the threshold at any stage ends with nothing aggregated and nobody charged.

What the server validates instead of each reply's norm (which it cannot see): the round number, the exact
record layout, key and ciphertext sizes, that every masked vector has the right shape, dtype uint64 and
elements < p, and the protocol's own checks (authenticated shares, rebuilt keys matching their public keys).
A malicious client can still send any field vector (poison the sum within the field's range); see
docs/secure-aggregation.md.
"""

from __future__ import annotations

import logging
import math
from collections import Counter

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common import MessageType
from flwr.serverapp import Grid

from dpfpl.common.metrics import GLOBAL_NOISE_STD
from dpfpl.common.secagg.crypto import KEY_BYTES
from dpfpl.common.secagg.encoding import decode_sum, effective_noise_multiplier
from dpfpl.common.secagg.field import quantized_sensitivity, scale_factor
from dpfpl.common.secagg.protocol import SecAggError, ServerSession, threshold_for

from .books import DISCRETE_GAUSSIAN_NOTE
from .exchange import exchange
from .replies import InvalidReply, blob, config_fields, id_to_blob, masked_input, reply_metrics
from .strategy import PromptStrategy, Reply

log = logging.getLogger("dpfpl.server.secagg")

SHARES, MASKED, UNMASK = (f"{MessageType.TRAIN}.secagg_{a}" for a in ("shares", "masked", "unmask"))


def _answered(msg: Message, server_round: int) -> bool:
    """False (logged) for a node that answered with an error instead of a reply."""
    if msg.has_error():
        log.warning("round %d: node %s failed: %s", server_round, msg.metadata.src_node_id, msg.error.reason)
        return False
    return True


def _request(
    grid: Grid,
    action: str,
    payloads: dict[int, dict],
    server_round: int,
    run_token: str,
    timeout: float | None,
    stats: dict,
) -> dict[int, Message]:
    """Send each node its payload (one ConfigRecord 'config'); the successful replies by node id."""
    messages = [
        Message(
            content=RecordDict({"config": ConfigRecord({**p, "server-round": server_round, "run-token": run_token})}),
            message_type=action,
            dst_node_id=node,
        )
        for node, p in payloads.items()
    ]
    stats["messages"] += 2 * len(messages)
    replies = {}
    for msg in exchange(grid, messages, timeout=timeout):
        if _answered(msg, server_round):
            replies[msg.metadata.src_node_id] = msg
    return replies


class SecureTrainExchange:
    """The train exchange of a run with ``secure-aggregation = true`` (``PromptStrategy.train_round``): the server
    sees only each group's noised sum."""

    def __init__(self) -> None:
        # by round: the public keys each node drew for it, announced in its unmasking reply of the round before
        self.announced: dict[int, dict[int, tuple[bytes, bytes]]] = {}

    def run(
        self, strategy: PromptStrategy, grid: Grid, server_round: int, timeout: float | None
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """The secure-aggregation equivalent of configure_train + send_and_receive + aggregate_train."""
        secure = _SecureRound(strategy, grid, server_round, timeout, self.announced.pop(server_round, {}))
        try:
            return secure.run()
        except SecAggError as err:
            log.error(
                "round %d: secure aggregation failed; nothing unmasked, p_G not updated, the global accountant "
                "not charged: %s",
                server_round,
                err,
            )
            return None, None
        finally:
            self.announced = {server_round + 1: secure.next_keys}  # only the next round may use them

    def privacy_notes(self) -> dict[str, str]:
        """The nodes' distributed discrete-Gaussian noise is accounted as the continuous Gaussian."""
        return {"approximation": DISCRETE_GAUSSIAN_NOTE}


NEXT_KEYS = ("next-c-pk", "next-s-pk")
_UNMASK_SHARES = {"b-owner", "b-share", "s-owner", "s-share"}


def _roster_payload(group: _Group, members: dict[int, tuple[bytes, bytes]]) -> dict:
    """The roster a member of ``group`` is sent: every member's two public keys, the threshold and the group."""
    order = sorted(members)
    return {
        "nodes": order,
        "c-pk": [members[u][0] for u in order],
        "s-pk": [members[u][1] for u in order],
        "secagg-threshold": group.threshold,
        "secagg-group": group.label,
    }


class _Group:
    """One secure-aggregation group: every node of a method with one global prompt, or one SecFPP cluster (whose
    members share that cluster's prompt). Groups run side by side, one message per node and stage."""

    def __init__(self, label: int, nodes: list[int], threshold: int, context: str, size: int) -> None:
        self.label, self.nodes, self.threshold = label, nodes, threshold
        self.keyed_ahead = False  # the roster went out with the train messages (keys announced last round)
        self.session = ServerSession(context=context, threshold=threshold, size=size)
        self.survivors: list[int] = []
        self.dropped: list[int] = []
        self.failed: str | None = None
        self.total: np.ndarray | None = None  # the unmasked integer sum


def _for_each_live_group(groups: list[_Group], server_round: int, step, min_clients: int = 0) -> list[_Group]:
    """Run ``step(group)`` for every live group; a SecAggError fails that group only (logged), never the others.
    Returns the groups still live; none left, or fewer survivors in them than ``min_clients``, fails the round."""
    for group in groups:
        if group.failed is None:
            try:
                step(group)
            except (SecAggError, InvalidReply, ValueError, TypeError, KeyError, IndexError, OverflowError) as err:
                # a value that passed the parser but that the protocol cannot use fails this group only
                group.failed = f"{type(err).__name__}: {err}"
                log.error(
                    "round %d: secure aggregation of group %d failed; nothing of it unmasked or charged: %s",
                    server_round,
                    group.label,
                    err,
                )
    live = [g for g in groups if g.failed is None]
    if not live:
        raise SecAggError("; ".join(f"group {g.label}: {g.failed}" for g in groups))
    if sum(len(g.survivors) for g in live) < min_clients:
        raise SecAggError(
            f"only {sum(len(g.survivors) for g in live)} masked inputs in groups that can be unmasked "
            f"(< min-clients {min_clients})"
        )
    return live


class _SecureRound:
    """One round's stages, in order (``run``): groups, key advertisements (the local step), shares, masked
    inputs, unmasking, and the server step on each group's decoded mean."""

    def __init__(
        self,
        strategy: PromptStrategy,
        grid: Grid,
        server_round: int,
        timeout: float | None,
        announced: dict[int, tuple[bytes, bytes]],
    ) -> None:
        self.strategy, self.grid, self.server_round, self.timeout = strategy, grid, server_round, timeout
        self.announced = announced  # the public keys the nodes drew for this round (the last round's unmasking)
        self.announce_next = server_round < strategy.cfg.num_server_rounds  # ask for the next round's keys
        self.next_keys: dict[int, tuple[bytes, bytes]] = {}  # those announced in this round's unmasking
        self.cfg, self.state = strategy.cfg, strategy.state
        self.shape = tuple(self.state.p_global.shape)
        self.stats = {"messages": 0}
        self.groups: list[_Group] = []
        self.group_of: dict[int, _Group] = {}
        self.sent = 0  # train messages sent
        self.advertised: dict[int, Reply] = {}  # by node id: payload = (c-pk, s-pk), or its shares (keyed ahead)
        self.roster_payloads: dict[int, dict] = {}
        self.updated = False  # whether a group's step changed its prompt (``apply``)

    def run(self) -> tuple[ArrayRecord | None, MetricRecord | None]:
        train = self.form_groups()
        shares = self.collect_train_replies(train)
        shares.update(self.collect_shares())
        self.collect_masked_inputs(shares)
        done = self.unmask()
        summary = self.apply(done)
        if not self.updated:  # every group's step was refused (not finite): booked, but nothing changed
            return None, None
        return self.strategy.current_arrays(), MetricRecord(summary)

    def _reject(self, node: int, what: str, err: Exception) -> None:
        """A stage's reply that fails its parser: logged, and listed with the round's rejected replies; the node
        leaves this round's secure aggregation (as a node that does not answer)."""
        why = str(err)[:300] if isinstance(err, InvalidReply) else f"malformed ({type(err).__name__})"
        log.warning("round %d: node %s: %s rejected: %s", self.server_round, node, what, why)
        self.strategy.rejected.append(f"node {node}: {what}: {why}")

    def _request(self, action: str, payloads: dict[int, dict]) -> dict[int, Message]:
        return _request(self.grid, action, payloads, self.server_round, self.state.run_token, self.timeout, self.stats)

    def form_groups(self) -> list[Message]:
        """The groups (``strategy.secagg_groups``) and their thresholds; the train messages, told their group."""
        strategy, server_round = self.strategy, self.server_round
        train = list(strategy.configure_train(server_round, strategy.current_arrays(), ConfigRecord(), self.grid))
        size = int(np.prod(self.shape))
        for label, nodes in sorted(strategy.secagg_groups([m.metadata.dst_node_id for m in train]).items()):
            try:
                threshold = threshold_for(len(nodes), self.cfg.secagg_dropout_tolerance)
            except SecAggError as err:  # e.g. a cluster with too few connected members this round: it sits out
                log.error(
                    "round %d: group %d (%d nodes) cannot run secure aggregation and sits this round out: %s",
                    server_round,
                    label,
                    len(nodes),
                    err,
                )
                continue
            context = f"{self.state.run_token}/{server_round}/g{label}"
            self.groups.append(_Group(label, sorted(nodes), threshold, context, size))
        self.group_of = {n: g for g in self.groups for n in g.nodes}
        if not self.groups:
            raise SecAggError("no group of nodes large enough for secure aggregation")
        train = [m for m in train if m.metadata.dst_node_id in self.group_of]
        rosters = {g.label: self.roster_ahead(g) for g in self.groups}
        for msg in train:  # the clients calibrate their noise shares for t survivors of their group
            group = self.group_of[msg.metadata.dst_node_id]
            msg.content["config"]["secagg-threshold"] = group.threshold
            msg.content["config"]["secagg-num-clients"] = len(group.nodes)
            msg.content["config"]["secagg-group"] = group.label
            if rosters[group.label]:
                msg.content["config"].update(rosters[group.label])
        self.sent = len(train)
        return train

    def roster_ahead(self, group: _Group) -> dict | None:
        """The roster payload for a group whose every member announced its keys for this round last round (the
        train message then carries it, and the reply the shares); None when the group advertises as it trains."""
        if not all(u in self.announced for u in group.nodes):
            return None
        try:
            members = group.session.set_roster({u: self.announced[u] for u in group.nodes})
        except SecAggError as err:  # repeated or malformed keys: advertise afresh, as without announcements
            log.warning(
                "round %d: group %d: announced keys not usable (%s); keys advertised afresh",
                self.server_round,
                group.label,
                err,
            )
            return None
        group.keyed_ahead = True
        return _roster_payload(group, members)

    def validate_train_reply(self, msg: Message, server_round: int) -> tuple[object, dict]:
        """The train reply under secure aggregation, no gradient: metrics and two public keys, or, in a group
        keyed ahead, metrics and the node's encrypted shares for the other members."""
        if msg.has_error():
            raise InvalidReply(f"node reported an error: {msg.error.reason}")
        metrics = reply_metrics(msg, "train")
        self.strategy.check_round_and_run(metrics, server_round)
        node = msg.metadata.src_node_id
        if self.group_of[node].keyed_ahead:
            record = config_fields(msg, "secagg", {"dst", "ct"})
            return id_to_blob(record["dst"], record["ct"], "shares", set(self.group_of) - {node}), metrics
        record = config_fields(msg, "secagg", {"c-pk", "s-pk"})
        return (blob(record["c-pk"], "c-pk", KEY_BYTES), blob(record["s-pk"], "s-pk", KEY_BYTES)), metrics

    def collect_train_replies(self, train: list[Message]) -> dict[int, dict[int, bytes]]:
        """The local step: each node trains and advertises its keys (or, keyed ahead, sends its shares); accepted
        through the strategy's one reply path (the books use the node's stable key, as in the clear rounds).
        Returns the shares of the groups keyed ahead."""
        self.stats["messages"] += 2 * len(train)
        replies = [
            m for m in exchange(self.grid, train, timeout=self.timeout) if m.metadata.src_node_id in self.group_of
        ]
        accepted = self.strategy.accept_replies(self.server_round, replies, self.validate_train_reply, "train reply")
        self.advertised = {r.node_id: r for r in accepted}
        payloads: dict[int, dict] = {}

        def roster(group: _Group) -> None:
            if group.keyed_ahead:
                return
            advertised = {u: self.advertised[u].payload for u in group.nodes if u in self.advertised}
            # a key advertised twice (a node replaying another's) cannot be attributed: all its holders are left
            # out of this round, as a dropout would be, and the others go on
            count = Counter(k for pair in advertised.values() for k in pair)
            for u in [u for u, pair in advertised.items() if any(count[k] > 1 for k in pair)]:
                log.warning(
                    "round %d: node %s advertised a public key another node also advertised; left out",
                    self.server_round,
                    u,
                )
                del advertised[u]
            members = group.session.set_roster(advertised)
            payloads.update({u: _roster_payload(group, members) for u in members})

        _for_each_live_group(self.groups, self.server_round, roster)
        self.roster_payloads = payloads
        return {u: r.payload for u, r in self.advertised.items() if self.group_of[u].keyed_ahead}

    def collect_shares(self) -> dict[int, dict[int, bytes]]:
        """Each node's encrypted Shamir shares, one per other member of its group (the groups not keyed ahead)."""
        shares = {}
        if not self.roster_payloads:
            return shares
        members = set(self.group_of)
        for node, msg in self._request(SHARES, self.roster_payloads).items():
            try:
                record = config_fields(msg, "secagg", {"dst", "ct"})
                shares[node] = id_to_blob(record["dst"], record["ct"], "shares", members - {node})
            except Exception as err:  # noqa: BLE001  a hostile reply is rejected, never fatal
                self._reject(node, "shares", err)
        return shares

    def collect_masked_inputs(self, shares: dict[int, dict[int, bytes]]) -> None:
        """Relay the shares to their recipients; each answers with its masked input."""
        payloads: dict[int, dict] = {}

        def relay(group: _Group) -> None:
            inbox = group.session.collect_shares({u: shares[u] for u in group.nodes if u in shares})
            senders = group.session.share_senders
            payloads.update(
                {
                    u: {
                        "src": list(inbox[u]),
                        "ct": list(inbox[u].values()),
                        "senders": senders,
                        "secagg-group": group.label,
                    }
                    for u in senders
                }
            )

        _for_each_live_group(self.groups, self.server_round, relay)
        masked = {}
        size = int(np.prod(self.shape))
        for node, msg in self._request(MASKED, payloads).items():
            try:
                masked[node] = masked_input(msg, size)
            except Exception as err:  # noqa: BLE001
                self._reject(node, "masked input", err)

        def collect(group: _Group) -> None:
            group.survivors, group.dropped = group.session.collect_masked(
                {u: y for u, y in masked.items() if u in group.nodes}
            )

        self.live = _for_each_live_group(self.groups, self.server_round, collect, self.cfg.min_clients)

    def unmask(self) -> list[_Group]:
        """Survivors send shares of the survivors' b and of the dropped nodes' s; the groups that unmask."""
        announce = {"announce-next": True} if self.announce_next else {}
        payloads = {
            u: {"survivors": g.survivors, "dropped": g.dropped, "secagg-group": g.label, **announce}
            for g in self.live
            for u in g.survivors
        }
        unmask = {}
        members = set(self.group_of)
        for node, msg in self._request(UNMASK, payloads).items():
            try:
                # the next round's keys when asked for, both or neither (a node that sends none advertises as it
                # trains next round)
                r = config_fields(msg, "secagg", _UNMASK_SHARES, optional=set(NEXT_KEYS) if announce else set())
                next_keys = [k for k in NEXT_KEYS if k in r]
                if next_keys and next_keys != list(NEXT_KEYS):
                    raise InvalidReply(f"the unmasking reply holds {next_keys} without the other next-round key")
                unmask[node] = (
                    id_to_blob(r["b-owner"], r["b-share"], "b-shares", members),
                    id_to_blob(r["s-owner"], r["s-share"], "s-shares", members),
                )
                if next_keys:
                    self.next_keys[node] = tuple(blob(r[k], k, KEY_BYTES) for k in NEXT_KEYS)
            except Exception as err:  # noqa: BLE001
                self._reject(node, "unmasking reply", err)

        def unmask_sum(group: _Group) -> None:
            group.total = group.session.unmask({u: r for u, r in unmask.items() if u in group.nodes})

        return _for_each_live_group(self.groups, self.server_round, unmask_sum, self.cfg.min_clients)

    def apply(self, done: list[_Group]) -> dict[str, float]:
        """Each group's decoded noisy mean takes the server step; only the survivors are charged, also where the
        step's result is refused for not being finite (their noisy sum was unmasked all the same)."""
        cfg, state, strategy = self.cfg, self.state, self.strategy
        z = state.noise_multiplier_global if cfg.dp else 0.0
        gamma = scale_factor(cfg.secagg_quantization_bits, cfg.max_grad_norm_global, cfg.batch_size)
        summary: dict[str, float] = {}
        for group in done:
            m = len(group.survivors)
            mean = decode_sum(
                group.total,
                bits=cfg.secagg_quantization_bits,
                clip_norm=cfg.max_grad_norm_global,
                batch_size=cfg.batch_size,
                num_summands=m,
            )
            self.updated |= strategy.apply_secure_mean(
                self.server_round, group.label, torch.from_numpy(mean.reshape(self.shape)).to(state.p_global.dtype), m
            )
            z_eff = effective_noise_multiplier(z, m, group.threshold) if cfg.dp else 0.0
            # std of the noise on the decoded mean, in gradient units (compare: central z C / (B n))
            std = z_eff * quantized_sensitivity(cfg.secagg_quantization_bits, int(np.prod(self.shape))) / (gamma * m)
            summary.update(
                strategy.group_metrics(
                    group.label,
                    {
                        "secagg-threshold": float(group.threshold),
                        "noise-multiplier-global-effective": z_eff,
                        GLOBAL_NOISE_STD: std,
                    },
                )
            )
            log.info(
                "round %d: group %d: secure aggregation of %d of %d clients (t = %d), z_eff %.4g >= z_G %.4g",
                self.server_round,
                group.label,
                m,
                len(group.nodes),
                group.threshold,
                z_eff,
                z if math.isfinite(z) else float("nan"),
            )
        survivors = [self.advertised[u] for g in done for u in g.survivors]  # only their data is in the release
        summary.update(strategy.close_round(survivors))
        # clients the round was sent to that are not in a sum, and those of them whose masks had to be removed
        # (they dropped after relaying their shares)
        summary.update(
            {
                "secagg-dropped": float(self.sent - len(survivors)),
                "secagg-masks-removed": float(sum(len(g.dropped) for g in done)),
                "secagg-messages": float(self.stats["messages"]),
                "secagg-groups-failed": float(len(self.groups) - len(done)),
            }
        )
        return summary
