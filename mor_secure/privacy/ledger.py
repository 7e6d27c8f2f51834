"""The privacy ledger: an append-only, fsync'd, hash-chained, Ed25519-signed JSON-lines file.

Every release that depends on a client's private data is recorded here *before* it leaves the
client (write-ahead): :meth:`Ledger.append` returns only after the entry is on disk, so a crash
can never under-report epsilon. Reports are computed from the ledger alone.

File format: one canonical JSON object per line (sorted keys, no spaces, ASCII), each ending in
``\\n``. An entry has ``seq`` (1-based; equals its line number), ``time`` (UTC ISO-8601),
``prev_hash`` (the previous entry's ``hash``; 64 zeros for the first), ``event``
(:func:`~mor_secure.privacy.events.event_to_dict`), ``context`` (``run_id``, ``phase``,
``purpose`` and free-form extras), ``hash`` (SHA-256 hex of the canonical JSON of the fields
before it) and ``signature`` (Ed25519 over the 32 raw hash bytes, hex).

Torn-tail policy (a crash in the middle of an append): the only bytes a crash can leave
unfinished are a final segment with no ``\\n``. If that segment is an exact, verifying entry,
only its newline was lost: it is a complete entry, is counted, and gets its newline back on the
next append (complete entries are never dropped). If it does not even start with a complete JSON
object, it is a *torn tail*: the append that wrote it never returned, so nothing was released.
:func:`verify_ledger` reports it (``ok=False``, ``torn_tail=True``, ``first_bad`` = its line);
opening the ledger for append moves those bytes aside to ``<ledger>.torn-<UTC time>`` and
continues the chain. Any other defect (bad hash, chain, signature, seq, JSON, a non-canonical
line) makes the ledger refuse to open for append: fail closed, a person must look.

Limitation: a hash chain cannot show that whole entries were cut off the end of the file; a
report's entry count can be cross-checked against what the server received.
"""

from __future__ import annotations

import copy
import fcntl
import hashlib
import json
import os
import stat
import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from mor_secure.crypto.kitfs import fsync_dir, write_file
from mor_secure.errors import CryptoError, LedgerError
from mor_secure.privacy.events import EVENT_TYPES, PrivacyEvent, event_from_dict, event_to_dict

GENESIS_HASH = "0" * 64
REQUIRED_CONTEXT = ("run_id", "phase", "purpose")
_HASHED_FIELDS = ("seq", "time", "prev_hash", "event", "context")
_ENTRY_FIELDS = frozenset(_HASHED_FIELDS + ("hash", "signature"))


