"""The privacy report of a run, computed from each client's ledger alone (plus budgets from config).

Run-dir layout: ``config.yaml`` (``clients: [{name, budget: {epsilon, delta, phase_caps?}}, ...]``;
a mapping ``name -> entry`` is accepted too), ``run_record.json`` (optional: ``run_id``,
``insecure_flags``, ``clients: {name: {model_class, insecure_flags?}}``, ``left_mixture: [name, ...]``),
``events.jsonl`` (optional: the server's event log; ``budget_refused`` rows name a client that
refused a release and left the mixture), ``clients/<name>/ledger.jsonl`` and
``clients/<name>/ledger_key.pub``.

Outputs ``privacy_report.json`` (``schema_version`` 1; non-finite numbers are the strings
``"inf"``/``"nan"``) and a self-contained ``privacy_report.html`` in ``run_dir``. A ledger that fails
verification is reported with its first bad line; its epsilon is computed over the verified prefix
only, is marked not trustworthy (``guarantee_valid: false``), and no remaining budget or
within-budget verdict is stated for it (``null``): an altered ledger proves nothing about spend.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml

from mor_secure.compliance.report_html import plot_png_base64, render_html
from mor_secure.errors import ConfigError, CryptoError
from mor_secure.privacy.accounting import ACCOUNTANTS, PLD_BASE_INTERVAL, PRIMARY_ACCOUNTANT, client_guarantee, epsilon_curve, phase_epsilon
from mor_secure.privacy.budget import Budget
from mor_secure.privacy.events import DpSgdTraining, GaussianScoreRelease, event_from_dict
from mor_secure.privacy.ledger import VerifyResult, load_public_key, read_entries

SCHEMA_VERSION = 1
UNIT = "one preference record of one client"
NEIGHBOURING_RELATION = "add/remove one preference record of this client"


def _load_config(run_dir: Path, config: Mapping[str, Any] | None) -> Mapping[str, Any]:
    if config is not None:
        return config
    path = run_dir / "config.yaml"
    if not path.exists():
        raise ConfigError(f"{path} is missing; pass config= or write the resolved config there.")
    return yaml.safe_load(path.read_text()) or {}


def _client_budgets(config: Mapping[str, Any]) -> dict[str, Budget]:
    clients = config.get("clients") or []
    if isinstance(clients, Mapping):
        clients = [{"name": name, **(entry or {})} for name, entry in clients.items()]
    budgets = {}
    for i, entry in enumerate(clients):
        name = entry.get("name") if isinstance(entry, Mapping) else None
        if not isinstance(name, str) or not name:
            raise ConfigError(f"config clients[{i}].name must be a non-empty string. Found {name!r}.")
        if "budget" not in entry:
            raise ConfigError(f"config clients[{i}] ({name}) has no budget; set budget: {{epsilon, delta}}.")
        try:
            budgets[name] = Budget.from_dict(entry["budget"])
        except ConfigError as exc:
            raise ConfigError(f"config clients[{i}] ({name}): {exc}") from exc
    return budgets


def _assumptions(events: list, route: str | None) -> list[str]:
    items = [
        f"Unit: {UNIT}; neighbouring datasets differ by adding or removing one such record.",
        f"Stated guarantee: the smaller of the DP-SGD and output routes under {PRIMARY_ACCOUNTANT} "
        f"(pessimistic PLD, discretisation interval {PLD_BASE_INTERVAL:g} or a coarser nested one for large epsilon).",
        "Noise is sampled as the mechanisms assume (no cryptographically secure sampler; see threat_model.md).",
    ]
    sizes = sorted({e.num_records for e in events if isinstance(e, DpSgdTraining)})
    if sizes:
        items.append(f"DP-SGD uses Poisson sampling as in Opacus; dataset size {sizes} is treated as public.")
        items.append("Every score released after the first DP-SGD training comes from a DP-trained reward model (post-processing).")
    bounds = sorted({e.clip_bound for e in events if isinstance(e, GaussianScoreRelease)})
    if bounds:
        items.append(f"Every released score is clipped to [-B, B] with B in {bounds} (sensitivity 2B per score).")
    if route == "output":
        items.append("The output route holds whatever the reward model's training was: no assumption on training.")
    return items


def _releases_by_phase(pairs: list) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for event, context in pairs:
        row = out.setdefault(str(context.get("phase")), {"entries": 0, "trainings": 0, "score_releases": 0, "scores": 0})
        row["entries"] += 1
        if isinstance(event, DpSgdTraining):
            row["trainings"] += 1
        else:
            row["score_releases"] += 1
            row["scores"] += event.count
    return out


def _verify(ledger: Path, key: Path) -> tuple[list[dict[str, Any]], VerifyResult]:
    if not ledger.exists():
        return [], VerifyResult(False, 0, None, f"ledger file missing: {ledger}")
    try:
        public_key = load_public_key(key)
    except CryptoError as exc:
        entries, _ = read_entries(ledger, None)
        return entries, VerifyResult(False, len(entries), None, f"signatures not checked: {exc}")
    return read_entries(ledger, public_key)


def _phase_spans(pairs: list) -> list[tuple[str, int, int]]:
    """Runs of consecutive ledger entries of one phase: ``(phase, first seq, last seq)``."""
    spans: list[tuple[str, int, int]] = []
    for seq, (_, context) in enumerate(pairs, start=1):
        phase = str(context.get("phase"))
        if spans and spans[-1][0] == phase:
            spans[-1] = (phase, spans[-1][1], seq)
        else:
            spans.append((phase, seq, seq))
    return spans


def _server_events(run_dir: Path) -> list[dict[str, Any]]:
    """The server's event log (refusals, rejections, dropouts); unreadable lines are skipped."""
    path = run_dir / "events.jsonl"
    rows = []
    for line in path.read_text(errors="replace").splitlines() if path.exists() else []:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def _is_refusal(row: Mapping[str, Any]) -> bool:
    """A client's budget refusal as the server logged it (a score refusal, or a refused training)."""
    from mor_secure.federation.protocol import ERR_BUDGET_REFUSED

    return row.get("kind") == "budget_refused" or (row.get("kind") == "train_failed" and row.get("code") == ERR_BUDGET_REFUSED)


