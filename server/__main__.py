"""``mlecs-coordinator``: run the coordinator, migrate its database, or manage admin tokens on it.

Exit codes: 0 stopped cleanly; 2 bad configuration (the device port with neither TLS nor
MLECS_ALLOW_PLAINTEXT, among others); 1 unexpected failure, or a ``tokens`` / ``enrolment-tokens`` command
refused (unknown token id, invalid name or scope, unknown federation).
"""

from __future__ import annotations

import asyncio
import getpass
import json
import logging
import os
import socket
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

import typer
from pydantic import ValidationError

from server.config import CoordinatorSettings
from server.domain.errors import CoordinatorError

if TYPE_CHECKING:
    from server.services.admin_tokens import AdminTokenService
    from server.services.devices import DeviceService

cli = typer.Typer(add_completion=False, no_args_is_help=False,
                  help="The mlecs coordinator. Settings come from MLECS_* environment variables.")

EXIT_CONFIG = 2


def _settings() -> CoordinatorSettings:
    try:
        return CoordinatorSettings()
    except ValidationError as exc:
        typer.echo(f"configuration error: {exc}", err=True)
        raise typer.Exit(EXIT_CONFIG) from exc


def _say_database(settings: CoordinatorSettings) -> str:
    """The database URL a command works on; says which on stderr (password hidden), so that a token made on
    the embedded SQLite by mistake is noticed at once."""
    from sqlalchemy.engine import make_url

    url = settings.resolved_database_url()
    if settings.database_url:
        shown = make_url(url).render_as_string(hide_password=True)
        typer.echo(f"database: {shown} (MLECS_DATABASE_URL)", err=True)
    else:
        typer.echo(f"database: embedded SQLite {url.removeprefix('sqlite:///')} (MLECS_DATABASE_URL is unset)",
                   err=True)
    return url


def _logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


@cli.command()
def serve() -> None:
    """Serve devices over gRPC and people over the admin API (migrates the database first).

    With no MLECS_DATABASE_URL the coordinator keeps its state in SQLite under MLECS_STATE_DIR
    (default ./mlecs-data); with no MLECS_REDIS_URL device presence is kept in-process.

    The device port needs mutual TLS (MLECS_TLS_CERT_FILE, MLECS_TLS_KEY_FILE, MLECS_TLS_CLIENT_CA_FILE;
    `mlecs certs init` makes development ones) unless MLECS_ALLOW_PLAINTEXT=true (local development).
    """
    settings = _settings()
    _logging(settings.log_level)
    from server.app import Coordinator
    from server.config import ConfigurationError

    sys.setswitchinterval(settings.gil_switch_interval_s)
    try:
        asyncio.run(Coordinator(settings).run())
    except ConfigurationError as exc:
        typer.echo(f"configuration error: {exc}", err=True)
        raise typer.Exit(EXIT_CONFIG) from exc


@cli.command("serve-heartbeats", hidden=True)
def serve_heartbeats_command(
    settings_stdin: bool = typer.Option(False, "--settings-stdin",
                                        help="Read the settings as JSON from stdin instead of MLECS_* variables."),
) -> None:
    """Serve Heartbeat alone on MLECS_HEARTBEAT_PORT (started and supervised by `serve`; not run by hand).

    Prints "listening PORT" on stdout once serving and stops when its parent process goes away.
    """
    if settings_stdin:
        try:
            settings = CoordinatorSettings(**json.loads(sys.stdin.read()))
        except (ValueError, ValidationError) as exc:
            typer.echo(f"configuration error: settings on stdin: {exc}", err=True)
            raise typer.Exit(EXIT_CONFIG) from exc
    else:
        settings = _settings()
    _logging(settings.log_level)
    from server.config import ConfigurationError
    from server.heartbeat_process import READY_PREFIX, serve_heartbeats

    if settings.heartbeat_port is None:
        typer.echo("configuration error: MLECS_HEARTBEAT_PORT is not set", err=True)
        raise typer.Exit(EXIT_CONFIG)

    def announce(port: int) -> None:
        print(f"{READY_PREFIX}{port}", flush=True)

    try:
        asyncio.run(serve_heartbeats(settings, announce))
    except ConfigurationError as exc:
        typer.echo(f"configuration error: {exc}", err=True)
        raise typer.Exit(EXIT_CONFIG) from exc


@cli.command("worker")
def worker_command() -> None:
    """Run cloud jobs: tune the cloud model, generate anchors and evaluate each new global version.

    Coordinators commit a round once its aggregate is stored and put the version's cloud job on a durable
    queue in their database; workers run those jobs. A coordinator runs one in-process unless
    MLECS_WORKER_INPROCESS=false, which is how Compose and Kubernetes run it: workers as their own service,
    scaled apart from the coordinator replicas, on the same MLECS_DATABASE_URL, blob store (MLECS_STATE_DIR)
    and data (MLECS_DATA_DIR, MLECS_TASK_DATA). MLECS_CLOUD_WORKERS sets the jobs run at once; metrics are
    served on MLECS_WORKER_METRICS_PORT. The database must be migrated (`mlecs-coordinator migrate`).
    """
    settings = _settings()
    _logging(settings.log_level)
    from server.worker import run_worker

    _say_database(settings)
    try:
        run_worker(settings)
    except RuntimeError as exc:
        typer.echo(f"worker: {exc}", err=True)
        raise typer.Exit(EXIT_CONFIG) from exc


@cli.command("migrate")
def migrate_command(revision: str = typer.Argument("head", help="Alembic revision to upgrade to")) -> None:
    """Apply database migrations and exit (the compose `migrate` service runs this)."""
    settings = _settings()
    _logging(settings.log_level)
    from server.persistence.database import migrate

    migrate(_say_database(settings), revision)
    typer.echo(f"database at revision {revision}")


