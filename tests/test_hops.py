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


def test_trace_requests_notes_each_request_path_only_with_a_trace(tmp_path, monkeypatch):
    """Each request sent through httpx (Flower's HTTP client) is one ``http`` event with its path (no
    query), to a real server on loopback; without a trace httpx is left as it is."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    import httpx

    monkeypatch.setattr(httpx.Client, "send", httpx.Client.send)  # restored after the test
    original = httpx.Client.send
    monkeypatch.delenv(hops.ENV, raising=False)
    assert hops.trace_requests() is False and httpx.Client.send is original

    class Ok(BaseHTTPRequestHandler):
        def do_POST(self):
            self.rfile.read(int(self.headers.get("content-length", 0)))
            self.send_response(200)
            self.send_header("content-length", "0")
            self.end_headers()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Ok)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    path = tmp_path / "trace.jsonl"
    monkeypatch.setenv(hops.ENV, str(path))
    try:
        assert hops.trace_requests() is True and hops.trace_requests() is True  # a second call wraps nothing more
        base = f"http://127.0.0.1:{server.server_address[1]}"
        with httpx.Client(timeout=10) as client:
            assert client.post(f"{base}/v1/fleet/pull-messages?x=1", content=b"{}").status_code == 200
            assert client.post(f"{base}/v1/fleet/pull-object", content=b"{}").status_code == 200
    finally:
        server.shutdown()
        server.server_close()
    sent = [e for e in hops.read(path) if e["event"] == hops.HTTP]
    assert [e["path"] for e in sent] == ["/v1/fleet/pull-messages", "/v1/fleet/pull-object"]


def test_requests_per_trip_counts_the_requests_inside_each_completed_round_trip():
    """Requests between a score push and its replies count, from the server and every client; those
    outside (the server's compute between steps) and those of a timed-out round trip do not."""
    server = [{"t": 10.0, "event": "server.push", "kind": "query.score"},
              {"t": 10.1, "event": "http", "path": "/v1/runtime/push-messages"},
              {"t": 10.9, "event": "http", "path": "/v1/runtime/pull-messages"},
              {"t": 11.0, "event": "server.replies"},
              {"t": 11.5, "event": "http", "path": "/v1/runtime/pull-messages"},  # between steps
              {"t": 20.0, "event": "server.push", "kind": "query.score"},  # timed out: no replies
              {"t": 20.2, "event": "http", "path": "/v1/runtime/pull-messages"},
              {"t": 30.0, "event": "server.push", "kind": "query.score"},
              {"t": 30.9, "event": "http", "path": "/v1/runtime/pull-messages"},
              {"t": 31.0, "event": "server.replies"}]
    a = [{"t": 10.3, "event": "http", "path": "/v1/fleet/pull-messages"},
         {"t": 10.4, "event": "supernode.received"},
         {"t": 10.5, "event": "http", "path": "/v1/fleet/pull-object"},
         {"t": 10.6, "event": "http", "path": "/v1/fleet/pull-object"},
         {"t": 30.5, "event": "http", "path": "/v1/fleet/pull-messages"}]
    b = [{"t": 10.3, "event": "http", "path": "/v1/fleet/pull-messages"}, {"t": 15.0, "event": "http",
                                                                            "path": "/v1/fleet/pull-messages"}]
    out = hops.requests_per_trip(server, [a, b], kind="query.score")
    assert out["round_trips"] == 2 and hops.round_trips(server, kind="query.score") == [(10.0, 11.0), (30.0, 31.0)]
    assert out["per_path"] == {"/v1/fleet/pull-messages": 1.5, "/v1/runtime/pull-messages": 1.0,
                               "/v1/fleet/pull-object": 1.0, "/v1/runtime/push-messages": 0.5}
    assert out["total"] == 4.0
    assert hops.requests_per_trip(server[:1], [a]) == {"round_trips": 0}
