"""threat_model.md cannot drift: every threat points at tests pytest collects, or is marked open.

Rules checked on the "Threats, mitigations, tests" table:
* a row whose test cell is exactly ``**open**`` is an open threat: it may cite no test;
* every other row cites at least one ``tests/<file>.py::<test>`` and is not marked open anywhere;
* every ``tests/...::...`` reference anywhere in the document is collected by pytest;
* every module path in the module column exists;
* every adversary of the "Adversaries" section is the adversary of at least one threat, and the
  adversaries the design names are all there.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "threat_model.md"
TABLE_HEADING = "## Threats, mitigations, tests"
COLUMNS = ["#", "adversary", "threat", "mitigation", "module", "test"]
OPEN = "**open**"
TEST_REF = re.compile(r"`(tests/[\w/]+\.py)::(\w+)`")
MODULE_REF = re.compile(r"`(mor_secure/[\w/]+\.py)`")
REQUIRED_ADVERSARIES = {
    "curious server", "malicious server", "curious client", "network attacker",
    "colluding server and decryptor", "poisoning client",
}


def section(text: str, heading: str) -> str:
    start = text.index(heading) + len(heading)
    nxt = text.find("\n## ", start)
    return text[start:] if nxt < 0 else text[start:nxt]


def threat_rows(text: str) -> list[dict[str, str]]:
    """The threats table as dicts keyed by ``COLUMNS``."""
    lines = [ln for ln in section(text, TABLE_HEADING).splitlines() if ln.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert header == COLUMNS, f"threat table columns changed: {header}"
    rows = []
    for line in lines[2:]:  # skip header and separator
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        assert len(cells) == len(COLUMNS), f"row has {len(cells)} cells, expected {len(COLUMNS)}: {line}"
        rows.append(dict(zip(COLUMNS, cells)))
    return rows


def row_problems(row: dict[str, str]) -> list[str]:
    """Why a threat row breaks the rules (empty when it is fine)."""
    refs = TEST_REF.findall(row["test"])
    name = row["#"]
    if row["test"] == OPEN:
        return [f"{name}: open threat cites a test"] if TEST_REF.search(" ".join(row.values())) else []
    problems = []
    if not refs:
        problems.append(f"{name}: no test reference and not marked {OPEN} in its test column")
    if OPEN in " ".join(row.values()):
        problems.append(f"{name}: marked open but its test column is not exactly {OPEN}")
    leftover = TEST_REF.sub("", row["test"]).replace(",", "").strip()
    if leftover:
        problems.append(f"{name}: test column holds something other than test references: {leftover!r}")
    return problems


def collected(files: set[str]) -> set[str]:
    """``file::test`` ids that pytest collects from ``files`` (parametrisation stripped)."""
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *sorted(files)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, f"pytest could not collect {sorted(files)}:\n{proc.stdout[-4000:]}\n{proc.stderr[-2000:]}"
    return {line.split("[")[0] for line in proc.stdout.splitlines() if "::" in line}


@pytest.fixture(scope="module")
def text() -> str:
    return DOC.read_text()


def test_every_threat_row_cites_a_test_or_is_marked_open(text):
    rows = threat_rows(text)
    assert len(rows) >= 10
    problems = [p for row in rows for p in row_problems(row)]
    assert not problems, "\n".join(problems)
    assert len({r["#"] for r in rows}) == len(rows), "threat ids must be unique"


def test_every_referenced_test_is_collected_by_pytest(text):
    refs = {f"{f}::{t}" for f, t in TEST_REF.findall(text)}
    missing_files = sorted({r.split("::")[0] for r in refs if not (ROOT / r.split("::")[0]).is_file()})
    assert not missing_files, f"threat_model.md cites test files that do not exist: {missing_files}"
    found = collected({r.split("::")[0] for r in refs})
    missing = sorted(refs - found)
    assert not missing, f"threat_model.md cites tests pytest does not collect: {missing}"


def test_every_cited_module_exists(text):
    modules = set(MODULE_REF.findall(text))
    assert modules
    missing = sorted(m for m in modules if not (ROOT / m).is_file())
    assert not missing, f"threat_model.md cites modules that do not exist: {missing}"


def test_every_adversary_has_a_threat(text):
    listed = set(re.findall(r"^- \*\*([^*]+)\*\*:", section(text, "## Adversaries"), flags=re.M))
    assert REQUIRED_ADVERSARIES <= listed, f"adversaries missing from the list: {REQUIRED_ADVERSARIES - listed}"
    used = {r["adversary"] for r in threat_rows(text)}
    assert listed <= used, f"adversaries with no threat row: {sorted(listed - used)}"
    assert used <= listed, f"threat rows name adversaries not in the list: {sorted(used - listed)}"


def test_known_limits_are_stated(text):
    limits = section(text, "## Known limits, stated plainly")
    for phrase in ("torchcsprng", "shared by all clients", "Prompts are visible to clients"):
        assert phrase in limits, f"known limit missing: {phrase!r}"


@pytest.mark.parametrize("row, ok", [
    ({"#": "X", "test": "`tests/test_a.py::test_b`", "mitigation": "m"}, True),
    ({"#": "X", "test": "", "mitigation": "m"}, False),  # silently untested
    ({"#": "X", "test": "todo", "mitigation": "m"}, False),
    ({"#": "X", "test": OPEN, "mitigation": "nothing yet"}, True),
    ({"#": "X", "test": OPEN, "mitigation": "see `tests/test_a.py::test_b`"}, False),  # open but cites a test
    ({"#": "X", "test": "`tests/test_a.py::test_b`", "mitigation": f"{OPEN}: partly"}, False),
    ({"#": "X", "test": "open", "mitigation": "m"}, False),  # open must be explicit
])
def test_row_rules(row, ok):
    assert (row_problems(row) == []) is ok
