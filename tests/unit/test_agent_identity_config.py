"""The agent's identity settings: mutual TLS files, explicit plaintext, and the enrolment token."""

from __future__ import annotations

from pathlib import Path

import pytest

from edge_agent.config import ConfigError, load_settings
from mlecs import certs

BASE = """
coordinator = "127.0.0.1:50051"
federation = "demo"
device_name = "cam-1"
modalities = ["image"]
{extra}
[partition]
num_clients = 3
client_index = 1
{tables}
"""


def _load(tmp_path: Path, extra: str = "", tables: str = ""):
    path = tmp_path / "agent.toml"
    path.write_text(BASE.format(extra=extra, tables=tables))
    return load_settings(path)


def _tls(directory: Path, cert: str = "cam-1", key: str | None = None) -> str:
    return (f'[tls]\nca_file = "{directory / "ca.pem"}"\ncert_file = "{directory / "devices" / f"{cert}.pem"}"\n'
            f'key_file = "{directory / "devices" / f"{key or cert}.key"}"\n')


@pytest.fixture
def ca(tmp_path: Path) -> Path:
    directory = tmp_path / "certs"
    certs.init_directory(directory)
    for name in ("cam-1", "cam-2"):
        certs.issue_device_files(directory, name)
    return directory


def test_without_tls_or_explicit_plaintext_the_config_is_refused_saying_how_to_fix_it(tmp_path):
    with pytest.raises(ConfigError, match=r"no \[tls\] section.*mlecs certs.*allow_plaintext = true"):
        _load(tmp_path)
    assert _load(tmp_path, "allow_plaintext = true").tls_material() is None


def test_tls_files_are_read_and_checked_at_load(tmp_path, ca):
    material = _load(tmp_path, tables=_tls(ca)).tls_material()
    assert material is not None
    assert material.cert_pem == (ca / "devices" / "cam-1.pem").read_bytes()
    assert material.ca_pem == (ca / "ca.pem").read_bytes() and material.server_name is None


def test_a_certificate_for_another_device_is_refused_at_load(tmp_path, ca):
    with pytest.raises(ConfigError, match=r"is for device 'cam-2', but device_name is 'cam-1'"):
        _load(tmp_path, tables=_tls(ca, "cam-2"))


def test_a_key_of_another_certificate_is_refused_at_load(tmp_path, ca):
    with pytest.raises(ConfigError, match="does not belong"):
        _load(tmp_path, tables=_tls(ca, "cam-1", key="cam-2"))


def test_a_missing_tls_file_is_named(tmp_path, ca):
    (ca / "devices" / "cam-1.key").unlink()
    with pytest.raises(ConfigError, match=r"tls.key_file: .*cam-1.key cannot be read"):
        _load(tmp_path, tables=_tls(ca))


def test_the_enrolment_token_comes_inline_or_from_a_file_but_not_both(tmp_path):
    inline = _load(tmp_path, 'allow_plaintext = true\nenrolment_token = "mlecs_enrol_abc"')
    assert inline.enrolment_token_value() == "mlecs_enrol_abc"
    assert "mlecs_enrol_abc" not in repr(inline)  # kept out of logs

    token_file = tmp_path / "token"
    token_file.write_text("mlecs_enrol_xyz\n")
    from_file = _load(tmp_path, f'allow_plaintext = true\nenrolment_token_file = "{token_file}"')
    assert from_file.enrolment_token_value() == "mlecs_enrol_xyz"
    token_file.unlink()  # read only when the agent enrols: a missing file is a config error then
    with pytest.raises(ConfigError, match=r"enrolment_token_file .* cannot be read"):
        from_file.enrolment_token_value()

    assert _load(tmp_path, "allow_plaintext = true").enrolment_token_value() == ""
    with pytest.raises(ConfigError, match="not both"):
        _load(tmp_path, f'allow_plaintext = true\nenrolment_token = "a"\nenrolment_token_file = "{token_file}"')
