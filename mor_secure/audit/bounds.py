"""Epsilon lower bounds from one training run (Steinke, Nasr and Jagielski, 2023).

Reference: T. Steinke, M. Nasr, M. Jagielski, "Privacy Auditing with One (1) Training Run",
NeurIPS 2023, arXiv:2305.08846. The game: ``m`` canaries, each included in the training data
independently with probability 1/2; after ONE run the auditor guesses membership for ``r`` of
them (abstaining on the rest) and gets ``v`` right. If the training is ``(epsilon, delta)``-DP
with respect to adding/removing one canary, then (the paper's main result for approximate DP;
its Appendix D computes the same p-value)::

    P[W >= v]  <=  f(v) + 2 m delta max_{i = 1..v} (f(v - i) - f(v)) / i,
    f(u) = P[Binomial(r, q) >= u],   q = e^eps / (1 + e^eps)

where ``W`` is the number of correct guesses and ``q`` is the accuracy of ``eps``-DP randomised
response. With ``delta = 0`` this is the pure-DP case: W is dominated by ``Binomial(r, q)``. The
right-hand side is the p-value of the null hypothesis "the training is (eps, delta)-DP"; the
epsilon lower bound at confidence ``c`` is the largest ``eps`` that the test rejects at level
``1 - c``.

Everything here is a pure function of integers and floats; nothing is trained or stored.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats

EPS_GRID_STEP = 0.1  # coarse scan of epsilon
EPS_FINE_STEP = 1e-4  # refinement inside the first coarse interval where the test stops rejecting
EPS_SCAN_MAX = 50.0  # beyond this the binomial tails underflow; no audit here comes close


def _check_counts(m: int, r: int, v: int) -> None:
    for name, value in (("m", m), ("r", r), ("v", v)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise ValueError(f"{name} must be an integer. Found {value!r}.")
    if not 0 <= v <= r <= m:
        raise ValueError(f"need 0 <= v <= r <= m (correct <= guesses <= canaries). Found m={m}, r={r}, v={v}.")


def _check_delta(delta: float) -> None:
    if not isinstance(delta, (int, float)) or isinstance(delta, bool) or not 0 <= delta <= 1:
        raise ValueError(f"delta must be a number in [0, 1]. Found {delta!r}.")


def rr_accuracy(epsilon: float) -> float:
    """Accuracy ``e^eps / (1 + e^eps)`` of eps-DP randomised response: the best any eps-DP guess can do."""
    if not epsilon >= 0:
        raise ValueError(f"epsilon must be >= 0. Found {epsilon!r}.")
    return 1.0 / (1.0 + math.exp(-epsilon))


def _p_values(m: int, r: int, v: int, epsilons: np.ndarray, delta: float) -> np.ndarray:
    """:func:`p_value` at every epsilon of ``epsilons`` (vectorised; arguments already checked)."""
    if v == 0:
        return np.ones_like(epsilons)
    q = 1.0 / (1.0 + np.exp(-epsilons))  # (G,)
    beta = stats.binom.sf(v - 1, r, q)  # f(v) = P[Bin(r, q) >= v]
    if delta == 0:
        return np.minimum(1.0, beta)
    i = np.arange(1, v + 1)  # (v,)
    # f(v - i) - f(v) = P[v - i <= Bin(r, q) <= v - 1] = cdf(v - 1) - cdf(v - i - 1)
    window = stats.binom.cdf(v - 1, r, q)[:, None] - stats.binom.cdf(v - i[None, :] - 1, r, q[:, None])  # (G, v)
    alpha = np.max(window / i[None, :], axis=1)
    return np.minimum(1.0, beta + 2 * m * delta * alpha)


def p_value(m: int, r: int, v: int, epsilon: float, delta: float) -> float:
    """Probability, under the null "(epsilon, delta)-DP", of at least ``v`` correct guesses out of ``r``
    with ``m`` canaries (Steinke et al. 2023; the pure-DP binomial tail when ``delta == 0``)."""
    _check_counts(m, r, v)
    _check_delta(delta)
    rr_accuracy(epsilon)  # checks epsilon
    return float(_p_values(m, r, v, np.array([float(epsilon)]), delta)[0])


def epsilon_lower_bound(m: int, r: int, v: int, delta: float, confidence: float = 0.95) -> float:
    """Largest epsilon such that every eps' <= epsilon is rejected by :func:`p_value` at level
    ``1 - confidence``: with probability >= ``confidence`` the training is not (eps', delta)-DP for
    any eps' below the returned value. 0.0 when even epsilon = 0 is not rejected.

    Taking the *first* crossing (not a bisection's arbitrary one) keeps the bound valid where the
    p-value is not monotone in epsilon (the delta term need not be; with ``delta == 0`` it is): if
    the true epsilon lay below the returned value, the test at the true epsilon rejected, which
    happens with probability <= 1 - confidence. The p-value is evaluated on a grid of step
    ``EPS_GRID_STEP``, then ``EPS_FINE_STEP`` inside the first coarse interval where it stops
    rejecting; the result is rounded down onto the fine grid.
    """
    _check_counts(m, r, v)
    _check_delta(delta)
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1). Found {confidence!r}.")
    level = 1.0 - confidence
    coarse = np.arange(0.0, EPS_SCAN_MAX + EPS_GRID_STEP / 2, EPS_GRID_STEP)
    kept = _p_values(m, r, v, coarse, delta) > level  # not rejected
    if kept[0]:
        return 0.0
    if not kept.any():
        return EPS_SCAN_MAX
    j = int(np.argmax(kept))  # first coarse point not rejected; coarse[j - 1] was rejected
    fine = np.arange(coarse[j - 1], coarse[j] + EPS_FINE_STEP / 2, EPS_FINE_STEP)
    fine_kept = _p_values(m, r, v, fine, delta) > level
    return float(fine[int(np.argmax(fine_kept)) - 1])


@dataclass(frozen=True)
class Guesses:
    """The outcome of one guessing rule: ``r`` guesses, ``v`` of them right."""

    k_pos: int  # top-k scored canaries guessed "included"
    k_neg: int  # bottom-k scored canaries guessed "excluded"
    r: int
    v: int
    correct_pos: int
    correct_neg: int


def guess_top_bottom(scores: Sequence[float], included: Sequence[bool], k_pos: int, k_neg: int) -> Guesses:
    """Guess "included" for the ``k_pos`` highest scores and "excluded" for the ``k_neg`` lowest;
    abstain on the rest. Ties are broken by canary index (a rule fixed before the run)."""
    scores = np.asarray(scores, dtype=float)
    included = np.asarray(included, dtype=bool)
    if scores.shape != included.shape or scores.ndim != 1:
        raise ValueError(f"scores and included must be 1-D of equal length. Found {scores.shape} and {included.shape}.")
    if not np.all(np.isfinite(scores)):
        raise ValueError("scores must be finite; a canary scored NaN or inf (did training diverge?).")
    if k_pos < 0 or k_neg < 0 or k_pos + k_neg > len(scores):
        raise ValueError(f"need k_pos, k_neg >= 0 and k_pos + k_neg <= m={len(scores)}. Found {k_pos}, {k_neg}.")
    order = np.lexsort((np.arange(len(scores)), scores))  # ascending score, then index
    neg, pos = order[:k_neg], order[len(order) - k_pos:] if k_pos else order[:0]
    correct_pos, correct_neg = int(included[pos].sum()), int((~included[neg]).sum())
    return Guesses(k_pos, k_neg, k_pos + k_neg, correct_pos + correct_neg, correct_pos, correct_neg)


@dataclass(frozen=True)
class AuditBound:
    """The reported bound: the best over the pre-declared guessing rules, each tested at
    ``(1 - confidence) / len(rules)`` (Bonferroni), so the maximum is itself valid at ``confidence``."""

    epsilon_lb: float
    confidence: float
    delta: float
    m: int
    best: Guesses
    per_rule: tuple[tuple[Guesses, float], ...]


def audit_bound(scores: Sequence[float], included: Sequence[bool], rules: Sequence[tuple[int, int]],
                delta: float, confidence: float = 0.95) -> AuditBound:
    """Epsilon lower bound from canary scores and the true inclusion bits, over the guessing
    ``rules`` ``[(k_pos, k_neg), ...]`` declared before the run (Bonferroni-corrected)."""
    if not rules:
        raise ValueError("rules must list at least one (k_pos, k_neg) guessing rule.")
    m = len(scores)
    per_rule_confidence = 1.0 - (1.0 - confidence) / len(rules)
    results = []
    for k_pos, k_neg in rules:
        g = guess_top_bottom(scores, included, k_pos, k_neg)
        results.append((g, epsilon_lower_bound(m, g.r, g.v, delta, per_rule_confidence)))
    best, eps = max(results, key=lambda item: item[1])
    return AuditBound(eps, confidence, delta, m, best, tuple(results))
