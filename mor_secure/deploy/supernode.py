"""``mor-secure client supernode``: Flower's own SuperNode, polling adaptively.

Flower 1.42's SuperNode loop (``flwr.supernode.start_client_internal``) pulls the SuperLink for a
message and, when there is none, sleeps a fixed 3 s; while its ClientApp works it looks for the
reply every 0.5 s. Neither interval can be set from outside its source. In a GRPO run the server
sends each client one reward request per step: after every reply the SuperNode pulls at once, finds
nothing (the server is still computing its next step) and sleeps 3 s, so every step waited about
2.7 s for that sleep alone (BENCHMARKS.md, perf (b)).

This launcher runs the unmodified ``flower-supernode`` command in-process with three substitutions
in that one module's namespace, nothing else:

* the idle sleep after an empty pull becomes ``idle_wait(seconds since the last message)``: an
  eighth of the time since the node last pulled a message or finished pushing a reply (its
  ``_pull_and_store_message`` and ``_push_messages`` are wrapped to note those times), at least
  ``floor_s`` (0.02 s) and at most Flower's own 3 s. Right after a message the node pulls every 0.02 s, so a request that follows a
  reply within t seconds waits at most about t/8 more; a node idle for 24 s or longer is back to
  Flower's 3 s, so the SuperLink's load from idle nodes does not change. Once messages come in a
  steady rhythm (a GRPO run: one request per step), :class:`Rhythm` sleeps through most of the
  expected gap at once and pulls finely only around its end, so the node's empty pulls, each one
  request the SuperLink serves, drop without the message waiting longer;
* the waits on the node's own local state (its ClientApp's reply, an object being stored) poll every
  ``local_poll_s`` (0.02 s) instead of 0.5 s; they read the SuperNode's in-memory state, no network;
* its object pulls from the SuperLink (``pull_objects``) retry a not-yet-available object after
  0.02 s instead of Flower's 1 s, doubling up to 0.05 s instead of Flower's 10 s
  (:func:`short_pull_backoff`). A message's objects arrive just after the message itself (while
  the sender pushes them), so the first pull often came too early and waited a whole second.

Everything else (TLS, node authentication, the Runtime API, the SuperExec and its ClientApp
processes) is Flower's code as installed. The substitutions are made only where the installed
module still has the names they replace; otherwise the launcher says so and runs Flower unchanged.
"""

from __future__ import annotations

import functools
import logging
import sys
import threading
import time as _time
from collections import deque
from collections.abc import Callable, Sequence

from mor_secure.federation import hops

log = logging.getLogger(__name__)

FLOWER_IDLE_S = 3.0  # the sleep this replaces, after an empty pull (Flower 1.42)
FLOOR_S = 0.02
LOCAL_POLL_S = 0.02
IDLE_FRACTION = 0.125
#: First wait before pulling a not-yet-available object again (Flower 1.42: PULL_INITIAL_BACKOFF = 1 s).
PULL_INITIAL_BACKOFF_S = 0.02
#: Longest wait between two pulls of a missing object (Flower 1.42: PULL_BACKOFF_CAP = 10 s). The
#: waits double from the first, so with a cap of 10 s an object that arrives 0.3 s late could be
#: found up to 0.3 s after it arrived; at 0.05 s it is found at most about 0.05 s after.
PULL_BACKOFF_CAP_S = 0.05
#: Tries per object before the pull fails (Flower 1.42: 500, about 80 minutes at its waits): about
#: 5 minutes at these waits. Objects follow their message by milliseconds on a working link.
PULL_MAX_TRIES = 6000
#: The keyword arguments of Flower's object pulls (``pull_objects``, ``pull_and_inflate_object_from_tree``).
PULL_RETRY = {"initial_backoff": PULL_INITIAL_BACKOFF_S, "backoff_cap": PULL_BACKOFF_CAP_S,
              "max_tries_per_object": PULL_MAX_TRIES}


def idle_wait(idle_s: float, *, floor_s: float = FLOOR_S, ceiling_s: float = FLOWER_IDLE_S,
              fraction: float = IDLE_FRACTION) -> float:
    """Seconds to sleep after an empty pull when the last message came ``idle_s`` seconds ago."""
    return min(ceiling_s, max(floor_s, fraction * max(0.0, idle_s)))