def _refusals(name: str, server_events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for row in server_events:
        if _is_refusal(row) and row.get("client") == name:
            when = row.get("time")
            stamp = (datetime.fromtimestamp(when, timezone.utc).isoformat(timespec="seconds")
                     if isinstance(when, (int, float)) else None)
            out.append({"time": stamp, "phase": row.get("phase"), "reason": row.get("reason")})
    return out


def client_report(
    run_dir: Path, name: str, budget: Budget | None, run_record: Mapping[str, Any],
    server_events: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """One client's section of the report (plain data; floats may be inf/nan)."""
    ledger = run_dir / "clients" / name / "ledger.jsonl"
    entries, result = _verify(ledger, ledger.with_name("ledger_key.pub"))
    pairs = [(event_from_dict(e["event"]), e["context"]) for e in entries]
    record = (run_record.get("clients") or {}).get(name) or {}
    flags = sorted(set(run_record.get("insecure_flags") or []) | set(record.get("insecure_flags") or []))
    refusals = _refusals(name, server_events or [])
    report: dict[str, Any] = {
        "name": name,
        "model_class": record.get("model_class"),
        "unit": UNIT,
        "neighbouring_relation": NEIGHBOURING_RELATION,
        "budget": budget.to_dict() if budget else None,
        "ledger": {"ok": result.ok, "entries": result.entries, "first_bad": result.first_bad,
                   "reason": result.reason, "torn_tail": result.torn_tail,
                   "first_time": entries[0]["time"] if entries else None,
                   "last_time": entries[-1]["time"] if entries else None},
        "releases_by_phase": _releases_by_phase(pairs),
        "phase_spans": _phase_spans(pairs),
        "refusals": refusals,
        "left_mixture": bool(refusals) or name in (run_record.get("left_mixture") or []),
        "insecure_flags": flags,
        "guarantee": None, "guarantee_valid": False, "within_budget": None, "remaining_epsilon": None,
        "phase_epsilon": {}, "curve": [], "assumptions": [],
    }
    if budget is None or not ledger.exists():
        if budget is None:
            report["ledger"]["reason"] += "; no budget (delta) configured for this client"
        return report  # no guarantee can be stated
    events = [e for e, _ in pairs]
    guarantee = client_guarantee(events, budget.delta, ACCOUNTANTS)
    valid = result.ok or result.torn_tail  # a torn tail was never committed: nothing lost
    phases = sorted({str(ctx.get("phase")) for _, ctx in pairs} | set(budget.phase_caps))
    report.update(
        guarantee=guarantee.to_dict(),
        guarantee_valid=valid,
        within_budget=guarantee.epsilon <= budget.epsilon if valid else None,
        remaining_epsilon=max(0.0, budget.epsilon - guarantee.epsilon) if valid else None,
        phase_epsilon={p: phase_epsilon(pairs, p, budget.delta, guarantee.route) for p in phases},
        curve=epsilon_curve(events, budget.delta),
        assumptions=_assumptions(events, guarantee.route),
    )
    return report


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def build_report(run_dir: Path, config: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The report as plain data (see :func:`write_report`)."""
    run_dir = Path(run_dir)
    budgets = _client_budgets(_load_config(run_dir, config))
    record_path = run_dir / "run_record.json"
    run_record = json.loads(record_path.read_text()) if record_path.exists() else {}
    ledgers = {p.parent.name for p in (run_dir / "clients").glob("*/ledger.jsonl")}
    names = list(budgets) + sorted(ledgers - set(budgets))
    server_events = _server_events(run_dir)
    return {
        "schema_version": SCHEMA_VERSION,
        "generated_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "run_id": run_record.get("run_id"),
        "insecure_flags": sorted(run_record.get("insecure_flags") or []),
        "primary_accountant": PRIMARY_ACCOUNTANT,
        "accountants": list(ACCOUNTANTS),
        "clients": [client_report(run_dir, n, budgets.get(n), run_record, server_events) for n in names],
        "server_refusals": [r for r in server_events if _is_refusal(r)],
    }


def write_report(run_dir: Path, config: Mapping[str, Any] | None = None) -> tuple[Path, Path]:
    """Write ``privacy_report.html`` and ``privacy_report.json`` into ``run_dir``; return their paths."""
    run_dir = Path(run_dir)
    report = build_report(run_dir, config)
    plots = {
        c["name"]: plot_png_base64(c["curve"], c["budget"]["epsilon"] if c["budget"] else None,
                                   c["guarantee"]["route_dpsgd"] if c["guarantee"] else math.inf, c["phase_spans"])
        for c in report["clients"]
    }
    html_path, json_path = run_dir / "privacy_report.html", run_dir / "privacy_report.json"
    _write_atomic(json_path, json.dumps(_jsonable(report), indent=2, allow_nan=False) + "\n")
    _write_atomic(html_path, render_html(report, plots))
    return html_path, json_path
