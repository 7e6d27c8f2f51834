"""Provisioning kits: PKI, Flower node-auth key format, permissions, CKKS key split."""

from __future__ import annotations

import argparse
import hashlib
import ipaddress
import json
import os
import shutil
import socket
import ssl
import stat
import threading
from pathlib import Path

import numpy as np
import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from mor_secure.crypto import ckks
from mor_secure.crypto.provision import load_client_kit, load_server_kit, provision
from mor_secure.errors import ConfigError, CryptoError

CLIENTS = ["hospital-a", "bank_b", "clinic.c"]


@pytest.fixture(scope="module")
def kits(tmp_path_factory):
    out = tmp_path_factory.mktemp("kits") / "consortium"
    return provision(out, CLIENTS)


@pytest.fixture()
def kit_copy(kits, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(kits.out_dir, dst)  # copy2 keeps the 0600/0700 modes
    return dst


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def test_layout_and_result(kits):
    assert (kits.ca_dir / "ca.key").is_file() and (kits.ca_dir / "ca.pem").is_file()
    assert not (kits.server_dir / "ca.key").exists()
    for name in CLIENTS:
        d = kits.client_dirs[name]
        assert not (d / "ca.key").exists() and not (d / "superlink.key").exists()
        assert (kits.server_dir / "supernodes" / f"{name}.pub").is_file()
    assert not list(kits.out_dir.glob(".provision-staging-*"))


def test_certs_chain_to_ca_with_sans(kits):
    ca = _cert(kits.ca_dir / "ca.pem")
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    server = _cert(kits.server_dir / "superlink.pem")
    server.verify_directly_issued_by(ca)
    for name in CLIENTS:
        assert _cert(kits.client_dirs[name] / "ca.pem") == ca
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert ipaddress.ip_address("127.0.0.1") in san.get_values_for_type(x509.IPAddress)
    assert ipaddress.ip_address("::1") in san.get_values_for_type(x509.IPAddress)
    assert "localhost" in san.get_values_for_type(x509.DNSName)
    eku = server.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.SERVER_AUTH in eku
    assert not server.extensions.get_extension_for_class(x509.BasicConstraints).value.ca


@pytest.mark.parametrize("hostname", ["127.0.0.1", "localhost"])
def test_tls_handshake_verifies_against_ca(kits, hostname):
    s = kits.server_dir
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(s / "superlink.pem", s / "superlink.key")
    client_ctx = ssl.create_default_context(cafile=str(kits.client_dirs[CLIENTS[0]] / "ca.pem"))
    a, b = socket.socketpair()
    errors = []

    def serve():
        try:
            with server_ctx.wrap_socket(a, server_side=True) as tls:
                tls.sendall(tls.recv(5))
        except Exception as err:  # surfaced below
            errors.append(err)

    t = threading.Thread(target=serve)
    t.start()
    with client_ctx.wrap_socket(b, server_hostname=hostname) as tls:
        tls.sendall(b"hello")
        assert tls.recv(5) == b"hello"
    t.join(5)
    assert not errors
    with pytest.raises(ssl.SSLCertVerificationError):  # wrong name is refused
        a2, b2 = socket.socketpair()
        threading.Thread(target=lambda: _quiet_accept(server_ctx, a2), daemon=True).start()
        client_ctx.wrap_socket(b2, server_hostname="evil.example")


def _quiet_accept(ctx, sock):
    try:
        ctx.wrap_socket(sock, server_side=True)
    except (ssl.SSLError, OSError):
        pass


def test_node_auth_keys_are_accepted_by_flower(kits):
    from flwr.cli.supernode.register import try_load_public_key
    from flwr.supercore.primitives.asymmetric import public_key_to_bytes
    from flwr.supernode.cli.flower_supernode import _try_setup_client_authentication

    for name in CLIENTS:
        d = kits.client_dirs[name]
        assert (d / "node_auth_key.pub").read_text().startswith("ecdsa-sha2-nistp384 ")
        priv, pub = _try_setup_client_authentication(
            argparse.Namespace(auth_supernode_private_key=str(d / "node_auth_key"),
                               auth_supernode_public_key=None))
        registered = try_load_public_key(kits.server_dir / "supernodes" / f"{name}.pub")
        assert registered == public_key_to_bytes(pub)


def test_permissions_are_owner_only(kits):
    for root in (kits.ca_dir, kits.server_dir, *kits.client_dirs.values()):
        assert stat.S_IMODE(os.stat(root).st_mode) == 0o700
        for p in root.rglob("*"):
            want = 0o700 if p.is_dir() else 0o600
            assert stat.S_IMODE(os.stat(p).st_mode) == want, p


def test_manifest_lists_fingerprints_and_no_secrets(kits):
    for root in (kits.ca_dir, kits.server_dir, *kits.client_dirs.values()):
        text = (root / "manifest.json").read_text()
        assert "PRIVATE KEY" not in text and "openssh-key" not in text.lower()
        files = json.loads(text)["files"]
        assert files and all(
            hashlib.sha256((root / rel).read_bytes()).hexdigest() == h for rel, h in files.items())


def test_refuses_overwrite_unless_forced(kits, kit_copy):
    with pytest.raises(CryptoError, match="refusing to overwrite"):
        provision(kits.out_dir, CLIENTS)
    old_ca = (kit_copy / "ca" / "ca.pem").read_bytes()
    result = provision(kit_copy, ["only-one"], force=True)
    assert (kit_copy / "ca" / "ca.pem").read_bytes() != old_ca
    assert sorted(p.name for p in (kit_copy / "clients").iterdir()) == ["only-one"]
    assert load_client_kit(result.client_dirs["only-one"]).name == "only-one"


def test_clients_decrypt_what_server_aggregated(kits):
    server = load_server_kit(kits.server_dir)
    assert server.ckks_context.is_private() is False
    assert sorted(server.supernode_keys) == sorted(CLIENTS)
    clients = [load_client_kit(kits.client_dirs[n]) for n in CLIENTS]
    rng = np.random.default_rng(0)
    scores = [rng.uniform(-4, 4, 32) for _ in clients]
    cts = [ckks.encrypt_scores(c.ckks_context, s) for c, s in zip(clients, scores)]
    cts.append(ckks.encrypt_scores(server.ckks_context, np.ones(32)))  # public ctx encrypts too
    weights = [np.full(32, 0.25)] * 4
    agg = ckks.weighted_sum(server.ckks_context, cts, weights)
    want = 0.25 * (sum(scores) + 1.0)
    for c in clients:  # any client may be the decryptor: one consortium key
        np.testing.assert_allclose(ckks.decrypt_aggregate(c.ckks_context, agg, 32), want, atol=1e-5)


def test_ledger_key_pkcs8_ed25519_signs(kits):
    kit = load_client_kit(kits.client_dirs[CLIENTS[1]])
    assert kit.ledger_key_path.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    sig = kit.ledger_key.sign(b"entry")
    kit.ledger_public_key.verify(sig, b"entry")
    load_server_kit(kits.server_dir).ledger_public_keys[CLIENTS[1]].verify(sig, b"entry")
    assert kit.supernode_args()[-1].endswith("node_auth_key")


def test_missing_file_is_named(kit_copy):
    (kit_copy / "clients" / CLIENTS[0] / "ckks_secret.bin").unlink()
    with pytest.raises(CryptoError, match=r"missing ckks_secret\.bin.*mor-secure provision"):
        load_client_kit(kit_copy / "clients" / CLIENTS[0])
    (kit_copy / "server" / "superlink.key").unlink()
    with pytest.raises(CryptoError, match=r"missing superlink\.key.*mor-secure provision"):
        load_server_kit(kit_copy / "server")


def test_loose_permissions_are_refused(kit_copy):
    key = kit_copy / "clients" / CLIENTS[0] / "node_auth_key"
    os.chmod(key, 0o644)
    with pytest.raises(CryptoError, match=r"node_auth_key has loose permissions 0o644.*chmod 600"):
        load_client_kit(kit_copy / "clients" / CLIENTS[0])
    os.chmod(kit_copy / "server", 0o755)
    with pytest.raises(CryptoError, match=r"loose permissions 0o755.*chmod 700"):
        load_server_kit(kit_copy / "server")


def test_tampered_file_and_secret_server_context_are_refused(kit_copy):
    sdir = kit_copy / "server"
    secret = (kit_copy / "clients" / CLIENTS[0] / "ckks_secret.bin").read_bytes()
    (sdir / "ckks_public.bin").write_bytes(secret)
    with pytest.raises(CryptoError, match="does not match its SHA-256"):
        load_server_kit(sdir)
    manifest = json.loads((sdir / "manifest.json").read_text())
    manifest["files"]["ckks_public.bin"] = hashlib.sha256(secret).hexdigest()
    (sdir / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CryptoError, match="holds a secret key"):
        load_server_kit(sdir)


@pytest.mark.parametrize(
    "clients, hosts, days",
    [([], ["localhost"], 1), (["a/b"], ["localhost"], 1), (["a", "a"], ["localhost"], 1),
     (["a"], [], 1), (["a"], ["bad host!"], 1), (["a"], ["localhost"], 0)],
)
def test_bad_inputs_are_config_errors(tmp_path, clients, hosts, days):
    with pytest.raises(ConfigError):
        provision(tmp_path / "k", clients, hosts, days)
    assert not (tmp_path / "k").exists()
