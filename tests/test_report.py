"""The compliance report: computed from ledgers alone, self-contained HTML, versioned JSON."""

from __future__ import annotations

import json
import math
import re

import dp_accounting as dpa
import pytest
from dp_accounting.pld import PLDAccountant
from helpers.independent import pld_routes
from helpers.report_run import CONFIG, DELTA, NOISED, TRAIN, client_ledger, make_run_dir

from mor_secure.compliance.report import write_report
from mor_secure.errors import ConfigError
from mor_secure.privacy.events import DpSgdTraining


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return make_run_dir(tmp_path_factory.mktemp("run"))


@pytest.fixture(scope="module")
def written(run_dir):
    html_path, json_path = write_report(run_dir)
    return html_path.read_text(), json.loads(json_path.read_text())


def _pld(events_per_route):
    acct = PLDAccountant(value_discretization_interval=1e-4)
    for e in events_per_route:
        if isinstance(e, DpSgdTraining):
            acct.compose(dpa.PoissonSampledDpEvent(e.sample_rate, dpa.GaussianDpEvent(e.noise_multiplier)), e.steps)
        else:
            acct.compose(dpa.GaussianDpEvent(e.noise_multiplier))
    return acct.get_epsilon(DELTA)


def test_html_is_self_contained_with_a_row_and_plot_per_client(written):
    html, _ = written
    for name in ("hospital-a", "bank_b", "tampered", "absent", "clinic-c"):
        assert re.search(rf'<tr id="client-{name}">', html)
    n = len(CONFIG["clients"])
    assert html.count("<img ") == n and html.count('src="data:image/png;base64,') == n
    assert all(alt for alt in re.findall(r'<img [^>]*alt="([^"]*)"', html))
    assert not re.search(r'src="(?!data:)', html) and not re.search(r'href="(?!#)', html)  # no external resources
    for target in re.findall(r'href="#([^"]+)"', html):  # in-page links land on an element
        assert f'id="{target}"' in html
    assert "http://" not in html and "https://" not in html and "<script" not in html and "<link" not in html
    assert "insecure_no_tls" in html and "add/remove one preference record of this client" in html


def test_json_is_versioned_and_matches_independent_pld(written):
    _, report = written
    assert report["schema_version"] == 1 and report["run_id"] == "run-7"
    clients = {c["name"]: c for c in report["clients"]}
    a, b = clients["hospital-a"], clients["bank b"]
    assert a["guarantee"]["route"] == "dpsgd" and a["guarantee"]["route_output"] == "inf"
    assert a["guarantee"]["epsilon"] == pytest.approx(_pld([TRAIN]), rel=0.01)
    assert b["guarantee"]["route"] == "output" and b["guarantee"]["route_dpsgd"] == "inf"
    assert b["guarantee"]["epsilon"] == pytest.approx(_pld([NOISED] * 3), rel=0.01)
    assert b["remaining_epsilon"] == pytest.approx(2.0 - b["guarantee"]["epsilon"])
    assert b["phase_epsilon"]["router_fit"] == pytest.approx(_pld([NOISED]), rel=0.01)
    assert set(b["guarantee"]["by_accountant"]["output"]) == {"dpa_pld", "dpa_rdp", "opacus_rdp", "opacus_prv"}
    assert a["model_class"] == "LlavaRewardModel" and a["insecure_flags"] == ["insecure_no_tls"]
    assert a["releases_by_phase"]["grpo"] == {"entries": 2, "trainings": 0, "score_releases": 2, "scores": 8}
    assert a["ledger"]["ok"] and a["guarantee_valid"] and a["within_budget"]
    assert [n for n, _ in a["curve"]] == [1, 2, 3, 4] and a["curve"][0][1] == 0.0
    assert any("Poisson" in s for s in a["assumptions"]) and any("[-B, B]" in s for s in b["assumptions"])


def independent_pld_from_ledger_file(path) -> tuple[float, float]:
    """(DP-SGD route, output route) from the ledger's raw JSON lines, without mor_secure's code."""
    return pld_routes([json.loads(line)["event"] for line in path.read_text().splitlines()], DELTA)


def _as_float(value) -> float:
    return float(value)  # the JSON spells infinity "inf"


