"""Budgets: validation, refusal before any write, the min-of-routes semantics, phase caps, planning."""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import HealthCheck, given, settings
from helpers.independent import pld_routes
from hypothesis import strategies as st
from opacus.accountants import PRVAccountant, RDPAccountant

from mor_secure.errors import BudgetExceededError, ConfigError
from mor_secure.privacy.accounting import client_guarantee, epsilon_dpsgd, epsilon_output
from mor_secure.privacy.budget import Budget, BudgetGuard, remaining
from mor_secure.privacy.events import DpSgdTraining, GaussianScoreRelease, event_to_dict
from mor_secure.privacy.ledger import Ledger, generate_signing_key
from mor_secure.privacy.planner import calibrate_dpsgd, plan_budget

DELTA = 1e-5
TRAIN = DpSgdTraining(noise_multiplier=1.0, sample_rate=0.01, steps=500, max_grad_norm=1.0, num_records=100)  # eps ~1.2
NO_NOISE = GaussianScoreRelease(noise_std=0.0, clip_bound=1.0, count=8)


def ctx(phase="grpo"):
    return {"run_id": "r1", "phase": phase, "purpose": "test"}


def noised(z: float) -> GaussianScoreRelease:
    return GaussianScoreRelease(noise_std=z * 2 * math.sqrt(8), clip_bound=1.0, count=8)


