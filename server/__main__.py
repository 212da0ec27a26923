"""``mlecs-coordinator``: run the coordinator, or only migrate its database.

Exit codes: 0 stopped cleanly; 2 bad configuration; 1 unexpected failure.
"""

from __future__ import annotations

import asyncio
import logging
import sys

import typer
from pydantic import ValidationError

from server.config import CoordinatorSettings

cli = typer.Typer(add_completion=False, no_args_is_help=False,
                  help="The mlecs coordinator. Settings come from MLECS_* environment variables.")

EXIT_CONFIG = 2


def _settings() -> CoordinatorSettings:
    try:
        return CoordinatorSettings()
    except ValidationError as exc:
        typer.echo(f"configuration error: {exc}", err=True)
        raise typer.Exit(EXIT_CONFIG) from exc


def _logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


@cli.command()
def serve() -> None:
    """Serve devices over gRPC and people over the admin API (migrates the database first).

    With no MLECS_DATABASE_URL the coordinator keeps its state in SQLite under MLECS_STATE_DIR
    (default ./mlecs-data); with no MLECS_REDIS_URL device presence is kept in-process.
    """
    settings = _settings()
    _logging(settings.log_level)
    from server.app import Coordinator

    sys.setswitchinterval(settings.gil_switch_interval_s)
    asyncio.run(Coordinator(settings).run())


@cli.command("migrate")
def migrate_command(revision: str = typer.Argument("head", help="Alembic revision to upgrade to")) -> None:
    """Apply database migrations and exit (the compose `migrate` service runs this)."""
    settings = _settings()
    _logging(settings.log_level)
    from server.persistence.database import migrate

    migrate(settings.resolved_database_url(), revision)
    typer.echo(f"database at revision {revision}")


def main() -> None:
    cli()


if __name__ == "__main__":
    main()