def test_each_clients_epsilon_recomputed_from_its_ledger_with_pld_within_one_percent(run_dir, written):
    _, report = written
    checked = 0
    for c in report["clients"]:
        path = run_dir / "clients" / c["name"] / "ledger.jsonl"
        if not c["ledger"]["ok"]:
            continue  # tampered or missing: covered below
        want_dpsgd, want_output = independent_pld_from_ledger_file(path)
        g = c["guarantee"]
        for got, want in ((_as_float(g["route_dpsgd"]), want_dpsgd), (_as_float(g["route_output"]), want_output)):
            assert got == want if math.isinf(want) else got == pytest.approx(want, rel=0.01), (c["name"], got, want)
        stated = min(want_dpsgd, want_output)
        assert _as_float(g["epsilon"]) == pytest.approx(stated, rel=0.01), c["name"]
        assert g["route"] == ("dpsgd" if want_dpsgd <= want_output else "output")
        assert c["remaining_epsilon"] == pytest.approx(c["budget"]["epsilon"] - _as_float(g["epsilon"]))
        checked += 1
    assert checked == 3
    clinic = next(c for c in report["clients"] if c["name"] == "clinic-c")
    assert clinic["guarantee"]["route"] == "dpsgd"  # the release before training is in the DP-SGD route
    curve = dict((n, eps) for n, eps in clinic["curve"])
    assert curve[5] < curve[6] and curve[6] == pytest.approx(_as_float(clinic["guarantee"]["route_dpsgd"]))


def test_refusal_in_the_servers_event_log_shows_the_client_left_the_mixture(written):
    html, report = written
    clients = {c["name"]: c for c in report["clients"]}
    assert clients["bank b"]["left_mixture"] and clients["bank b"]["refusals"][0]["phase"] == "grpo"
    assert not clients["hospital-a"]["left_mixture"] and clients["hospital-a"]["refusals"] == []
    assert [r["client"] for r in report["server_refusals"]] == ["bank b"]
    row = re.search(r'<tr id="client-bank_b">.*?</tr>', html).group(0)
    assert "left the mixture" in row
    assert "left the mixture" not in re.search(r'<tr id="client-hospital-a">.*?</tr>', html).group(0)


def test_tampered_ledger_is_named_and_untrusted(written):
    _, report = written
    (t,) = [c for c in report["clients"] if c["name"] == "tampered"]
    assert t["ledger"]["ok"] is False and t["ledger"]["first_bad"] == 2
    assert "hash mismatch" in t["ledger"]["reason"] and t["guarantee_valid"] is False
    assert t["guarantee"]["epsilon"] == pytest.approx(_pld([NOISED]), rel=0.01)  # verified prefix only
    assert t["remaining_epsilon"] is None and t["within_budget"] is None  # nothing stated from an altered ledger


def test_missing_ledger_states_no_guarantee(written):
    html, report = written
    (absent,) = [c for c in report["clients"] if c["name"] == "absent"]
    assert absent["guarantee"] is None and absent["ledger"]["ok"] is False and "missing" in absent["ledger"]["reason"]
    row = re.search(r'<tr id="client-absent">.*?</tr>', html).group(0)
    assert "NOT VERIFIED" in row and "n/a" in row
    row = re.search(r'<tr id="client-tampered">.*?</tr>', html).group(0)
    assert "ε ≥ " in row and "NOT VERIFIED at entry 2" in row and "untrusted ledger" in row


def test_torn_tail_keeps_the_guarantee_valid_and_config_may_be_passed(tmp_path):
    budget = {"epsilon": 3.0, "delta": DELTA}
    ledger = client_ledger(tmp_path, "c1", budget, [(NOISED, "grpo")] * 2)
    ledger.write_bytes(ledger.read_bytes() + b'{"context":{"cl')
    _, json_path = write_report(tmp_path, config={"clients": {"c1": {"budget": budget}}})
    (c,) = json.loads(json_path.read_text())["clients"]
    assert c["ledger"]["torn_tail"] and c["ledger"]["first_bad"] == 3 and c["guarantee_valid"]
    assert c["guarantee"]["epsilon"] == pytest.approx(_pld([NOISED] * 2), rel=0.01)


def test_bad_or_missing_config_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="config.yaml is missing"):
        write_report(tmp_path)
    with pytest.raises(ConfigError, match=r"clients\[0\] \(c1\): budget.epsilon must be .* Found 0"):
        write_report(tmp_path, config={"clients": [{"name": "c1", "budget": {"epsilon": 0, "delta": DELTA}}]})


def test_cli_report_writes_both_files_and_prints_their_paths(tmp_path, capsys):
    from mor_secure import cli

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    client_ledger(run_dir, "c1", {"epsilon": 3.0, "delta": DELTA}, [(NOISED, "grpo")] * 2)
    (run_dir / "config.yaml").write_text("clients:\n  - {name: c1, budget: {epsilon: 3.0, delta: 1.0e-5}}\n")
    assert cli.main(["report", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert f"privacy report: {run_dir / 'privacy_report.html'}" in out and str(run_dir / "privacy_report.json") in out
    (c,) = json.loads((run_dir / "privacy_report.json").read_text())["clients"]
    assert c["guarantee"]["epsilon"] == pytest.approx(_pld([NOISED] * 2), rel=0.01)
    assert cli.main(["report", str(tmp_path / "nowhere")]) == 2
    assert "config.yaml is missing" in capsys.readouterr().err
