"""Offline provisioning of per-party kits: TLS, SuperNode auth, CKKS and ledger keys.

The provisioner (the consortium's admin, offline) runs :func:`provision` once and hands each
directory to its party over a trusted channel::

    out_dir/ca/                 ca.pem, ca.key                  -- stays with the provisioner
    out_dir/server/             ca.pem, superlink.pem, superlink.key, ckks_public.bin,
                                supernodes/<client>.pub (OpenSSH EC P-384 node-auth keys),
                                ledger_keys/<client>.pub, supernodes.json
    out_dir/clients/<client>/   ca.pem, node_auth_key (OpenSSH private), node_auth_key.pub,
                                ckks_secret.bin, ledger_key.pem (Ed25519 PKCS8), ledger_key.pub

Every kit has a ``manifest.json`` (file list + SHA-256, no secrets); files are 0600 and
directories 0700. Flower 1.42 has no authorized-keys file any more (``--auth-list-public-keys``
is refused): start ``flower-superlink --enable-supernode-auth`` and register each key with
``flwr supernode register supernodes/<client>.pub <connection>``
(:meth:`ServerKit.register_commands`).

Trust notes: the provisioner generates -- and therefore briefly holds -- every key, including
the single consortium-wide CKKS secret key (CKKS here is single-key; see
``mor_secure.crypto.ckks``) and each client's ledger signing key. It keeps only ``ca/``.
"""

from __future__ import annotations

import datetime as dt
import json
import re
import secrets
import shutil
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import tenseal as ts
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from mor_secure.crypto import ckks, pki
from mor_secure.crypto.kitfs import (
    FIX, fsync_dir, load_manifest, make_dir, read_kit_file, write_file, write_manifest,
)
from mor_secure.errors import ConfigError, CryptoError

DEFAULT_HOSTS = ("127.0.0.1", "localhost", "::1")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_CLIENT_FILES = ["ca.pem", "node_auth_key", "node_auth_key.pub", "ckks_secret.bin",
                 "ledger_key.pem", "ledger_key.pub"]
_SERVER_FILES = ["ca.pem", "superlink.pem", "superlink.key", "ckks_public.bin", "supernodes.json"]


@dataclass(frozen=True)
class ProvisionResult:
    """Where the kits went, and the fingerprints to compare out of band."""

    out_dir: Path
    ca_dir: Path
    server_dir: Path
    client_dirs: dict[str, Path]
    ca_fingerprint: str
    server_cert_fingerprint: str


@dataclass(frozen=True)
class ClientKit:
    """A client's kit: paths plus loaded materials."""

    name: str
    dir: Path
    ca_pem: Path
    node_auth_key: Path
    node_auth_pub: Path
    ckks_secret: Path
    ledger_key_path: Path
    ledger_pub_path: Path
    ca_cert: x509.Certificate
    node_auth_private_key: ec.EllipticCurvePrivateKey
    ledger_key: ed25519.Ed25519PrivateKey
    ledger_public_key: ed25519.Ed25519PublicKey
    ckks_context: ts.Context = field(repr=False)

    def supernode_args(self) -> list[str]:
        """TLS + node-auth flags for ``flower-supernode``."""
        return ["--root-certificates", str(self.ca_pem),
                "--auth-supernode-private-key", str(self.node_auth_key)]


@dataclass(frozen=True)
class ServerKit:
    """The server's kit: paths plus loaded materials. Holds no CKKS secret key."""

    dir: Path
    ca_pem: Path
    cert_pem: Path
    key_pem: Path
    ckks_public: Path
    ca_cert: x509.Certificate
    cert: x509.Certificate
    ckks_context: ts.Context = field(repr=False)
    supernode_keys: dict[str, Path] = field(default_factory=dict)
    ledger_public_keys: dict[str, ed25519.Ed25519PublicKey] = field(default_factory=dict)

    def superlink_tls_args(self) -> list[str]:
        """TLS + node-auth flags for ``flower-superlink``."""
        return ["--ssl-ca-certfile", str(self.ca_pem), "--ssl-certfile", str(self.cert_pem),
                "--ssl-keyfile", str(self.key_pem), "--enable-supernode-auth"]

    def register_commands(self, connection: str | None = None) -> list[list[str]]:
        """One ``flwr supernode register KEY.pub [CONNECTION]`` argv per client."""
        tail = [connection] if connection else []
        return [["flwr", "supernode", "register", str(p), *tail]
                for p in self.supernode_keys.values()]


