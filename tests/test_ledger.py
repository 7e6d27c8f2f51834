"""The ledger: write-ahead append, hash chain, signatures, verification and torn-tail handling."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import stat
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mor_secure import cli
from mor_secure.errors import CryptoError, LedgerError
from mor_secure.privacy import ledger as ledger_mod
from mor_secure.privacy.events import DpSgdTraining, GaussianScoreRelease
from mor_secure.privacy.ledger import (
    GENESIS_HASH,
    Ledger,
    events,
    generate_signing_key,
    load_public_key,
    load_signing_key,
    verify_ledger,
)

TRAIN = DpSgdTraining(noise_multiplier=1.1, sample_rate=0.05, steps=60, max_grad_norm=1.0, num_records=1000)
RELEASE = GaussianScoreRelease(noise_std=2.5, clip_bound=1.0, count=8)
CTX = {"run_id": "r1", "phase": "grpo", "purpose": "scores", "client": "hospital-a"}


@pytest.fixture
def key(tmp_path):
    return generate_signing_key(tmp_path / "ledger_key.pem")


def _filled(path: Path, key, n: int = 4) -> Ledger:
    led = Ledger(path, signing_key=key)
    led.append(TRAIN, {**CTX, "phase": "rm_training"})
    for i in range(n - 1):
        led.append(RELEASE, {**CTX, "step": i})
    return led


def test_keys_are_owner_only_and_round_trip(tmp_path, key):
    priv = tmp_path / "ledger_key.pem"
    assert stat.S_IMODE(priv.stat().st_mode) == 0o600
    assert load_signing_key(priv).public_key().public_bytes_raw() == key.public_key().public_bytes_raw()
    assert load_public_key(tmp_path / "ledger_key.pub").public_bytes_raw() == key.public_key().public_bytes_raw()
    with pytest.raises(CryptoError, match="already exists"):
        generate_signing_key(priv)
    priv.chmod(0o644)
    with pytest.raises(CryptoError, match="chmod 600"):
        load_signing_key(priv)


def test_append_chains_signs_and_reopens(tmp_path, key):
    path = tmp_path / "ledger.jsonl"
    led = _filled(path, key, n=3)
    entries = led.entries
    assert [e["seq"] for e in entries] == [1, 2, 3]
    assert entries[0]["prev_hash"] == GENESIS_HASH
    assert all(b["prev_hash"] == a["hash"] for a, b in zip(entries, entries[1:]))
    assert verify_ledger(path, key.public_key()) == ledger_mod.VerifyResult(True, 3, None, "ok")
    reopened = Ledger(path, signing_key=key)
    entry = reopened.append(RELEASE, CTX)
    assert entry["seq"] == 4 and entry["prev_hash"] == entries[-1]["hash"]
    assert events(path, key.public_key())[0] == (TRAIN, {**CTX, "phase": "rm_training"})
    assert verify_ledger(path, key.public_key()).ok


def test_append_fsyncs_before_returning(tmp_path, key, monkeypatch):
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(ledger_mod.os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd)))
    Ledger(tmp_path / "ledger.jsonl", signing_key=key).append(RELEASE, CTX)
    assert len(synced) >= 2  # the directory on create, then the file after the write


def test_read_only_and_key_mismatch_and_bad_context(tmp_path, key):
    path = tmp_path / "ledger.jsonl"
    _filled(path, key, n=2)
    read_only = Ledger(path, public_key=key.public_key())
    assert len(read_only) == 2
    with pytest.raises(LedgerError, match="read-only"):
        read_only.append(RELEASE, CTX)
    other = generate_signing_key(tmp_path / "other.pem")
    with pytest.raises(LedgerError, match="does not match"):
        Ledger(path, signing_key=key, public_key=other.public_key())
    with pytest.raises(LedgerError, match="line 1: bad signature"):
        Ledger(path, public_key=other.public_key())
    led = Ledger(path, signing_key=key)
    with pytest.raises(LedgerError, match=r"context\['phase'\]"):
        led.append(RELEASE, {"run_id": "r1", "purpose": "x"})
    with pytest.raises(LedgerError, match="JSON-serialisable"):
        led.append(RELEASE, {**CTX, "loss": float("nan")})


def test_refused_check_writes_nothing(tmp_path, key):
    path = tmp_path / "ledger.jsonl"
    led = _filled(path, key, n=2)
    before = path.read_bytes()

    def refuse(entries):
        assert entries[-1] == (RELEASE, CTX) and len(entries) == 3
        raise RuntimeError("no")

    with pytest.raises(RuntimeError):
        led.append(RELEASE, CTX, check=refuse)
    assert path.read_bytes() == before and len(led) == 2


def test_two_writers_keep_one_chain(tmp_path, key):
    path = tmp_path / "ledger.jsonl"
    a, b = Ledger(path, signing_key=key), Ledger(path, signing_key=key)
    a.append(TRAIN, CTX)
    b.append(RELEASE, CTX)  # b sees a's entry under the lock and continues after it
    a.append(RELEASE, CTX)
    result = verify_ledger(path, key.public_key())
    assert result.ok and result.entries == 3


def test_removed_or_swapped_lines_are_named(tmp_path, key):
    path = tmp_path / "ledger.jsonl"
    _filled(path, key, n=4)
    lines = path.read_bytes().splitlines(keepends=True)
    path.write_bytes(b"".join(lines[:1] + lines[2:]))
    assert verify_ledger(path, key.public_key()).first_bad == 2
    path.write_bytes(b"".join([lines[0], lines[2], lines[1], lines[3]]))
    result = verify_ledger(path, key.public_key())
    assert (result.ok, result.first_bad, result.entries) == (False, 2, 1)
    with pytest.raises(LedgerError, match="line 2"):
        Ledger(path, signing_key=key)
    with pytest.raises(LedgerError, match="line 2"):
        events(path)


@pytest.fixture(scope="module")
def pristine_files(tmp_path_factory):
    """A 4-entry ledger (a training, three releases) and its key pair, in one folder; and its bytes."""
    tmp = tmp_path_factory.mktemp("pristine")
    key = generate_signing_key(tmp / "k.pem")
    _filled(tmp / "ledger.jsonl", key, n=4)
    return tmp, (tmp / "ledger.jsonl").read_bytes()


@pytest.fixture(scope="module")
def pristine(pristine_files):
    folder, raw = pristine_files
    return raw, load_public_key(folder / "k.pub")


@st.composite
def one_byte_changed(draw, raw: bytes) -> tuple[bytes, int]:
    """``raw`` with one byte replaced, and the line whose content (or final newline) held that byte."""
    pos = draw(st.integers(0, len(raw) - 1), label="position")
    new = draw(st.integers(0, 255).filter(lambda b: b != raw[pos]), label="byte")
    return raw[:pos] + bytes([new]) + raw[pos + 1 :], raw[:pos].count(b"\n") + 1


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_any_single_byte_change_is_detected_at_its_line(pristine, data):
    raw, public_key = pristine
    changed, line = data.draw(one_byte_changed(raw))
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "ledger.jsonl"
        path.write_bytes(changed)
        result = verify_ledger(path, public_key)
    assert not result.ok
    assert result.first_bad == line, result.reason
    assert result.entries == line - 1


def test_signature_has_one_spelling(tmp_path, key):
    path = tmp_path / "ledger.jsonl"
    _filled(path, key, n=2)
    entry = json.loads(path.read_bytes().splitlines()[1])
    upper = entry["signature"].upper()  # same bytes to bytes.fromhex, different file
    raw = path.read_bytes().replace(entry["signature"].encode(), upper.encode())
    path.write_bytes(raw)
    result = verify_ledger(path, key.public_key())
    assert (result.ok, result.first_bad) == (False, 2) and "bad signature" in result.reason


def test_torn_tail_is_reported_moved_aside_and_chain_continues(tmp_path, key):
    path = tmp_path / "ledger.jsonl"
    _filled(path, key, n=3)
    committed = path.read_bytes()
    torn = committed.splitlines(keepends=True)[-1][:57]  # a crash mid-write of a 4th line
    path.write_bytes(committed + torn)
    result = verify_ledger(path, key.public_key())
    assert (result.ok, result.torn_tail, result.first_bad, result.entries) == (False, True, 4, 3)
    assert "torn_tail" in result.reason
    assert len(events(path, key.public_key())) == 3  # never committed, so not an event
    assert len(Ledger(path, public_key=key.public_key())) == 3  # read-only open leaves the file alone
    assert path.read_bytes() == committed + torn

    led = Ledger(path, signing_key=key)  # reopen for append: move aside, continue
    (aside,) = tmp_path.glob("ledger.jsonl.torn-*")
    assert aside.read_bytes() == torn
    assert path.read_bytes() == committed
    assert led.append(RELEASE, CTX)["seq"] == 4
    assert verify_ledger(path, key.public_key()).ok


def test_complete_entry_missing_only_its_newline_is_kept(tmp_path, key):
    path = tmp_path / "ledger.jsonl"
    _filled(path, key, n=3)
    path.write_bytes(path.read_bytes()[:-1])
    result = verify_ledger(path, key.public_key())
    assert result.ok and result.entries == 3 and not result.torn_tail
    led = Ledger(path, signing_key=key)
    assert led.append(RELEASE, CTX)["seq"] == 4
    assert verify_ledger(path, key.public_key()).entries == 4


def test_tail_holding_a_complete_but_altered_entry_is_not_torn(tmp_path, key):
    path = tmp_path / "ledger.jsonl"
    _filled(path, key, n=2)
    lines = path.read_bytes().splitlines()
    entry = json.loads(lines[-1])
    entry["event"]["noise_std"] = 100.0
    path.write_bytes(lines[0] + b"\n" + ledger_mod.canonical_json(entry))
    result = verify_ledger(path, key.public_key())
    assert (result.ok, result.torn_tail, result.first_bad) == (False, False, 2)
    assert "hash mismatch" in result.reason
    with pytest.raises(LedgerError, match="line 2"):
        Ledger(path, signing_key=key)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_cli_verify_fails_on_any_changed_byte_and_names_the_entry(pristine_files, data):
    """``mor-secure ledger verify`` (the command a compliance officer runs) on a copy with one byte changed."""
    folder, raw = pristine_files
    changed, line = data.draw(one_byte_changed(raw))
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "ledger.jsonl"
        path.write_bytes(changed)
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            code = cli.main(["ledger", "verify", str(path), "--key", str(folder / "k.pub")])
    assert code == 1
    assert re.search(rf"^FAILED: .*: entry {line} \(line {line}\) is the first bad entry: .*Entries before it verify: {line - 1}\.$",
                     out.getvalue(), re.M), out.getvalue()


def test_cli_verify_passes_an_intact_ledger_and_fails_a_foreign_key_or_a_missing_file(pristine_files, tmp_path):
    folder, _ = pristine_files
    assert not verify_ledger(tmp_path / "nothing.jsonl", load_public_key(folder / "k.pub")).ok
    with contextlib.redirect_stdout(io.StringIO()) as out:
        assert cli.main(["ledger", "verify", str(tmp_path / "nothing.jsonl"), "--key", str(folder / "k.pub")]) == 1
    assert "ledger file missing" in out.getvalue()
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert cli.main(["ledger", "verify", str(folder / "ledger.jsonl"), "--key", str(folder / "k.pub")]) == 0
    assert out.getvalue().startswith("OK: ") and "(4 entries" in out.getvalue()
    generate_signing_key(tmp_path / "other.pem")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert cli.main(["ledger", "verify", str(folder / "ledger.jsonl"), "--key", str(tmp_path / "other.pub")]) == 1
    assert "entry 1 (line 1) is the first bad entry: bad signature" in out.getvalue()


def test_entries_spell_out_mechanism_and_sensitivity_and_they_must_match(tmp_path, key):
    path = tmp_path / "ledger.jsonl"
    _filled(path, key, n=2)
    train, release = (json.loads(line)["event"] for line in path.read_text().splitlines())
    assert (train["mechanism"], train["l2_sensitivity"]) == ("poisson_subsampled_gaussian", TRAIN.max_grad_norm)
    assert (release["mechanism"], release["l2_sensitivity"]) == ("gaussian", 2 * 1.0 * 8 ** 0.5)
    assert ledger_mod.event_from_dict(release) == RELEASE
    with pytest.raises(LedgerError, match="l2_sensitivity=1.0 but its fields give"):
        ledger_mod.event_from_dict({**release, "l2_sensitivity": 1.0})
