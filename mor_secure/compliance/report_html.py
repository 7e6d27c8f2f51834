"""Self-contained HTML for the privacy report: inline CSS, plots as base64 PNG, no external resources.

Layout, for a compliance reader: a summary table with one row per client (``id="client-<name>"``),
then one section per client (``id="details-<name>"``) with the stated guarantee in words, every
accountant's epsilon for both routes side by side, spend per phase against its cap, refusals, the
assumptions, and a plot of epsilon over the client's ledger (``id="plot-<name>"``).
"""

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
from matplotlib.ticker import MaxNLocator

_CSS = """
body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1200px;padding:0 1em;color:#222;line-height:1.4}
table{border-collapse:collapse;margin:0.8em 0}th,td{border:1px solid #bbb;padding:4px 8px;vertical-align:top}
th{background:#eee;text-align:left}.bad{color:#b00020;font-weight:bold}.ok{color:#0a7a2f}.warn{color:#a65b00}
small{color:#555}td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}section{margin-top:2.5em;border-top:2px solid #ddd}
.statement{font-size:1.1em;background:#f6f6f6;padding:0.6em 0.8em;border-left:4px solid #0a7a2f}
.statement.untrusted{border-left-color:#b00020}figure{margin:1em 0}figcaption{font-size:0.9em;color:#555;max-width:760px}
code{background:#f2f2f2;padding:0 3px}.cols{display:flex;flex-wrap:wrap;gap:2em}
"""
_KNOWN_PHASES = {"rm_training": "#dbe9f6", "router_fit": "#fde7d3", "grpo": "#e3f1dc"}  # same colour in every plot
_OTHER_COLOURS = ("#efe0f3", "#f8f1c9", "#dff3f1", "#eeeeee")
PRIMARY_MARK = " (primary)"