tokens_cli = typer.Typer(add_completion=False, no_args_is_help=True, help=(
    "Admin API tokens, directly on the configured database (migrated first). The first admin token can only be "
    "made here: there is no default password."))
cli.add_typer(tokens_cli, name="tokens")


@contextmanager
def _token_service() -> Iterator[AdminTokenService]:
    """The token service on the configured database; a refused command prints why and exits 1."""
    from server.persistence.database import migrate
    from server.persistence.sql_store import SqlStore
    from server.services.admin_tokens import AdminTokenService

    settings = _settings()
    settings.state_dir.mkdir(parents=True, exist_ok=True)
    url = _say_database(settings)
    migrate(url)
    store = SqlStore.from_url(url)
    try:
        yield AdminTokenService(store)
    except CoordinatorError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from exc
    finally:
        store.close()


def _operator() -> str:
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no passwd entry (containers)
        user = f"uid {os.getuid()}"
    return f"cli:{user}@{socket.gethostname()}"


def _when(value: datetime | None, never: str = "never") -> str:
    return never if value is None else value.strftime("%Y-%m-%d %H:%M:%SZ")


@tokens_cli.command("create")
def tokens_create(
    name: str = typer.Option(..., "--name", help="Who or what holds the token; shown in the audit log."),
    scopes: list[str] = typer.Option(["admin"], "--scope", help="read, operate or admin (admin ⊇ operate ⊇ read); "
                                                               "repeat for several."),
    expires_in_days: int | None = typer.Option(None, "--expires-in-days", min=1, max=3650,
                                               help="Lifetime in days (default: until revoked)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Print only the token, for scripts."),
) -> None:
    """Create an admin token and print it once (only its sha256 is stored)."""
    with _token_service() as tokens:
        expires_in = None if expires_in_days is None else timedelta(days=expires_in_days)
        issued = tokens.create(name, scopes, expires_in, _operator())
    if not quiet:
        token = issued.token
        typer.echo(f"created token {token.id} {token.name!r}: scopes {', '.join(sorted(s.value for s in token.scopes))}"
                   f", expires {_when(token.expires_at)}")
        typer.echo("store it now, it is not shown again:")
    typer.echo(issued.plaintext)


@tokens_cli.command("list")
def tokens_list() -> None:
    """List admin tokens (never their plaintext)."""
    with _token_service() as tokens:
        listed = tokens.list_all()
    now = datetime.now(UTC)
    typer.echo(f"{'id':<32}  {'name':<24}  {'scopes':<20}  {'state':<8}  {'expires':<20}  last used")
    for t in listed:
        state = ("revoked" if t.revoked_at else
                 "expired" if t.expires_at is not None and t.expires_at <= now else "active")
        typer.echo(f"{t.id:<32}  {t.name[:24]:<24}  {','.join(sorted(s.value for s in t.scopes)):<20}  {state:<8}  "
                   f"{_when(t.expires_at):<20}  {_when(t.last_used_at, '-')}")


@tokens_cli.command("revoke")
def tokens_revoke(token_id: str = typer.Argument(..., help="The token's id (from `tokens list`).")) -> None:
    """Revoke an admin token: its next request is refused. Unlike the admin API, this may revoke the last
    admin token (create a new one with `tokens create`)."""
    with _token_service() as tokens:
        token = tokens.revoke(token_id, allow_last_admin=True)
    typer.echo(f"revoked token {token.id} {token.name!r}")


enrolment_cli = typer.Typer(add_completion=False, no_args_is_help=True, help=(
    "One-time enrolment tokens for devices, directly on the configured database (migrated first). A device "
    "enrols once with its token (agent config: enrolment_token_file); the token is then used up."))
cli.add_typer(enrolment_cli, name="enrolment-tokens")


@enrolment_cli.command("create")
def enrolment_tokens_create(
    federation: str = typer.Option(..., "--federation", help="Name (or id) of the federation the device joins."),
    device_names: list[str] = typer.Option(
        None, "--device-name", help="Only the device of this name may use the token (it may then also re-enrol "
                                    "an existing device of that name). Repeat for one token per name, printed "
                                    "in the same order. Default: one token for one new device of any name."),
    ttl_hours: float = typer.Option(24.0, "--ttl-hours", min=0.001, max=720,
                                    help="How long the token may be used, in hours."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Print only the token(s), one per line, for scripts."),
) -> None:
    """Create a one-time enrolment token and print it once (only its sha256 is stored)."""
    names: list[str | None] = list(device_names) if device_names else [None]
    with _device_service() as devices:
        issued = [devices.issue_enrolment_token(federation, name, ttl_hours * 3600, _operator()) for name in names]
    for plaintext, token in issued:
        if not quiet:
            who = f"device {token.device_name!r}" if token.device_name else "one new device"
            typer.echo(f"enrolment token {token.id} for {who} in federation {federation!r}, usable until "
                       f"{_when(token.expires_at)}; give it to the device now, it is not shown again:", err=True)
        typer.echo(plaintext)


@contextmanager
def _device_service() -> Iterator[DeviceService]:
    """The device service on the configured database and Redis; a refused command prints why and exits 1."""
    from server.composition import build_services

    settings = _settings()
    _say_database(settings)
    services = build_services(settings)
    try:
        yield services.devices
    except CoordinatorError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from exc
    finally:
        services.ctx.presence.close()
        services.ctx.revocations.close()


def main() -> None:
    cli()


if __name__ == "__main__":
    main()
