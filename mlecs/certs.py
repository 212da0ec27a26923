"""Development certificates for mutual TLS on the device port: a CA, the coordinator's server
certificate and one client certificate per device.

The coordinator accepts a device connection only with a certificate signed by the CA it is configured
with, and binds each call to the device named by that certificate's common name (CN = device name).
Keys are EC P-256: small, fast to generate and supported by every gRPC TLS stack.

Files, in one directory (``mlecs certs init`` / ``mlecs certs device``)::

    ca.pem  ca.key                     the development CA (keep ca.key off devices)
    coordinator.pem  coordinator.key   the coordinator's server certificate (SANs: its names and IPs)
    devices/<name>.pem  devices/<name>.key   a device's client certificate (CN = <name>)

Key files are written with mode 0600. Nothing is overwritten unless ``force`` is given.
"""

from __future__ import annotations

import ipaddress
import os
import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

DEFAULT_SANS = ("localhost", "127.0.0.1")
CA_DAYS = 3650
LEAF_DAYS = 825
"""Longer than this and some TLS clients refuse a server certificate."""
MAX_DEVICE_NAME = 64
"""X.509 caps a common name at 64 characters, so a device that uses mTLS has a name this long at most."""
_DEVICE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_BACKDATE = timedelta(minutes=5)
"""Certificates start a little in the past, so a device whose clock runs slightly behind accepts them."""


class CertificateError(Exception):
    """A certificate could not be made, read or written; the message says which file and why."""


@dataclass(frozen=True)
class Issued:
    """A certificate and its private key, as PEM."""

    cert_pem: bytes
    key_pem: bytes


@dataclass(frozen=True)
class PemFiles:
    """Where a certificate and its key were written."""

    cert: Path
    key: Path


@dataclass(frozen=True)
class CaLayout:
    """The file names of a certificate directory (see the module docstring)."""

    root: Path

    @property
    def ca(self) -> PemFiles:
        return PemFiles(self.root / "ca.pem", self.root / "ca.key")

    @property
    def coordinator(self) -> PemFiles:
        return PemFiles(self.root / "coordinator.pem", self.root / "coordinator.key")

    def device(self, name: str) -> PemFiles:
        check_device_name(name)
        return PemFiles(self.root / "devices" / f"{name}.pem", self.root / "devices" / f"{name}.key")


def check_device_name(name: str) -> str:
    """Returns ``name`` if it can be a certificate's CN and a file name; raises CertificateError."""
    if not _DEVICE_NAME.match(name):
        raise CertificateError(
            f"device name {name!r} cannot name a certificate: use 1-{MAX_DEVICE_NAME} letters, digits, '.', '_' "
            "or '-', starting with a letter or digit")
    return name


# ---- making certificates (pure: PEM in, PEM out) ------------------------------------------------

def create_ca(common_name: str = "mlecs development CA", days: int = CA_DAYS) -> Issued:
    """A self-signed CA that may sign leaf certificates only (path length 0)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name),
                      x509.NameAttribute(NameOID.ORGANIZATION_NAME, "mlecs")])
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE).not_valid_after(now + timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False, data_encipherment=False,
                                     key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return Issued(cert.public_bytes(serialization.Encoding.PEM), _key_pem(key))


def issue_server_certificate(ca: Issued, sans: list[str] | tuple[str, ...] = DEFAULT_SANS,
                             days: int = LEAF_DAYS) -> Issued:
    """The coordinator's certificate: serverAuth, valid for each DNS name or IP address in ``sans``."""
    if not sans:
        raise CertificateError("the coordinator certificate needs at least one DNS name or IP address (--san)")
    names = [_general_name(san) for san in sans]
    return _issue(ca, "mlecs coordinator", ExtendedKeyUsageOID.SERVER_AUTH, days, names)


def issue_device_certificate(ca: Issued, device_name: str, days: int = LEAF_DAYS) -> Issued:
    """A device's client certificate: clientAuth, CN = ``device_name`` (the coordinator checks it)."""
    return _issue(ca, check_device_name(device_name), ExtendedKeyUsageOID.CLIENT_AUTH, days, [])


def common_name(cert_pem: bytes) -> str:
    """The subject CN of a PEM certificate."""
    values = _load_cert(cert_pem, "certificate").subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if not values:
        raise CertificateError("the certificate has no common name")
    return str(values[0].value)