def _check_inputs(clients: list[str], hosts: list[str], days: int) -> None:
    if not clients:
        raise ConfigError("clients is empty: provision needs at least one client name")
    for name in clients:
        if not isinstance(name, str) or not _NAME_RE.match(name):
            raise ConfigError(
                f"client name {name!r} is invalid: use 1-64 of [A-Za-z0-9_.-], starting alnum")
    if len(set(clients)) != len(clients):
        raise ConfigError(f"client names must be unique, got {clients}")
    if not isinstance(days, int) or not 1 <= days <= 3650:
        raise ConfigError(f"days={days!r} must be an integer in 1..3650")
    if not hosts:
        raise ConfigError("hosts is empty: the SuperLink certificate needs at least one SAN")
    for h in hosts:
        pki.host_to_san(h)


def provision(out_dir: Path, clients: list[str], hosts: Sequence[str] = DEFAULT_HOSTS,
              days: int = 365, *, force: bool = False,
              ckks_params: ckks.CkksParams = ckks.CkksParams()) -> ProvisionResult:
    """Create the CA, server and client kits under ``out_dir`` (see the module docstring).

    Refuses (CryptoError) if ``out_dir/ca``, ``server`` or ``clients`` already exists, unless
    ``force=True``, which replaces all three. Kits are built in a staging directory and moved
    into place, so a crash leaves no half-written kit under the final names.
    """
    out_dir = Path(out_dir)
    hosts = list(hosts)
    _check_inputs(clients, hosts, days)
    targets = [out_dir / "ca", out_dir / "server", out_dir / "clients"]
    existing = [t for t in targets if t.exists() or t.is_symlink()]
    if existing and not force:
        raise CryptoError(
            f"refusing to overwrite existing kit(s) {', '.join(map(str, existing))}; "
            "pass force=True (`mor-secure provision --force`) to replace them")
    if not out_dir.exists():
        make_dir(out_dir)
    staging = out_dir / f".provision-staging-{secrets.token_hex(8)}"
    make_dir(staging)
    try:
        result = _build(staging, clients, hosts, days, ckks_params)
        for t in existing:
            shutil.rmtree(t) if t.is_dir() and not t.is_symlink() else t.unlink()
        for t in targets:
            (staging / t.name).rename(t)
        fsync_dir(out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return ProvisionResult(
        out_dir=out_dir, ca_dir=targets[0], server_dir=targets[1],
        client_dirs={c: targets[2] / c for c in clients},
        ca_fingerprint=result[0], server_cert_fingerprint=result[1])


def _build(root: Path, clients: list[str], hosts: list[str], days: int,
           params: ckks.CkksParams) -> tuple[str, str]:
    created = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    ca = pki.make_ca("mor-secure consortium CA", days)
    ca_pem = pki.cert_pem(ca.cert)
    ca_fp = pki.cert_fingerprint(ca.cert)
    common = {"created_utc": created, "ca_sha256": ca_fp, "ckks_params": asdict(params)}

    ca_dir = root / "ca"
    make_dir(ca_dir)
    write_file(ca_dir / "ca.pem", ca_pem)
    write_file(ca_dir / "ca.key", pki.private_pem(ca.key))
    write_manifest(ca_dir, "ca", "ca", common)

    secret_ctx = ckks.new_secret_context(params)
    secret_bytes = ckks.serialize_context(secret_ctx, secret=True)
    public_bytes = ckks.serialize_context(ckks.public_copy(secret_ctx), secret=False)

    registry = []
    for name in clients:
        cdir = root / "clients" / name
        make_dir(cdir)
        node_priv, node_pub = pki.make_node_auth_key()
        ledger_priv, ledger_pub = pki.make_ledger_key()
        for rel, data in [("ca.pem", ca_pem), ("node_auth_key", node_priv),
                          ("node_auth_key.pub", node_pub), ("ckks_secret.bin", secret_bytes),
                          ("ledger_key.pem", ledger_priv), ("ledger_key.pub", ledger_pub)]:
            write_file(cdir / rel, data)
        write_manifest(cdir, "client", name, common)
        registry.append((name, node_pub, ledger_pub))

    server = pki.make_server_cert(ca, "mor-secure superlink", hosts, days)
    sdir = root / "server"
    for d in (sdir, sdir / "supernodes", sdir / "ledger_keys"):
        make_dir(d)
    write_file(sdir / "ca.pem", ca_pem)
    write_file(sdir / "superlink.pem", pki.cert_pem(server.cert))
    write_file(sdir / "superlink.key", pki.private_pem(server.key))
    write_file(sdir / "ckks_public.bin", public_bytes)
    entries = []
    for name, node_pub, ledger_pub in registry:
        write_file(sdir / "supernodes" / f"{name}.pub", node_pub)
        write_file(sdir / "ledger_keys" / f"{name}.pub", ledger_pub)
        entries.append({"name": name, "node_auth_public_key": f"supernodes/{name}.pub",
                        "node_auth_sha256": pki.sha256_hex(node_pub),
                        "ledger_public_key": f"ledger_keys/{name}.pub"})
    doc = {"key_format": "OpenSSH ecdsa-sha2-nistp384 (Flower 1.42 SuperNode auth)",
           "register_with": "flwr supernode register supernodes/<name>.pub <connection>",
           "supernodes": entries}
    write_file(sdir / "supernodes.json", (json.dumps(doc, indent=2) + "\n").encode())
    write_manifest(sdir, "server", "server",
                   {**common, "hosts": hosts, "cert_sha256": pki.cert_fingerprint(server.cert)})
    return ca_fp, pki.cert_fingerprint(server.cert)


def _load_ca(kit_dir: Path, manifest: dict, what: str) -> x509.Certificate:
    try:
        ca_cert = x509.load_pem_x509_certificate(read_kit_file(kit_dir, "ca.pem", what))
    except ValueError as err:
        raise CryptoError(f"{what}: ca.pem is not a PEM certificate ({err}); {FIX}") from err
    if pki.cert_fingerprint(ca_cert) != manifest.get("ca_sha256"):
        raise CryptoError(f"{what}: ca.pem does not match the manifest's CA; {FIX}")
    return ca_cert


def _load_ckks(kit_dir: Path, rel: str, what: str) -> ts.Context:
    try:
        return ckks.load_context(read_kit_file(kit_dir, rel, what))
    except CryptoError as err:
        raise CryptoError(f"{what}: {rel}: {err}; {FIX}") from err


def load_client_kit(kit_dir: Path) -> ClientKit:
    """Load and check a client kit (permissions, manifest hashes, key types)."""
    kit_dir = Path(kit_dir)
    what = f"client kit {kit_dir}"
    manifest = load_manifest(kit_dir, "client", _CLIENT_FILES, what)
    ca_cert = _load_ca(kit_dir, manifest, what)
    try:
        node_key = serialization.load_ssh_private_key(
            read_kit_file(kit_dir, "node_auth_key", what), None)
        ledger_key = serialization.load_pem_private_key(
            read_kit_file(kit_dir, "ledger_key.pem", what), None)
        ledger_pub = serialization.load_pem_public_key(
            read_kit_file(kit_dir, "ledger_key.pub", what))
    except (ValueError, TypeError) as err:
        raise CryptoError(f"{what}: a key file failed to parse ({err}); {FIX}") from err
    if not isinstance(node_key, ec.EllipticCurvePrivateKey):
        raise CryptoError(f"{what}: node_auth_key is not an EC key; {FIX}")
    if not isinstance(ledger_key, ed25519.Ed25519PrivateKey) or not isinstance(
            ledger_pub, ed25519.Ed25519PublicKey) or ledger_pub != ledger_key.public_key():
        raise CryptoError(f"{what}: ledger_key.pem/.pub are not a matching Ed25519 pair; {FIX}")
    ctx = _load_ckks(kit_dir, "ckks_secret.bin", what)
    if not ctx.is_private():
        raise CryptoError(f"{what}: ckks_secret.bin holds no secret key; {FIX}")
    return ClientKit(
        name=manifest["name"], dir=kit_dir, ca_pem=kit_dir / "ca.pem",
        node_auth_key=kit_dir / "node_auth_key", node_auth_pub=kit_dir / "node_auth_key.pub",
        ckks_secret=kit_dir / "ckks_secret.bin", ledger_key_path=kit_dir / "ledger_key.pem",
        ledger_pub_path=kit_dir / "ledger_key.pub", ca_cert=ca_cert,
        node_auth_private_key=node_key, ledger_key=ledger_key, ledger_public_key=ledger_pub,
        ckks_context=ctx)


def load_server_kit(kit_dir: Path) -> ServerKit:
    """Load and check the server kit; refuses one whose CKKS context holds a secret key."""
    kit_dir = Path(kit_dir)
    what = f"server kit {kit_dir}"
    manifest = load_manifest(kit_dir, "server", _SERVER_FILES, what)
    ca_cert = _load_ca(kit_dir, manifest, what)
    try:
        cert = x509.load_pem_x509_certificate(read_kit_file(kit_dir, "superlink.pem", what))
        key = serialization.load_pem_private_key(read_kit_file(kit_dir, "superlink.key", what), None)
        cert.verify_directly_issued_by(ca_cert)
    except (ValueError, TypeError) as err:
        raise CryptoError(f"{what}: superlink.pem/.key invalid or not issued by ca.pem ({err}); {FIX}") from err
    except InvalidSignature as err:
        raise CryptoError(f"{what}: superlink.pem is not signed by ca.pem; {FIX}") from err
    if pki.public_pem(key.public_key()) != pki.public_pem(cert.public_key()):
        raise CryptoError(f"{what}: superlink.key does not match superlink.pem; {FIX}")
    if cert.not_valid_after_utc < dt.datetime.now(dt.timezone.utc):
        raise CryptoError(f"{what}: superlink.pem expired on {cert.not_valid_after_utc}; {FIX}")
    ctx = _load_ckks(kit_dir, "ckks_public.bin", what)
    if ctx.is_private() or ctx.has_secret_key():
        raise CryptoError(f"{what}: ckks_public.bin holds a secret key; the server must not; {FIX}")
    doc = json.loads(read_kit_file(kit_dir, "supernodes.json", what))
    nodes, ledgers = {}, {}
    for e in doc.get("supernodes", []):
        name = e.get("name", "")
        if not _NAME_RE.match(name):
            raise CryptoError(f"{what}: supernodes.json has an invalid name {name!r}; {FIX}")
        pub = read_kit_file(kit_dir, f"supernodes/{name}.pub", what)
        lpub = serialization.load_pem_public_key(
            read_kit_file(kit_dir, f"ledger_keys/{name}.pub", what))
        if pki.sha256_hex(pub) != e.get("node_auth_sha256") or not isinstance(
                lpub, ed25519.Ed25519PublicKey):
            raise CryptoError(f"{what}: keys of supernode {name!r} do not match supernodes.json; {FIX}")
        nodes[name] = kit_dir / "supernodes" / f"{name}.pub"
        ledgers[name] = lpub
    return ServerKit(
        dir=kit_dir, ca_pem=kit_dir / "ca.pem", cert_pem=kit_dir / "superlink.pem",
        key_pem=kit_dir / "superlink.key", ckks_public=kit_dir / "ckks_public.bin",
        ca_cert=ca_cert, cert=cert, ckks_context=ctx, supernode_keys=nodes,
        ledger_public_keys=ledgers)
