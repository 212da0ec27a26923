"""Security of the device gRPC port: mutual TLS credentials, or plaintext only when explicitly allowed.

With mutual TLS every connection presents a client certificate signed by ``tls_client_ca_file``
(the handshake fails otherwise, before any RPC runs), and the servicer binds each call to the device
the certificate names: its subject CN must equal the device's name.
"""

from __future__ import annotations

import logging
from pathlib import Path

import grpc

from mlecs.certs import CertificateError, check_key_pair
from server.config import ConfigurationError, CoordinatorSettings
from server.domain.errors import UnauthenticatedError

log = logging.getLogger("mlecs.coordinator")

FIX = ("run `mlecs certs init --dir DIR` and set MLECS_TLS_CERT_FILE=DIR/coordinator.pem, "
       "MLECS_TLS_KEY_FILE=DIR/coordinator.key and MLECS_TLS_CLIENT_CA_FILE=DIR/ca.pem; or, for local "
       "development only, set MLECS_ALLOW_PLAINTEXT=true")


def device_port_credentials(settings: CoordinatorSettings) -> grpc.ServerCredentials | None:
    """Mutual-TLS credentials for the device port, or None for plaintext (only when allowed, with a loud
    warning). Raises ConfigurationError, saying how to fix it, when neither is configured or a file is bad."""
    if settings.tls_cert_file is None or settings.tls_key_file is None or settings.tls_client_ca_file is None:
        if not settings.allow_plaintext:
            raise ConfigurationError(f"the device port has no TLS configured and plaintext is not allowed: {FIX}")
        log.warning("!!! PLAINTEXT device port (MLECS_ALLOW_PLAINTEXT=true): device credentials and updates cross "
                    "the network unencrypted and devices are not authenticated by certificate. For local "
                    "development and benchmarks only !!!")
        return None
    cert = _read(settings.tls_cert_file, "MLECS_TLS_CERT_FILE")
    key = _read(settings.tls_key_file, "MLECS_TLS_KEY_FILE")
    client_ca = _read(settings.tls_client_ca_file, "MLECS_TLS_CLIENT_CA_FILE")
    try:
        check_key_pair(cert, key, f"{settings.tls_cert_file} with {settings.tls_key_file}")
    except CertificateError as exc:
        raise ConfigurationError(str(exc)) from exc
    if b"-----BEGIN CERTIFICATE-----" not in client_ca:
        raise ConfigurationError(f"MLECS_TLS_CLIENT_CA_FILE={settings.tls_client_ca_file} holds no PEM certificate")
    if settings.allow_plaintext:
        log.info("MLECS_ALLOW_PLAINTEXT is ignored: mutual TLS is configured")
    log.info("device port uses mutual TLS; client certificates must chain to %s", settings.tls_client_ca_file)
    return grpc.ssl_server_credentials([(key, cert)], root_certificates=client_ca, require_client_auth=True)


def peer_certificate_name(context: grpc.aio.ServicerContext) -> str:
    """The subject CN of the client certificate this call came with (mutual TLS only)."""
    names = context.auth_context().get("x509_common_name") or []
    if not names:  # the handshake demands a certificate, so only a certificate without a CN gets here
        raise UnauthenticatedError("the client certificate names no device (no subject CN)")
    return bytes(names[0]).decode("utf-8", errors="replace")


def _read(path: Path, setting: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ConfigurationError(f"{setting}={path} cannot be read: {exc.strerror}") from exc