@pytest.fixture
def ledger(tmp_path):
    return Ledger(tmp_path / "ledger.jsonl", signing_key=generate_signing_key(tmp_path / "k.pem"))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"epsilon": -1, "delta": DELTA}, r"budget.epsilon must be a finite number > 0. Found -1."),
        ({"epsilon": math.inf, "delta": DELTA}, r"budget.epsilon .* Found inf"),
        ({"epsilon": 1.0, "delta": 1.5}, r"budget.delta must be in \(0, 1\).* Found 1.5"),
        ({"epsilon": 1.0, "delta": DELTA, "phase_caps": {"grpo": 2.0}}, r"phase_caps\['grpo'\] must be in \(0, budget.epsilon=1.0\]. Found 2.0"),
    ],
)
def test_budget_validation_names_field_and_value(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        Budget(**kwargs)


def test_budget_from_dict_and_frozen():
    b = Budget.from_dict({"epsilon": 2, "delta": DELTA, "phase_caps": {"grpo": 1}})
    assert b.to_dict() == {"epsilon": 2, "delta": DELTA, "phase_caps": {"grpo": 1}}
    with pytest.raises(ConfigError, match="budget.delta is missing"):
        Budget.from_dict({"epsilon": 2})
    with pytest.raises(ConfigError, match="unknown keys \\['eps'\\]"):
        Budget.from_dict({"eps": 2, "epsilon": 2, "delta": DELTA})
    with pytest.raises(TypeError):
        b.phase_caps["x"] = 1  # read-only
    with pytest.raises(AttributeError):
        b.epsilon = 3


def test_release_crossing_the_budget_is_refused_and_nothing_written(ledger):
    guard = BudgetGuard(ledger, Budget(epsilon=1.0, delta=DELTA))
    release = noised(3.0)  # eps ~ 1.6 for one: never fits
    small = noised(10.0)
    allowed = 0
    with pytest.raises(BudgetExceededError) as info:
        while True:
            guard.authorize(small, ctx())
            allowed += 1
    assert allowed >= 1
    err = info.value
    assert err.budget == 1.0 and err.phase is None and err.requested_epsilon > 1.0
    assert err.requested_epsilon == pytest.approx(epsilon_output([small] * (allowed + 1), DELTA))
    assert "nothing written" in str(err)
    assert epsilon_output([small] * allowed, DELTA) <= 1.0
    size = ledger.path.stat().st_size
    with pytest.raises(BudgetExceededError):
        guard.authorize(release, ctx())
    assert ledger.path.stat().st_size == size and len(ledger) == allowed
    assert 0 <= guard.remaining() == remaining(ledger, guard.budget) < 1.0


def test_dp_trained_client_releases_for_free_non_dp_client_does_not(ledger, tmp_path):
    guard = BudgetGuard(ledger, Budget(epsilon=2.0, delta=DELTA))
    with pytest.raises(BudgetExceededError):
        guard.authorize(NO_NOISE, ctx())  # no DP training yet: a noiseless release is infinite epsilon
    guard.authorize(TRAIN, ctx("rm_training"))
    assert guard.remaining() == 2.0  # training releases nothing
    guard.authorize(NO_NOISE, ctx())  # from now on the DP-SGD route states the guarantee
    left = guard.remaining()
    assert left == pytest.approx(2.0 - client_guarantee([TRAIN], DELTA).route_dpsgd)
    for _ in range(5):
        guard.authorize(NO_NOISE, ctx())  # post-processing of a DP model: free
    assert guard.remaining() == left and len(ledger) == 7


def test_training_beyond_the_budget_is_refused(ledger):
    guard = BudgetGuard(ledger, Budget(epsilon=0.5, delta=DELTA))
    with pytest.raises(BudgetExceededError, match="dpsgd route"):
        guard.authorize(TRAIN, ctx("rm_training"))
    assert len(ledger) == 0


def test_phase_caps(ledger):
    guard = BudgetGuard(ledger, Budget(epsilon=3.0, delta=DELTA, phase_caps={"router_fit": 0.5}))
    guard.authorize(noised(10.0), ctx("router_fit"))
    with pytest.raises(BudgetExceededError) as info:
        for _ in range(20):
            guard.authorize(noised(10.0), ctx("router_fit"))
    assert info.value.phase == "router_fit" and info.value.budget == 0.5
    guard.authorize(noised(10.0), ctx("grpo"))  # other phases still spend the overall budget


def test_caps_do_not_bind_releases_the_dpsgd_route_covers(ledger):
    guard = BudgetGuard(ledger, Budget(epsilon=2.0, delta=DELTA, phase_caps={"grpo": 0.3}))
    guard.authorize(TRAIN, ctx("rm_training"))
    for _ in range(3):  # output route ~0.6 > cap, but the DP-SGD route spends 0 in grpo
        guard.authorize(noised(8.0), ctx("grpo"))
    assert len(ledger) == 4


def _train(z: float, q: float, steps: int) -> DpSgdTraining:
    return DpSgdTraining(noise_multiplier=z, sample_rate=q, steps=steps, max_grad_norm=1.0, num_records=int(1 / q))


_steps = st.one_of(
    st.builds(noised, st.floats(1.0, 30.0)),
    st.builds(_train, st.floats(0.7, 3.0), st.floats(0.005, 0.1), st.integers(10, 500)),
    st.just(NO_NOISE),
)


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(requests=st.lists(_steps, min_size=1, max_size=6), eps=st.floats(0.3, 4.0))
def test_authorize_accepts_exactly_what_fits(tmp_path_factory, requests, eps):
    """Each request is allowed iff the ledger plus it stays within the budget by an independent
    dp-accounting PLD computation (and a training's own DP-SGD route fits: it could cover nothing
    otherwise); a refused one leaves the ledger byte for byte as it was."""
    d = tmp_path_factory.mktemp("l")
    guard = BudgetGuard(Ledger(d / "ledger.jsonl", signing_key=generate_signing_key(d / "k.pem")), Budget(epsilon=eps, delta=DELTA))
    accepted, decided = [], 0
    for event in requests:
        dpsgd, output = pld_routes(map(event_to_dict, [*accepted, event]), DELTA)
        needed = dpsgd if isinstance(event, DpSgdTraining) else min(dpsgd, output)
        before = guard.ledger.path.read_bytes() if guard.ledger.path.exists() else b""
        try:
            guard.authorize(event, ctx())
            allowed = True
        except BudgetExceededError as exc:
            allowed = False
            assert exc.requested_epsilon > exc.budget
            assert (guard.ledger.path.read_bytes() if guard.ledger.path.exists() else b"") == before
        if not math.isclose(needed, eps, rel_tol=0.01):  # the two PLD computations agree within 1%
            assert allowed == (needed <= eps), (event, needed, eps, accepted)
            decided += 1
        if allowed:
            accepted.append(event)
    assert [e for e, _ in guard.ledger.events()] == accepted
    assert guard.remaining() == pytest.approx(max(0.0, eps - min(pld_routes(map(event_to_dict, accepted), DELTA))), rel=0.01, abs=1e-3)


def test_plan_dpsgd_meets_target_per_opacus_and_guard_accepts_it(ledger):
    target = 2.0
    plan = plan_budget(target_epsilon=target, delta=DELTA, num_records=500, epochs=2, batch_size=25,
                       score_releases=40, score_count=8, clip_bound=1.0)
    d = plan.dpsgd
    assert (d.steps_per_epoch, d.sample_rate, d.steps) == (20, 0.05, 40)
    opacus = PRVAccountant()
    opacus.history = [(d.noise_multiplier, d.sample_rate, d.steps)]
    assert target * 0.97 <= opacus.get_epsilon(DELTA) <= target
    assert d.epsilon["dpa_pld"] <= target and d.epsilon["dpa_pld"] == pytest.approx(target, rel=0.03)
    o = plan.output
    assert o.epsilon["dpa_pld"] <= target and o.epsilon["dpa_pld"] == pytest.approx(target, rel=0.01)
    assert o.noise_multiplier == pytest.approx(o.noise_std / (2 * math.sqrt(8)))
    assert "noise_multiplier" in plan.render() and plan.to_dict()["output"]["releases"] == 40
    # the planned run fits a budget of the target: training, then free releases
    guard = BudgetGuard(ledger, Budget(epsilon=target, delta=DELTA))
    guard.authorize(d.event(max_grad_norm=1.0), ctx("rm_training"))


def test_plan_output_route_alone_fits_then_one_more_is_refused(ledger):
    plan = plan_budget(target_epsilon=1.0, delta=DELTA, num_records=500, epochs=None, batch_size=25,
                       score_releases=5, score_count=4, clip_bound=2.0, opacus_accountant="rdp")
    assert plan.dpsgd is None
    guard = BudgetGuard(ledger, Budget(epsilon=1.0, delta=DELTA))
    for _ in range(5):
        guard.authorize(plan.output.event(), ctx())
    with pytest.raises(BudgetExceededError):
        guard.authorize(plan.output.event(), ctx())


def test_plan_rdp_accountant_meets_target_per_opacus_rdp():
    plan = plan_budget(target_epsilon=4.0, delta=DELTA, num_records=300, epochs=3, batch_size=30, opacus_accountant="rdp")
    opacus = RDPAccountant()
    opacus.history = [(plan.dpsgd.noise_multiplier, plan.dpsgd.sample_rate, plan.dpsgd.steps)]
    assert 4.0 * 0.97 <= opacus.get_epsilon(DELTA) <= 4.0
    assert plan.output is None


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"delta": 0.01}, r"delta must be in \(0, 1/num_records = 0.002\). Found 0.01"),
        ({"batch_size": 1000}, r"batch_size must be <= num_records=500. Found 1000"),
        ({"score_releases": 3, "score_count": 2}, r"clip_bound .* Found None"),
        ({"epochs": 0}, r"epochs must be an integer >= 1. Found 0"),
    ],
)
def test_plan_errors_name_the_bad_value(kwargs, message):
    args = {"target_epsilon": 1.0, "delta": DELTA, "num_records": 500, "epochs": 1, "batch_size": 50, **kwargs}
    with pytest.raises(ConfigError, match=message):
        plan_budget(**args)