def plot_png_base64(
    curve: Sequence[Sequence[float]],
    budget_epsilon: float | None,
    route_dpsgd: float,
    phase_spans: Sequence[Sequence[Any]] = (),
) -> str:
    """Epsilon of the stated guarantee after each ledger entry, as a base64 PNG (Agg backend).
    ``phase_spans`` (``(phase, first seq, last seq)``) shade the entries of each phase."""
    fig = Figure(figsize=(9, 3.6), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    labelled: set[str] = set()
    others = sorted({p for p, _, _ in phase_spans} - set(_KNOWN_PHASES))
    for phase, first, last in phase_spans:
        colour = _KNOWN_PHASES.get(phase) or _OTHER_COLOURS[others.index(phase) % len(_OTHER_COLOURS)]
        ax.axvspan(first - 0.5, last + 0.5, color=colour, lw=0, label=None if phase in labelled else f"phase {phase}")
        labelled.add(phase)
    xs = [n for n, _ in curve]
    ys = [eps if math.isfinite(eps) else math.nan for _, eps in curve]
    ax.step(xs, ys, where="post", marker=".", color="#1f4e99", label="stated guarantee ε (primary accountant)")
    if budget_epsilon is not None:
        ax.axhline(budget_epsilon, color="#b00020", linestyle="--", label=f"budget ε = {budget_epsilon:g}")
    if math.isfinite(route_dpsgd):
        ax.axhline(route_dpsgd, color="#555", linestyle=":", label=f"DP-SGD route ε = {route_dpsgd:.3g}")
    if any(not math.isfinite(eps) for _, eps in curve):
        ax.set_title("gaps: ε = ∞ (a release without DP cover)", fontsize=9, color="#b00020")
    ax.set_ylim(bottom=0)
    if xs:
        ax.set_xlim(0.5, max(xs) + 0.5)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("ledger entry (seq), in the order the releases were recorded")
    ax.set_ylabel("ε")
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
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


def _ledger_cell(ledger: Mapping[str, Any], *, short: bool = False) -> str:
    if ledger["ok"]:
        what = f'{ledger["entries"]} entries' if short else f'{ledger["entries"]} entries, chain and signatures intact'
        return f'<span class="ok">verified</span> ({what})'
    css = "warn" if ledger["torn_tail"] else "bad"
    where = f' at entry {ledger["first_bad"]}' if ledger["first_bad"] else ""
    return f'<span class="{css}">NOT VERIFIED{where}</span>' + ("" if short else f': {escape(ledger["reason"])}')


def _status_cell(c: Mapping[str, Any]) -> str:
    parts = []
    if c["guarantee"] is None:
        parts.append('<span class="bad">no guarantee stated</span>')
    elif not c["guarantee_valid"]:
        parts.append('<span class="bad">untrusted ledger</span>')
    elif c["within_budget"]:
        parts.append('<span class="ok">within budget</span>')
    else:
        parts.append('<span class="bad">OVER BUDGET</span>')
    if c["left_mixture"]:
        parts.append('<span class="warn">refused a release; left the mixture</span>')
    return "<br>".join(parts)


def _row(c: Mapping[str, Any], primary: str) -> str:
    g, b = c["guarantee"], c["budget"]
    route = "" if g is None else {"dpsgd": "DP-SGD route", "output": "output route"}[g["route"]]
    # an unverified ledger proves only what its verified prefix recorded: at least that much was spent
    relation = "=" if c["guarantee_valid"] else "≥"
    stated = "n/a" if g is None else f'ε {relation} {_num(g["epsilon"])}<br><small>{route}</small>'
    flags = ", ".join(escape(f) for f in c["insecure_flags"]) or "none"
    return (
        f'<tr id="{element_id(c["name"])}"><td><a href="#{element_id(c["name"], "details")}">{escape(c["name"])}</a>'
        f'<br><small>{escape(str(c["model_class"] or "model n/a"))}</small></td><td class="num">{stated}</td>'
        f"<td class=\"num\">{_num(b['delta'] if b else None)}</td>"
        f"<td class=\"num\">{_num(b['epsilon'] if b else None)}</td><td class=\"num\">{_num(c['remaining_epsilon'])}</td>"
        f'<td class="num">{_num(g["route_dpsgd"] if g else None)}</td><td class="num">{_num(g["route_output"] if g else None)}</td>'
        f"<td>{_status_cell(c)}</td><td>{flags}</td><td>{_ledger_cell(c['ledger'], short=True)}</td></tr>"
    )


def _when(iso: Any) -> str:
    """An entry's UTC ISO time to the second, for reading."""
    return escape(str(iso)[:19].replace("T", " "))


def _statement(c: Mapping[str, Any], primary: str) -> str:
    g, ledger = c["guarantee"], c["ledger"]
    if g is None:
        return f'<p class="statement untrusted">No guarantee can be stated: {escape(ledger["reason"])}.</p>'
    route = "DP-SGD route (the reward model is DP-trained; its scores are post-processing)" if g["route"] == "dpsgd" \
        else "output route (composition of the clipped, noised score releases)"
    span = f" recorded {_when(ledger['first_time'])} to {_when(ledger['last_time'])} UTC" if ledger["first_time"] else ""
    warn = "" if c["guarantee_valid"] else (
        ' <span class="bad">The ledger failed verification: this figure covers only the verified prefix and '
        "proves nothing about the spend after it.</span>")
    return (
        f'<p class="statement{"" if c["guarantee_valid"] else " untrusted"}">({_num(g["epsilon"])}, {_num(g["delta"])})-DP '
        f"for {escape(c['unit'])}, neighbouring relation: {escape(c['neighbouring_relation'])}. "
        f"Stated by the {route}, computed with {escape(primary)} from {ledger['entries']} ledger entries{span}.{warn}</p>"
    )


def _accountant_table(c: Mapping[str, Any], accountants: Sequence[str], primary: str) -> str:
    by = (c["guarantee"] or {}).get("by_accountant") or {"dpsgd": {}, "output": {}}
    rows = "".join(
        f"<tr><td>{escape(a)}{PRIMARY_MARK if a == primary else ''}</td>"
        f'<td class="num">{_num(by["dpsgd"].get(a))}</td><td class="num">{_num(by["output"].get(a))}</td></tr>'
        for a in accountants
    )
    return (f'<table id="{element_id(c["name"], "accountants")}"><caption>ε spent, by route and accountant</caption>'
            f"<tr><th>accountant</th><th>DP-SGD route</th><th>output route</th></tr>{rows}</table>")


def _phase_table(c: Mapping[str, Any]) -> str:
    caps = (c["budget"] or {}).get("phase_caps") or {}
    phases = list(dict.fromkeys([*c["releases_by_phase"], *c["phase_epsilon"]]))
    rows = "".join(
        f"<tr><td>{escape(p)}</td><td class=\"num\">{c['releases_by_phase'].get(p, {}).get('entries', 0)}</td>"
        f"<td class=\"num\">{c['releases_by_phase'].get(p, {}).get('scores', 0)}</td>"
        f"<td class=\"num\">{_num(c['phase_epsilon'].get(p))}</td><td class=\"num\">{_num(caps.get(p))}</td></tr>"
        for p in phases
    ) or '<tr><td colspan="5">no ledger entries</td></tr>'
    return ("<table><caption>ledger entries and ε by phase (stated route)</caption><tr><th>phase</th><th>entries</th>"
            f"<th>scores released</th><th>ε spent</th><th>phase cap</th></tr>{rows}</table>")


def _refusal_list(c: Mapping[str, Any]) -> str:
    if not c["refusals"]:
        return ""
    items = "".join(
        f"<li>{escape(str(r.get('time') or 'time unknown'))}, phase {escape(str(r.get('phase')))}: {escape(str(r.get('reason')))}</li>"
        for r in c["refusals"]
    )
    return ("<h3>Refusals</h3><p>The client refused these releases (nothing was recorded or sent); the server "
            f"dropped it from the mixture and renormalised the router weights over the other clients.</p><ul>{items}</ul>")


def _details(c: Mapping[str, Any], png: str, accountants: Sequence[str], primary: str) -> str:
    items = "".join(f"<li>{escape(a)}</li>" for a in c["assumptions"]) or "<li>no guarantee stated</li>"
    notes = "".join(f"<li>{escape(n)}</li>" for n in (c["guarantee"] or {}).get("notes", []))
    notes = f"<h3>Accountant notes</h3><ul>{notes}</ul>" if notes else ""
    alt = f"Epsilon of {c['name']}'s stated guarantee after each ledger entry, with its budget"
    caption = ("ε of the stated guarantee (the smaller route, primary accountant) after each ledger entry; shaded "
               "bands are the run's phases. Training releases nothing by itself: ε counts from the first release.")
    return (
        f'<section id="{element_id(c["name"], "details")}"><h2>{escape(c["name"])}</h2>{_statement(c, primary)}'
        f'<div class="cols">{_accountant_table(c, accountants, primary)}{_phase_table(c)}</div>'
        f'<figure><img id="{element_id(c["name"], "plot")}" src="data:image/png;base64,{png}" alt="{escape(alt)}">'
        f"<figcaption>{caption}</figcaption></figure>"
        f"{_refusal_list(c)}<h3>Assumptions</h3><ul>{items}</ul>{notes}"
        f"<h3>Ledger</h3><p>{_ledger_cell(c['ledger'])}. Check it yourself: "
        f"<code>mor-secure ledger verify clients/{escape(c['name'])}/ledger.jsonl</code></p></section>"
    )


def render_html(report: Mapping[str, Any], plots: Mapping[str, str]) -> str:
    accountants, primary = report["accountants"], report["primary_accountant"]
    flags = ", ".join(escape(f) for f in report["insecure_flags"])
    banner = (f'<p class="bad">Insecure flags in force for this run: {flags}</p>' if flags
              else '<p class="ok">No insecure flags in force.</p>')
    head = (
        "<tr><th>client<br><small>reward model</small></th><th>stated ε</th><th>δ</th><th>budget ε</th>"
        "<th>remaining ε</th><th>DP-SGD route ε</th><th>output route ε</th><th>status</th><th>insecure flags</th><th>ledger</th></tr>"
    )
    rows = "".join(_row(c, primary) for c in report["clients"])
    details = "".join(_details(c, plots[c["name"]], accountants, primary) for c in report["clients"])
    run = escape(str(report["run_id"] or "n/a"))
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        f"<title>Privacy report {run}</title><style>{_CSS}</style></head><body>"
        f"<h1>Privacy report</h1><p>Run <b>{run}</b>, generated {escape(report['generated_at'])} (UTC), "
        f"report schema version {report['schema_version']}. Every guarantee is record-level (ε, δ)-differential "
        "privacy for one client: the protected unit is one preference record of that client, and neighbouring "
        "datasets differ by adding or removing one such record. Each client's guarantee is the smaller of two routes "
        f"(DP-SGD training, or composition of its noised score releases), stated with {escape(primary)}; the other "
        "accountants are shown beside it. Everything here is computed from the clients' signed ledgers alone.</p>"
        f'{banner}<table id="clients"><caption>Clients (ε columns under {escape(primary)})</caption>{head}{rows}</table>'
        f"{details}</body></html>\n"
    )
