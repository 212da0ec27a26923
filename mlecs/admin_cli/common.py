"""What every admin command shares: the connection options, calling the API, and printing its answers."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Annotated, Any

import typer

from mlecs.fleet.admin_client import AdminApiError, AdminClient

DEFAULT_URL = "http://127.0.0.1:8080"

Url = Annotated[str, typer.Option("--url", envvar="MLECS_ADMIN_URL", show_default=True,
                                  help="The coordinator's admin API.")]
Token = Annotated[str | None, typer.Option("--token", envvar="MLECS_ADMIN_TOKEN", show_default=False,
                                           help="Admin bearer token (mlecs-coordinator tokens create).")]
Json = Annotated[bool, typer.Option("--json", help="Print the API's JSON instead of a table.")]

Column = tuple[str, str | Callable[[dict[str, Any]], Any]]
"""A table column: its header, and the key of the value it shows (or a function of the row)."""


@contextmanager
def api(url: str, token: str | None) -> Iterator[AdminClient]:
    """A client for one command; an error answer or an unreachable API ends the command with exit code 1."""
    try:
        yield AdminClient(url, token)
    except AdminApiError as exc:
        hint = " (pass --token or set MLECS_ADMIN_TOKEN)" if exc.status == 401 and not token else ""
        typer.echo(f"error: HTTP {exc.status}: {exc.detail}{hint}", err=True)
        raise typer.Exit(1) from exc
    except OSError as exc:  # urllib.error.URLError, connection refused, timeouts
        reason = getattr(exc, "reason", exc)
        typer.echo(f"error: cannot reach the admin API at {url}: {reason}", err=True)
        raise typer.Exit(1) from exc


def text(value: Any) -> str:
    """A value as a table cell."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list):
        return ",".join(text(v) for v in value) or "-"
    if isinstance(value, dict):
        return " ".join(f"{k}={text(v)}" for k, v in value.items()) or "-"
    return str(value)


def table(rows: Sequence[dict[str, Any]], columns: Sequence[Column]) -> str:
    cells = [[text(key(row) if callable(key) else row.get(key)) for _, key in columns] for row in rows]
    widths = [max([len(header), *(len(r[i]) for r in cells)]) for i, (header, _) in enumerate(columns)]
    lines = ["  ".join(h.ljust(w) for (h, _), w in zip(columns, widths, strict=True)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells]
    return "\n".join(lines)


def fields(record: dict[str, Any], keys: Sequence[str] | None = None) -> str:
    """One record as ``key: value`` lines (every key, or these)."""
    chosen = list(keys) if keys is not None else list(record)
    width = max(len(k) for k in chosen)
    return "\n".join(f"{k.ljust(width)}  {text(record.get(k))}" for k in chosen)


def show(data: Any, as_json: bool, render: Callable[[Any], str]) -> None:
    typer.echo(json.dumps(data, indent=2) if as_json else render(data))
