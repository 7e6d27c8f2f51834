"""Self-contained HTML for the privacy report: inline CSS, plots as base64 PNG, no external resources."""

from __future__ import annotations

import base64
import io
import math
import re
from collections.abc import Mapping, Sequence
from html import escape
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

_CSS = """
body{font-family:system-ui,sans-serif;margin:2em;color:#222}
table{border-collapse:collapse;margin:1em 0}th,td{border:1px solid #bbb;padding:4px 8px;vertical-align:top}
th{background:#eee}.bad{color:#b00020;font-weight:bold}.ok{color:#0a7a2f}.warn{color:#a65b00}
td.num{text-align:right;font-variant-numeric:tabular-nums}section{margin-top:2em}
"""


def plot_png_base64(curve: Sequence[Sequence[float]], budget_epsilon: float | None, route_dpsgd: float) -> str:
    """Epsilon of the stated guarantee over the ledger's entries, as a base64 PNG (Agg backend)."""
    fig = Figure(figsize=(6, 3), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    xs = [n for n, _ in curve]
    ys = [eps if math.isfinite(eps) else math.nan for _, eps in curve]
    ax.step(xs, ys, where="post", marker=".", label="guarantee (primary accountant)")
    if budget_epsilon is not None:
        ax.axhline(budget_epsilon, color="#b00020", linestyle="--", label=f"budget ε={budget_epsilon:g}")
    if math.isfinite(route_dpsgd):
        ax.axhline(route_dpsgd, color="#555", linestyle=":", label=f"DP-SGD route ε={route_dpsgd:.3g}")
    if any(not math.isfinite(eps) for _, eps in curve):
        ax.set_title("gaps: ε = ∞ (a release without DP cover)", fontsize=9)
    ax.set_ylim(bottom=0)
    ax.set_xlabel("ledger entry (seq)")
    ax.set_ylabel("ε")
    ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def element_id(name: str, prefix: str = "client") -> str:
    """HTML id ``<prefix>-<name>`` (a client's table row by default); characters outside
    [A-Za-z0-9_-] become ``_``."""
    return f"{prefix}-" + re.sub(r"[^A-Za-z0-9_-]", "_", name)


def _num(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return "∞" if value == math.inf else ("n/a" if math.isnan(value) else f"{value:.4g}")
    return escape(str(value))


def _ledger_cell(ledger: Mapping[str, Any]) -> str:
    if ledger["ok"]:
        return f'<span class="ok">verified</span> ({ledger["entries"]} entries)'
    css = "warn" if ledger["torn_tail"] else "bad"
    where = f' at line {ledger["first_bad"]}' if ledger["first_bad"] else ""
    return f'<span class="{css}">NOT VERIFIED{where}</span>: {escape(ledger["reason"])}'


def _route_cells(guarantee: Mapping[str, Any] | None, accountants: Sequence[str]) -> str:
    cells = []
    for route in ("dpsgd", "output"):
        table = guarantee["by_accountant"][route] if guarantee else {}
        cells.append("<br>".join(f"{escape(a)}: {_num(table.get(a))}" for a in accountants))
    return "".join(f'<td class="num">{c}</td>' for c in cells)


def _row(c: Mapping[str, Any], accountants: Sequence[str]) -> str:
    g, b = c["guarantee"], c["budget"]
    if g is None:
        stated = "n/a"
    else:
        mark = "" if c["guarantee_valid"] else ' <span class="bad">(untrusted ledger)</span>'
        over = "" if c["within_budget"] else ' <span class="bad">OVER BUDGET</span>'
        stated = f'ε={_num(g["epsilon"])} via {escape(g["route"])} route{mark}{over}'
    phases = "<br>".join(
        f'{escape(p)}: {r["entries"]} entries, {r["scores"]} scores' for p, r in c["releases_by_phase"].items()
    ) or "none"
    flags = ", ".join(escape(f) for f in c["insecure_flags"]) or "none"
    return (
        f'<tr id="{element_id(c["name"])}"><td>{escape(c["name"])}</td><td>{escape(str(c["model_class"] or "n/a"))}</td>'
        f"<td>{stated}</td><td class=\"num\">{_num(b['delta'] if b else None)}</td>"
        f"<td class=\"num\">{_num(b['epsilon'] if b else None)}</td><td class=\"num\">{_num(c['remaining_epsilon'])}</td>"
        f"{_route_cells(g, accountants)}"
        f"<td>{phases}</td><td>{flags}</td><td>{_ledger_cell(c['ledger'])}</td></tr>"
    )


def _details(c: Mapping[str, Any], png: str) -> str:
    items = "".join(f"<li>{escape(a)}</li>" for a in c["assumptions"]) or "<li>no guarantee stated</li>"
    caps = (c["budget"] or {}).get("phase_caps") or {}
    spend = "".join(
        f"<tr><td>{escape(p)}</td><td class=\"num\">{_num(e)}</td><td class=\"num\">{_num(caps.get(p))}</td></tr>"
        for p, e in c["phase_epsilon"].items()
    )
    alt = f"Epsilon of {c['name']}'s guarantee over its ledger entries, with its budget"
    return (
        f'<section id="{element_id(c["name"], "details")}"><h2>{escape(c["name"])}</h2>'
        f"<p>Neighbouring relation: {escape(c['neighbouring_relation'])}.</p><ul>{items}</ul>"
        f"<table><tr><th>phase</th><th>ε spent on stated route</th><th>phase cap</th></tr>{spend}</table>"
        f'<img src="data:image/png;base64,{png}" alt="{escape(alt)}"></section>'
    )


def render_html(report: Mapping[str, Any], plots: Mapping[str, str]) -> str:
    accountants = report["accountants"]
    flags = ", ".join(escape(f) for f in report["insecure_flags"])
    banner = f'<p class="bad">Insecure flags in force for this run: {flags}</p>' if flags else "<p class=\"ok\">No insecure flags in force.</p>"
    head = (
        "<tr><th>client</th><th>model</th><th>stated guarantee</th><th>δ</th><th>budget ε</th><th>remaining ε</th>"
        "<th>DP-SGD route ε</th><th>output route ε</th><th>entries by phase</th><th>insecure flags</th><th>ledger</th></tr>"
    )
    rows = "".join(_row(c, accountants) for c in report["clients"])
    details = "".join(_details(c, plots[c["name"]]) for c in report["clients"])
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        f"<title>Privacy report {escape(str(report['run_id'] or ''))}</title><style>{_CSS}</style></head><body>"
        f"<h1>Privacy report</h1><p>Run {escape(str(report['run_id'] or 'n/a'))}, generated {escape(report['generated_at'])}, "
        f"schema version {report['schema_version']}. Every guarantee is record-level (ε, δ)-DP per client; "
        f"stated with {escape(report['primary_accountant'])}, other accountants side by side.</p>{banner}"
        f'<table id="clients">{head}{rows}</table>{details}</body></html>\n'
    )
