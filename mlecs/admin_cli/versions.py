"""``mlecs devices`` and ``mlecs versions``."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Annotated, Any

import typer

from mlecs.admin_cli.common import DEFAULT_URL, Column, Json, Token, Url, api, fields, show, table

devices_app = typer.Typer(no_args_is_help=True, help="See and revoke devices.")
versions_app = typer.Typer(no_args_is_help=True, help="Global versions: list, download, promote or roll back.")

Federation = Annotated[str, typer.Argument(help="The federation's name or id.")]
DeviceId = Annotated[str, typer.Argument(help="The device's id.")]
VersionId = Annotated[str, typer.Argument(help="The version's id.")]

DEVICE_COLUMNS: list[Column] = [("name", "name"), ("id", "id"), ("modalities", "modalities"), ("online", "online"),
                                ("revoked", "revoked"), ("last seen", "last_seen_at"), ("enrolled", "enrolled_at")]
VERSION_COLUMNS: list[Column] = [("round", "round_number"), ("id", "id"), ("codec", "codec"),
                                 ("adapter bytes", "adapter_size"),
                                 ("accuracy", lambda v: v["metrics"].get("accuracy")),
                                 ("cloud work", lambda v: v.get("cloud_state")), ("created", "created_at")]


@devices_app.command("list")
def list_devices(federation: Federation, url: Url = DEFAULT_URL, token: Token = None, as_json: Json = False) -> None:
    """List a federation's devices with their modality sets and when last seen. Scope: read."""
    with api(url, token) as client:
        show(client.get(f"/v1/federations/{federation}/devices"), as_json, lambda rows: table(rows, DEVICE_COLUMNS))


@devices_app.command("get")
def get_device(device_id: DeviceId, url: Url = DEFAULT_URL, token: Token = None, as_json: Json = False) -> None:
    """Show a device. Scope: read."""
    with api(url, token) as client:
        show(client.get(f"/v1/devices/{device_id}"), as_json, fields)


@devices_app.command("revoke")
def revoke_device(device_id: DeviceId, url: Url = DEFAULT_URL, token: Token = None, as_json: Json = False) -> None:
    """Revoke a device: its next call is refused. Scope: admin."""
    with api(url, token) as client:
        show(client.post(f"/v1/devices/{device_id}/revoke"), as_json, lambda d: f"device {d['name']} ({d['id']}) "
                                                                             "revoked")


def _version(record: dict[str, Any]) -> str:
    return fields(record, ["id", "federation_id", "round_number", "codec", "adapter_sha256", "adapter_size",
                           "anchors_size", "created_at", "metrics", "cloud_state", "cloud_attempts", "cloud_error",
                           "cloud_finished_at"])


@versions_app.command("list")
def list_versions(federation: Federation, url: Url = DEFAULT_URL, token: Token = None, as_json: Json = False) -> None:
    """List a federation's global versions with their evaluation and where their cloud work (tuning, anchors,
    evaluation) stands: pending, done, failed, or none. Scope: read."""
    with api(url, token) as client:
        show(client.get(f"/v1/federations/{federation}/versions"), as_json,
             lambda rows: table(rows, VERSION_COLUMNS))


@versions_app.command("get")
def get_version(version_id: VersionId, url: Url = DEFAULT_URL, token: Token = None, as_json: Json = False) -> None:
    """Show a global version. Scope: read."""
    with api(url, token) as client:
        show(client.get(f"/v1/versions/{version_id}"), as_json, _version)


@versions_app.command("download")
def download(version_id: VersionId,
             output: Annotated[Path | None, typer.Option("--output", "-o", help="Where to write it (default: "
                                                                                "adapter-<id>.mlecs here).")] = None,
             url: Url = DEFAULT_URL, token: Token = None) -> None:
    """Download a version's encoded adapter, checking its sha256. Scope: read."""
    with api(url, token) as client:
        payload, headers = client.get_bytes(f"/v1/versions/{version_id}/adapter")
    expected = headers.get("x-checksum-sha256", "")
    if hashlib.sha256(payload).hexdigest() != expected:
        typer.echo(f"error: the download's sha256 does not match the coordinator's ({expected or 'none sent'})",
                   err=True)
        raise typer.Exit(1)
    target = output or Path(f"adapter-{version_id}.mlecs")
    try:
        target.write_bytes(payload)
    except OSError as exc:
        typer.echo(f"error: cannot write {target}: {exc.strerror or exc}", err=True)
        raise typer.Exit(1) from exc
    typer.echo(f"wrote {target} ({len(payload):,} bytes, sha256 {expected})")


@versions_app.command("promote")
def promote(federation: Federation, version_id: VersionId, url: Url = DEFAULT_URL, token: Token = None,
            as_json: Json = False) -> None:
    """Make a version the current one (a newer one, or an older one to roll back); the next round starts from
    it. Scope: admin."""
    with api(url, token) as client:
        show(client.post(f"/v1/federations/{federation}/versions/{version_id}/promote"), as_json,
             lambda f: f"federation {f['name']}: current version is now {f['current_version_id']}")
