"""Crash safety: SIGKILL client processes at random moments, many times; the ledger never under-reports.

Three client folders run the real ``ClientNode`` (DP-SGD training with Opacus, then clipped, noised
score releases guarded by the budget) in child processes forked from a warm server
(``tests/helpers/crash_client.py --serve``). Each child is killed with SIGKILL at a random moment
of its training or of its scoring loop (the stage is drawn first and recognised from the child's
wire log, so machine load does not decide where kills land); the next child on the same folder resumes (opens the
ledger, repairs a torn tail if any, retrains if the RM was not finished). Outside the ledger each
child logs what it *actually* did to a wire log: the mechanism Opacus was configured with and every
score vector at the moment it would be sent.

After every kill: the ledger verifies (a torn final write is the only tolerated defect), every
release maps to its own earlier ledger entry with the same parameters, and the epsilon computed from
the ledger is at least the epsilon of what was actually released, recomputed from the wire log with
dp-accounting's PLD accountant. At the end each folder gets one run that is not killed; then every
ledger verifies outright and ``write_report`` states, for every client, an epsilon that is at least
the released one and within the client's budget.

``MOR_CRASH_KILLS`` (default 30) sets the number of kills; ``MOR_CRASH_SEED`` the delays' seed.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import pytest
import yaml
from helpers.hardening import record
from helpers.independent import pld_epsilon

from mor_secure.compliance.report import write_report
from mor_secure.config import ClientSection
from mor_secure.data import make_client_pairs
from mor_secure.data.storage import save_records
from mor_secure.federation.client_node import CLIENT_FILE, ClientSetup
from mor_secure.privacy.accounting import client_guarantee
from mor_secure.privacy.events import DpSgdTraining, GaussianScoreRelease
from mor_secure.privacy.ledger import generate_signing_key, load_public_key, read_ledger, verify_ledger

HELPER = Path(__file__).parent / "helpers" / "crash_client.py"
DELTA = 1e-5
PAIRS, BATCH, EPOCHS = 24, 8, 1  # a multiple of the batch: Opacus then runs exactly the recorded steps
KILLS = int(os.environ.get("MOR_CRASH_KILLS", "30"))
SEED = int(os.environ.get("MOR_CRASH_SEED", str(int(time.time()) % 100_000)))
TRAINING = {"epochs": EPOCHS, "batch_size": BATCH, "lr": 3e-3, "lora_r": 2}
CLIENTS = {
    # DP-trained, scores released without noise: the DP-SGD route carries everything (post-processing).
    "dp_free": {"privacy": {"dp_sgd": True, "epsilon": 2.0, "delta": DELTA},
                "budget": {"epsilon": 6.0, "delta": DELTA}, "scores": {"clip_bound": 1.0, "noise_std": 0.0}},
    # DP-trained and noised scores: the output route is smaller for the first few releases, then DP-SGD.
    "dp_mixed": {"privacy": {"dp_sgd": True, "epsilon": 2.0, "delta": DELTA},
                 "budget": {"epsilon": 6.0, "delta": DELTA}, "scores": {"clip_bound": 1.0, "noise_std": 24.0}},
    # No DP training: every release spends output-route budget until the client refuses (~9 releases).
    "output_only": {"privacy": {"dp_sgd": False}, "budget": {"epsilon": 3.0, "delta": DELTA},
                    "scores": {"clip_bound": 1.0, "noise_std": 16.0}},
}


def _make_client(folder: Path, name: str, section: dict) -> None:
    config = ClientSection.model_validate({"name": name, "families": ["colour"], "training": TRAINING, **section})
    folder.mkdir(parents=True)
    (folder / CLIENT_FILE).write_text(ClientSetup(config, 0, 32).to_json())
    save_records(make_client_pairs("shapes", ["colour"], PAIRS, seed=1), "pairs", folder / "data")
    generate_signing_key(folder / "ledger_key.pem", folder / "ledger_key.pub")


class ForkServer:
    """The helper's fork server: ``start`` forks a warm client process, ``wait`` reaps it."""

    def __init__(self, stderr_path: Path) -> None:
        self.stderr = open(stderr_path, "wb")
        self.proc = subprocess.Popen([sys.executable, str(HELPER), "--serve"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self.stderr, text=True, bufsize=1)
        assert self._read() == "ready"

    def _read(self) -> str:
        line = self.proc.stdout.readline().strip()
        if not line:
            raise RuntimeError(f"fork server died (exit {self.proc.poll()}); see {self.stderr.name}")
        return line

    def _ask(self, line: str, answer: str) -> int:
        self.proc.stdin.write(line + "\n")
        reply = self._read()
        assert reply.startswith(answer + " "), reply
        return int(reply.split()[1])

    def start(self, folder: Path, wire: Path, max_releases: int) -> int:
        return self._ask(f"run {folder} {wire} {max_releases}", "pid")

    def wait(self, pid: int) -> int:
        return self._ask(f"wait {pid}", "status")

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=30)
        self.stderr.close()


