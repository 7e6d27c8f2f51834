"""``mor-secure client supernode``: the adaptive poll that replaces Flower's fixed 3 s idle sleep.

The real SuperNode runs through it in ``tests/test_deployment.py`` (TLS, node auth, the MoR job);
here: the schedule, the substitution, and that the installed Flower still has what it replaces.
"""

from __future__ import annotations

import inspect
import time
import types

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mor_secure.cli import main
from mor_secure.deploy import supernode as sn


@given(st.floats(min_value=0, max_value=1e6), st.floats(min_value=0, max_value=1e6))
def test_idle_wait_is_bounded_and_grows_with_idle_time(a, b):
    lo, hi = sorted((a, b))
    assert sn.FLOOR_S <= sn.idle_wait(lo) <= sn.idle_wait(hi) <= sn.FLOWER_IDLE_S


def test_idle_wait_values():
    assert sn.idle_wait(0.0) == sn.FLOOR_S  # right after a message: pull every 0.02 s
    assert sn.idle_wait(1.0) == pytest.approx(0.125)  # a request t s after a reply waits at most ~t/8 more
    assert sn.idle_wait(24.0) == sn.FLOWER_IDLE_S  # an idle node is back to Flower's own 3 s
    assert sn.idle_wait(3600.0) == sn.FLOWER_IDLE_S


class FakeTime:
    def __init__(self):
        self.now, self.slept = 100.0, []

    def clock(self):
        return self.now

    def sleep(self, s):
        self.slept.append(s)
        self.now += s


def test_clock_replaces_the_idle_sleep_and_the_local_waits():
    t = FakeTime()
    clock = sn.AdaptiveClock(clock=t.clock, sleeper=t.sleep)
    clock.mark_message()
    clock.sleep(3)  # Flower's idle sleep right after a message
    assert t.slept[-1] == sn.FLOOR_S
    t.now += 2.0
    clock.sleep(3)
    assert t.slept[-1] == pytest.approx(sn.IDLE_FRACTION * (2.0 + sn.FLOOR_S))
    t.now += 60
    clock.sleep(3)
    assert t.slept[-1] == sn.FLOWER_IDLE_S
    clock.sleep(0.5)  # Flower's wait for its ClientApp's reply (local state)
    assert t.slept[-1] == sn.LOCAL_POLL_S
    clock.sleep(0.001)
    assert t.slept[-1] == 0.001
    assert clock.idle_sleeps == 3
    assert clock.monotonic is time.monotonic and clock.time is time.time  # the rest is the real module


def test_rhythm_waits_like_idle_wait_until_it_has_gaps():
    r = sn.Rhythm()
    for idle in (0.0, 0.5, 2.0, 60.0):
        assert r.wait(idle) == sn.idle_wait(idle)
    for _ in range(sn.RHYTHM_MIN_GAPS - 1):
        r.wait(0.9)
        r.observe(1.0)
    assert r.wait(0.0) == sn.idle_wait(0.0)  # two gaps: no rhythm yet


def test_rhythm_sleeps_through_the_lead_then_polls_finely_then_gives_up():
    r = sn.Rhythm()
    for _ in range(sn.RHYTHM_MIN_GAPS):
        r.wait(0.99)  # an empty pull just before the message
        r.observe(1.01)
    shortest = min(r.gaps)
    assert shortest == pytest.approx(1.0)  # the midpoint of the last empty pull and the one that found it
    assert r.wait(0.0) == pytest.approx(sn.RHYTHM_LEAD * shortest)  # one sleep to the expected window
    assert r.wait(0.5) == pytest.approx(sn.RHYTHM_LEAD * shortest - 0.5)
    assert r.wait(0.85) == pytest.approx(shortest / sn.RHYTHM_STEPS)  # inside it: fine polls
    assert r.wait(2.1) == sn.idle_wait(2.1)  # past twice the shortest gap: idle_wait again
    assert r.wait(100.0) == sn.FLOWER_IDLE_S


def test_rhythm_remembers_the_midpoint_of_what_it_knows():
    r = sn.Rhythm()
    r.observe(1.0)  # found at the first pull after the last message: somewhere in [0, 1]
    assert r.gaps[-1] == 0.5
    r.wait(0.6)
    r.observe(1.0)  # after an empty pull at 0.6
    assert r.gaps[-1] == pytest.approx(0.8)
    r.observe(0.3)  # the empty pull belonged to the previous message
    assert r.gaps[-1] == pytest.approx(0.15)
    r.observe(-1.0)  # a clock step backwards is not a gap
    assert len(r.gaps) == 3
    with pytest.raises(ValueError, match="floor_s"):
        sn.Rhythm(floor_s=0)


