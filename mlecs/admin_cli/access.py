"""``mlecs tokens`` and ``mlecs audit``."""

from __future__ import annotations

from typing import Annotated

import typer

from mlecs.admin_cli.common import DEFAULT_URL, Column, Json, Token, Url, api, fields, show, table

tokens_app = typer.Typer(no_args_is_help=True, help="Admin API tokens (the first one comes from "
                                                    "`mlecs-coordinator tokens create`).")

TOKEN_COLUMNS: list[Column] = [("id", "id"), ("name", "name"), ("scopes", "scopes"), ("state", "state"),
                               ("expires", "expires_at"), ("last used", "last_used_at"), ("created by", "created_by")]
AUDIT_COLUMNS: list[Column] = [("at", "at"), ("actor", "actor_name"), ("action", "action"), ("status", "status"),
                               ("outcome", "outcome"), ("path", "path"), ("detail", "detail")]


@tokens_app.command("create")
def create(
    name: Annotated[str, typer.Option("--name", help="Who or what holds it; shown in the audit log.")],
    scopes: Annotated[list[str], typer.Option("--scope", help="read, operate or admin (admin ⊇ operate ⊇ read); "
                                                              "repeat for several.")],
    expires_in_days: Annotated[int | None, typer.Option("--expires-in-days", min=1, max=3650,
                                                        help="Lifetime (default: until revoked).")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Print only the token.")] = False,
    url: Url = DEFAULT_URL, token: Token = None, as_json: Json = False,
) -> None:
    """Issue an admin token; it is shown only now. Scope: admin."""
    with api(url, token) as client:
        issued = client.post("/v1/tokens", {"name": name, "scopes": scopes, "expires_in_days": expires_in_days})
    if quiet:
        typer.echo(issued["token"])
        return
    show(issued, as_json, lambda t: fields(t, ["id", "name", "scopes", "expires_at"])
         + f"\nstore it now, it is not shown again:\n{t['token']}")


@tokens_app.command("list")
def list_(url: Url = DEFAULT_URL, token: Token = None, as_json: Json = False) -> None:
    """List admin tokens (never their plaintext). Scope: admin."""
    with api(url, token) as client:
        show(client.get("/v1/tokens"), as_json, lambda rows: table(rows, TOKEN_COLUMNS))


@tokens_app.command("revoke")
def revoke(token_id: Annotated[str, typer.Argument(help="The token's id.")], url: Url = DEFAULT_URL,
           token: Token = None, as_json: Json = False) -> None:
    """Revoke an admin token: its next request is refused. Scope: admin."""
    with api(url, token) as client:
        show(client.post(f"/v1/tokens/{token_id}/revoke"), as_json, lambda t: f"token {t['name']} ({t['id']}) "
                                                                              f"{t['state']}")


def audit(
    actor: Annotated[str | None, typer.Option("--actor", help="A token's id or name, or 'anonymous'.")] = None,
    action: Annotated[str | None, typer.Option("--action", help="An action (rounds.launch) or a group "
                                                                "(rounds).")] = None,
    since: Annotated[str | None, typer.Option("--since", help="RFC 3339 time, e.g. 2026-01-06T00:00:00Z.")] = None,
    limit: Annotated[int, typer.Option("--limit", min=1, max=1000, help="At most this many, newest first.")] = 100,
    url: Url = DEFAULT_URL, token: Token = None, as_json: Json = False,
) -> None:
    """The audit log of admin actions, refusals included, newest first. Scope: admin."""
    with api(url, token) as client:
        show(client.get("/v1/audit", actor=actor, action=action, since=since, limit=limit), as_json,
             lambda rows: table(rows, AUDIT_COLUMNS))
