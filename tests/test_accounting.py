"""Accounting: routes, accountants side by side, independent recomputation, monotonicity."""

from __future__ import annotations

import math

import pytest
from helpers.independent import pld_routes
from hypothesis import given, settings
from hypothesis import strategies as st
from opacus.accountants import RDPAccountant

from mor_secure.privacy.accounting import (
    ACCOUNTANTS,
    client_guarantee,
    epsilon_curve,
    epsilon_dpsgd,
    epsilon_output,
    phase_epsilon,
)
from mor_secure.privacy.events import DpSgdTraining, GaussianScoreRelease, event_to_dict

DELTA = 1e-5


def train(z=1.0, q=0.01, steps=500):
    return DpSgdTraining(noise_multiplier=z, sample_rate=q, steps=steps, max_grad_norm=1.0, num_records=int(1 / q))


def release(z=10.0, count=4, bound=1.0):
    """A release whose noise multiplier (std over L2 sensitivity 2B*sqrt(count)) is ``z``."""
    return GaussianScoreRelease(noise_std=z * 2 * bound * math.sqrt(count), clip_bound=bound, count=count)


trainings = st.builds(train, z=st.floats(0.8, 3.0), q=st.floats(0.005, 0.1), steps=st.integers(10, 400))
releases = st.builds(release, z=st.floats(2.0, 60.0), count=st.integers(1, 16), bound=st.floats(0.5, 5.0))
noiseless = st.builds(GaussianScoreRelease, noise_std=st.just(0.0), clip_bound=st.floats(0.5, 5.0), count=st.integers(1, 16))
event_lists = st.lists(st.one_of(trainings, releases, releases, noiseless), min_size=1, max_size=6)


@settings(max_examples=15, deadline=None)
@given(events=event_lists)
def test_guarantee_matches_independent_pld_within_one_percent(events):
    g = client_guarantee(events, DELTA, accountants=())
    want_dpsgd, want_output = pld_routes(map(event_to_dict, events), DELTA)
    for got, want in ((g.route_dpsgd, want_dpsgd), (g.route_output, want_output)):
        assert got == want if math.isinf(want) else got == pytest.approx(want, rel=0.01, abs=1e-6)
    assert g.epsilon == min(g.route_dpsgd, g.route_output)


@settings(max_examples=15, deadline=None)
@given(events=event_lists, more=st.lists(st.one_of(trainings, releases, noiseless), min_size=1, max_size=2))
def test_epsilon_never_decreases_as_events_are_added(events, more):
    """Every prefix of a ledger states at most the epsilon of any longer prefix: the guarantee, each
    route (the DP-SGD route once it exists), and the curve the report plots."""
    full = events + more
    previous = None
    for k in range(1, len(full) + 1):
        g = client_guarantee(full[:k], DELTA, accountants=())
        now = (g.epsilon, g.route_output, g.route_dpsgd)
        if previous is not None:
            assert all(b >= a * (1 - 1e-9) for a, b in zip(previous[:2], now[:2])), (k, previous, now)
            # the DP-SGD route only exists from the first training on (inf before); then it never decreases
            if math.isfinite(previous[2]):
                assert now[2] >= previous[2] * (1 - 1e-9), (k, previous, now)
        previous = now
    curve = [eps for _, eps in epsilon_curve(full, DELTA)]
    assert len(curve) == len(full) and curve[-1] == previous[0]
    assert all(b >= a * (1 - 1e-9) for a, b in zip(curve, curve[1:])), curve


def test_accountants_side_by_side_agree_with_opacus_directly():
    events = [train(), release(), release(z=20.0)]
    g = client_guarantee(events, DELTA)
    assert set(g.by_accountant["dpsgd"]) == set(ACCOUNTANTS) == set(g.by_accountant["output"])
    opacus = RDPAccountant()
    opacus.history = [(1.0, 0.01, 500)]
    assert g.by_accountant["dpsgd"]["opacus_rdp"] == pytest.approx(opacus.get_epsilon(DELTA))
    assert g.by_accountant["dpsgd"]["dpa_rdp"] == pytest.approx(opacus.get_epsilon(DELTA), rel=1e-3)
    # PLD and PRV are the tight ones; RDP is looser
    for route in ("dpsgd", "output"):
        row = g.by_accountant[route]
        assert row["dpa_pld"] == pytest.approx(row["opacus_prv"], rel=0.02, abs=0.02)  # PRV eps_error=0.01
        assert row["dpa_pld"] <= row["dpa_rdp"]
    assert g.to_dict()["epsilon"] == g.epsilon