#: :class:`Rhythm`: gaps remembered, gaps needed before it predicts, the share of the shortest
#: remembered gap slept at once, the poll interval inside the expected window (that gap over
#: ``RHYTHM_STEPS``), and up to what multiple of that gap it keeps that interval.
RHYTHM_WINDOW = 5
RHYTHM_MIN_GAPS = 3
RHYTHM_LEAD = 0.8
RHYTHM_STEPS = 10
RHYTHM_SLACK = 2.0


class Rhythm:
    """When the next message is due, learnt from the last gaps; the wait after an empty pull.

    A GRPO run asks every client once per step, so a node's gap between finishing one message
    and receiving the next (the server's step) repeats. Every empty pull costs the SuperLink one
    request, and on a small host the requests of idle polls slow down the ones a round trip
    waits for (BENCHMARKS.md, perf (b)). With at least ``RHYTHM_MIN_GAPS`` gaps remembered (the
    last ``RHYTHM_WINDOW``), a node idle for less than ``RHYTHM_LEAD`` of the shortest sleeps to
    that point at once, then polls every shortest / ``RHYTHM_STEPS`` (at least ``floor_s``) until
    ``RHYTHM_SLACK`` times the shortest; past that, or without enough gaps, it is :func:`idle_wait`
    (so gaps of two kinds, such as a CKKS decryption request just after each score request, poll
    finely only around the short one).

    A gap is known only to lie between the last empty pull and the pull that found the message
    (or between the node's last message and that pull, if no pull was empty): the midpoint is
    remembered. A message that came while the node slept through the lead is remembered as
    ``RHYTHM_LEAD`` of when it was found, so the next lead shortens by that factor again instead
    of settling on its own sleep (its midpoint, half the lead, would halve the next one and put
    many fine pulls before the message). Not thread-safe; its callers hold their own lock.
    """

    def __init__(self, *, floor_s: float = FLOOR_S, ceiling_s: float = FLOWER_IDLE_S,
                 fraction: float = IDLE_FRACTION, window: int = RHYTHM_WINDOW) -> None:
        if not 0 < floor_s <= ceiling_s:
            raise ValueError(f"floor_s must be in (0, ceiling_s={ceiling_s}], got {floor_s}")
        self.floor_s, self.ceiling_s, self.fraction = floor_s, ceiling_s, fraction
        self.gaps: deque[float] = deque(maxlen=window)
        self._empty: float | None = None  # idle time of the last empty pull since the last message
        self._leapt = False  # the last wait was the sleep through the lead

    def observe(self, gap_s: float) -> None:
        """A pull found a message ``gap_s`` seconds after the node's last one ended."""
        if gap_s >= 0:
            if self._leapt:
                self.gaps.append(RHYTHM_LEAD * gap_s)
            else:
                lo = self._empty if self._empty is not None and self._empty <= gap_s else 0.0
                self.gaps.append((lo + gap_s) / 2)
        self._empty, self._leapt = None, False

    def restart(self) -> None:
        """Forget the pulls of a wait that ended without a message (a caller that gave up)."""
        self._empty, self._leapt = None, False

    def lead(self, idle_s: float) -> float:
        """Seconds to sleep before the first pull after a message, ``idle_s`` seconds after it
        ended: the rest of the lead once the rhythm is known, else 0. Flower's loop, the executor
        and the ServerApp each pull once right after a message, which with a known rhythm is an
        empty pull at the moment the replies move, the busiest of the round trip."""
        if len(self.gaps) < RHYTHM_MIN_GAPS:
            return 0.0
        due = RHYTHM_LEAD * min(self.gaps)
        if idle_s >= due:
            return 0.0
        self._leapt = True
        return min(self.ceiling_s, due - idle_s)

    def wait(self, idle_s: float) -> float:
        """Seconds to sleep after an empty pull, ``idle_s`` seconds after the last message ended."""
        self._empty, self._leapt = idle_s, False
        rest = self.lead(idle_s)
        if rest > 0:
            return max(self.floor_s, rest)
        base = idle_wait(idle_s, floor_s=self.floor_s, ceiling_s=self.ceiling_s, fraction=self.fraction)
        if len(self.gaps) >= RHYTHM_MIN_GAPS and idle_s <= RHYTHM_SLACK * min(self.gaps):
            return min(base, max(self.floor_s, min(self.gaps) / RHYTHM_STEPS))
        return base


