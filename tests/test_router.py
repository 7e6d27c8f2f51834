"""Phase 2: the router recovers a planted routing; masking renormalises over clients present."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mor_secure.rewards.router import Router, fit_router, masked_weights, mean_entropy, mixture_reward


def planted_problem(n_per_family: int = 60, seed: int = 0):
    """3 families, 3 clients; client k's scores predict the label only on family k."""
    g = torch.Generator().manual_seed(seed)
    k = 3
    fam = torch.arange(k).repeat_interleave(n_per_family)
    n = len(fam)
    features = torch.nn.functional.one_hot(fam, k).float() * 3 + 0.3 * torch.randn(n, 8, generator=g)[:, :k]
    features = torch.cat([features, torch.randn(n, 5, generator=g)], dim=1)
    labels = (torch.rand(n, generator=g) < 0.5).float()
    sign = (labels * 2 - 1)[:, None]
    scores_a = torch.randn(n, k, generator=g)
    scores_b = torch.randn(n, k, generator=g)
    owner = torch.nn.functional.one_hot(fam, k).bool()
    # the owner scores the preferred response higher by a clear margin; others are noise
    scores_a = torch.where(owner, sign * 2 + 0.3 * scores_a, scores_a)
    scores_b = torch.where(owner, -sign * 2 + 0.3 * scores_b, scores_b)
    return fam, features, scores_a, scores_b, labels


def test_router_recovers_planted_routing():
    fam, feats, sa, sb, labels = planted_problem()
    router = Router(feats.shape[1], ["a", "b", "c"])
    present = torch.ones_like(sa, dtype=torch.bool)
    fit = fit_router(router, feats, sa, sb, labels, present, steps=300, lr=0.05, progress=False)
    assert fit.accuracy > 0.95
    _, feats2, *_ = planted_problem(seed=1)  # held-out prompts
    with torch.no_grad():
        w = router.weights(feats2, torch.ones(3, dtype=torch.bool))
    for k in range(3):
        assert w[fam == k, k].mean() > 0.9, f"family {k}: weight on its owner {w[fam == k, k].mean():.2f}"


def test_missing_client_is_masked_and_weights_renormalise():
    logits = torch.tensor([[2.0, 1.0, 0.0]])
    present = torch.tensor([True, False, True])
    w = masked_weights(logits, present)
    assert w[0, 1] == 0 and torch.isclose(w.sum(), torch.tensor(1.0))
    none = masked_weights(logits, torch.zeros(3, dtype=torch.bool))
    assert torch.all(none == 0)


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 6), st.integers(1, 5), st.integers(0, 2**31 - 1))
def test_mixture_ignores_absent_clients_scores(n, k, seed):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, k, generator=g)
    present = torch.rand(n, k, generator=g) > 0.3
    scores = torch.randn(n, k, generator=g)
    scale = torch.rand(k, generator=g) + 0.1
    w = masked_weights(logits, present)
    base = mixture_reward(w, scores, scale, present)
    garbage = torch.where(present, scores, torch.full_like(scores, 1e6))
    assert torch.allclose(mixture_reward(w, garbage, scale, present), base)
    rows = present.any(-1)
    assert torch.allclose(w[rows].sum(-1), torch.ones(int(rows.sum())))


def test_router_save_load(tmp_path):
    router = Router(4, ["x", "y"], hidden=3)
    router.save(tmp_path / "r.pt")
    again = Router.load(tmp_path / "r.pt")
    f = torch.randn(5, 4)
    assert again.clients == ["x", "y"]
    assert torch.allclose(again.logits(f), router.logits(f))


def test_entropy_penalty_concentrates_weight_without_losing_accuracy():
    """The penalty of ``entropy_weight`` sharpens each input's weights onto its owner, at no cost in
    pairwise accuracy. (On the demo's objective set, pure likelihood left the position family's
    owner with 0.34-0.50 of the weight; see the router module's docstring.)"""
    fam, feats, sa, sb, labels = planted_problem()
    present = torch.ones_like(sa, dtype=torch.bool)
    entropy, owner_weight, accuracy = {}, {}, {}
    for entropy_weight in (0.0, 0.05):
        router = Router(feats.shape[1], ["a", "b", "c"])
        fit = fit_router(router, feats, sa, sb, labels, present, steps=300, lr=0.02,
                         entropy_weight=entropy_weight, progress=False)
        with torch.no_grad():
            w = router.weights(feats, present)
        entropy[entropy_weight] = float(mean_entropy(w))
        owner_weight[entropy_weight] = min(float(w[fam == k, k].mean()) for k in range(3))
        accuracy[entropy_weight] = fit.accuracy
    assert entropy[0.05] < 0.5 * entropy[0.0], entropy
    assert owner_weight[0.05] > 0.97, owner_weight
    assert accuracy[0.05] >= accuracy[0.0] - 0.02, accuracy
