"""One training round under secure aggregation: the server never sees a client's clear gradient.

Drives ``common.secagg.protocol.ServerSession`` over Flower messages (Message API, custom actions of the
``train`` type, routed to ``client_app/secagg.py``):

  train                 p_G -> local step; reply: metrics + two X25519 public keys (no gradient)
  train.secagg_shares   roster of public keys -> ciphertexts of Shamir shares, one per other client
  train.secagg_masked   the ciphertexts addressed to the client -> its masked input y (uint64 field vector)
  train.secagg_unmask   survivors / dropped -> shares of b_v (survivors) or s_sk_v (dropped)

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
A malicious client can still send any field vector (poison the sum within the field's range); see README.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common import MessageType
from flwr.serverapp import Grid

from common.optim import sgd_update
from common.secagg.encoding import decode_sum, effective_noise_multiplier
from common.secagg.field import quantized_sensitivity, scale_factor
from common.secagg.protocol import SecAggError, ServerSession, threshold_for

from common.runtag import RUN_TAG_KEY, run_tag

from .strategy import InvalidReply, PromptStrategy, node_key

log = logging.getLogger("dpfpl.server.secagg")

SHARES, MASKED, UNMASK = (f"{MessageType.TRAIN}.secagg_{a}" for a in ("shares", "masked", "unmask"))


def _ok(msg: Message, server_round: int) -> bool:
    if msg.has_error():
        log.warning("round %d: node %s failed: %s", server_round, msg.metadata.src_node_id, msg.error.reason)
        return False
    return True


def _config(msg: Message) -> dict | None:
    content = msg.content
    return dict(content["secagg"]) if "secagg" in content.config_records else None


def _request(grid: Grid, action: str, payloads: dict[int, dict], server_round: int, run_token: str,
             timeout: float | None, stats: dict) -> dict[int, Message]:
    """Send each node its payload (one ConfigRecord 'config'); the successful replies by node id."""
    messages = [Message(content=RecordDict({"config": ConfigRecord({**p, "server-round": server_round,
                                                                     "run-token": run_token})}),
                        message_type=action, dst_node_id=node) for node, p in payloads.items()]
    stats["messages"] += 2 * len(messages)
    replies = {}
    for msg in grid.send_and_receive(messages, timeout=timeout):
        if _ok(msg, server_round):
            replies[msg.metadata.src_node_id] = msg
    return replies


def secure_train_round(strategy: PromptStrategy, grid: Grid, server_round: int,
                       timeout: float | None) -> tuple[ArrayRecord | None, MetricRecord | None]:
    """The secure-aggregation equivalent of configure_train + send_and_receive + aggregate_train."""
    try:
        return _round(strategy, grid, server_round, timeout)
    except SecAggError as err:
        log.error("round %d: secure aggregation failed; nothing unmasked, p_G not updated, the global accountant not charged: %s",
                  server_round, err)
        return None, None


class _Group:
    """One secure-aggregation group: every node of a method with one global prompt, or one SecFPP cluster (whose
    members share that cluster's prompt). Groups run side by side, one message per node and stage."""

    def __init__(self, label: int, nodes: list[int], threshold: int, context: str, size: int) -> None:
        self.label, self.nodes, self.threshold = label, nodes, threshold
        self.session = ServerSession(context=context, threshold=threshold, size=size)
        self.survivors: list[int] = []
        self.dropped: list[int] = []
        self.failed: str | None = None


def _each(groups: list[_Group], server_round: int, step, min_clients: int = 0) -> list[_Group]:
    """Run ``step(group)`` for every live group; a SecAggError fails that group only (logged), never the others.
    Returns the groups still live; none left, or fewer survivors in them than ``min_clients``, fails the round."""
    for group in groups:
        if group.failed is None:
            try:
                step(group)
            except SecAggError as err:
                group.failed = str(err)
                log.error("round %d: secure aggregation of group %d failed; nothing of it unmasked or charged: %s",
                          server_round, group.label, err)
    live = [g for g in groups if g.failed is None]
    if not live:
        raise SecAggError("; ".join(f"group {g.label}: {g.failed}" for g in groups))
    if sum(len(g.survivors) for g in live) < min_clients:
        raise SecAggError(f"only {sum(len(g.survivors) for g in live)} masked inputs in groups that can be unmasked "
                          f"(< min-clients {min_clients})")
    return live


def _round(strategy: PromptStrategy, grid: Grid, server_round: int,
           timeout: float | None) -> tuple[ArrayRecord | None, MetricRecord | None]:
    cfg, state = strategy.cfg, strategy.state
    shape = tuple(state.p_global.shape)
    size = int(np.prod(shape))
    stats = {"messages": 0}
    train = list(strategy.configure_train(server_round, strategy.current_arrays(), ConfigRecord(), grid))
    groups: list[_Group] = []
    for label, nodes in sorted(strategy.secagg_groups([m.metadata.dst_node_id for m in train]).items()):
        try:
            threshold = threshold_for(len(nodes), cfg.secagg_dropout_tolerance)
        except SecAggError as err:  # e.g. a cluster with too few connected members this round: it sits out
            log.error("round %d: group %d (%d nodes) cannot run secure aggregation and sits this round out: %s",
                      server_round, label, len(nodes), err)
            continue
        groups.append(_Group(label, sorted(nodes), threshold, f"{state.run_token}/{server_round}/g{label}", size))
    group_of = {n: g for g in groups for n in g.nodes}
    train = [m for m in train if m.metadata.dst_node_id in group_of]
    if not groups:
        raise SecAggError("no group of nodes large enough for secure aggregation")
    for msg in train:  # the clients calibrate their noise shares for t survivors of their group
        group = group_of[msg.metadata.dst_node_id]
        msg.content["config"]["secagg-threshold"] = group.threshold
        msg.content["config"]["secagg-num-clients"] = len(group.nodes)
        msg.content["config"]["secagg-group"] = group.label
    stats["messages"] += 2 * len(train)
    keys, metrics, book_key = {}, {}, {}
    for msg in grid.send_and_receive(train, timeout=timeout):
        node = msg.metadata.src_node_id
        if not _ok(msg, server_round) or node not in group_of:
            continue
        record, m = _config(msg), dict(msg.content["metrics"]) if "metrics" in msg.content.metric_records else {}
        if (record is None or int(m.get("server-round", -1)) != server_round or len(msg.content.array_records)
                or set(record) != {"c-pk", "s-pk"}):
            log.warning("round %d: node %s: malformed key advertisement rejected", server_round, node)
            continue
        if m.get(RUN_TAG_KEY) != run_tag(state.run_token):
            log.warning("round %d: node %s: key advertisement for another run rejected", server_round, node)
            continue
        try:  # the accountant's books use the node's stable key, as in the clear rounds
            book_key[node] = node_key(msg, m)
        except InvalidReply as err:
            log.warning("round %d: node %s: key advertisement rejected: %s", server_round, node, err)
            continue
        keys[node] = (bytes(record["c-pk"]), bytes(record["s-pk"]))
        metrics[node] = m
    shared = {k for k in book_key.values() if list(book_key.values()).count(k) > 1}
    for node in [u for u, k in book_key.items() if k in shared]:  # one identity, one reply per round
        log.warning("round %d: node %s shares its node key with another reply; rejected", server_round, node)
        keys.pop(node), metrics.pop(node)

    payloads: dict[int, dict] = {}

    def roster(group: _Group) -> None:
        members = group.session.set_roster({u: keys[u] for u in group.nodes if u in keys})
        order = sorted(members)
        payload = {"nodes": order, "c-pk": [members[u][0] for u in order], "s-pk": [members[u][1] for u in order],
                   "secagg-threshold": group.threshold, "secagg-group": group.label}
        payloads.update({u: payload for u in order})

    _each(groups, server_round, roster)
    replies = _request(grid, SHARES, payloads, server_round, state.run_token, timeout, stats)
    shares = {}
    for node, msg in replies.items():
        record = _config(msg)
        if record is None or set(record) != {"dst", "ct"} or len(record["dst"]) != len(record["ct"]):
            log.warning("round %d: node %s: malformed shares rejected", server_round, node)
            continue
        shares[node] = {int(d): bytes(c) for d, c in zip(record["dst"], record["ct"])}
    payloads = {}

    def relay(group: _Group) -> None:
        inbox = group.session.collect_shares({u: shares[u] for u in group.nodes if u in shares})
        senders = group.session.share_senders
        payloads.update({u: {"src": list(inbox[u]), "ct": list(inbox[u].values()), "senders": senders,
                             "secagg-group": group.label} for u in senders})

    _each(groups, server_round, relay)
    replies = _request(grid, MASKED, payloads, server_round, state.run_token, timeout, stats)
    masked = {}
    for node, msg in replies.items():
        content = msg.content
        if set(content.array_records.keys()) != {"secagg"} or set(content["secagg"].keys()) != {"masked"}:
            log.warning("round %d: node %s: malformed masked input rejected", server_round, node)
            continue
        masked[node] = content["secagg"]["masked"].numpy()  # shape, dtype and range: ServerSession checks

    def collect(group: _Group) -> None:
        group.survivors, group.dropped = group.session.collect_masked(
            {u: y for u, y in masked.items() if u in group.nodes})

    live = _each(groups, server_round, collect, cfg.min_clients)

    payloads = {u: {"survivors": g.survivors, "dropped": g.dropped, "secagg-group": g.label}
                for g in live for u in g.survivors}
    replies = _request(grid, UNMASK, payloads, server_round, state.run_token, timeout, stats)
    unmask = {}
    for node, msg in replies.items():
        r = _config(msg)
        if r is None or set(r) != {"b-owner", "b-share", "s-owner", "s-share"}:
            log.warning("round %d: node %s: malformed unmasking reply rejected", server_round, node)
            continue
        unmask[node] = ({int(o): bytes(s) for o, s in zip(r["b-owner"], r["b-share"])},
                        {int(o): bytes(s) for o, s in zip(r["s-owner"], r["s-share"])})
    totals: dict[int, np.ndarray] = {}

    def unmask_sum(group: _Group) -> None:
        totals[group.label] = group.session.unmask({u: r for u, r in unmask.items() if u in group.nodes})

    done = _each(groups, server_round, unmask_sum, cfg.min_clients)

    z = state.noise_multiplier_global if cfg.dp else 0.0
    gamma = scale_factor(cfg.secagg_quantization_bits, cfg.max_grad_norm_global, cfg.batch_size)
    summary: dict[str, float] = {}
    for group in done:
        m = len(group.survivors)
        mean = decode_sum(totals[group.label], bits=cfg.secagg_quantization_bits, clip_norm=cfg.max_grad_norm_global,
                          batch_size=cfg.batch_size, num_summands=m)
        strategy.apply_secure_mean(group.label, torch.from_numpy(mean.reshape(shape)).to(state.p_global.dtype), m)
        for node in group.survivors:  # only the survivors' data is in the release
            strategy.book(book_key[node], metrics[node])
        z_eff = effective_noise_multiplier(z, m, group.threshold) if cfg.dp else 0.0
        # std of the noise on the decoded mean, in gradient units (compare: central z C / (B n))
        std = z_eff * quantized_sensitivity(cfg.secagg_quantization_bits, size) / (gamma * m)
        summary.update(strategy.group_metrics(group.label, {"secagg-threshold": float(group.threshold),
                                                            "noise-multiplier-global-effective": z_eff,
                                                            "global-noise-std": std}))
        log.info("round %d: group %d: secure aggregation of %d of %d clients (t = %d), z_eff %.4g >= z_G %.4g",
                 server_round, group.label, m, len(group.nodes), group.threshold, z_eff,
                 z if math.isfinite(z) else float("nan"))
    survivors = [u for g in done for u in g.survivors]
    summary.update({"num-replies": float(len(survivors)),
                    # clients the round was sent to that are not in a sum, and those of them whose masks had to be
                    # removed (they dropped after relaying their shares)
                    "secagg-dropped": float(len(train) - len(survivors)),
                    "secagg-masks-removed": float(sum(len(g.dropped) for g in done)),
                    "secagg-messages": float(stats["messages"]), "secagg-groups-failed": float(len(groups) - len(done))})
    summary.update(strategy._summarize_node_metrics([metrics[u] for u in survivors if u in metrics]))
    return strategy.current_arrays(), MetricRecord(summary)
