"""`mlecs certs`: the development CA, the coordinator's server certificate and device client certificates."""

from __future__ import annotations

import ipaddress
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from typer.testing import CliRunner

from mlecs import certs
from mlecs.certs import CaLayout, CertificateError
from mlecs.cli import app


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_init_makes_a_ca_and_a_coordinator_certificate_for_localhost_signed_by_it(tmp_path):
    layout = certs.init_directory(tmp_path / "c")
    ca, server = _cert(layout.ca.cert), _cert(layout.coordinator.cert)

    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    server.verify_directly_issued_by(ca)
    assert not server.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["localhost"]
    assert sans.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    usage = server.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usage) == [ExtendedKeyUsageOID.SERVER_AUTH]
    certs.check_key_pair(layout.coordinator.cert.read_bytes(), layout.coordinator.key.read_bytes(), "coordinator")


def test_key_files_are_readable_by_their_owner_only(tmp_path):
    layout = certs.init_directory(tmp_path)
    device = certs.issue_device_files(tmp_path, "cam-1")
    for key in (layout.ca.key, layout.coordinator.key, device.key):
        assert _mode(key) == 0o600, key
    assert _mode(layout.coordinator.cert) == 0o644


def test_sans_may_name_dns_names_and_ipv4_and_ipv6_addresses(tmp_path):
    layout = certs.init_directory(tmp_path, ["coordinator.example", "*.fleet.example", "10.0.0.7", "::1"])
    sans = _cert(layout.coordinator.cert).extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["coordinator.example", "*.fleet.example"]
    assert sans.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("10.0.0.7"), ipaddress.ip_address("::1")]


@pytest.mark.parametrize("san", ["not a name", "bad_underscore.example", ""])
def test_a_san_that_is_neither_a_dns_name_nor_an_ip_is_refused_by_name(tmp_path, san):
    with pytest.raises(CertificateError, match="neither an IP address nor a DNS name"):
        certs.init_directory(tmp_path, [san])
    assert not (tmp_path / "ca.pem").exists()  # nothing half-written


def test_a_device_certificate_names_the_device_for_client_auth_and_chains_to_the_ca(tmp_path):
    layout = certs.init_directory(tmp_path)
    files = certs.issue_device_files(tmp_path, "cam-1")
    assert files == layout.device("cam-1") and files.cert == tmp_path / "devices" / "cam-1.pem"
    cert = _cert(files.cert)
    cert.verify_directly_issued_by(_cert(layout.ca.cert))
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "cam-1"
    assert certs.common_name(files.cert.read_bytes()) == "cam-1"
    assert list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [
        ExtendedKeyUsageOID.CLIENT_AUTH]


def test_nothing_is_overwritten_without_force(tmp_path):
    layout = certs.init_directory(tmp_path)
    before = layout.ca.cert.read_bytes()
    with pytest.raises(CertificateError, match=r"already exist.*--force"):
        certs.init_directory(tmp_path)
    assert layout.ca.cert.read_bytes() == before
    certs.issue_device_files(tmp_path, "cam-1")
    with pytest.raises(CertificateError, match=r"cam-1.pem.*--force"):
        certs.issue_device_files(tmp_path, "cam-1")

    certs.init_directory(tmp_path, force=True)
    assert layout.ca.cert.read_bytes() != before
    assert _mode(layout.ca.key) == 0o600


def test_a_device_certificate_needs_the_ca_first(tmp_path):
    with pytest.raises(CertificateError, match=r"cannot read the CA.*mlecs certs init"):
        certs.issue_device_files(tmp_path, "cam-1")


@pytest.mark.parametrize("name", ["", "../escape", "-dash", "has space", "x" * 65])
def test_a_device_name_that_cannot_be_a_cn_and_a_file_name_is_refused(tmp_path, name):
    certs.init_directory(tmp_path)
    with pytest.raises(CertificateError, match="cannot name a certificate"):
        certs.issue_device_files(tmp_path, name)


def test_a_key_that_does_not_belong_to_the_certificate_is_named(tmp_path):
    layout = certs.init_directory(tmp_path)
    with pytest.raises(CertificateError, match="does not belong"):
        certs.check_key_pair(layout.coordinator.cert.read_bytes(), layout.ca.key.read_bytes(), "coordinator")
    with pytest.raises(CertificateError, match="not a PEM certificate"):
        certs.check_key_pair(b"junk", layout.ca.key.read_bytes(), "coordinator")


def test_the_cli_makes_the_files_and_prints_the_settings_that_use_them(tmp_path):
    runner = CliRunner()
    result = runner.invoke(app, ["certs", "init", "--dir", str(tmp_path), "--san", "coordinator.example",
                                 "--san", "127.0.0.1"])
    assert result.exit_code == 0, result.output
    assert "MLECS_TLS_CLIENT_CA_FILE=" in result.output and "MLECS_TLS_CERT_FILE=" in result.output
    assert _cert(CaLayout(tmp_path).coordinator.cert).extensions.get_extension_for_class(
        x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName) == ["coordinator.example"]

    result = runner.invoke(app, ["certs", "device", "cam-1", "--dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "[tls]" in result.output and "cam-1.key" in result.output
    again = runner.invoke(app, ["certs", "device", "cam-1", "--dir", str(tmp_path)])
    assert again.exit_code == 1 and "--force" in again.output
    assert runner.invoke(app, ["certs", "device", "cam-1", "--dir", str(tmp_path), "--force"]).exit_code == 0


def test_the_cli_help_says_what_each_command_makes():
    result = CliRunner().invoke(app, ["certs", "--help"])
    assert result.exit_code == 0 and "init" in result.output and "device" in result.output
    init_help = CliRunner().invoke(app, ["certs", "init", "--help"]).output
    assert "--san" in init_help and "--force" in init_help and "MLECS_TLS_CERT_FILE" in init_help