@given(st.floats(0.2, 5.0), st.floats(0.0, 0.2), st.integers(0, 2**32 - 1))
def test_a_steady_rhythm_costs_fewer_pulls_and_a_bounded_delay(gap, jitter, seed):
    """Messages every ``gap`` s (+-``jitter``): once learnt, the rhythm pulls fewer times per
    message than ``idle_wait`` alone, and finds each message at most about gap/16 late (or no
    later than ``idle_wait`` would)."""
    import random

    rnd = random.Random(seed)
    gaps = [1000.0] + [gap * (1 + rnd.uniform(-jitter, jitter)) for _ in range(40)]  # a first, long wait
    r = sn.Rhythm()
    empties, delays = sn.simulate_pulls(gaps, r)
    plain, plain_delays = sn.simulate_pulls(gaps)
    learnt = slice(12, None)
    assert sum(empties[learnt]) < sum(plain[learnt]) / 2
    # a remembered midpoint can exceed its gap by half a fine poll, so the poll by 1/32 of itself
    bound = max(sn.FLOOR_S, gap * (1 + jitter) * (1 + 1 / (2 * sn.RHYTHM_STEPS)) / sn.RHYTHM_STEPS) + 1e-9
    assert max(delays[learnt]) <= max(bound, max(plain_delays[learnt]))


def test_gaps_of_two_kinds_poll_finely_only_around_the_short_one():
    """A decryptor client under CKKS gets a decryption request just after each score request:
    gaps alternate short and long. The long ones must not be polled at the short one's pace."""
    gaps = [0.1, 1.0] * 12
    r = sn.Rhythm()
    empties, delays = sn.simulate_pulls(gaps, r)
    plain, _ = sn.simulate_pulls(gaps)
    long_ = slice(13, None, 2)
    assert gaps[13] == 1.0
    assert sum(empties[long_]) <= sum(plain[long_]) + len(empties[long_])
    assert max(delays[long_]) <= 1.0 / 8 + 1e-9  # idle_wait's bound


def test_a_message_earlier_than_the_rhythm_shortens_the_lead_geometrically():
    r = sn.Rhythm()
    sn.simulate_pulls([2.0] * 5, r)
    due = sn.RHYTHM_LEAD * min(r.gaps)
    assert 1.4 < due < 1.6
    empties, delays = sn.simulate_pulls([0.4] * 12, r)  # the server's steps got faster
    assert delays[0] == pytest.approx(due - 0.4)  # the first came during the lead: found at its end
    assert delays[1] == pytest.approx(sn.RHYTHM_LEAD ** 2 * due - 0.4)  # remembered as the lead of when it was found
    assert all(b < a for a, b in zip(delays[:4], delays[1:4]))
    assert max(delays[6:]) <= 0.4 / sn.RHYTHM_STEPS + 1e-9  # then found within a fine poll of when it came


def test_lead_is_the_rest_of_the_expected_gap_and_is_remembered_as_such():
    r = sn.Rhythm()
    assert r.lead(0.0) == 0.0  # no rhythm: pull at once
    for _ in range(sn.RHYTHM_MIN_GAPS):
        r.wait(0.95)
        r.observe(1.05)
    assert r.lead(0.0) == pytest.approx(sn.RHYTHM_LEAD)
    assert r.lead(0.5) == pytest.approx(sn.RHYTHM_LEAD - 0.5)
    assert r.lead(0.9) == 0.0  # past the lead: pull
    r.lead(0.0)
    r.observe(0.8)  # found at the first pull after the lead: it may have come at any point of it
    assert r.gaps[-1] == pytest.approx(sn.RHYTHM_LEAD * 0.8)
    assert sn.Rhythm(ceiling_s=0.25).lead(0.0) == 0.0
    capped = sn.Rhythm(ceiling_s=0.25)
    for _ in range(sn.RHYTHM_MIN_GAPS):
        capped.observe(2.0)
    assert capped.lead(0.0) == 0.25  # one sleep is at most the ceiling


