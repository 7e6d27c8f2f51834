"""The HTML report in a real headless browser (Debian's chromium, installed by scripts/setup.sh).

Chromium loads a copy of the report with a small probe script appended (the report itself has no
scripts); after the load event the probe records, for every client of the JSON report, whether its
summary row is there and shows its name and stated epsilon, and whether its plot decoded to a real
image with a size on the page. ``--dump-dom`` returns the DOM with the probe's result. A screenshot
checks the page paints (not blank).

Without chromium the test skips, except under CI (env ``CI`` set), where a missing browser fails.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from html import unescape
from pathlib import Path

import pytest
from helpers.report_run import CONFIG, make_run_dir
from PIL import Image

from mor_secure.compliance.report import write_report
from mor_secure.compliance.report_html import element_id

BROWSERS = ("chromium", "chromium-browser")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--virtual-time-budget=10000"]

PROBE = """<script>
window.addEventListener("load", function () {
  var out = {};
  JSON.parse(document.getElementById("probe-ids").textContent).forEach(function (c) {
    var row = document.getElementById(c.row), img = document.getElementById(c.plot);
    var box = img ? img.getBoundingClientRect() : null;
    out[c.name] = {
      row: !!row && row.tagName === "TR",
      row_text: row ? row.innerText : "",
      plot_decoded: !!img && img.complete && img.naturalWidth > 0 && img.naturalHeight > 0,
      plot_size: img ? [img.naturalWidth, img.naturalHeight] : null,
      plot_on_page: !!box && box.width > 100 && box.height > 50
    };
  });
  var pre = document.createElement("pre");
  pre.id = "probe-result";
  pre.textContent = JSON.stringify(out);
  document.body.appendChild(pre);
});
</script>"""


def _browser() -> str:
    found = next((path for path in map(shutil.which, BROWSERS) if path), None)
    if found:
        return found
    message = "chromium is not installed (scripts/setup.sh installs it with apt-get when run as root on Debian)"
    if os.environ.get("CI"):
        pytest.fail(f"{message}; under CI the browser check must run")
    pytest.skip(message)


def _run(browser: str, tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    profile = tmp_path / f"profile-{len(list(tmp_path.glob('profile-*')))}"  # a fresh profile each time
    cmd = [browser, *FLAGS, f"--user-data-dir={profile}", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    run_dir = make_run_dir(tmp_path_factory.mktemp("run"))
    html_path, json_path = write_report(run_dir)
    return html_path, json.loads(json_path.read_text())


def test_browser_finds_each_clients_row_and_plot(report, tmp_path):
    browser = _browser()
    html_path, data = report
    ids = [{"name": c["name"], "row": element_id(c["name"]), "plot": element_id(c["name"], "plot")} for c in data["clients"]]
    probe_ids = f'<script type="application/json" id="probe-ids">{json.dumps(ids)}</script>'
    page = tmp_path / "probed.html"
    page.write_text(html_path.read_text().replace("</body>", probe_ids + PROBE + "</body>"))

    done = _run(browser, tmp_path, "--dump-dom", page.as_uri())
    found = re.search(r'<pre id="probe-result">(.*?)</pre>', done.stdout, re.S)
    assert found, f"the probe did not run (exit {done.returncode}): {done.stderr[-2000:]}"
    result = json.loads(unescape(found.group(1)))
    assert set(result) == {c["name"] for c in data["clients"]} and len(result) == len(CONFIG["clients"])
    for c in data["clients"]:
        seen = result[c["name"]]
        assert seen["row"] and c["name"] in seen["row_text"], (c["name"], seen)
        g = c["guarantee"]
        if g is not None:  # the stated epsilon, as the report prints it, is in the row
            relation = "=" if c["guarantee_valid"] else "≥"  # an altered ledger: at least its verified prefix
            assert f"ε {relation} {float(g['epsilon']):.4g}" in seen["row_text"], (c["name"], seen["row_text"])
        assert seen["plot_decoded"] and seen["plot_size"][0] >= 300, (c["name"], seen)
        assert seen["plot_on_page"], (c["name"], seen)

    shot = tmp_path / "report.png"
    done = _run(browser, tmp_path, "--window-size=1300,1800", f"--screenshot={shot}", html_path.as_uri())
    assert shot.exists(), f"no screenshot (exit {done.returncode}): {done.stderr[-2000:]}"
    with Image.open(shot) as img:
        colours = img.convert("RGB").getcolors(maxcolors=1 << 20)
        assert img.size == (1300, 1800)
    assert colours is None or len(colours) > 50, "the page painted (almost) nothing"
