"""The ServerApp's exchange loop (server_app/exchange.py) against a fake Grid on a fake clock."""

from __future__ import annotations

import pytest
from flwr.app import ConfigRecord, Message, RecordDict

from dpfpl.server_app.exchange import FIRST_INTERVAL, MAX_INTERVAL, exchange


class FakeGrid:
    """Each destination node answers ``delay[node]`` seconds after the push (None: never); a pull returns the
    replies due by then for the asked ids. Every pull and its time are recorded."""

    def __init__(self, delay: dict[int, float | None], refuse: set[int] = frozenset()) -> None:
        self.now = 0.0
        self.delay, self.refuse = delay, refuse
        self.due: dict[str, tuple[float, Message]] = {}
        self.pulls: list[tuple[float, list[str]]] = []
        self.extra: list[Message] = []  # handed out with the next pull

    def sleep(self, seconds: float) -> None:
        assert seconds > 0
        self.now += seconds

    def clock(self) -> float:
        return self.now

    def push_messages(self, messages):
        ids = []
        for i, msg in enumerate(messages):
            node = msg.metadata.dst_node_id
            if node in self.refuse:
                ids.append(None)
                continue
            msg_id = f"m{node}-{i}"
            msg.metadata.__dict__["_message_id"] = msg_id
            if self.delay[node] is not None:
                reply = Message(RecordDict({"r": ConfigRecord({"node": node})}), reply_to=msg)
                reply.metadata.__dict__["_src_node_id"] = node
                self.due[msg_id] = (self.now + self.delay[node], reply)
            ids.append(msg_id)
        return ids

    def pull_messages(self, message_ids):
        message_ids = list(message_ids)
        self.pulls.append((self.now, message_ids))
        out = [self.due.pop(i)[1] for i in message_ids if i in self.due and self.due[i][0] <= self.now]
        out += self.extra
        self.extra = []
        return out


def _messages(nodes):
    return [Message(RecordDict({"c": ConfigRecord({"x": 1})}), dst_node_id=n, message_type="train") for n in nodes]


def _run(grid, nodes, timeout):
    return exchange(grid, _messages(nodes), timeout, sleep=grid.sleep, clock=grid.clock)


def test_replies_are_matched_to_their_messages_and_returned_as_soon_as_all_are_in():
    grid = FakeGrid({1: 0.0, 2: 0.35, 3: 0.2})
    replies = _run(grid, [1, 2, 3], timeout=10.0)
    assert [r.content["r"]["node"] for r in replies] == [1, 2, 3]  # in the order pushed, not arrived
    assert all(r.metadata.reply_to_message_id.startswith(f"m{r.content['r']['node']}-") for r in replies)
    assert grid.now < 0.35 + MAX_INTERVAL  # not Flower's 3 s between pulls
    assert grid.pulls[-1][1] == [grid.pulls[-1][1][0]]  # only the missing one is asked for at the end


def test_a_hanging_node_is_dropped_at_the_timeout_not_waited_for():
    grid = FakeGrid({1: 0.1, 2: None, 3: 0.3})
    replies = _run(grid, [1, 2, 3], timeout=2.0)
    assert sorted(r.content["r"]["node"] for r in replies) == [1, 3]
    assert grid.now == pytest.approx(2.0)  # the last pull is at the deadline, not after it
    assert grid.pulls[-1][0] == pytest.approx(2.0)


def test_the_poll_interval_backs_off_while_nothing_arrives_and_resets_on_a_reply():
    grid = FakeGrid({1: 3.0, 2: 3.5, 3: None})
    _run(grid, [1, 2, 3], timeout=6.0)
    times = [t for t, _ in grid.pulls]
    gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
    assert gaps[:6] == pytest.approx([FIRST_INTERVAL, 0.15, 0.225, 0.3375, MAX_INTERVAL, MAX_INTERVAL])
    first = next(i for i, (_, ids) in enumerate(grid.pulls) if len(ids) == 2)  # node 1 answered just before
    assert times[first - 1] >= 3.0 > times[first - 2]
    assert gaps[first - 1] == pytest.approx(FIRST_INTERVAL)  # back to the short interval after a reply
    assert max(gaps[first - 1 :]) == pytest.approx(MAX_INTERVAL)  # and backing off again towards the deadline
    assert times[-1] == pytest.approx(6.0)


def test_a_grid_with_its_own_pull_interval_is_never_polled_more_slowly_than_that():
    """Simulation's in-memory grid pulls every 0.1 s in Flower's own loop (``pull_interval``): the exchange loop
    keeps to that interval there instead of backing off, so a simulated round waits no longer than before."""
    grid = FakeGrid({1: 2.0})
    grid.pull_interval = 0.1
    _run(grid, [1], timeout=5.0)
    times = [t for t, _ in grid.pulls]
    assert max(b - a for a, b in zip(times, times[1:], strict=False)) == pytest.approx(0.1)
    assert times[-1] == pytest.approx(2.0, abs=0.1 + 1e-9)


def test_refused_messages_are_not_waited_for_and_foreign_or_repeated_replies_are_ignored():
    grid = FakeGrid({1: 0.0, 2: 0.0}, refuse={2})
    stranger = Message(RecordDict({"r": ConfigRecord({"node": 9})}), reply_to=_messages([9])[0])
    grid.extra = [stranger]
    replies = _run(grid, [1, 2], timeout=None)
    assert [r.content["r"]["node"] for r in replies] == [1]
    assert len(grid.pulls) == 1


def test_a_synchronous_grid_is_pulled_once_even_when_the_push_outlasted_the_timeout():
    grid = FakeGrid({1: 0.0})
    original = grid.push_messages

    def slow_push(messages):
        ids = original(messages)
        grid.now += 5.0  # the in-process grid runs the ClientApps during the push
        return ids

    grid.push_messages = slow_push
    assert len(_run(grid, [1], timeout=1.0)) == 1


def test_the_in_process_grid_goes_through_the_same_loop():
    from dpfpl.inprocess import InProcessGrid

    assert hasattr(InProcessGrid, "push_messages") and hasattr(InProcessGrid, "pull_messages")
