"""``mlecs certs``: make the development CA and the certificates for mutual TLS on the device port."""

from __future__ import annotations

from pathlib import Path

import typer

certs_app = typer.Typer(
    add_completion=False, no_args_is_help=True,
    help="Development certificates for mutual TLS between devices and the coordinator: `init` makes a CA and "
         "the coordinator's certificate, `device NAME` a client certificate for one device (CN = NAME).")

_DIR = typer.Option(Path("mlecs-certs"), "--dir", "-d", help="Directory of the CA and certificates.")
_FORCE = typer.Option(False, "--force", help="Replace files that already exist.")
_DAYS = typer.Option(825, "--days", min=1, max=3650, help="Validity of the issued certificate(s) in days.")


@certs_app.command("init")
def init(
    directory: Path = _DIR,
    san: list[str] = typer.Option(
        None, "--san",
        help="A DNS name or IP address devices use to reach the coordinator; repeat for several. "
             "Default: localhost and 127.0.0.1."),
    days: int = _DAYS,
    force: bool = _FORCE,
) -> None:
    """Create a development CA (ca.pem, ca.key) and the coordinator's certificate (coordinator.pem,
    coordinator.key) in --dir.

    Point the coordinator at them with MLECS_TLS_CERT_FILE=DIR/coordinator.pem,
    MLECS_TLS_KEY_FILE=DIR/coordinator.key and MLECS_TLS_CLIENT_CA_FILE=DIR/ca.pem. Keep ca.key on the
    machine that issues device certificates, never on a device. For production, use your own CA.
    """
    from mlecs.certs import DEFAULT_SANS, CertificateError, init_directory

    try:
        layout = init_directory(directory, list(san) if san else list(DEFAULT_SANS), force=force, days=days)
    except CertificateError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from exc
    typer.echo(f"CA:          {layout.ca.cert}  (key {layout.ca.key})")
    typer.echo(f"coordinator: {layout.coordinator.cert}  (key {layout.coordinator.key})")
    typer.echo("coordinator settings:")
    typer.echo(f"  MLECS_TLS_CERT_FILE={layout.coordinator.cert.resolve()}")
    typer.echo(f"  MLECS_TLS_KEY_FILE={layout.coordinator.key.resolve()}")
    typer.echo(f"  MLECS_TLS_CLIENT_CA_FILE={layout.ca.cert.resolve()}")


@certs_app.command("device")
def device(
    name: str = typer.Argument(..., help="The device's name: the agent's device_name, and the certificate's CN."),
    directory: Path = _DIR,
    days: int = _DAYS,
    force: bool = _FORCE,
) -> None:
    """Issue a client certificate for device NAME, signed by the CA in --dir (run `init` first).

    Writes DIR/devices/NAME.pem and DIR/devices/NAME.key; copy them and DIR/ca.pem to the device and
    name them in the agent config's [tls] section. The coordinator accepts the certificate only for
    the device called NAME.
    """
    from mlecs.certs import CertificateError, issue_device_files

    try:
        files = issue_device_files(directory, name, force=force, days=days)
    except CertificateError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from exc
    typer.echo(f"device {name}: {files.cert}  (key {files.key})")
    typer.echo("agent config:")
    typer.echo("  [tls]")
    typer.echo(f'  ca_file = "{(directory / "ca.pem").resolve()}"')
    typer.echo(f'  cert_file = "{files.cert.resolve()}"')
    typer.echo(f'  key_file = "{files.key.resolve()}"')
