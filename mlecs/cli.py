"""The ``mlecs`` command line."""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import typer

from mlecs.admin_cli import register as register_admin_commands
from mlecs.certs_cli import certs_app
from mlecs.data_cli import data_app
from mlecs.model_cli import model_app, predict

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="mlecs: federated multimodal learning between a coordinator and edge devices.")



@app.callback()
def _root() -> None:
    """mlecs: federated multimodal learning between a coordinator and edge devices."""


app.add_typer(certs_app, name="certs")
app.add_typer(data_app, name="data")
app.add_typer(model_app, name="model")
app.command("predict", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})(predict)
register_admin_commands(app)  # federations, rounds, devices, enrolment-tokens, versions, tokens, audit


COLUMNS = ("round", "participants", "global acc", "client acc", "cloud acc", "upload B/client", "upload ratio",
           "wall s")


def _row(r: dict) -> str:
    def pct(x: float) -> str:
        return "   n/a" if x is None or math.isnan(x) else f"{x:.4f}"

    return (f"{r['round']:>5}  {r['participants']:>12}  {pct(r['global_accuracy']):>10}  "
            f"{pct(r['client_accuracy_mean']):>10}  {pct(r.get('cloud_accuracy', math.nan)):>9}  "
            f"{r['upload_bytes_per_client']:>15,.0f}  "
            f"{r['upload_ratio'] * 100:>11.3f}%  {r['wall_s']:>6.1f}"
            + ("" if r.get("state", "committed") == "committed" else f"  FAILED: {r.get('failure_reason')}"))


@app.command()
def fleet(
    clients: int = typer.Option(3, "--clients", "-n", min=1, max=64, help="Number of edge agents."),
    rounds: int = typer.Option(3, "--rounds", "-r", min=1, help="Rounds to run."),
    json_path: Path | None = typer.Option(None, "--json", help="Also write the per-round results here."),
    database_url: str | None = typer.Option(
        None, envvar="MLECS_DATABASE_URL",
        help="Coordinator database (e.g. postgresql://postgres@127.0.0.1:5432/test). Default: embedded SQLite."),
    redis_url: str | None = typer.Option(
        None, envvar="MLECS_REDIS_URL", help="Redis for presence (redis://127.0.0.1:6379/0). Default: in-process."),
    data_dir: Path | None = typer.Option(None, envvar="MLECS_DATA_DIR", help="AV-MNIST directory."),
    setting: str = typer.Option("canonical", help="Data setting: canonical or hard."),
    aggregation: str = typer.Option("mma", help="mma or fedavg."),
    public_fraction: float = typer.Option(0.2, help="Share of the training pairs that plays the public set."),
    upload_stage: str = typer.Option(
        "private", help="Data the uploaded change is learned on: private (each agent's private data and public "
                        "shard, the method) or public (the public shard only, the prototype's rule)."),
    public_epochs: int = typer.Option(5, help="Epochs over the public shard per round (--upload-stage public)."),
    private_epochs: int = typer.Option(
        1, help="Epochs over private data per round: the uploaded stage (private), or personalisation (public)."),
    personal_epochs: int = typer.Option(1, help="Epochs of personal fine-tuning after the upload (private)."),
    codec: str = typer.Option("fp16", help="Upload codec: fp32, fp16 or int8."),
    backbone: str = typer.Option("minilm", help="Edge backbone: minilm (all-MiniLM-L6-v2) or tiny (tests)."),
    seed: int = typer.Option(0, help="Seed for partitions, modality sets and initialisation."),
    workdir: Path | None = typer.Option(None, help="Keep state and logs here instead of a temporary folder."),
    model_out: Path | None = typer.Option(
        None, "--model-out", help="Write the last global version here as a model directory (mlecs predict)."),
    dataset: Path | None = typer.Option(
        None, "--data", help="Run on these dataset directories (mlecs data export-avmnist --out DIR, or the same "
                             "layout for any task: task.toml, public/, test/, device-0/ ...) instead of exporting "
                             "AV-MNIST into the workdir."),
) -> None:
    """Run a local federation: a coordinator and N agents as separate processes on loopback.

    AV-MNIST is first exported as dataset directories (the workdir's data/, as `mlecs data export-avmnist`
    writes them); agents get a mix of modality sets (image+audio, image only, audio only) and a Dirichlet
    label-skewed share, and read only their own folder. Each round every agent trains the global model on
    its private data and uploads the change (AMT), then personalises it; each round prints participants,
    global test accuracy, mean personalised client accuracy, bytes uploaded per client, the upload as a
    share of the full edge model in fp32, and the round's wall time.

    It runs the secure setup: a development CA and certificates under the workdir's certs/, mutual TLS on
    the device port, and a one-time enrolment token per agent.
    """
    from mlecs.fleet.runner import FleetError, FleetOptions, run_fleet

    for option, value, allowed in (("--setting", setting, ("canonical", "hard")),
                                   ("--aggregation", aggregation, ("mma", "fedavg")),
                                   ("--upload-stage", upload_stage, ("private", "public")),
                                   ("--codec", codec, ("fp32", "fp16", "int8")),
                                   ("--backbone", backbone, ("minilm", "tiny"))):
        if value not in allowed:
            raise typer.BadParameter(f"{value!r} is not one of {', '.join(allowed)}", param_hint=option)

    options = FleetOptions(
        clients=clients, rounds=rounds, database_url=database_url, redis_url=redis_url, data_dir=data_dir,
        setting=setting, aggregation=aggregation, public_fraction=public_fraction, upload_stage=upload_stage,
        public_epochs=public_epochs, private_epochs=private_epochs, personal_epochs=personal_epochs,
        upload_codec=codec, seed=seed, model={"backbone": backbone},
        workdir=workdir, model_out=model_out, dataset=dataset)

    def say(line: str) -> None:
        typer.echo(line, err=True)

    header_printed = False

    def on_round(result: object) -> None:
        nonlocal header_printed
        if not header_printed:
            typer.echo("  ".join(f"{c:>{w}}" for c, w in zip(COLUMNS, (5, 12, 10, 10, 9, 15, 12, 6), strict=True)))
            header_printed = True
        typer.echo(_row(result.as_json()))  # type: ignore[attr-defined]

    try:
        report = run_fleet(options, say=say, on_round=on_round)
    except FleetError as exc:
        typer.echo(f"fleet failed: {exc}", err=True)
        raise typer.Exit(1) from exc
    if json_path:
        json_path.write_text(json.dumps(report, indent=2) + "\n")
        say(f"wrote {json_path}")
    if any(r.get("state") != "committed" for r in report["rounds"]):
        raise typer.Exit(1)


def main() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.exit(app())


if __name__ == "__main__":
    main()