def check_key_pair(cert_pem: bytes, key_pem: bytes, what: str) -> None:
    """Raises CertificateError unless ``key_pem`` is the private key of ``cert_pem``: a mismatch would
    otherwise surface as an unexplained TLS handshake failure."""
    cert = _load_cert(cert_pem, what)
    key = _load_key(key_pem, what)
    fmt = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    if cert.public_key().public_bytes(*fmt) != key.public_key().public_bytes(*fmt):
        raise CertificateError(f"{what}: the private key does not belong to the certificate")


def _issue(ca: Issued, cn: str, usage: x509.ObjectIdentifier, days: int, sans: list[x509.GeneralName]) -> Issued:
    ca_cert = _load_cert(ca.cert_pem, "CA certificate")
    ca_key = _load_key(ca.key_pem, "CA key")
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
        .issuer_name(ca_cert.subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(min(now + timedelta(days=days), ca_cert.not_valid_after_utc))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=False, crl_sign=False,
                                     content_commitment=False, key_encipherment=False, data_encipherment=False,
                                     key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())
    return Issued(cert.public_bytes(serialization.Encoding.PEM), _key_pem(key))


def _general_name(san: str) -> x509.GeneralName:
    san = san.strip()
    try:
        return x509.IPAddress(ipaddress.ip_address(san))
    except ValueError:
        pass
    if not re.match(r"^(\*\.)?[A-Za-z0-9]([A-Za-z0-9-]{0,62})(\.[A-Za-z0-9]([A-Za-z0-9-]{0,62}))*$", san):
        raise CertificateError(f"{san!r} is neither an IP address nor a DNS name")
    return x509.DNSName(san)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _load_cert(pem: bytes, what: str) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(pem)
    except ValueError as exc:
        raise CertificateError(f"{what} is not a PEM certificate: {exc}") from exc


def _load_key(pem: bytes, what: str) -> ec.EllipticCurvePrivateKey:
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError) as exc:
        raise CertificateError(f"{what} is not an unencrypted PEM private key: {exc}") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise CertificateError(f"{what} is not an EC private key")
    return key


# ---- files -------------------------------------------------------------------------------------

def init_directory(directory: Path, sans: list[str] | tuple[str, ...] = DEFAULT_SANS, *, force: bool = False,
                   days: int = LEAF_DAYS) -> CaLayout:
    """Creates a CA and the coordinator certificate in ``directory``; refuses to overwrite unless ``force``."""
    layout = CaLayout(Path(directory))
    _refuse_existing([layout.ca, layout.coordinator], force)
    ca = create_ca()
    server = issue_server_certificate(ca, sans, days)
    write_pair(layout.ca, ca, force=force)
    write_pair(layout.coordinator, server, force=force)
    return layout


def issue_device_files(directory: Path, device_name: str, *, force: bool = False, days: int = LEAF_DAYS) -> PemFiles:
    """Signs a client certificate for ``device_name`` with the CA in ``directory``; returns where it went."""
    layout = CaLayout(Path(directory))
    files = layout.device(device_name)
    _refuse_existing([files], force)
    issued = issue_device_certificate(load_pair(layout.ca, "the CA"), device_name, days)
    write_pair(files, issued, force=force)
    return files


def load_pair(files: PemFiles, what: str) -> Issued:
    """Reads a certificate and its key; raises CertificateError naming a missing or unreadable file."""
    try:
        issued = Issued(files.cert.read_bytes(), files.key.read_bytes())
    except OSError as exc:
        raise CertificateError(f"cannot read {what} ({exc.filename}): {exc.strerror}; "
                               "create it with `mlecs certs init --dir DIR`") from exc
    check_key_pair(issued.cert_pem, issued.key_pem, what)
    return issued


def write_pair(files: PemFiles, issued: Issued, *, force: bool = False) -> None:
    """Writes the certificate (0644) and the key (0600, never readable by others, even for a moment)."""
    _refuse_existing([files], force)
    files.cert.parent.mkdir(parents=True, exist_ok=True)
    _write(files.key, issued.key_pem, 0o600)
    _write(files.cert, issued.cert_pem, 0o644)


def _write(path: Path, data: bytes, mode: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.fchmod(fd, mode)  # an existing file (--force) keeps its old mode through O_CREAT
        os.write(fd, data)
    finally:
        os.close(fd)


def _refuse_existing(pairs: list[PemFiles], force: bool) -> None:
    if force:
        return
    existing = [str(p) for files in pairs for p in (files.cert, files.key) if p.exists()]
    if existing:
        raise CertificateError(f"{', '.join(existing)} already exist(s); pass --force to replace")