def simulate_pulls(gaps: Sequence[float], rhythm: Rhythm | None = None) -> tuple[list[int], list[float]]:
    """A model of one node's pulls: after each message it pulls at once (after ``rhythm.lead``,
    with a rhythm), then after each wait (``rhythm.wait``, else :func:`idle_wait`); the k-th next
    message is there ``gaps[k]`` seconds after the last one ended. Pulls take no time. Returns the
    empty pulls and the delay (found - there) of each message."""
    empties, delays = [], []
    for gap in gaps:
        idle, n = (rhythm.lead(0.0) if rhythm is not None else 0.0), 0
        while idle < gap:
            n += 1
            idle += rhythm.wait(idle) if rhythm is not None else idle_wait(idle)
        if rhythm is not None:
            rhythm.observe(idle)
        empties.append(n)
        delays.append(idle - gap)
    return empties, delays


class AdaptiveClock:
    """Stands in for the ``time`` module inside Flower's SuperNode loop module only.

    ``sleep(s)`` with Flower's idle interval (``s >= FLOWER_IDLE_S``) sleeps what its
    :class:`Rhythm` says for the time since ``mark_message()`` or ``arrived()`` was last called
    (``idle_wait`` of it until the rhythm is known); ``before_pull()`` sleeps the rest of the
    rhythm's lead. Shorter sleeps (Flower's 0.5 s waits on local state) sleep at most
    ``local_poll_s``. Every other attribute is the real ``time`` module's.
    """

    def __init__(self, *, floor_s: float = FLOOR_S, ceiling_s: float = FLOWER_IDLE_S,
                 local_poll_s: float = LOCAL_POLL_S, clock: Callable[[], float] = _time.monotonic,
                 sleeper: Callable[[float], None] = _time.sleep) -> None:
        if not 0 < floor_s <= ceiling_s:
            raise ValueError(f"floor_s must be in (0, ceiling_s={ceiling_s}], got {floor_s}")
        if local_poll_s <= 0:
            raise ValueError(f"local_poll_s must be positive, got {local_poll_s}")
        self.floor_s, self.ceiling_s, self.local_poll_s = floor_s, ceiling_s, local_poll_s
        self._clock, self._sleep = clock, sleeper
        self._lock = threading.Lock()
        self._last = clock()
        self.rhythm = Rhythm(floor_s=floor_s, ceiling_s=ceiling_s)
        self.idle_sleeps = 0  # how often the idle branch ran (for the tests and the bench)

    def mark_message(self) -> None:
        with self._lock:
            self._last = self._clock()

    def arrived(self) -> None:
        """A message was pulled: its gap since the node's last mark goes to the rhythm; marks."""
        with self._lock:
            now = self._clock()
            self.rhythm.observe(now - self._last)
            self._last = now

    def before_pull(self) -> None:
        """Sleep through the rest of the rhythm's lead, if any, before the loop's next pull."""
        with self._lock:
            wait = self.rhythm.lead(self._clock() - self._last)
        if wait > 0:
            self._sleep(wait)

    def sleep(self, seconds: float) -> None:
        if seconds >= FLOWER_IDLE_S:
            with self._lock:
                idle = self._clock() - self._last
                self.idle_sleeps += 1
                wait = self.rhythm.wait(idle)
            self._sleep(wait)
        else:
            self._sleep(min(seconds, self.local_poll_s))

    def __getattr__(self, name: str):
        return getattr(_time, name)


def _traced(fn: Callable, event: str, when: Callable[[object], bool],
            then: Callable[[], None] | None = None) -> Callable:
    """``fn``, noting ``event`` in the hop trace (``federation.hops``) after each call whose result
    passes ``when``, and then calling ``then`` (if given)."""
    def call(*args, **kwargs):
        out = fn(*args, **kwargs)
        if when(out):
            hops.note(event)
            if then is not None:
                then()
        return out
    return call


