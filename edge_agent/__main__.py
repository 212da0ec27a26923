"""``mlecs-agent``: the edge device daemon.

Exit codes (systemd's RestartPreventExitStatus uses the configuration ones):
  0  stopped: the coordinator ended the federation, or SIGTERM/SIGINT
  1  unexpected failure (restart me)
  2  configuration error: fix the config file (restarting will not help); also when the dataset
     directory has no usable sample (the report says why)
  3  refused by the coordinator: unknown federation, revoked device, or a missing, used or expired
     enrolment token
"""

from __future__ import annotations

import logging
import os
import signal
from pathlib import Path

import typer

EXIT_OK, EXIT_CRASH, EXIT_CONFIG, EXIT_REFUSED = 0, 1, 2, 3

cli = typer.Typer(add_completion=False)


@cli.command()
def run(
    config: Path = typer.Option(Path("/etc/mlecs/agent.toml"), "--config", "-c", help="Agent TOML config file"),
    log_level: str = typer.Option("INFO", help="DEBUG, INFO, WARNING or ERROR"),
    log_format: str | None = typer.Option(
        None, help="text or json (one JSON object per line, for the journal); default: the config's log_format"),
    check_config: bool = typer.Option(
        False, "--check-config", help="Only check the config (and the TLS files it names), print a summary, exit"),
    export_model: Path | None = typer.Option(
        None, "--export-model", help="Only copy this device's personalised model (from its latest round) to this "
                                     "directory as a model directory (mlecs predict --model), then exit"),
) -> None:
    """Run the agent: enrol, then train the rounds the coordinator assigns until it says stop."""
    from edge_agent.config import ConfigError, load_settings
    from edge_agent.logs import configure_logging

    if log_format not in (None, "text", "json"):
        typer.echo(f"configuration error: --log-format must be text or json, got {log_format!r}", err=True)
        raise typer.Exit(EXIT_CONFIG)
    try:
        settings = load_settings(config)
    except ConfigError as exc:
        typer.echo(f"configuration error: {exc}", err=True)
        raise typer.Exit(EXIT_CONFIG) from exc
    configure_logging(log_level, "json" if log_format == "json" else
                      "text" if log_format == "text" else settings.log_format)
    if export_model is not None:
        _export_personal_model(settings.state_dir, export_model)
        return
    if check_config:  # the installer runs this before it switches a device to a new version
        typer.echo(f"config ok: device_name={settings.device_name} federation={settings.federation} "
                   f"coordinator={settings.coordinator} state_dir={settings.state_dir} "
                   f"tls={'on' if settings.tls else 'off'}")
        return
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    torch.set_num_threads(settings.torch_threads)
    from edge_agent.agent import Agent
    from edge_agent.client import CoordinatorClient
    from edge_agent.errors import CredentialRejected, RequestRefused
    from mlecs.datasets import DatasetError

    tls = settings.tls_material()  # checked by load_settings already
    if tls is None:
        logging.getLogger("mlecs.agent").warning(
            "!!! PLAINTEXT connection to the coordinator (allow_plaintext = true): the device secret and updates "
            "cross the network unencrypted. For local development only !!!")
    agent = Agent(settings, CoordinatorClient(settings.coordinator, tls=tls))
    signal.signal(signal.SIGTERM, lambda *_: agent.shutdown())
    signal.signal(signal.SIGINT, lambda *_: agent.shutdown())
    try:
        agent.run()
    except (FileNotFoundError, ConfigError) as exc:
        typer.echo(f"configuration error: {exc}", err=True)
        raise typer.Exit(EXIT_CONFIG) from exc
    except DatasetError as exc:
        typer.echo(f"no usable data: {exc}; every problem (also logged above):", err=True)
        for problem in exc.report.problems:
            typer.echo(f"  {problem.describe()}", err=True)
        raise typer.Exit(EXIT_CONFIG) from exc
    except (CredentialRejected, RequestRefused) as exc:
        typer.echo(f"refused by the coordinator: {exc}", err=True)
        raise typer.Exit(EXIT_REFUSED) from exc


def _export_personal_model(state_dir: Path, out: Path) -> None:
    import shutil

    from edge_agent.trainer import PERSONAL_MODEL_DIR

    source = state_dir / PERSONAL_MODEL_DIR
    if not (source / "model.json").is_file():
        typer.echo(f"error: no personalised model in {state_dir}: the agent keeps one after each round it trains",
                   err=True)
        raise typer.Exit(EXIT_CRASH)
    shutil.copytree(source, out, dirs_exist_ok=True)
    typer.echo(f"wrote {out}: this device's personalised model; run it with mlecs predict --model {out}")


def main() -> None:
    cli()


if __name__ == "__main__":
    main()