def test_clock_learns_the_rhythm_from_arrivals():
    t = FakeTime()
    clock = sn.AdaptiveClock(clock=t.clock, sleeper=t.sleep)
    for _ in range(sn.RHYTHM_MIN_GAPS):
        clock.mark_message()  # a reply pushed
        t.now += 0.99
        clock.sleep(3)  # an empty pull
        t.now = t.now - t.slept[-1] + 0.02
        clock.arrived()  # the next message, 1.01 s after the reply
    clock.mark_message()
    clock.sleep(3)
    assert t.slept[-1] == pytest.approx(sn.RHYTHM_LEAD * min(clock.rhythm.gaps))
    assert 0.7 < t.slept[-1] < 0.85
    clock.mark_message()
    before = len(t.slept)
    clock.before_pull()  # Flower's loop pulls right after a reply: with a rhythm it first sleeps the lead
    assert len(t.slept) == before + 1 and t.slept[-1] == pytest.approx(sn.RHYTHM_LEAD * min(clock.rhythm.gaps))
    clock.before_pull()  # past the lead: no sleep
    assert len(t.slept) == before + 1


def test_clock_refuses_bad_settings():
    with pytest.raises(ValueError, match="floor_s"):
        sn.AdaptiveClock(floor_s=0)
    with pytest.raises(ValueError, match="floor_s"):
        sn.AdaptiveClock(floor_s=5)
    with pytest.raises(ValueError, match="local_poll_s"):
        sn.AdaptiveClock(local_poll_s=0)


def test_install_wraps_the_pull_so_a_message_resets_the_schedule():
    t = FakeTime()
    replies = iter([None, 7, None])
    module = types.SimpleNamespace(time=time, _pull_and_store_message=lambda **kw: next(replies),
                                   _push_messages=lambda **kw: None)
    clock = sn.AdaptiveClock(clock=t.clock, sleeper=t.sleep)
    assert sn.install(module, clock)
    assert module.time is clock
    t.now += 60
    assert module._pull_and_store_message(state=None) is None
    module.time.sleep(3)
    assert t.slept[-1] == sn.FLOWER_IDLE_S  # no message for 60 s: Flower's interval
    assert module._pull_and_store_message(state=None) == 7  # a message arrives
    assert module._pull_and_store_message(state=None) is None
    module.time.sleep(3)
    assert t.slept[-1] == sn.FLOOR_S
    t.now += 8.0  # the ClientApp worked 8 s on that message; pushing its reply marks the clock again
    module._push_messages(state=None)
    module.time.sleep(3)
    assert t.slept[-1] == sn.FLOOR_S


def test_install_changes_nothing_in_a_module_it_does_not_know():
    for module in (types.SimpleNamespace(time=time, _push_messages=print),
                   types.SimpleNamespace(_pull_and_store_message=print, _push_messages=print),
                   types.SimpleNamespace(time=time, _pull_and_store_message=print),
                   types.SimpleNamespace(time=object(), _pull_and_store_message=print, _push_messages=print)):
        before = dict(vars(module))
        assert not sn.install(module, sn.AdaptiveClock())
        assert vars(module) == before


def test_installed_flower_still_has_the_loop_this_replaces():
    """Fails on a Flower whose SuperNode loop changed: the launcher would then run it unchanged
    (and say so), and what BENCHMARKS.md perf (b) says about the poll would no longer hold."""
    from flwr.supernode import start_client_internal as loop

    from flwr.superlink.grid import http_grid
    from flwr.supercore.inflatable import inflatable_utils

    assert loop.time is time and callable(loop._pull_and_store_message) and callable(loop._push_messages)
    src = inspect.getsource(loop.start_client_internal)
    assert "run_id = _pull_and_store_message(" in src and "time.sleep(3)" in src and "_push_messages(" in src
    assert "time.sleep(0.5)" in inspect.getsource(loop._push_messages)
    # the object pulls whose first retry is shortened: the SuperNode's and the SuperLink grid's
    assert "pull_objects(" in inspect.getsource(loop._pull_and_store_message)
    assert "pull_objects(" in inspect.getsource(http_grid.HttpGrid)
    assert inspect.signature(inflatable_utils.pull_objects).parameters["initial_backoff"].default == 1
    for fn in (inflatable_utils.pull_objects, inflatable_utils.pull_and_inflate_object_from_tree):
        assert set(sn.PULL_RETRY) <= set(inspect.signature(fn).parameters), fn  # the executor's pull takes them too
    # the hop trace wraps `receive`, which the loop passes by keyword
    assert "receive=receive" in src


def test_cli_needs_flower_arguments(capsys):
    assert main(["client", "supernode"]) == 2
    assert "after `--`" in capsys.readouterr().err
    assert main(["client", "supernode", "--floor-s", "4", "--", "--superlink", "127.0.0.1:1"]) == 2
    assert "--floor-s 4.0" in capsys.readouterr().err


