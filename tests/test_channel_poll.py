"""The ServerApp's pulls for replies from a SuperLink grid (``channel.send_and_receive``): every
empty pull is one request the SuperLink serves, so once round trips repeat the server sleeps
through most of the next one (``deploy.supernode.Rhythm``). A grid double stands in for the
SuperLink here (the real one runs in ``tests/test_deployment.py``): replies become available a
fixed time after the push, and the double counts the pulls. Time is a virtual clock that the
channel's sleeps advance, so the counts do not depend on how busy the machine is."""

from __future__ import annotations

import pytest
from flwr.app import Message, RecordDict
from flwr.serverapp import Grid

from mor_secure.deploy import supernode as sn
from mor_secure.deploy.inproc import ensure_task_identity
from mor_secure.federation import channel


class VirtualTime:
    """Stands in for the ``time`` module in ``channel``: ``sleep`` advances ``monotonic``."""

    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        assert seconds >= 0
        self.now += seconds


class DelayedGrid(Grid):
    """Each pushed message's reply can be pulled ``delay_s`` after the push (a test double)."""

    def __init__(self, delay_s: float, clock: VirtualTime) -> None:
        self.delay_s, self.due, self.pulls, self.pushed, self.time = delay_s, {}, [], 0, clock

    def push_messages(self, messages):
        ids = []
        for m in messages:
            self.pushed += 1
            mid = f"m{self.pushed}"
            self.due[mid] = (self.time.monotonic() + self.delay_s, m)
            ids.append(mid)
        return ids

    def pull_messages(self, message_ids):
        now = self.time.monotonic()
        self.pulls.append(now)
        out = []
        for mid in list(message_ids):
            at, m = self.due[mid]
            if now >= at:
                reply = Message(RecordDict(), reply_to=m)
                reply.metadata.__dict__["_reply_to_message_id"] = mid
                out.append(reply)
                del self.due[mid]
        return out

    def create_message(self, *a, **k):
        raise NotImplementedError

    def set_run(self, run_id):
        raise NotImplementedError

    @property
    def run(self):
        raise NotImplementedError

    def get_node_ids(self):
        return [1, 2, 3]

    def send_and_receive(self, messages, *, timeout=None):
        raise AssertionError("send_and_receive polls the grid itself")


def _messages(kind: str) -> list[Message]:
    ensure_task_identity()
    return [Message(RecordDict(), dst_node_id=n, message_type=kind) for n in (1, 2, 3)]


@pytest.fixture
def clock(monkeypatch) -> VirtualTime:
    monkeypatch.setattr(channel, "_REPLY_RHYTHMS", {})
    monkeypatch.setattr(channel, "_short_reply_pulls", lambda grid: None)  # a double, not Flower's HttpGrid
    virtual = VirtualTime()
    monkeypatch.setattr(channel, "time", virtual)
    return virtual


def test_the_server_learns_the_round_trip_and_pulls_a_few_times_near_its_end(clock):
    grid = DelayedGrid(0.3, clock)
    counts, firsts, lates = [], [], []
    for _ in range(sn.RHYTHM_MIN_GAPS + 3):
        grid.pulls.clear()
        start = clock.monotonic()
        replies = channel.send_and_receive(grid, _messages("query.score"), timeout=10)
        assert len(replies) == 3
        counts.append(len(grid.pulls))
        firsts.append(grid.pulls[0] - start)
        lates.append(grid.pulls[-1] - start - 0.3)
    learnt = slice(sn.RHYTHM_MIN_GAPS + 1, None)
    assert counts[0] >= 8  # no rhythm yet: 0.02 s at first, an eighth of the time waited after
    assert max(counts[learnt]) <= 4 and max(counts[learnt]) < counts[0] / 2
    assert min(firsts[learnt]) >= 0.2  # its first pull comes near the end of the round trip, not at once
    assert max(lates[learnt]) <= 0.3 / sn.RHYTHM_STEPS + 1e-9  # and seen within a fine poll of being there
    other = channel._REPLY_RHYTHMS
    assert set(other) == {"query.score"}


def test_a_round_trip_that_times_out_leaves_no_stale_pulls(clock):
    grid = DelayedGrid(5.0, clock)
    assert channel.send_and_receive(grid, _messages("query.score"), timeout=0.2) == []
    rhythm = channel._REPLY_RHYTHMS["query.score"]
    assert not rhythm.gaps and rhythm._empty is not None  # it gave up; nothing was observed
    grid.delay_s = 0.05
    assert len(channel.send_and_receive(grid, _messages("query.score"), timeout=5)) == 3
    assert rhythm.gaps[-1] <= 0.05 + sn.FLOOR_S  # not the midpoint with the last call's empty pull (at 0.2 s)
