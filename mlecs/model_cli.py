"""``mlecs model export`` (a global version as a model directory) and ``mlecs predict`` (run one)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from mlecs.admin_cli.common import DEFAULT_URL, Token, Url, api
from mlecs.model_export import export_version

model_app = typer.Typer(add_completion=False, no_args_is_help=True,
                        help="Trained models: `export VERSION_ID --out DIR` writes a global version as a "
                             "self-contained model directory that `mlecs predict` and mlecs.load_model run.")


@model_app.command("export")
def export(version_id: Annotated[str, typer.Argument(help="The global version (`mlecs versions list FED`).")],
           out: Annotated[Path, typer.Option("--out", "-o", help="Directory to write (created if needed).")],
           url: Url = DEFAULT_URL, token: Token = None) -> None:
    """Write a global version as a model directory: weights.safetensors, model.json and task.toml. Scope: read."""
    with api(url, token) as client:
        try:
            version = export_version(client, version_id, out)
        except ValueError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(1) from exc
    accuracy = version["metrics"].get("accuracy")
    typer.echo(f"wrote {out} (round {version['round_number']}"
               + (f", coordinator's test accuracy {accuracy:.4f})" if accuracy is not None else ")"))


def predict(
    ctx: typer.Context,
    model_dir: Annotated[Path, typer.Option("--model", "-m", help="A model directory (`mlecs model export`).")],
    dataset: Annotated[Path | None, typer.Option(
        "--dataset", help="Evaluate on every usable sample of this dataset directory.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Classify one sample, given as --MODALITY FILE for any of the task's modalities (e.g. --image a.png --audio
    b.wav), or evaluate on a dataset directory with --dataset."""
    from mlecs.datasets import DatasetError
    from mlecs.inference import ModelDirectoryError, load_model

    try:
        model = load_model(model_dir)
    except ModelDirectoryError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from exc
    files = _modality_files(ctx.args, list(model.task.modalities))
    if (dataset is None) == (not files):
        typer.echo(f"error: give --dataset DIR, or one file per modality: "
                   f"{' '.join(f'--{m} FILE' for m in model.task.modalities)}", err=True)
        raise typer.Exit(2)
    try:
        result: dict[str, Any]
        if dataset is not None:
            result = dict(model.evaluate(dataset))
            text = f"accuracy {result['accuracy']:.4f} on {result['samples']} samples of {dataset}"
        else:
            prediction = model.predict(files)
            result = {"label": prediction.label, "probabilities": prediction.probabilities}
            text = f"{prediction.label} ({max(prediction.probabilities):.1%})"
    except (DatasetError, ValueError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from exc
    typer.echo(json.dumps(result) if as_json else text)


def _modality_files(args: list[str], modalities: list[str]) -> dict[str, Path]:
    files: dict[str, Path] = {}
    it = iter(args)
    for arg in it:
        name = arg.removeprefix("--")
        if not arg.startswith("--") or name not in modalities:
            raise typer.BadParameter(f"unexpected {arg!r}: the task's modalities are {', '.join(modalities)}")
        value = next(it, None)
        if value is None:
            raise typer.BadParameter(f"{arg} needs a file")
        files[name] = Path(value)
    return files
