"""``mlecs`` commands for the coordinator's admin API: one command per operation, grouped by resource.

Every command takes ``--url`` (``MLECS_ADMIN_URL``), ``--token`` (``MLECS_ADMIN_TOKEN``) and ``--json``;
it prints a table (or ``key: value`` lines) by default, the API's JSON with ``--json``, and on an error the
problem's detail with exit code 1.
"""

from __future__ import annotations

import typer

from mlecs.admin_cli.access import audit, tokens_app
from mlecs.admin_cli.federations import enrolment_tokens_app, federations_app
from mlecs.admin_cli.rounds import rounds_app
from mlecs.admin_cli.versions import devices_app, versions_app


def register(app: typer.Typer) -> None:
    """Adds the admin API commands to the ``mlecs`` command line."""
    app.add_typer(federations_app, name="federations")
    app.add_typer(rounds_app, name="rounds")
    app.add_typer(devices_app, name="devices")
    app.add_typer(enrolment_tokens_app, name="enrolment-tokens")
    app.add_typer(versions_app, name="versions")
    app.add_typer(tokens_app, name="tokens")
    app.command("audit")(audit)
