"""The ServerApp's one exchange: push messages, then pull their replies until all are in or the time is up.

Flower's ``Grid.send_and_receive`` does the same through the same public calls, but its deployment grid
sleeps 3 s between pulls, so a reply waits up to 3 s on the SuperLink before the ServerApp sees it, on
every exchange (a secure-aggregation round has four). Here the pulls start ``FIRST_INTERVAL`` apart and back
off to ``MAX_INTERVAL`` while nothing arrives; a reply resets the interval, since the others usually follow.

Semantics kept from Flower's loop:

- a message the Grid did not accept (``push_messages`` gives no id, or ``None``) has no reply to wait for;
- a reply belongs to the exchange when its ``reply_to_message_id`` is one of the pushed ids (an error reply
  that the SuperLink or the node sent in place of a result is a reply too, and comes back to the caller);
- ``timeout`` counts from the end of the push; ``None`` waits for every reply. A node that hangs is dropped:
  whatever has arrived by the deadline is returned, its reply is not waited for.

Unlike Flower's loop, the Grid is always pulled once after the push even when the push alone took longer than
``timeout`` (a synchronous grid, ``dpfpl.inprocess.InProcessGrid``, delivers during the push), and a second
reply to the same message is ignored. The replies come back in the order of their messages, whatever order
they arrived in (the aggregates are then the same floats run to run).

``DPFPL_EXCHANGE=flower`` in the ServerApp's environment uses Flower's ``send_and_receive`` instead (to compare
the two). Each exchange is tallied (count, seconds, and the last poll interval before the exchange's final reply
was seen: a bound on what this side's polling added); ``take_tally`` reads and resets it, once per round.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterable

from flwr.app import Message
from flwr.serverapp import Grid

log = logging.getLogger("dpfpl.server.exchange")

FIRST_INTERVAL = 0.1  # seconds between the first pulls
MAX_INTERVAL = 0.5  # the interval backs off to this while nothing arrives
BACKOFF = 1.5

_tally = {"exchanges": 0, "exchange-seconds": 0.0, "server-poll-bound-seconds": 0.0}


def take_tally() -> dict[str, float]:
    """The exchanges since the last call: how many, their seconds (push to last reply), and the summed bound on
    the ServerApp's own polling delay; resets the tally."""
    out = {k: v if k == "exchanges" else round(float(v), 3) for k, v in _tally.items()}
    _tally.update({k: 0 for k in _tally})
    return out


def exchange(
    grid: Grid,
    messages: Iterable[Message],
    timeout: float | None = None,
    *,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> list[Message]:
    """Push ``messages`` through ``grid`` and return the replies that arrived within ``timeout`` seconds."""
    started = clock()
    if os.environ.get("DPFPL_EXCHANGE") == "flower":
        replies = list(grid.send_and_receive(messages, timeout=timeout))
        _tally["exchanges"] += 1
        _tally["exchange-seconds"] += clock() - started
        _tally["server-poll-bound-seconds"] += 3.0 if replies else 0.0  # Flower's deployment grid: 3 s pulls
        return replies
    order = {i: n for n, i in enumerate(i for i in grid.push_messages(list(messages)) if i)}
    pending = set(order)
    deadline = None if timeout is None else clock() + timeout
    replies: list[Message] = []
    # a grid that states its own pull interval (simulation's in-memory grid: 0.1 s) is never polled more slowly
    # than Flower's own loop would, so simulation does not wait longer than before
    ceiling = min(MAX_INTERVAL, float(getattr(grid, "pull_interval", MAX_INTERVAL)))
    first = interval = min(FIRST_INTERVAL, ceiling)
    waited = 0.0  # the last sleep: a reply seen by the next pull arrived at most this long before it
    while pending:
        pulled = 0
        for msg in grid.pull_messages(sorted(pending, key=order.__getitem__)):
            if msg.metadata.reply_to_message_id in pending:  # not another exchange's, nor a second reply
                pending.discard(msg.metadata.reply_to_message_id)
                replies.append(msg)
                pulled += 1
        if not pending:
            break
        if pulled:
            interval = first
        wait = interval
        if deadline is not None:
            left = deadline - clock()
            if left <= 0:
                log.debug("exchange: %d replies missing at the timeout", len(pending))
                break
            wait = min(wait, left)
        sleep(wait)
        waited = wait
        interval = min(interval * BACKOFF, ceiling)
    _tally["exchanges"] += 1
    _tally["exchange-seconds"] += clock() - started
    _tally["server-poll-bound-seconds"] += waited
    return sorted(replies, key=lambda m: order[m.metadata.reply_to_message_id])  # in the order pushed