def canonical_json(obj: Any) -> bytes:
    """The one byte encoding used for hashing and for the lines of the file."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode()


def _entry_hash(entry: Mapping[str, Any]) -> str:
    return hashlib.sha256(canonical_json({k: entry[k] for k in _HASHED_FIELDS})).hexdigest()


# ---------------------------------------------------------------- keys


def generate_signing_key(path: Path, public_path: Path | None = None) -> Ed25519PrivateKey:
    """Create a new Ed25519 ledger key: private PEM at ``path`` (mode 0600, never overwritten),
    public PEM at ``public_path`` (default ``path`` with suffix ``.pub``)."""
    path = Path(path)
    public_path = Path(public_path) if public_path else path.with_suffix(".pub")
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    try:
        write_file(path, pem)  # exclusive create, mode 0600, fsync'd
    except FileExistsError:
        raise CryptoError(f"signing key {path} already exists; load it with load_signing_key or remove it.") from None
    public_path.write_bytes(
        key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    return key


def load_signing_key(path: Path) -> Ed25519PrivateKey:
    """Load a private ledger key; refuses a file that group or others can access."""
    path = Path(path)
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
        data = path.read_bytes()
    except OSError as exc:
        raise CryptoError(f"cannot read signing key {path}: {exc}") from exc
    if mode & 0o077:
        raise CryptoError(f"signing key {path} has mode {oct(mode)}; it must be owner-only. Run: chmod 600 {path}")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise CryptoError(f"signing key {path} is not an unencrypted PEM private key: {exc}") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise CryptoError(f"signing key {path} is {type(key).__name__}; the ledger needs Ed25519.")
    return key


def load_public_key(path: Path) -> Ed25519PublicKey:
    path = Path(path)
    try:
        key = serialization.load_pem_public_key(path.read_bytes())
    except (OSError, ValueError) as exc:
        raise CryptoError(f"cannot load public key {path}: {exc}") from exc
    if not isinstance(key, Ed25519PublicKey):
        raise CryptoError(f"public key {path} is {type(key).__name__}; the ledger needs Ed25519.")
    return key


# ---------------------------------------------------------------- reading and verification


@dataclass(frozen=True)
class VerifyResult:
    """Outcome of verifying a ledger. ``first_bad`` is the 1-based line (= seq) of the first bad entry."""

    ok: bool
    entries: int
    first_bad: int | None
    reason: str
    torn_tail: bool = False


@dataclass(frozen=True)
class _Scan:
    entries: list[dict[str, Any]]
    result: VerifyResult
    good_bytes: int  # length of the verified prefix, newline-terminated lines only
    missing_newline: bool  # the last verified entry lacks its "\n"


def _check_line(raw: bytes, seq: int, prev_hash: str, public_key: Ed25519PublicKey | None) -> dict[str, Any]:
    """Parse and verify one line; raise ValueError naming the defect."""
    try:
        entry = json.loads(raw.decode("ascii"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"malformed JSON ({exc})") from None
    if not isinstance(entry, dict) or set(entry) != _ENTRY_FIELDS:
        raise ValueError(f"entry fields must be {sorted(_ENTRY_FIELDS)}")
    if canonical_json(entry) != raw:
        raise ValueError("line is not in canonical JSON form")
    if entry["seq"] != seq:
        raise ValueError(f"bad seq: expected {seq}, found {entry['seq']!r}")
    if entry["prev_hash"] != prev_hash:
        raise ValueError("broken chain: prev_hash does not match the previous entry's hash")
    if entry["hash"] != _entry_hash(entry):
        raise ValueError("hash mismatch: the entry's content was changed")
    try:
        signature = bytes.fromhex(entry["signature"])
        if signature.hex() != entry["signature"]:  # one spelling only: lower-case hex
            raise ValueError
        if public_key is not None:
            public_key.verify(signature, bytes.fromhex(entry["hash"]))
    except (InvalidSignature, ValueError, TypeError):
        raise ValueError("bad signature") from None
    try:
        event_from_dict(entry["event"])
    except LedgerError as exc:
        raise ValueError(str(exc)) from None
    if not isinstance(entry["context"], dict):
        raise ValueError("context is not an object")
    return entry


def _starts_with_json_object(raw: bytes) -> bool:
    """True if ``raw`` begins with a whole JSON object: then it is not a prefix cut by a crash."""
    try:
        return isinstance(json.JSONDecoder().raw_decode(raw.decode("ascii", errors="replace"))[0], dict)
    except json.JSONDecodeError:
        return False


def _scan(path: Path, public_key: Ed25519PublicKey | None) -> _Scan:
    data = Path(path).read_bytes() if Path(path).exists() else b""
    *lines, tail = data.split(b"\n")
    entries: list[dict[str, Any]] = []
    prev, offset = GENESIS_HASH, 0

    def bad(reason: str, torn: bool = False) -> _Scan:
        line = len(entries) + 1
        return _Scan(entries, VerifyResult(False, len(entries), line, f"line {line}: {reason}", torn), offset, False)

    for raw in lines:
        try:
            entry = _check_line(raw, len(entries) + 1, prev, public_key)
        except ValueError as exc:
            return bad(str(exc))
        entries.append(entry)
        prev, offset = entry["hash"], offset + len(raw) + 1
    if tail:
        try:
            entries.append(_check_line(tail, len(entries) + 1, prev, public_key))
        except ValueError as exc:
            if _starts_with_json_object(tail):
                return bad(str(exc))
            return bad(f"torn_tail: {len(tail)} bytes of an incomplete final write (not a committed entry)", torn=True)
        result = VerifyResult(True, len(entries), None, "ok (final newline missing; restored on next append)")
        return _Scan(entries, result, offset, True)
    return _Scan(entries, VerifyResult(True, len(entries), None, "ok"), offset, False)


def verify_ledger(path: Path, public_key: Ed25519PublicKey) -> VerifyResult:
    """Check every entry's JSON, seq, chain, hash and signature; name the first bad line.
    A missing file fails (``first_bad`` is ``None``): there is nothing to vouch for."""
    if not Path(path).is_file():
        return VerifyResult(False, 0, None, f"ledger file missing: {path}")
    return _scan(path, public_key).result


def read_entries(path: Path, public_key: Ed25519PublicKey | None) -> tuple[list[dict[str, Any]], VerifyResult]:
    """The raw entries (``seq``, ``time``, ``event``, ``context``, ...) of the verified prefix, in
    order, and the verification result. Signatures are checked only when ``public_key`` is given."""
    scan = _scan(path, public_key)
    return scan.entries, scan.result


def read_ledger(path: Path, public_key: Ed25519PublicKey | None) -> tuple[list[tuple[PrivacyEvent, dict[str, Any]]], VerifyResult]:
    """The (event, context) pairs of the verified prefix, in order, and the verification result.
    Signatures are checked only when ``public_key`` is given."""
    entries, result = read_entries(path, public_key)
    return [(event_from_dict(e["event"]), e["context"]) for e in entries], result


def events(path: Path, public_key: Ed25519PublicKey | None = None) -> list[tuple[PrivacyEvent, dict[str, Any]]]:
    """The committed (event, context) pairs, in order. Checks the chain (and signatures when a key is
    given); a torn tail is skipped (it was never committed); any other defect raises LedgerError."""
    pairs, result = read_ledger(path, public_key)
    if not result.ok and not result.torn_tail:
        raise LedgerError(f"ledger {path} failed verification at {result.reason}")
    return pairs


# ---------------------------------------------------------------- the writer


def _check_context(context: Mapping[str, Any]) -> dict[str, Any]:
    if not isinstance(context, Mapping):
        raise LedgerError(f"context must be a dict. Found {type(context).__name__}.")
    for key in REQUIRED_CONTEXT:
        if not isinstance(context.get(key), str) or not context[key]:
            raise LedgerError(f"context[{key!r}] must be a non-empty string. Found {context.get(key)!r}.")
    try:
        return json.loads(canonical_json(dict(context)))
    except (TypeError, ValueError) as exc:
        raise LedgerError(f"context must be JSON-serialisable with finite numbers: {exc}") from exc


class Ledger:
    """A client's privacy ledger. Opening verifies the whole file and continues its chain.

    With ``signing_key`` the ledger can append; with only ``public_key`` it is read-only.
    One writer at a time is enforced with an exclusive ``flock`` around check-and-append.
    """

    def __init__(
        self,
        path: Path,
        signing_key: Ed25519PrivateKey | None = None,
        public_key: Ed25519PublicKey | None = None,
    ) -> None:
        if signing_key is None and public_key is None:
            raise LedgerError("Ledger needs signing_key (to append) or public_key (to read and verify).")
        derived = signing_key.public_key() if signing_key is not None else None
        if derived is not None and public_key is not None and derived.public_bytes_raw() != public_key.public_bytes_raw():
            raise LedgerError("public_key does not match signing_key; pass the key pair of this ledger.")
        self.path = Path(path)
        self.public_key: Ed25519PublicKey = public_key or derived  # type: ignore[assignment]
        self._signing_key = signing_key
        self._mutex = threading.Lock()
        self._entries: list[dict[str, Any]] = []
        self._known: tuple[int, int] | None = None  # (inode, size) of the file we last read or wrote
        if signing_key is None:
            self._entries = self._load()
        elif self.path.exists():
            with self._locked() as fd:
                self._entries = self._load(fd)

    @property
    def entries(self) -> tuple[dict[str, Any], ...]:
        """Copies of the committed entries, in order."""
        return tuple(copy.deepcopy(self._entries))

    def events(self) -> list[tuple[PrivacyEvent, dict[str, Any]]]:
        """The committed (event, context) pairs, in order (contexts are copies)."""
        return [(event_from_dict(e["event"]), copy.deepcopy(e["context"])) for e in self._entries]

    def __len__(self) -> int:
        return len(self._entries)

    def _load(self, fd: int | None = None) -> list[dict[str, Any]]:
        """Verify the file; with a writer's ``fd``, also repair a torn tail or a lost final newline."""
        scan = _scan(self.path, self.public_key)
        if not scan.result.ok and not scan.result.torn_tail:
            raise LedgerError(f"ledger {self.path} failed verification at {scan.result.reason}. Refusing to continue it.")
        if fd is not None:
            if scan.result.torn_tail or scan.missing_newline:
                self._repair(fd, scan)
            self._remember(fd)
        return scan.entries

    def _remember(self, fd: int) -> None:
        st = os.fstat(fd)
        self._known = (st.st_ino, st.st_size)

    def _repair(self, fd: int, scan: _Scan) -> None:
        if scan.missing_newline:
            os.write(fd, b"\n")
        else:  # torn tail: keep the bytes for inspection, then cut them off
            torn = self.path.read_bytes()[scan.good_bytes :]
            stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
            aside = self.path.with_name(f"{self.path.name}.torn-{stamp}")
            write_file(aside, torn)
            os.ftruncate(fd, scan.good_bytes)
        os.fsync(fd)
        fsync_dir(self.path.parent)

    @contextmanager
    def _locked(self) -> Iterator[int]:
        created = not self.path.exists()
        with self._mutex:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                if created:
                    fsync_dir(self.path.parent)
                yield fd
            finally:
                os.close(fd)  # closing releases the flock

    def append(
        self,
        event: PrivacyEvent,
        context: Mapping[str, Any],
        *,
        check: Callable[[list[tuple[PrivacyEvent, dict[str, Any]]]], None] | None = None,
    ) -> dict[str, Any]:
        """Write one entry and fsync it before returning (write-ahead: release only after this).

        ``check``, if given, is called under the writer lock with every committed (event, context)
        plus the new one last; it refuses by raising, and then nothing is written.
        """
        if self._signing_key is None:
            raise LedgerError(f"ledger {self.path} was opened read-only; pass signing_key to append.")
        if not isinstance(event, tuple(EVENT_TYPES.values())):
            raise LedgerError(f"event must be one of {sorted(EVENT_TYPES)}. Found {type(event).__name__}.")
        context = _check_context(context)
        with self._locked() as fd:
            st = os.fstat(fd)
            if self._known != (st.st_ino, st.st_size):  # another writer appended: re-read and re-verify
                self._entries = self._load(fd)
            if check is not None:
                check([*self.events(), (event, context)])
            prev = self._entries[-1]["hash"] if self._entries else GENESIS_HASH
            entry: dict[str, Any] = {
                "seq": len(self._entries) + 1,
                "time": datetime.now(timezone.utc).isoformat(timespec="microseconds"),
                "prev_hash": prev,
                "event": event_to_dict(event),
                "context": context,
            }
            entry["hash"] = _entry_hash(entry)
            entry["signature"] = self._signing_key.sign(bytes.fromhex(entry["hash"])).hex()
            line = canonical_json(entry) + b"\n"
            written = 0
            while written < len(line):
                written += os.write(fd, line[written:])
            os.fsync(fd)
            self._entries.append(entry)
            self._remember(fd)
        return copy.deepcopy(entry)