def _wire(path: Path) -> list[dict]:
    if not path.exists():
        return []
    lines = path.read_bytes().split(b"\n")
    # A kill can cut the wire log's own last line; what was cut was never acted on.
    return [json.loads(raw) for raw in lines if raw.strip() and raw.endswith(b"}")]


def released_epsilon(wire: list[dict]) -> float:
    """Epsilon of what the client actually did (wire log), recomputed independently (dp-accounting PLD).

    DP-SGD route: every training Opacus was configured for (killed ones too: stricter than needed),
    with its real sample rate and steps; it covers every release, since scores only come from a
    finished DP-trained model. Output route: every score vector sent. The smaller route."""
    trainings = [{"kind": "dpsgd_training", "noise_multiplier": r["noise_multiplier"], "sample_rate": r["sample_rate"],
                  "steps": r["steps_per_epoch"] * EPOCHS} for r in wire if r["ev"] == "dp_noise"]
    releases = [{"kind": "gaussian_score_release", "noise_std": r["noise_std"], "clip_bound": r["clip_bound"],
                 "count": r["count"]} for r in wire if r["ev"] == "release"]
    return pld_epsilon(trainings + releases, DELTA) if releases else 0.0  # no release: nothing left the client


def check_folder(folder: Path, wire: list[dict], *, final: bool) -> float:
    """The invariants after a kill (``final``: after a clean run). Returns the ledger's epsilon."""
    public_key = load_public_key(folder / "ledger_key.pub")
    if not (folder / "ledger.jsonl").exists():  # killed before its first entry: then nothing was released
        assert not final and not [r for r in wire if r["ev"] in ("release", "dp_noise")], folder.name
        return 0.0
    result = verify_ledger(folder / "ledger.jsonl", public_key)
    if final:
        assert result.ok, f"{folder.name}: {result.reason}"
    else:  # the only defect a kill may leave is a torn final write, repaired on the next open
        assert result.ok or result.torn_tail, f"{folder.name}: {result.reason}"
    pairs, _ = read_ledger(folder / "ledger.jsonl", public_key)
    entries = [json.loads(line) for line in (folder / "ledger.jsonl").read_bytes().split(b"\n")[: len(pairs)]]
    releases = [r for r in wire if r["ev"] == "release"]
    seqs = [r["seq"] for r in releases]
    assert len(set(seqs)) == len(seqs), f"{folder.name}: two releases claim one ledger entry"
    for r in releases:  # write-ahead: each release has its own committed, earlier entry
        assert 1 <= r["seq"] <= len(pairs), f"{folder.name}: release claims entry {r['seq']} of {len(pairs)}"
        event, entry = pairs[r["seq"] - 1][0], entries[r["seq"] - 1]
        assert event == GaussianScoreRelease(noise_std=r["noise_std"], clip_bound=r["clip_bound"], count=r["count"])
        assert datetime.fromisoformat(entry["time"]) <= datetime.fromisoformat(r["time"])
    recorded = [e for e, _ in pairs if isinstance(e, DpSgdTraining)]
    trained = [r for r in wire if r["ev"] == "dp_noise"]
    assert len(recorded) >= len(trained), f"{folder.name}: a training ran without its ledger entry"
    for t in trained:  # what Opacus ran is what the ledger says would run
        assert any(e.noise_multiplier == t["noise_multiplier"] and e.sample_rate >= t["sample_rate"]
                   and e.steps >= t["steps_per_epoch"] * EPOCHS for e in recorded), (t, recorded)
    reported = client_guarantee([e for e, _ in pairs], DELTA, accountants=()).epsilon
    released = released_epsilon(wire)
    assert reported >= released * (1 - 2e-3), f"{folder.name}: ledger epsilon {reported} < released {released}"
    return reported


def _lost_entries(folder: Path, committed: dict) -> int:
    """Committed entries of ``folder``'s ledger seen at its previous check that are not now at the
    same line, unchanged; updates ``committed``."""
    path = folder / "ledger.jsonl"
    if not path.exists():
        return len(committed.get(folder, []))
    pairs, _ = read_ledger(path, load_public_key(folder / "ledger_key.pub"))
    now = path.read_bytes().split(b"\n")[: len(pairs)]
    before = committed.get(folder, [])
    committed[folder] = now
    return sum(1 for i, line in enumerate(before) if i >= len(now) or now[i] != line)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("crash")
    for name, section in CLIENTS.items():
        _make_client(run_dir / "clients" / name, name, section)
    config = {"clients": [{"name": n, "budget": s["budget"]} for n, s in CLIENTS.items()]}
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config))
    (run_dir / "run_record.json").write_text(json.dumps({"run_id": "crash-run", "insecure_flags": []}))
    return run_dir


