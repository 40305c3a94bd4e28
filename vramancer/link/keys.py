"""Secure Fabric identities: this node's key pair and certificate, fingerprints, and the trust store.

Files, under ``keys_dir()`` (``<dir of $VRAMANCER_CONFIG>/keys``, i.e. ``~/.config/vramancer/keys``):

    node.key    the Ed25519 private key, PKCS#8 PEM, mode 0600 (the folder is 0700)
    node.crt    a self-signed X.509 certificate of that key (PEM, 0600); no CA anywhere
    trust.json  {"version": 1, "trusted": [fingerprint, ...], "revoked": [fingerprint, ...]}

A fingerprint is the SHA-256 of the certificate's SubjectPublicKeyInfo (DER), written as 16 groups
of 4 lowercase hex digits joined by ":". Revoked wins over trusted.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from .. import envs
from ..errors import BadInputError
from .errors import LinkError

__all__ = [
    "Identity",
    "TrustStore",
    "keys_dir",
    "fingerprint_of_cert",
    "format_fingerprint",
    "parse_fingerprint",
    "create_identity",
    "load_identity",
]

_KEY = "node.key"
_CERT = "node.crt"
_TRUST = "trust.json"


def keys_dir() -> Path:
    """The folder of this node's identity and trust store (next to the config file)."""
    return Path(envs.get("VRAMANCER_CONFIG")).expanduser().parent / "keys"


def format_fingerprint(digest_hex: str) -> str:
    return ":".join(digest_hex[i:i + 4] for i in range(0, len(digest_hex), 4))


def parse_fingerprint(text: str) -> str:
    """A fingerprint as typed (any case, with or without ':' / spaces) in canonical form."""
    raw = re.sub(r"[\s:]", "", text).lower()
    if not re.fullmatch(r"[0-9a-f]{64}", raw):
        raise BadInputError(f"not a fingerprint: {text!r} (64 hex digits, as `vramancer keys show` prints)")
    return format_fingerprint(raw)


def fingerprint_of_cert(cert_der: bytes) -> str:
    """Fingerprint of a DER certificate: SHA-256 of its public key (SubjectPublicKeyInfo)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    try:
        cert = x509.load_der_x509_certificate(cert_der)
    except ValueError as e:
        raise LinkError(f"peer certificate does not parse: {e}") from None
    spki = cert.public_key().public_bytes(serialization.Encoding.DER,
                                          serialization.PublicFormat.SubjectPublicKeyInfo)
    return format_fingerprint(hashlib.sha256(spki).hexdigest())


@dataclass(frozen=True)
class Identity:
    key_path: Path
    cert_path: Path
    cert_der: bytes
    fingerprint: str


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, data)
    finally:
        os.close(fd)


def create_identity(directory: Path | None = None, name: str = "vramancer-node", force: bool = False) -> Identity:
    """Make an Ed25519 key and a self-signed certificate (valid 10 years) under ``directory``."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization  # noqa: F401
    from cryptography.hazmat.primitives.asymmetric import ed25519
    from cryptography.x509.oid import NameOID

    directory = Path(directory) if directory is not None else keys_dir()
    if (directory / _KEY).exists() and not force:
        raise BadInputError(f"an identity already exists in {directory} (keys init --force replaces it)")
    directory.mkdir(parents=True, exist_ok=True)
    os.chmod(directory, 0o700)
    key = ed25519.Ed25519PrivateKey.generate()
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = _dt.datetime.now(_dt.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - _dt.timedelta(days=1)).not_valid_after(now + _dt.timedelta(days=3650))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .sign(key, None))
    _write_private(directory / _KEY, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                       serialization.NoEncryption()))
    _write_private(directory / _CERT, cert.public_bytes(serialization.Encoding.PEM))
    return load_identity(directory)


def load_identity(directory: Path | None = None) -> Identity:
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    directory = Path(directory) if directory is not None else keys_dir()
    key_path, cert_path = directory / _KEY, directory / _CERT
    if not key_path.is_file() or not cert_path.is_file():
        raise BadInputError(f"no node identity in {directory}: run `vramancer keys init`")
    mode = key_path.stat().st_mode & 0o777
    if mode & 0o077:
        raise LinkError(f"{key_path} is readable by others (mode {mode:o}): chmod 600 it")
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    except ValueError as e:
        raise LinkError(f"{cert_path} does not parse: {e}") from None
    der = cert.public_bytes(serialization.Encoding.DER)
    return Identity(key_path, cert_path, der, fingerprint_of_cert(der))


@dataclass
class TrustStore:
    """Trusted and revoked fingerprints, kept in ``path`` (JSON, 0600)."""

    path: Path
    trusted: list[str] = field(default_factory=list)
    revoked: list[str] = field(default_factory=list)

    @classmethod
    def load(cls, path: Path | None = None) -> TrustStore:
        path = Path(path) if path is not None else keys_dir() / _TRUST
        if not path.exists():
            return cls(path)
        try:
            data = json.loads(path.read_text())
            trusted = [parse_fingerprint(f) for f in data.get("trusted", [])]
            revoked = [parse_fingerprint(f) for f in data.get("revoked", [])]
        except (ValueError, AttributeError, TypeError) as e:
            raise LinkError(f"trust store {path} is malformed: {e}") from None
        return cls(path, trusted, revoked)

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        _write_private(self.path, (json.dumps({"version": 1, "trusted": self.trusted, "revoked": self.revoked},
                                              indent=2) + "\n").encode())

    def trust(self, fingerprint: str) -> str:
        fp = parse_fingerprint(fingerprint)
        if fp not in self.trusted:
            self.trusted.append(fp)
        if fp in self.revoked:
            self.revoked.remove(fp)
        return fp

    def revoke(self, fingerprint: str) -> str:
        fp = parse_fingerprint(fingerprint)
        if fp not in self.revoked:
            self.revoked.append(fp)
        if fp in self.trusted:
            self.trusted.remove(fp)
        return fp

    def verdict(self, fingerprint: str) -> str:
        """'trusted', 'revoked' or 'unknown'."""
        if fingerprint in self.revoked:
            return "revoked"
        return "trusted" if fingerprint in self.trusted else "unknown"