def test_short_pull_backoff_keeps_flowers_function_with_shorter_waits():
    from flwr.supercore.inflatable import inflatable_utils

    module = types.SimpleNamespace(pull_objects=inflatable_utils.pull_objects)
    assert sn.short_pull_backoff(module)
    assert module.pull_objects.func is inflatable_utils.pull_objects
    assert module.pull_objects.keywords == {"initial_backoff": 0.02, "backoff_cap": 0.05,
                                            "max_tries_per_object": sn.PULL_MAX_TRIES}  # the limit on time: Flower's
    assert 60 <= sn.PULL_MAX_TRIES * sn.PULL_BACKOFF_CAP_S <= 600  # a missing object fails the pull in minutes
    assert sn.short_pull_backoff(module) and module.pull_objects.func is inflatable_utils.pull_objects  # idempotent
    assert not sn.short_pull_backoff(types.SimpleNamespace(pull_objects=print))
    assert not sn.short_pull_backoff(types.SimpleNamespace())


def test_a_missing_object_is_pulled_again_after_the_short_backoff():
    """Flower's own pull_objects with the substituted first wait: an object that is there only at
    the third try is fetched after 0.02 + 0.04 s of backoff, where Flower's waits 1 + 2 s."""
    from flwr.supercore.inflatable import inflatable_utils
    from flwr.supercore.inflatable.inflatable_utils import ObjectUnavailableError

    module = types.SimpleNamespace(pull_objects=inflatable_utils.pull_objects)
    assert sn.short_pull_backoff(module)
    tries = []

    def pull(obj_id):
        tries.append(obj_id)
        if len(tries) < 3:
            raise ObjectUnavailableError(obj_id)
        return b"content"

    start = time.monotonic()
    assert module.pull_objects(["a"], pull_object_fn=pull) == {"a": b"content"}
    assert len(tries) == 3 and time.monotonic() - start < 1.0  # Flower's first retry alone waits 0.8-1.2 s


def test_a_late_object_is_found_soon_after_it_arrives():
    """The waits between pulls of a missing object stop doubling at 0.05 s: an object 0.5 s late
    is tried at least every ~0.06 s (Flower's doubling would wait 0.16 s, then 0.32 s)."""
    from flwr.supercore.inflatable import inflatable_utils
    from flwr.supercore.inflatable.inflatable_utils import ObjectUnavailableError

    module = types.SimpleNamespace(pull_objects=inflatable_utils.pull_objects)
    assert sn.short_pull_backoff(module)
    arrives, tries = time.monotonic() + 0.5, []

    def pull(obj_id):
        tries.append(time.monotonic())
        if tries[-1] < arrives:
            raise ObjectUnavailableError(obj_id)
        return b"content"

    assert module.pull_objects(["a"], pull_object_fn=pull) == {"a": b"content"}
    gaps = [b - a for a, b in zip(tries, tries[1:])]
    assert len(tries) >= 6 and max(gaps) < 0.15, gaps  # 0.06 s with jitter, slack for a busy machine


@pytest.mark.parametrize("flower_loop", ["known", "pull_changed", "loop_changed", "both_changed"])
def test_launcher_says_what_it_substituted(flower_loop, monkeypatch, capsys):
    """`main` on the real loop module (restored afterwards), with Flower's SuperNode itself
    replaced by a stub that records its argv: it names every substitution it could not make."""
    import sys as _sys

    from flwr.supernode import start_client_internal as loop
    from flwr.supernode import cli as flower_cli

    for name in ("time", "_pull_and_store_message", "_push_messages", "pull_objects"):
        monkeypatch.setattr(loop, name, getattr(loop, name))  # restored at teardown, whatever main does
    if flower_loop in ("pull_changed", "both_changed"):
        monkeypatch.setattr(loop, "pull_objects", lambda *a, **k: {})
    if flower_loop in ("loop_changed", "both_changed"):
        monkeypatch.delattr(loop, "_push_messages")
    ran = []
    monkeypatch.setattr(flower_cli, "flower_supernode", lambda: ran.append(list(_sys.argv)))
    monkeypatch.setattr(_sys, "argv", list(_sys.argv))
    assert sn.main(["--superlink", "127.0.0.1:1"]) == 0
    assert ran == [["flower-supernode", "--superlink", "127.0.0.1:1"]]  # Flower's own command, arguments as given
    err = capsys.readouterr().err
    expected = {"known": "with adaptive polling", "pull_changed": "the adaptive poll is in place",
                "loop_changed": "the object-pull retry is in place", "both_changed": "running flower-supernode unchanged"}
    assert expected[flower_loop] in err, err
    assert (loop.time is time) == (flower_loop in ("loop_changed", "both_changed"))
