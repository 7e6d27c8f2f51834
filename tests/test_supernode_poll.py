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
    assert sn.idle_wait(1.0) == pytest.approx(0.25)  # a request t s after a reply waits at most ~t/4 more
    assert sn.idle_wait(12.0) == sn.FLOWER_IDLE_S  # an idle node is back to Flower's own 3 s
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
    assert t.slept[-1] == pytest.approx(0.25 * (2.0 + sn.FLOOR_S))
    t.now += 60
    clock.sleep(3)
    assert t.slept[-1] == sn.FLOWER_IDLE_S
    clock.sleep(0.5)  # Flower's wait for its ClientApp's reply (local state)
    assert t.slept[-1] == sn.LOCAL_POLL_S
    clock.sleep(0.001)
    assert t.slept[-1] == 0.001
    assert clock.idle_sleeps == 3
    assert clock.monotonic is time.monotonic and clock.time is time.time  # the rest is the real module


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
    module = types.SimpleNamespace(time=time, _pull_and_store_message=lambda **kw: next(replies))
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


def test_install_changes_nothing_in_a_module_it_does_not_know():
    for module in (types.SimpleNamespace(time=time), types.SimpleNamespace(_pull_and_store_message=print),
                   types.SimpleNamespace(time=object(), _pull_and_store_message=print)):
        before = dict(vars(module))
        assert not sn.install(module, sn.AdaptiveClock())
        assert vars(module) == before


def test_installed_flower_still_has_the_loop_this_replaces():
    """Fails on a Flower whose SuperNode loop changed: the launcher would then run it unchanged
    (and say so), and what BENCHMARKS.md perf (b) says about the poll would no longer hold."""
    from flwr.supernode import start_client_internal as loop

    assert loop.time is time and callable(loop._pull_and_store_message)
    src = inspect.getsource(loop.start_client_internal)
    assert "run_id = _pull_and_store_message(" in src and "time.sleep(3)" in src
    assert "time.sleep(0.5)" in inspect.getsource(loop._push_messages)


def test_cli_needs_flower_arguments(capsys):
    assert main(["client", "supernode"]) == 2
    assert "after `--`" in capsys.readouterr().err
    assert main(["client", "supernode", "--floor-s", "4", "--", "--superlink", "127.0.0.1:1"]) == 2
    assert "--floor-s 4.0" in capsys.readouterr().err
