"""Timestamps of one reward round trip's hops, for ``bench perf`` (b): where the time goes.

A process started with ``MOR_SECURE_HOP_TRACE=PATH`` in its environment appends one JSON line
per event to PATH: ``{"t": wall-clock seconds, "event": name}``. Without the variable
:func:`note` does nothing. The events are written by the ServerApp's reply loop
(``channel.send_and_receive``), the adaptive SuperNode (``deploy.supernode``) and the scoring
service as ClientApp executor (``federation.runtime_executor``). All the processes of a
loopback deployment share one clock, so the events of one round trip can be laid on one time
line (:func:`critical_path`). Nothing a client releases is traced: names and times only.

:func:`trace_requests` also notes every HTTP request a traced process sends to Flower's APIs (its
path), so that :func:`requests_per_trip` can count what one round trip asks of the SuperLink.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import threading
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from statistics import median

ENV = "MOR_SECURE_HOP_TRACE"

log = logging.getLogger(__name__)

_lock = threading.Lock()
_file = None
_path = None
_failed: set[str] = set()  # trace paths that could not be written: not tried again


def note(event: str, **detail) -> None:
    """Append ``event`` (and ``detail``) with the current time to this process's trace, if it has one.

    Never raises: the trace is a measurement, and the SuperNode, executor and server loops it is
    called from must go on whatever happens to it. A path that cannot be written is reported once
    on the log and not tried again."""
    global _file, _path
    path = os.environ.get(ENV)
    if not path or path in _failed:
        return
    t = time.time()
    with _lock:
        try:
            if _file is None or _path != path:
                if _file is not None:
                    _file.close()
                _file, _path = None, None
                _file = open(path, "a", buffering=1, encoding="utf-8")  # noqa: SIM115 - kept open, one per process
                _path = path
            _file.write(json.dumps({"t": t, "event": event, **detail}) + "\n")
        except (OSError, TypeError, ValueError) as exc:
            _failed.add(path)
            log.warning("hop trace %s=%s cannot be written (%s); tracing is off in this process", ENV, path, exc)


HTTP = "http"


def trace_requests() -> bool:
    """In a process with a hop trace (``MOR_SECURE_HOP_TRACE``), note each HTTP request it sends
    through ``httpx.Client`` (Flower 1.42's SuperNode, ServerApp and SuperExec talk to the SuperLink
    through it) as an ``http`` event with the request's path, when it is sent. Nothing without the
    variable. Returns whether requests are traced; calling it again changes nothing."""
    if not os.environ.get(ENV):
        return False
    import httpx

    send = httpx.Client.send
    if getattr(send, "_hop_traced", False):
        return True

    @functools.wraps(send)
    def traced_send(self, request, *args, **kwargs):
        note(HTTP, path=request.url.path)
        return send(self, request, *args, **kwargs)

    traced_send._hop_traced = True
    httpx.Client.send = traced_send
    return True


def read(path: Path | str) -> list[dict]:
    """The events in a trace file (none if it does not exist); a torn last line is skipped."""
    path = Path(path)
    if not path.exists():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


def read_deployment(trace_dir: Path | str, clients: Sequence[str]) -> tuple[list[dict], list[list[dict]]]:
    """The ServerApp's events and each client's (its SuperNode's and its service's together) from a
    deployment's trace folder: ``server.jsonl``, ``supernode_NAME.jsonl``, ``service_NAME.jsonl``,
    the names ``bench perf`` and the deployment test give each process's ``MOR_SECURE_HOP_TRACE``."""
    trace_dir = Path(trace_dir)
    per_client = [read(trace_dir / f"supernode_{n}.jsonl") + read(trace_dir / f"service_{n}.jsonl") for n in clients]
    return read(trace_dir / "server.jsonl"), per_client


SERVER_PUSH, SERVER_PUSHED, SERVER_PULL, SERVER_DONE = "server.push", "server.pushed", "server.pull", "server.replies"
#: The critical path of a reward round trip: (event that ends the hop, what happens in it). The
#: client events are those of the client whose reply reached the SuperLink last.
HOPS = (
    ("supernode.received", "the server pushes the requests to the SuperLink; the SuperNode pulls its message"),
    ("supernode.stored", "the SuperNode pulls the message's objects from the SuperLink and stores them"),
    ("executor.inputs", "the executor pulls the message and its context from the SuperNode"),
    ("executor.answered", "the client scores the responses (the same work as in-process)"),
    ("executor.replied", "the executor pushes the reply to the SuperNode"),
    ("supernode.sent", "the SuperNode pushes the reply and its objects to the SuperLink"),
    (SERVER_PULL, "the server's next pull for replies (its poll interval)"),
    (SERVER_DONE, "the server pulls the replies and their objects from the SuperLink"),
)


