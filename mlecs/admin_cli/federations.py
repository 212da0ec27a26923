"""``mlecs federations`` and ``mlecs enrolment-tokens``."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Annotated, Any

import typer

from mlecs.admin_cli.common import DEFAULT_URL, Column, Json, Token, Url, api, fields, show, table
from mlecs.tasks.spec import builtin_task_text

federations_app = typer.Typer(no_args_is_help=True, help="Create, list, pause, resume and stop federations.")
enrolment_tokens_app = typer.Typer(no_args_is_help=True, help="One-time tokens devices enrol with.")

Federation = Annotated[str, typer.Argument(help="The federation's name or id.")]

FEDERATION_COLUMNS: list[Column] = [("name", "name"), ("id", "id"), ("state", "state"),
                                    ("current version", "current_version_id"), ("created", "created_at")]
ENROLMENT_COLUMNS: list[Column] = [("id", "id"), ("device", "device_name"), ("state", "state"),
                                   ("expires", "expires_at"), ("used by", "used_by_device_id"),
                                   ("created by", "created_by")]


def _federation(record: dict[str, Any]) -> str:
    return fields(record, ["name", "id", "state", "current_version_id", "created_at"]) + "\nconfig:\n" + "\n".join(
        f"  {key}: {json.dumps(value)}" for key, value in record["config"].items())


def read_config(path: Path) -> dict[str, Any]:
    """A federation config from a .json or .toml file (the fields of the API's ``config`` object)."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise typer.BadParameter(f"cannot read {path}: {exc.strerror or exc}", param_hint="--config") from exc
    try:
        if path.suffix.lower() == ".toml":
            config = tomllib.loads(raw.decode())
        elif path.suffix.lower() == ".json":
            config = json.loads(raw)
        else:
            raise typer.BadParameter(f"{path} must end in .json or .toml", param_hint="--config")
    except (ValueError, UnicodeDecodeError) as exc:  # JSONDecodeError and TOMLDecodeError are ValueErrors
        raise typer.BadParameter(f"{path} is not valid {path.suffix[1:].upper()}: {exc}",
                                 param_hint="--config") from exc
    if not isinstance(config, dict):
        raise typer.BadParameter(f"{path} must hold an object of config fields", param_hint="--config")
    return config


def _task_file_text(path: str) -> str:
    from mlecs.tasks import TaskError, task_text

    try:
        return task_text(path)
    except TaskError as exc:
        raise typer.BadParameter(str(exc), param_hint="--task") from exc


@federations_app.command("create")
def create(
    name: Annotated[str, typer.Argument(help="Letters, digits, '-', '_' or '.'; at most 64.")],
    config: Annotated[Path | None, typer.Option("--config", help="The full config as a .json or .toml file "
                                                                 "(omitted fields take their defaults).")] = None,
    task: Annotated[str | None, typer.Option(
        "--task", help="The federation's task: a built-in name (avmnist, avmnist-hard) or a task file, sent as "
                       "its text (docs/datasets.md). Default: the bundled AV-MNIST.")] = None,
    url: Url = DEFAULT_URL, token: Token = None, as_json: Json = False,
) -> None:
    """Create a federation and its initial global version. Scope: operate."""
    settings: dict[str, Any] = dict(read_config(config)) if config else {}
    if task is not None:  # a built-in name travels as is (the coordinator expands it), a file as its text
        settings["task"] = task if builtin_task_text(task) is not None else _task_file_text(task)
    body = {"name": name, "config": settings}
    with api(url, token) as client:
        show(client.post("/v1/federations", body), as_json, _federation)


@federations_app.command("list")
def list_(url: Url = DEFAULT_URL, token: Token = None, as_json: Json = False) -> None:
    """List federations. Scope: read."""
    with api(url, token) as client:
        show(client.get("/v1/federations"), as_json, lambda rows: table(rows, FEDERATION_COLUMNS))


@federations_app.command("get")
def get(federation: Federation, url: Url = DEFAULT_URL, token: Token = None, as_json: Json = False) -> None:
    """Show a federation with its config. Scope: read."""
    with api(url, token) as client:
        show(client.get(f"/v1/federations/{federation}"), as_json, _federation)


def _change(verb: str, federation: str, url: str, token: str | None, as_json: bool) -> None:
    with api(url, token) as client:
        show(client.post(f"/v1/federations/{federation}/{verb}"), as_json,
             lambda f: f"federation {f['name']} is {f['state']}")


@federations_app.command("pause")
def pause(federation: Federation, url: Url = DEFAULT_URL, token: Token = None, as_json: Json = False) -> None:
    """Open no new rounds and tell devices to wait. Scope: operate."""
    _change("pause", federation, url, token, as_json)


@federations_app.command("resume")
def resume(federation: Federation, url: Url = DEFAULT_URL, token: Token = None, as_json: Json = False) -> None:
    """Resume a paused federation. Scope: operate."""
    _change("resume", federation, url, token, as_json)


@federations_app.command("stop")
def stop(federation: Federation, url: Url = DEFAULT_URL, token: Token = None, as_json: Json = False) -> None:
    """Stop a federation for good: devices stop, an unfinished round fails. Scope: operate."""
    _change("stop", federation, url, token, as_json)


@enrolment_tokens_app.command("create")
def create_enrolment_token(
    federation: Federation,
    device_name: Annotated[str | None, typer.Option("--device-name", help="Only this device may use it.")] = None,
    expires_in_hours: Annotated[float, typer.Option("--expires-in-hours", min=0.01, max=720)] = 24.0,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Print only the token.")] = False,
    url: Url = DEFAULT_URL, token: Token = None, as_json: Json = False,
) -> None:
    """Issue a one-time enrolment token; it is shown only now. Scope: operate."""
    body: dict[str, Any] = {"expires_in_hours": expires_in_hours}
    if device_name is not None:
        body["device_name"] = device_name
    with api(url, token) as client:
        issued = client.post(f"/v1/federations/{federation}/enrolment-tokens", body)
    if quiet:
        typer.echo(issued["token"])
        return
    show(issued, as_json, lambda t: fields(t, ["id", "device_name", "expires_at"])
         + f"\nstore it now, it is not shown again:\n{t['token']}")


@enrolment_tokens_app.command("list")
def list_enrolment_tokens(federation: Federation, url: Url = DEFAULT_URL, token: Token = None,
                          as_json: Json = False) -> None:
    """List a federation's enrolment tokens and whether each was used. Scope: read."""
    with api(url, token) as client:
        show(client.get(f"/v1/federations/{federation}/enrolment-tokens"), as_json,
             lambda rows: table(rows, ENROLMENT_COLUMNS))
