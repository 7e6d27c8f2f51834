"""The hop trace of a reward round trip (``federation.hops``): written only when asked for, and
laid on one time line as the critical path through the slowest client."""

from __future__ import annotations

import json

import pytest

from mor_secure.federation import hops


def test_note_writes_only_with_the_environment_variable(tmp_path, monkeypatch):
    path = tmp_path / "trace.jsonl"
    monkeypatch.delenv(hops.ENV, raising=False)
    hops.note("server.push", kind="query.score")
    assert not path.exists()
    monkeypatch.setenv(hops.ENV, str(path))
    hops.note("server.push", kind="query.score")
    hops.note("server.replies")
    events = hops.read(path)
    assert [e["event"] for e in events] == ["server.push", "server.replies"]
    assert events[0]["kind"] == "query.score" and events[0]["t"] <= events[1]["t"]
    with open(path, "a", encoding="utf-8") as f:
        f.write('{"t": 1, "ev')  # a torn last line (the process was killed mid-write) is skipped
    assert len(hops.read(path)) == 2
    assert hops.read(tmp_path / "missing.jsonl") == []


def _client(t0: float, offsets: list[float]) -> list[dict]:
    names = ["supernode.received", "supernode.stored", "executor.acquired", "executor.inputs", "executor.answered",
             "executor.replied", "supernode.sent"]
    return [{"t": t0 + o, "event": n} for n, o in zip(names, offsets)]


def test_critical_path_follows_the_last_client_and_adds_up_to_the_round_trip():
    server = [{"t": 0.0, "event": "server.push", "kind": "train"}, {"t": 5.0, "event": "server.replies"},
              {"t": 10.0, "event": "server.push", "kind": "query.score"}, {"t": 10.1, "event": "server.pushed"},
              {"t": 10.2, "event": "server.pull"}, {"t": 11.1, "event": "server.pull"},
              {"t": 11.3, "event": "server.replies"},
              {"t": 20.0, "event": "server.push", "kind": "query.score"}, {"t": 20.1, "event": "server.pull"},
              {"t": 20.9, "event": "server.pull"}, {"t": 21.0, "event": "server.replies"}]
    fast = _client(0.0, [1, 2, 2, 3, 4, 4, 4.5]) + _client(10.0, [0.05, 0.2, 0.1, 0.25, 0.35, 0.4, 0.5]) \
        + _client(20.0, [0.05, 0.1, 0.1, 0.15, 0.3, 0.35, 0.4])
    # the slow client's executor acquired its task before the objects were stored: hop 3 counts from "stored"
    slow = _client(10.0, [0.1, 0.3, 0.1, 0.4, 0.7, 0.75, 1.0]) + _client(20.0, [0.1, 0.2, 0.1, 0.3, 0.5, 0.6, 0.8])
    out = hops.critical_path(server, [fast, slow], kind="query.score")
    assert out["round_trips"] == 2  # the train round trip is left out
    first, second = out["per_trip"]
    assert first == pytest.approx([0.1, 0.2, 0.1, 0.3, 0.05, 0.25, 0.1, 0.2])  # the slow client, then pull at 11.1
    # second round trip: the server's last pull (20.9) came 0.1 s after the slow client's reply (20.8)
    assert second == pytest.approx([0.1, 0.1, 0.1, 0.2, 0.1, 0.2, 0.1, 0.1])
    assert out["total_s"] == pytest.approx(1.15)
    assert [h["event"] for h in out["hops"]] == [name for name, _ in hops.HOPS]
    assert out["hops"][3]["median_s"] == pytest.approx(0.25)
    # a pull that began before the last reply reached the SuperLink counts nothing for the poll wait
    early = [e if e["t"] != 20.9 else {"t": 20.7, "event": "server.pull"} for e in server]
    assert hops.critical_path(early, [fast, slow], kind="query.score")["per_trip"][1][6:] == pytest.approx([0, 0.2])
    # a client that never sent its reply leaves its round trips out
    assert hops.critical_path(server, [fast, slow[:-1]], kind="query.score")["round_trips"] == 1
    assert hops.critical_path(server, [], kind="query.score") == {"round_trips": 0}
    assert json.dumps(out)  # stored in the bench's results file


def test_a_round_trip_that_timed_out_is_left_out_not_stretched_to_the_next():
    """The server notes ``server.replies`` only when every reply came back: a score round trip that
    timed out ends at the next push (here a decrypt request), not at that request's replies."""
    server = [{"t": 10.0, "event": "server.push", "kind": "query.score"}, {"t": 10.3, "event": "server.pull"},
              {"t": 70.0, "event": "server.push", "kind": "query.decrypt"}, {"t": 70.5, "event": "server.pull"},
              {"t": 71.0, "event": "server.replies"},
              {"t": 80.0, "event": "server.push", "kind": "query.score"}, {"t": 80.8, "event": "server.pull"},
              {"t": 81.0, "event": "server.replies"}]
    client = _client(10.0, [0.1, 0.2, 0.1, 0.3, 0.4, 0.5, 0.6]) + _client(70.0, [0.1, 0.2, 0.1, 0.3, 0.35, 0.4, 0.45]) \
        + _client(80.0, [0.1, 0.2, 0.1, 0.3, 0.5, 0.6, 0.7])
    out = hops.critical_path(server, [client], kind="query.score")
    assert out["round_trips"] == 1 and out["total_s"] == pytest.approx(1.0)
    assert out["per_trip"][0] == pytest.approx([0.1, 0.1, 0.1, 0.2, 0.1, 0.1, 0.1, 0.2])


def test_a_trace_that_cannot_be_written_turns_tracing_off_without_raising(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv(hops.ENV, str(tmp_path / "no-such-dir" / "trace.jsonl"))
    hops.note("supernode.received")  # called inside Flower's SuperNode loop: must never raise
    hops.note("supernode.stored")
    assert "cannot be written" in caplog.text and caplog.text.count("cannot be written") == 1
    good = tmp_path / "trace.jsonl"
    monkeypatch.setenv(hops.ENV, str(good))
    hops.note("server.push")
    assert [e["event"] for e in hops.read(good)] == ["server.push"]
