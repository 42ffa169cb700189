"""One secure-aggregation round in memory, message by message, counting what crosses the wire.

Used by the tests (exactness, dropouts, failure) and by ``dpfpl/bench/secagg.py`` (cost vs clear aggregation).
The Flower driver (``server_app/secagg_round.py``) runs the same state machines over real messages.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from .common.secagg.protocol import ClientSession, ServerSession

KEY_ADVERT_BYTES = 64  # two X25519 public keys


@dataclass
class RoundStats:
    messages: int = 0  # server -> client requests and client -> server replies
    bytes_up: int = 0  # client -> server payload bytes (keys, ciphertexts, masked vector, shares)
    bytes_down: int = 0  # server -> client payload bytes (roster, relayed ciphertexts, survivor lists)
    seconds_client: float = 0.0  # summed over clients
    seconds_server: float = 0.0
    stages: dict[str, int] = field(default_factory=dict)  # clients answering each stage


def run_round(
    inputs: dict[int, np.ndarray],
    threshold: int,
    context: str = "sim/1",
    *,
    drop_before_keys: frozenset = frozenset(),
    drop_before_shares: frozenset = frozenset(),
    drop_before_masked: frozenset = frozenset(),
    drop_before_unmask: frozenset = frozenset(),
) -> tuple[np.ndarray, RoundStats, ServerSession]:
    """Sum of the signed integer vectors ``inputs`` (node id -> vector) via the protocol; a node in a
    ``drop_before_*`` set stops answering from that stage on. Raises ``SecAggError`` when the round fails."""
    size = len(next(iter(inputs.values())))
    stats = RoundStats()
    clients = {u: ClientSession(node_id=u, context=context, threshold=threshold) for u in inputs}
    server = ServerSession(context=context, threshold=threshold, size=size)
    gone: set[int] = set()

    def alive(stage_drop: frozenset) -> list[int]:
        gone.update(stage_drop)
        return [u for u in sorted(clients) if u not in gone]

    def timed(fn, *args):
        t0 = time.perf_counter()
        out = fn(*args)
        stats.seconds_client += time.perf_counter() - t0
        return out

    # stage 1
    stats.messages += len(clients)  # requests (the train message carries them in the real app)
    keys = {u: timed(clients[u].advertise) for u in alive(drop_before_keys)}
    stats.messages += len(keys)
    stats.bytes_up += KEY_ADVERT_BYTES * len(keys)
    stats.stages["keys"] = len(keys)
    t0 = time.perf_counter()
    roster = server.set_roster(keys)
    stats.seconds_server += time.perf_counter() - t0
    # stage 2
    senders = alive(drop_before_shares)
    stats.messages += len(roster) + len([u for u in senders if u in roster])
    stats.bytes_down += len(roster) * len(roster) * (KEY_ADVERT_BYTES + 8)
    shares = {u: timed(clients[u].share_keys, roster, threshold) for u in senders if u in roster}
    stats.bytes_up += sum(len(ct) for cts in shares.values() for ct in cts.values())
    stats.stages["shares"] = len(shares)
    t0 = time.perf_counter()
    inbox = server.collect_shares(shares)
    stats.seconds_server += time.perf_counter() - t0
    # stage 3
    u2 = server.share_senders
    stats.messages += len(u2)
    stats.bytes_down += sum(len(ct) + 8 for cts in inbox.values() for ct in cts.values()) + 8 * len(u2) ** 2
    masked = {u: timed(clients[u].masked_input, inbox[u], u2, inputs[u]) for u in alive(drop_before_masked) if u in u2}
    stats.messages += len(masked)
    stats.bytes_up += sum(y.nbytes for y in masked.values())
    stats.stages["masked"] = len(masked)
    t0 = time.perf_counter()
    survivors, dropped = server.collect_masked(masked)
    stats.seconds_server += time.perf_counter() - t0
    # stage 4
    stats.messages += len(survivors)
    stats.bytes_down += 8 * len(u2) * len(survivors)
    replies = {u: timed(clients[u].unmask, survivors, dropped) for u in alive(drop_before_unmask) if u in survivors}
    stats.messages += len(replies)
    stats.bytes_up += sum(len(s) + 8 for r in replies.values() for part in r for s in part.values())
    stats.stages["unmask"] = len(replies)
    t0 = time.perf_counter()
    total = server.unmask(replies)
    stats.seconds_server += time.perf_counter() - t0
    return total, stats, server