def test_plan_by_phase_composes_to_the_whole_and_the_guard_accepts_the_run(ledger):
    plan = plan_budget(target_epsilon=2.0, delta=DELTA, num_records=400, epochs=2, batch_size=40,
                       score_count=4, clip_bound=1.0, phase_releases={"router_fit": 1, "grpo": 12})
    rows = {r["phase"]: r for r in plan.phases()}
    assert list(rows) == ["rm_training", "router_fit", "grpo"] and plan.output.releases == 13
    release = plan.output.event()
    assert rows["grpo"]["output"] == pytest.approx(epsilon_output([release] * 12, DELTA))
    assert rows["grpo"]["output_cumulative"] == pytest.approx(epsilon_output([release] * 13, DELTA))
    assert rows["grpo"]["output_cumulative"] <= 2.0
    assert rows["router_fit"]["output"] < rows["grpo"]["output"] < rows["grpo"]["output_cumulative"]
    assert rows["rm_training"]["dpsgd"] == plan.dpsgd.epsilon["dpa_pld"] and rows["grpo"]["dpsgd"] == 0.0
    # the stated guarantee after each phase is what the guard computes from the ledger of that run
    guard = BudgetGuard(ledger, Budget(epsilon=2.0, delta=DELTA))
    guard.authorize(plan.dpsgd.event(max_grad_norm=1.0), ctx("rm_training"))
    for phase, n in plan.output.phase_releases.items():
        for _ in range(n):
            guard.authorize(release, ctx(phase))
        assert 2.0 - guard.remaining() == pytest.approx(rows[phase]["stated"], rel=1e-6)
    assert "Epsilon each phase would spend" in plan.render() and plan.to_dict()["phases"][2]["releases"] == 12
    with pytest.raises(ConfigError, match="disagrees with phase_releases"):
        plan_budget(target_epsilon=2.0, delta=DELTA, num_records=400, epochs=None, batch_size=40, score_releases=5,
                    score_count=4, clip_bound=1.0, phase_releases={"grpo": 3})