def _first(events: Sequence[dict], name: str, start: float, end: float) -> float | None:
    return next((e["t"] for e in events if e["event"] == name and start <= e["t"] <= end), None)


def round_trips(server: Sequence[dict], kind: str | None = None) -> list[tuple[float, float]]:
    """(push, last reply) of each completed round trip in the ServerApp's events: from a
    ``server.push`` (of message type ``kind``, if given) to the ``server.replies`` before the next
    push of any kind; a round trip that timed out has none and is left out."""
    every_push = sorted(e["t"] for e in server if e["event"] == SERVER_PUSH)
    pushes = [e["t"] for e in server if e["event"] == SERVER_PUSH and (kind is None or e.get("kind") == kind)]
    trips = []
    for start in pushes:
        following = next((t for t in every_push if t > start), float("inf"))
        end = _first(server, SERVER_DONE, start, following)
        if end is not None:
            trips.append((start, end))
    return trips


def requests_per_trip(server: Sequence[dict], clients: Iterable[Sequence[dict]], kind: str | None = None) -> dict:
    """What each completed round trip (:func:`round_trips`) asked of the SuperLink: the ``http``
    events (:func:`trace_requests`) of the ServerApp and of every client between the push and the
    last reply, per request path. Only traced processes count: the SuperLink's own SuperExec
    (which asks for a ServerApp to start about once a second) is not one. Returns the number of
    round trips, and the mean per round trip of each path and of all."""
    trips = round_trips(server, kind)
    if not trips:
        return {"round_trips": 0}
    sent = [e for events in (server, *clients) for e in events if e["event"] == HTTP]
    per_path: dict[str, int] = {}
    for start, end in trips:
        for e in sent:
            if start <= e["t"] <= end:
                per_path[e.get("path", "?")] = per_path.get(e.get("path", "?"), 0) + 1
    n = len(trips)
    return {"round_trips": n, "total": sum(per_path.values()) / n,
            "per_path": {p: c / n for p, c in sorted(per_path.items(), key=lambda pc: -pc[1])}}


def critical_path(server: Sequence[dict], clients: Iterable[Sequence[dict]], kind: str | None = None) -> dict:
    """Split each round trip, from the server's push to its last reply, into ``HOPS``.

    ``server``: the ServerApp's events; ``clients``: one event list per client (its SuperNode's
    and its executor's together); ``kind``: only round trips of that message type. A round trip
    runs from a ``server.push`` to the ``server.replies`` before the next push of any kind (a
    round trip that timed out has none and is left out); a client's events in that window
    are its part of it (one request per client at a time). The path follows the client whose
    reply reached the SuperLink last, then the server's last pull (the one that found the last
    reply). A hop that overlaps the one before counts only its time past it, so a round trip's
    hops add up to its whole time. Returns the number of round trips with every event, and per
    hop and in all the median seconds over them (medians need not add up to the total's median),
    and each round trip's hops (``per_trip``, in ``HOPS`` order).
    """
    clients = [sorted(c, key=lambda e: e["t"]) for c in clients]
    pulls = sorted(e["t"] for e in server if e["event"] == SERVER_PULL)
    per_hop: dict[str, list[float]] = {name: [] for name, _ in HOPS}
    totals, trips = [], []
    for start, end in round_trips(server, kind):
        sent = [(_first(c, "supernode.sent", start, end), c) for c in clients]
        if not sent or any(t is None for t, _ in sent):
            continue
        _, last = max(sent, key=lambda tc: tc[0])
        points = {name: _first(last, name, start, end) for name, _ in HOPS[:6]}
        points[SERVER_PULL] = max((t for t in pulls if start <= t <= end), default=None)
        points[SERVER_DONE] = end
        if any(t is None for t in points.values()):
            continue
        reached, trip = start, []
        for name, _ in HOPS:
            now = max(reached, points[name])
            trip.append(now - reached)
            per_hop[name].append(now - reached)
            reached = now
        totals.append(end - start)
        trips.append(trip)
    if not totals:
        return {"round_trips": 0}
    return {"round_trips": len(totals), "total_s": median(totals), "per_trip": trips,
            "hops": [{"hop": what, "event": name, "median_s": median(per_hop[name])} for name, what in HOPS]}
