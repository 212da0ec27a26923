"""``mlecs rounds``."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from mlecs.admin_cli.common import DEFAULT_URL, Column, Json, Token, Url, api, fields, show, table, text

rounds_app = typer.Typer(no_args_is_help=True, help="Launch rounds and see who took part, what was refused and "
                                                    "how they scored.")

RoundId = Annotated[str, typer.Argument(help="The round's id.")]

ROUND_COLUMNS: list[Column] = [("number", "number"), ("id", "id"), ("state", "state"),
                               ("participants", lambda r: len(r["participants"])), ("opened", "opened_at"),
                               ("closed", "closed_at"), ("failure", "failure_reason")]
PARTICIPANT_COLUMNS: list[Column] = [("device", "device_name"), ("id", "device_id"), ("invited", "invited"),
                                     ("update", "update_state"), ("accepted", "accepted_at"),
                                     ("rejected because", "rejection_reason"), ("anchor agreement", "anchor_agreement"),
                                     ("reported", "reported")]
REFUSAL_COLUMNS: list[Column] = [("at", "at"), ("device", "device_id"), ("method", "method"), ("reason", "reason"),
                                 ("detail", "detail")]


def _round(record: dict[str, Any]) -> str:
    keys = ["id", "federation_id", "number", "state", "target_updates", "opened_at", "deadline_at", "closed_at",
            "failure_reason", "base_version_id", "version_id"]
    return (fields(record, keys) + f"\nparticipants  {text(record['participants'])}\nmetrics:\n"
            + "\n".join(f"  {k}: {text(v)}" for k, v in record["metrics"].items()))


def _metrics(record: dict[str, Any]) -> str:
    lines = [f"round {record['number']} ({record['state']}), version {text(record['version_id'])}", "round metrics:"]
    lines += [f"  {k}: {text(v)}" for k, v in record["metrics"].items()] or ["  -"]
    lines += ["version evaluation:"] + ([f"  {k}: {text(v)}" for k, v in record["version_metrics"].items()] or ["  -"])
    lines += ["device reports:"] + ([f"  {d}: {text(m)}" for d, m in record["device_reports"].items()] or ["  -"])
    return "\n".join(lines)


@rounds_app.command("launch")
def launch(federation: Annotated[str, typer.Argument(help="The federation's name or id.")],
           url: Url = DEFAULT_URL, token: Token = None, as_json: Json = False) -> None:
    """Launch the next round with the live devices. Scope: operate."""
    with api(url, token) as client:
        show(client.post(f"/v1/federations/{federation}/rounds"), as_json, _round)


@rounds_app.command("list")
def list_(federation: Annotated[str, typer.Argument(help="The federation's name or id.")],
          url: Url = DEFAULT_URL, token: Token = None, as_json: Json = False) -> None:
    """List a federation's rounds. Scope: read."""
    with api(url, token) as client:
        show(client.get(f"/v1/federations/{federation}/rounds"), as_json, lambda rows: table(rows, ROUND_COLUMNS))


@rounds_app.command("get")
def get(round_id: RoundId, url: Url = DEFAULT_URL, token: Token = None, as_json: Json = False) -> None:
    """Show a round. Scope: read."""
    with api(url, token) as client:
        show(client.get(f"/v1/rounds/{round_id}"), as_json, _round)


@rounds_app.command("participants")
def participants(round_id: RoundId, url: Url = DEFAULT_URL, token: Token = None, as_json: Json = False) -> None:
    """Per device: invited, its update's state, accepted when or rejected why, anchor agreement. Scope: read."""
    with api(url, token) as client:
        show(client.get(f"/v1/rounds/{round_id}/participants"), as_json,
             lambda rows: table(rows, PARTICIPANT_COLUMNS))


@rounds_app.command("refusals")
def refusals(round_id: RoundId,
             limit: Annotated[int, typer.Option("--limit", min=1, max=1000, help="At most this many, newest "
                                                                                  "first.")] = 100,
             url: Url = DEFAULT_URL, token: Token = None, as_json: Json = False) -> None:
    """Device requests refused in the round (invalid updates, rate limits, identity). Scope: read."""
    with api(url, token) as client:
        show(client.get(f"/v1/rounds/{round_id}/refusals", limit=limit), as_json,
             lambda rows: table(rows, REFUSAL_COLUMNS))


@rounds_app.command("metrics")
def metrics(round_id: RoundId, url: Url = DEFAULT_URL, token: Token = None, as_json: Json = False) -> None:
    """The round's metrics, its version's evaluation and each device's report. Scope: read."""
    with api(url, token) as client:
        show(client.get(f"/v1/rounds/{round_id}/metrics"), as_json, _metrics)
