"""Owner-only files and manifests for provisioning kits.

Every kit file is created with ``O_CREAT|O_EXCL|O_NOFOLLOW`` and mode 0600, every kit
directory with 0700, both fsync'd. Each kit has a ``manifest.json`` that lists its files with
SHA-256 fingerprints (fingerprints of key files only; never key material) so a loader can
tell a mixed-up or tampered kit from a good one.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

from mor_secure.crypto.pki import sha256_hex
from mor_secure.errors import CryptoError

KIT_VERSION = 1
MANIFEST = "manifest.json"
FILE_MODE = 0o600
DIR_MODE = 0o700
FIX = "run `mor-secure provision` to (re)create the kits"


def make_dir(path: Path) -> None:
    """Create ``path`` (parents too) with mode 0700; an existing dir is tightened to 0700."""
    path.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
    os.chmod(path, DIR_MODE)


def write_file(path: Path, data: bytes) -> None:
    """Create ``path`` exclusively with mode 0600, write ``data`` and fsync."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    fd = os.open(path, flags, FILE_MODE)
    try:
        os.fchmod(fd, FILE_MODE)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    """fsync a directory so renames and creations in it are durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_manifest(kit_dir: Path, kind: str, name: str, extra: dict) -> None:
    """Write ``manifest.json`` listing every file under ``kit_dir`` with its SHA-256."""
    files = {}
    for p in sorted(kit_dir.rglob("*")):
        if p.is_file() and p.name != MANIFEST:
            files[p.relative_to(kit_dir).as_posix()] = sha256_hex(p.read_bytes())
    manifest = {"kit": kind, "name": name, "kit_version": KIT_VERSION, **extra, "files": files}
    write_file(kit_dir / MANIFEST, (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode())


def check_private(path: Path, what: str) -> None:
    """CryptoError unless ``path`` exists, is owned by us, and is owner-only (0600/0700)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        raise CryptoError(f"{what}: missing {path.name} ({path}); {FIX}") from None
    if stat.S_ISLNK(st.st_mode):
        raise CryptoError(f"{what}: {path} is a symlink; kit files must be regular files; {FIX}")
    if hasattr(os, "getuid") and st.st_uid != os.getuid():
        raise CryptoError(f"{what}: {path} is owned by uid {st.st_uid}, not by this user; {FIX}")
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o077:
        want = "700" if stat.S_ISDIR(st.st_mode) else "600"
        raise CryptoError(
            f"{what}: {path} has loose permissions 0o{mode:o}; kit files must be owner-only: "
            f"run `chmod {want} {path}`, or {FIX} with --force"
        )


def read_kit_file(kit_dir: Path, rel: str, what: str) -> bytes:
    """Read one kit file after checking it exists and is owner-only."""
    path = kit_dir / rel
    check_private(path, what)
    return path.read_bytes()


def load_manifest(kit_dir: Path, kind: str, required: list[str], what: str) -> dict:
    """Check the kit dir and its manifest; verify every listed file's SHA-256.

    ``required`` files must be present and listed. Returns the parsed manifest.
    """
    check_private(kit_dir, what)
    raw = read_kit_file(kit_dir, MANIFEST, what)
    try:
        manifest = json.loads(raw)
    except json.JSONDecodeError as err:
        raise CryptoError(f"{what}: {kit_dir / MANIFEST} is not valid JSON ({err}); {FIX}") from err
    if manifest.get("kit") != kind or manifest.get("kit_version") != KIT_VERSION:
        raise CryptoError(
            f"{what}: {kit_dir} is not a version-{KIT_VERSION} {kind} kit "
            f"(manifest says {manifest.get('kit')!r} v{manifest.get('kit_version')!r}); {FIX}"
        )
    files = manifest.get("files", {})
    for rel in required:
        check_private(kit_dir / rel, what)
        if rel not in files:
            raise CryptoError(f"{what}: {rel} is not listed in {kit_dir / MANIFEST}; {FIX}")
    for rel, digest in files.items():
        parts = Path(rel).parts
        if Path(rel).is_absolute() or ".." in parts or not parts:
            raise CryptoError(f"{what}: manifest lists an unsafe path {rel!r}; {FIX}")
        if len(parts) > 1:
            check_private(kit_dir / Path(*parts[:-1]), what)
        data = read_kit_file(kit_dir, rel, what)
        if sha256_hex(data) != digest:
            raise CryptoError(
                f"{what}: {kit_dir / rel} does not match its SHA-256 in the manifest "
                f"(altered or from another kit); {FIX}"
            )
    return manifest
