"""The one-run audit bound (Steinke, Nasr, Jagielski 2023): known values, monotonicity, validity."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from mor_secure.audit.bounds import (
    EPS_FINE_STEP,
    audit_bound,
    epsilon_lower_bound,
    guess_top_bottom,
    p_value,
    rr_accuracy,
)


def logit(p: float) -> float:
    return math.log(p / (1 - p))


def test_all_correct_pure_dp_has_closed_form():
    # delta = 0, v = r: p-value q^r, so the bound is logit(0.05 ** (1 / r)).
    for r in (10, 100, 1000):
        expected = logit(0.05 ** (1 / r))
        assert epsilon_lower_bound(r, r, r, 0.0) == pytest.approx(expected, abs=2 * EPS_FINE_STEP)
        assert epsilon_lower_bound(r, r, r, 0.0) <= expected


def test_pure_dp_bound_is_the_clopper_pearson_lower_limit():
    # With delta = 0 the test is the exact one-sided binomial test: the bound is logit of the
    # one-sided 95% Clopper-Pearson lower limit (= two-sided 90%), computed independently by scipy.
    for r, v in ((100, 95), (200, 150), (50, 40), (1000, 600)):
        low = stats.binomtest(v, r).proportion_ci(confidence_level=0.90, method="exact").low
        assert epsilon_lower_bound(r, r, v, 0.0) == pytest.approx(logit(low), abs=2 * EPS_FINE_STEP)


def test_delta_term_by_hand():
    # m = r = v = 1: beta = q, alpha = P[0 <= Bin(1, q) < 1] / 1 = 1 - q, p = q + 2 m delta (1 - q).
    q, delta = rr_accuracy(1.0), 0.01
    assert p_value(1, 1, 1, 1.0, delta) == pytest.approx(q + 2 * delta * (1 - q))
    assert p_value(5, 3, 0, 2.0, 0.1) == 1.0  # no correct guesses: nothing to reject


def test_no_better_than_chance_gives_zero():
    assert epsilon_lower_bound(1000, 100, 50, 1e-5) == 0.0
    assert epsilon_lower_bound(1000, 100, 10, 1e-5) == 0.0
    assert epsilon_lower_bound(1000, 0, 0, 1e-5) == 0.0


def test_delta_only_weakens_the_bound():
    for delta in (0.0, 1e-6, 1e-5, 1e-3):
        assert epsilon_lower_bound(1000, 100, 95, delta) <= epsilon_lower_bound(1000, 100, 95, 0.0)
    assert epsilon_lower_bound(1000, 100, 95, 1e-3) < epsilon_lower_bound(1000, 100, 95, 1e-6)


@settings(max_examples=40, deadline=None)
@given(r=st.integers(1, 400), data=st.data(), delta=st.sampled_from([0.0, 1e-6, 1e-5]))
def test_monotone_in_correct_guesses(r, data, delta):
    v = data.draw(st.integers(0, r - 1))
    m = data.draw(st.integers(r, 2000))
    assert epsilon_lower_bound(m, r, v, delta) <= epsilon_lower_bound(m, r, v + 1, delta)


@settings(max_examples=40, deadline=None)
@given(eps=st.floats(0.0, 10.0), r=st.integers(1, 300), data=st.data())
def test_p_value_monotone_in_epsilon_for_pure_dp(eps, r, data):
    v = data.draw(st.integers(0, r))
    assert p_value(r, r, v, eps, 0.0) <= p_value(r, r, v, eps + 0.5, 0.0) + 1e-12


def test_higher_confidence_gives_lower_bound():
    assert epsilon_lower_bound(1000, 200, 190, 1e-5, 0.99) < epsilon_lower_bound(1000, 200, 190, 1e-5, 0.95)


@settings(max_examples=25, deadline=None)
@given(eps=st.floats(0.1, 6.0), r=st.integers(5, 500))
def test_exact_false_positive_rate_against_randomised_response(eps, r):
    # eps-DP randomised response is the extreme eps-DP mechanism: each guess is right with
    # probability q = e^eps / (1 + e^eps), independently. The chance that the bound exceeds the
    # true eps, summed exactly over Bin(r, q), must be at most 1 - confidence = 5%.
    q = rr_accuracy(eps)
    lbs = np.array([epsilon_lower_bound(r, r, v, 0.0) for v in range(r + 1)])
    probability = float(stats.binom.pmf(np.arange(r + 1), r, q)[lbs > eps].sum())
    assert probability <= 0.05 + 1e-9


@settings(max_examples=12, deadline=None)
@given(eps=st.floats(0.1, 8.0), m=st.integers(20, 300), seed=st.integers(0, 2**32 - 1),
       delta=st.sampled_from([0.0, 1e-5]))
def test_simulated_randomised_response_audits_stay_below_epsilon(eps, m, seed, delta):
    # 300 simulated one-run audits of eps-DP randomised response over m canaries (all guessed):
    # the bound may exceed eps in at most ~5% of them (plus 3 binomial standard deviations).
    rng = np.random.default_rng(seed)
    trials = 300
    included = rng.random((trials, m)) < 0.5
    truthful = rng.random((trials, m)) < rr_accuracy(eps)
    guesses = np.where(truthful, included, ~included)
    v = (guesses == included).sum(axis=1)
    cache = {int(k): epsilon_lower_bound(m, m, int(k), delta) for k in np.unique(v)}
    exceed = np.mean([cache[int(k)] > eps for k in v])
    assert exceed <= 0.05 + 3 * math.sqrt(0.05 * 0.95 / trials)


def test_guess_top_bottom_counts():
    scores = [5.0, -3.0, 0.1, 4.0, -2.0, 0.0]
    included = [True, False, True, False, True, False]
    g = guess_top_bottom(scores, included, 2, 2)  # top: idx 0 (in), 3 (out); bottom: idx 1 (out), 4 (in)
    assert (g.r, g.v, g.correct_pos, g.correct_neg) == (4, 2, 1, 1)
    assert guess_top_bottom(scores, included, 0, 1).v == 1
    with pytest.raises(ValueError, match="k_pos"):
        guess_top_bottom(scores, included, 4, 4)
    with pytest.raises(ValueError, match="finite"):
        guess_top_bottom([math.nan] * 6, included, 1, 1)


def test_audit_bound_is_bonferroni_over_rules():
    rng = np.random.default_rng(0)
    included = rng.random(500) < 0.5
    scores = np.where(included, 1.0, 0.0) + rng.normal(0, 0.3, 500)
    one = audit_bound(scores, included, [(50, 50)], 1e-5)
    four = audit_bound(scores, included, [(50, 50), (0, 50), (25, 25), (100, 100)], 1e-5)
    g = one.best
    assert one.epsilon_lb == epsilon_lower_bound(500, g.r, g.v, 1e-5, 0.95)
    # each of four rules is tested at 98.75%: the same rule alone gives a larger bound
    same = dict(((r.k_pos, r.k_neg), eps) for r, eps in four.per_rule)[(50, 50)]
    assert same == epsilon_lower_bound(500, g.r, g.v, 1e-5, 1 - 0.05 / 4) <= one.epsilon_lb
    assert four.epsilon_lb == max(eps for _, eps in four.per_rule)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="v <= r <= m"):
        p_value(10, 5, 6, 1.0, 0.0)
    with pytest.raises(ValueError, match="delta"):
        epsilon_lower_bound(10, 5, 5, 1.5)
    with pytest.raises(ValueError, match="confidence"):
        epsilon_lower_bound(10, 5, 5, 0.0, confidence=1.0)
