"""Key and certificate primitives for provisioning (``cryptography`` only).

* TLS: an ECDSA P-384 / SHA-384 CA (path length 0) and a SuperLink server certificate with
  the hosts as subjectAltNames (IP literals as IPAddress, names as DNSName), EKU serverAuth.
* SuperNode authentication (Flower 1.42): an EC key on a NIST curve (we use P-384), the
  private key in **OpenSSH** private-key format, unencrypted (``flower-supernode
  --auth-supernode-private-key`` reads it with ``load_ssh_private_key(data, None)``), the
  public key in **OpenSSH** public-key format (``ecdsa-sha2-nistp384 AAAA...``) as read by
  ``flwr supernode register KEY.pub`` (``load_ssh_public_key`` + NIST-curve check).
* Ledger signing: Ed25519, private key PEM/PKCS8 (unencrypted: protected by 0600 files),
  public key PEM/SubjectPublicKeyInfo.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import re
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from mor_secure.errors import ConfigError

_CURVE = ec.SECP384R1
_HASH = hashes.SHA384
_DNS_RE = re.compile(r"^(?=.{1,253}$)([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$")


@dataclass(frozen=True)
class KeyCert:
    """A private key with its certificate."""

    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate


def sha256_hex(data: bytes) -> str:
    """Hex SHA-256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


def cert_fingerprint(cert: x509.Certificate) -> str:
    """SHA-256 fingerprint of a certificate's DER encoding (hex)."""
    return cert.fingerprint(hashes.SHA256()).hex()


def _validity(days: int) -> tuple[dt.datetime, dt.datetime]:
    now = dt.datetime.now(dt.timezone.utc)
    return now - dt.timedelta(minutes=5), now + dt.timedelta(days=days)


def host_to_san(host: str) -> x509.GeneralName:
    """``127.0.0.1``/``::1`` → IPAddress SAN; ``localhost``/``a.example`` → DNSName SAN."""
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        pass
    if not _DNS_RE.match(host):
        raise ConfigError(f"host {host!r} is neither an IP address nor a valid DNS name")
    return x509.DNSName(host.lower())


def make_ca(common_name: str, days: int) -> KeyCert:
    """A self-signed CA that may sign end-entity certificates only (path length 0)."""
    key = ec.generate_private_key(_CURVE())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    not_before, not_after = _validity(days)
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True,
                crl_sign=True, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .sign(key, _HASH())
    )
    return KeyCert(key, cert)


def make_server_cert(ca: KeyCert, common_name: str, hosts: list[str], days: int) -> KeyCert:
    """A TLS server certificate for the SuperLink, signed by ``ca``, SANs = ``hosts``."""
    if not hosts:
        raise ConfigError("hosts is empty: the SuperLink certificate needs at least one SAN")
    sans = [host_to_san(h) for h in hosts]
    key = ec.generate_private_key(_CURVE())
    not_before, not_after = _validity(days)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(min(not_after, ca.cert.not_valid_after_utc))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=True, key_cert_sign=False,
                crl_sign=False, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()), critical=False
        )
        .sign(ca.key, _HASH())
    )
    return KeyCert(key, cert)


def cert_pem(cert: x509.Certificate) -> bytes:
    """PEM encoding of a certificate."""
    return cert.public_bytes(serialization.Encoding.PEM)


def private_pem(key: ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey) -> bytes:
    """Unencrypted PKCS8 PEM (file permissions protect it)."""
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def public_pem(key: ed25519.Ed25519PublicKey | ec.EllipticCurvePublicKey) -> bytes:
    """PEM SubjectPublicKeyInfo."""
    return key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def make_node_auth_key() -> tuple[bytes, bytes]:
    """Flower SuperNode auth key pair: (OpenSSH private key, OpenSSH public key line)."""
    key = ec.generate_private_key(_CURVE())
    priv = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    )
    pub = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    return priv, pub + b"\n"


def make_ledger_key() -> tuple[bytes, bytes]:
    """Ledger signing key pair: (Ed25519 PKCS8 PEM private, SubjectPublicKeyInfo PEM public)."""
    key = ed25519.Ed25519PrivateKey.generate()
    return private_pem(key), public_pem(key.public_key())
