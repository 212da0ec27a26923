"""``mlecs data``: check a dataset directory against a task, and export AV-MNIST as dataset directories."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from mlecs.datasets.dataset import SPLITS, DatasetReport, check_dataset
from mlecs.tasks import TaskError, builtin_task_names, load_task

data_app = typer.Typer(
    add_completion=False, no_args_is_help=True,
    help="On-device datasets (docs/datasets.md): `check DIR --task TASK` reports what a device would read and "
         "every problem; `export-avmnist` writes the AV-MNIST example as dataset directories.")

USABLE, UNUSABLE = 0, 2


def _print_report(report: DatasetReport) -> None:
    typer.echo(f"{report.directory} (task {report.task}): {report.usable} of {report.rows} row(s) usable, "
               f"{report.skipped} skipped")
    modalities = sorted({m for counts in report.per_modality.values() for m in counts})
    if report.usable:
        typer.echo(f"  {'split':<8} {'samples':>8}" + "".join(f" {m:>10}" for m in modalities))
        for split in SPLITS:
            counts = report.per_modality.get(split, {})
            typer.echo(f"  {split:<8} {report.per_split.get(split, 0):>8}"
                       + "".join(f" {counts.get(m, 0):>10}" for m in modalities))
    if report.problems:
        typer.echo(f"{len(report.problems)} problem(s):")
        for problem in report.problems:
            typer.echo(f"  {problem.describe()}" + ("" if problem.skipped or problem.line is None else " (kept)"))


@data_app.command("check")
def check(
    directory: Path = typer.Argument(..., help="The dataset directory (it holds manifest.csv)."),
    task: str = typer.Option(..., "--task", "-t",
                             help=f"A task file, or a built-in task: {', '.join(builtin_task_names())}."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
) -> None:
    """Read DIR as a device would and report usable samples per split and modality, and every problem with its
    manifest line and file. Exit code 0 when at least one sample is usable, 2 when none is."""
    try:
        spec = load_task(task)
    except TaskError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(UNUSABLE) from exc
    report = check_dataset(directory, spec)
    if as_json:
        typer.echo(json.dumps(report.to_dict(), indent=2))
    else:
        _print_report(report)
    raise typer.Exit(USABLE if report.usable else UNUSABLE)


@data_app.command("export-avmnist")
def export_avmnist_command(
    out: Path = typer.Option(..., "--out", "-o", help="Directory to write (created if needed)."),
    devices: int = typer.Option(..., "--devices", "-n", min=1, max=1000, help="How many device folders."),
    setting: str = typer.Option("canonical", help="canonical, or hard (noisy images and audio)."),
    missing_fraction: float | None = typer.Option(
        None, "--missing-fraction", min=0.0, max=1.0,
        help="Share of devices holding one modality only (default: one third image-only, one third audio-only)."),
    seed: int = typer.Option(0, help="Seed of the partition (which samples each device holds)."),
    data_dir: Path | None = typer.Option(None, envvar="MLECS_DATA_DIR", help="The AV-MNIST directory."),
) -> None:
    """Write AV-MNIST as dataset directories: OUT/public (the public set, which the coordinator reads and hands
    out in shards), OUT/test, OUT/device-0 ... (each device's private shard, 15% marked heldout) and
    OUT/task.toml. Devices are label-skewed (Dirichlet 0.5)."""
    from mlecs.datasets.export_avmnist import export_avmnist

    if setting not in ("canonical", "hard"):
        raise typer.BadParameter(f"must be canonical or hard, not {setting!r}", param_hint="--setting")
    try:
        summary = export_avmnist(out, devices, setting=setting,  # type: ignore[arg-type]
                                 missing_fraction=missing_fraction, seed=seed, data_dir=data_dir,
                                 progress=lambda name, count: typer.echo(f"  {out / name}: {count} samples"))
    except FileNotFoundError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from exc
    written = sum(count for name, count in summary.directories.items() if "/" not in name)  # shares counted once
    typer.echo(f"wrote {written} samples for task {summary.task}; "
               f"check one with: mlecs data check {out / 'device-0'} --task {out / 'task.toml'}")