def _wait_for(wire: Path, before: int, events: set[str], timeout_s: float = 60.0) -> None:
    """Until the child logs one of ``events`` (or ends: ``done``/``refused``), or ``timeout_s``."""
    stop = time.monotonic() + timeout_s
    while time.monotonic() < stop:
        if {r["ev"] for r in _wire(wire)[before:]} & (events | {"done", "refused"}):
            return
        time.sleep(0.01)


def test_sigkill_during_training_and_scoring_never_under_reports(run_dir):
    """Each round picks a stage, waits (from the wire log) until the child is in it, then kills it
    after a further random delay: training (the first rounds of each folder, then by chance while
    its RM is not finished), or scoring."""
    rng = random.Random(SEED)
    folders = {name: run_dir / "clients" / name for name in CLIENTS}
    wires = {name: run_dir / f"wire-{name}.jsonl" for name in CLIENTS}
    server = ForkServer(run_dir / "children.stderr")
    killed_in = {"before_training": 0, "training": 0, "scoring": 0, "after_exit": 0}
    committed, lost = {}, 0  # each folder's committed ledger lines after the last kill; entries that vanished
    training_s = dict.fromkeys(CLIENTS, 1.5)  # how long each folder's training takes; from its wire log
    training_kills = dict.fromkeys(CLIENTS, 0)
    try:
        for i in range(KILLS):
            name = list(CLIENTS)[i % len(CLIENTS)]
            before = len(_wire(wires[name]))
            trained = (folders[name] / "rm" / "complete").exists()
            pid = server.start(folders[name], wires[name], 1000)
            if not trained and (training_kills[name] < 3 or rng.random() < 0.3):
                _wait_for(wires[name], before, {"train_start"})
                time.sleep(rng.uniform(0.0, 0.8 * training_s[name]))
            else:
                _wait_for(wires[name], before, {"train_done"})
                time.sleep(rng.uniform(0.0, 1.5))
            os.kill(pid, signal.SIGKILL)
            status = server.wait(pid)
            rows = _wire(wires[name])[before:]
            mine = [r["ev"] for r in rows]
            if os.WIFEXITED(status):
                assert os.WEXITSTATUS(status) == 0, (run_dir / "children.stderr").read_text()[-3000:]
                killed_in["after_exit"] += 1
            else:
                assert os.WTERMSIG(status) == signal.SIGKILL
                stage = ("scoring" if "train_done" in mine else "training" if "train_start" in mine else "before_training")
                killed_in[stage] += 1
                training_kills[name] += stage == "training"
            if "train_start" in mine and "train_done" in mine:
                t = {r["ev"]: r["t"] for r in rows}
                training_s[name] = t["train_done"] - t["train_start"]
            check_folder(folders[name], _wire(wires[name]), final=False)
            lost += _lost_entries(folders[name], committed)
        for name in CLIENTS:  # one run each that finishes: reopen, repair, release a few, exit;
            # output_only releases until its budget refuses (bounded: about 9 releases in all), so the
            # refusal is reached however few releases the kills above left time for
            pid = server.start(folders[name], wires[name], 1000 if name == "output_only" else 3)
            status = server.wait(pid)
            assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, (run_dir / "children.stderr").read_text()[-3000:]
    finally:
        server.close()
    print(f"seed {SEED}: {KILLS} kills {killed_in}")
    # at least 9 rounds aim at training; a fast machine may finish some before the kill lands
    assert killed_in["training"] >= 4 and killed_in["scoring"] >= KILLS // 3, killed_in

    _, json_path = write_report(run_dir)
    report = {c["name"]: c for c in json.loads(json_path.read_text())["clients"]}
    for name in CLIENTS:
        wire = _wire(wires[name])
        reported = check_folder(folders[name], wire, final=True)
        c = report[name]
        assert c["ledger"]["ok"] and c["guarantee_valid"], c["ledger"]
        assert c["guarantee"]["epsilon"] == pytest.approx(reported)
        assert c["guarantee"]["epsilon"] >= released_epsilon(wire) * (1 - 2e-3)
        assert c["within_budget"], (name, c["guarantee"]["epsilon"], c["budget"])
    # the scenario did what it is for: releases on every folder, refusals where the budget ran out
    assert all(any(r["ev"] == "release" for r in _wire(w)) for w in wires.values())
    assert any(r["ev"] == "refused" for r in _wire(wires["output_only"]))
    assert report["dp_free"]["guarantee"]["route"] == "dpsgd" and report["output_only"]["guarantee"]["route"] == "output"
    lost += sum(_lost_entries(folders[name], committed) for name in CLIENTS)
    assert lost == 0, f"{lost} committed ledger entries changed or vanished after a kill"
    record("tests/test_crash_safety.py::test_sigkill_during_training_and_scoring_never_under_reports",
           faults=sum(killed_in.values()) - killed_in["after_exit"], runs=len(CLIENTS), runs_finished=len(CLIENTS),
           ledger_entries_lost=lost)