def test_route_rules():
    assert epsilon_dpsgd([release()], DELTA) == math.inf  # no DP training: no DP-SGD route
    assert epsilon_output([], DELTA) == 0.0 and epsilon_output([train()], DELTA) == 0.0
    non_private = GaussianScoreRelease(noise_std=0.0, clip_bound=1.0, count=3)
    assert epsilon_output([non_private], DELTA) == math.inf
    dp_client = client_guarantee([train(), non_private, non_private], DELTA, accountants=())
    assert dp_client.route == "dpsgd" and dp_client.epsilon == dp_client.route_dpsgd < math.inf
    # a release recorded before the first training is not covered by it
    before = epsilon_dpsgd([release(z=2.0), train()], DELTA)
    assert before > epsilon_dpsgd([train(), release(z=2.0)], DELTA) == epsilon_dpsgd([train()], DELTA)
    assert epsilon_dpsgd([non_private, train()], DELTA) == math.inf


def test_phase_epsilon_splits_by_phase_and_route():
    entries = [(train(), {"phase": "rm"}), (release(), {"phase": "router"}), (release(), {"phase": "grpo"})]
    assert phase_epsilon(entries, "router", DELTA, "output") == pytest.approx(epsilon_output([release()], DELTA))
    assert phase_epsilon(entries, "rm", DELTA, "output") == 0.0
    assert phase_epsilon(entries, "grpo", DELTA, "dpsgd") == 0.0
    assert phase_epsilon(entries, "rm", DELTA, "dpsgd") == pytest.approx(epsilon_dpsgd([train()], DELTA))
    assert phase_epsilon(entries[1:], "grpo", DELTA, "dpsgd") == math.inf


def test_secondary_accountant_failure_is_noted_not_fatal():
    g = client_guarantee([release(z=0.01)], DELTA, accountants=("opacus_prv",))
    assert g.route_output > 1000 and math.isfinite(g.route_output)
    assert math.isnan(g.by_accountant["output"]["opacus_prv"]) and g.notes


@pytest.mark.parametrize("accountant", ACCOUNTANTS)
def test_one_release_of_k_batches_costs_what_k_releases_cost(accountant):
    """``grpo.steps_per_generation: k`` sends one score request per k GRPO steps: one release of
    k*N scores instead of k releases of N, at the same noise std. Gaussian mechanisms compose
    exactly, so the output route's epsilon must not change (the config's description says so)."""
    sigma, bound, n, k = 1200.0, 5.0, 128, 4  # about epsilon 4
    many = [GaussianScoreRelease(noise_std=sigma, clip_bound=bound, count=n)] * (k * 25)
    one = [GaussianScoreRelease(noise_std=sigma, clip_bound=bound, count=k * n)] * 25
    eps_many, eps_one = epsilon_output(many, DELTA, accountant), epsilon_output(one, DELTA, accountant)
    assert 0 < eps_one < math.inf and eps_one == pytest.approx(eps_many, rel=1e-6)


def test_vacuous_release_is_inf_under_pld_and_finite_under_rdp():
    g = client_guarantee([GaussianScoreRelease(noise_std=1e-6, clip_bound=1.0, count=1)], DELTA, accountants=("dpa_rdp",))
    assert g.route_output == math.inf and 1e5 < g.by_accountant["output"]["dpa_rdp"] < math.inf


def test_curve_is_thinned_and_ends_at_the_last_entry():
    events = [release()] * 30
    curve = epsilon_curve(events, DELTA, max_points=7)
    assert len(curve) <= 7 and curve[0][0] == 1 and curve[-1][0] == 30
    assert curve[-1][1] == pytest.approx(epsilon_output(events, DELTA))
    assert epsilon_curve([], DELTA) == []


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: epsilon_output([], 0.0), "delta must be in \\(0, 1\\). Found 0.0"),
        (lambda: epsilon_output([release()], DELTA, "moments"), "accountant must be one of"),
        (lambda: phase_epsilon([], "x", DELTA, "both"), "route must be one of"),
    ],
)
def test_errors_name_the_bad_value(call, message):
    with pytest.raises(ValueError, match=message):
        call()