@pytest.mark.parametrize("records, batch", [(24, 8), (30, 8), (3000, 256), (100, 16)])
def test_calibrated_training_is_the_schedule_opacus_runs(records, batch):
    """The recorded training (sample rate, steps) is what Opacus' DPDataLoader runs from a loader of
    ``batch``, so the ledger never under-reports; and it meets the target under the primary accountant."""
    import torch
    from opacus.data_loader import DPDataLoader

    event = calibrate_dpsgd(target_epsilon=3.0, delta=DELTA, num_records=records, epochs=2, batch_size=batch,
                            opacus_accountant="rdp")
    loader = DPDataLoader.from_data_loader(torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.zeros(records, 1)), batch_size=batch))
    assert loader.sample_rate == event.sample_rate and 2 * len(loader) <= event.steps
    assert epsilon_dpsgd([event], DELTA) <= 3.0


def test_cli_budget_plan_prints_each_phase(capsys):
    from mor_secure import cli

    code = cli.main(["budget", "plan", "--epsilon", "2", "--delta", "1e-5", "--records", "400", "--epochs", "2",
                     "--batch-size", "40", "--score-count", "4", "--clip-bound", "1", "--phase-releases", "router_fit=1",
                     "--phase-releases", "grpo=12", "--json"])
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    assert [r["phase"] for r in out["phases"]] == ["rm_training", "router_fit", "grpo"]
    assert out["dpsgd"]["opacus_accountant"] == "rdp" and out["dpsgd"]["steps"] == 20
    assert cli.main(["budget", "plan", "--epsilon", "2", "--delta", "1e-5", "--records", "400", "--epochs", "2",
                     "--batch-size", "40", "--phase-releases", "grpo"]) == 2
    assert "PHASE=COUNT" in capsys.readouterr().err


@pytest.mark.parametrize("records, batch", [(24, 8), (64, 16), (30, 8), (3000, 256)])
def test_training_recorded_by_the_client_covers_what_opacus_runs(records, batch):
    """The event the client writes before DP-SGD (rewards.train.plan_dpsgd) has epsilon at least that
    of the schedule Opacus' DPDataLoader then runs, by the primary accountant."""
    import torch
    from opacus.data_loader import DPDataLoader

    from mor_secure.rewards.train import TrainSettings, plan_dpsgd

    settings = TrainSettings(epochs=2, batch_size=batch, lr=0.1, dp=True, target_epsilon=3.0, delta=DELTA)
    recorded = plan_dpsgd(records, settings)
    dataset = torch.utils.data.TensorDataset(torch.zeros(records, 1))
    loader = DPDataLoader.from_data_loader(torch.utils.data.DataLoader(dataset, batch_size=batch))
    run = DpSgdTraining(noise_multiplier=recorded.noise_multiplier, sample_rate=loader.sample_rate,
                        steps=settings.epochs * len(loader), max_grad_norm=1.0, num_records=records)
    assert epsilon_dpsgd([recorded], DELTA) >= epsilon_dpsgd([run], DELTA) * (1 - 1e-9)