def install(module, clock: AdaptiveClock) -> bool:
    """Put ``clock`` in place of ``module.time``; wrap ``module._pull_and_store_message`` and
    ``module._push_messages`` so that a pulled message, and the end of pushing its reply, mark the
    clock (the node is busy, not idle, in between). Each also notes its moments in the hop trace
    (``federation.hops``; nothing without ``MOR_SECURE_HOP_TRACE``): the message arrived, its
    objects are stored, its reply is pushed. Returns False (and changes nothing) if a name is
    missing or is not what Flower 1.42 has there."""
    pull, push = getattr(module, "_pull_and_store_message", None), getattr(module, "_push_messages", None)
    if getattr(module, "time", None) is not _time or not callable(pull) or not callable(push):
        return False

    def pull_and_mark(*args, **kwargs):
        clock.before_pull()
        arrivals = []
        if "receive" in kwargs:  # the moment the message came, for the clock's rhythm
            kwargs["receive"] = _traced(kwargs["receive"], "supernode.received", lambda got: got is not None,
                                        then=lambda: (clock.arrived(), arrivals.append(1)))
        run_id = pull(*args, **kwargs)
        if run_id is not None:
            hops.note("supernode.stored")
            if not arrivals:
                clock.arrived()
            clock.mark_message()
        return run_id

    def push_and_mark(*args, **kwargs):
        try:
            out = push(*args, **kwargs)
            hops.note("supernode.sent")
            return out
        finally:
            clock.mark_message()

    module._pull_and_store_message, module._push_messages = pull_and_mark, push_and_mark
    module.time = clock
    return True


def short_pull_backoff(module) -> bool:
    """Make ``module.pull_objects`` (Flower's object pull, imported by name into ``module``) retry a
    missing object on ``PULL_RETRY``'s schedule: first after 0.02 s, doubling up to 0.05 s, at most
    ``PULL_MAX_TRIES`` tries. Flower's doubling and its limit on the whole pull's time stay. Returns
    False (and changes nothing) if ``module.pull_objects`` is not Flower's function; True if it is,
    or was already replaced."""
    from flwr.supercore.inflatable import inflatable_utils

    current = getattr(module, "pull_objects", None)
    if isinstance(current, functools.partial) and current.func is inflatable_utils.pull_objects:
        return True
    if current is not inflatable_utils.pull_objects:
        return False
    module.pull_objects = functools.partial(current, **PULL_RETRY)
    return True


def main(argv: Sequence[str], *, floor_s: float = FLOOR_S, local_poll_s: float = LOCAL_POLL_S) -> int:
    """Run ``flower-supernode ARGV`` in this process with the adaptive poll."""
    import flwr
    from flwr.supernode import start_client_internal as loop_module
    from flwr.supernode.cli import flower_supernode

    clock = AdaptiveClock(floor_s=floor_s, local_poll_s=local_poll_s)
    hops.trace_requests()
    pulls = short_pull_backoff(loop_module)
    polls = install(loop_module, clock)
    if pulls != polls:
        print(f"mor-secure: warning: flwr {flwr.__version__}'s SuperNode loop is only partly the one this launcher "
              f"knows: {'the object-pull retry' if pulls else 'the adaptive poll'} is in place, "
              f"{'the adaptive poll' if pulls else 'the object-pull retry'} is Flower's own",
              file=sys.stderr, flush=True)
    elif polls:
        print(f"mor-secure: flower-supernode (flwr {flwr.__version__}) with adaptive polling: after an empty "
              f"pull it sleeps an eighth of the time since its last message, {floor_s:g} s to "
              f"{FLOWER_IDLE_S:g} s, or through most of the gap it learnt messages come in; local waits "
              f"every {local_poll_s:g} s; a missing object is pulled again "
              f"after {PULL_INITIAL_BACKOFF_S:g} s, then at most every {PULL_BACKOFF_CAP_S:g} s", file=sys.stderr,
              flush=True)
    else:
        print(f"mor-secure: warning: flwr {flwr.__version__}'s SuperNode loop is not the one this launcher "
              "knows (flwr.supernode.start_client_internal has no `time` module, no "
              "`_pull_and_store_message`, no `_push_messages` or no Flower `pull_objects`); running flower-supernode unchanged, with "
              "its own polling",
              file=sys.stderr, flush=True)
    sys.argv = ["flower-supernode", *argv]
    flower_supernode()
    return 0
