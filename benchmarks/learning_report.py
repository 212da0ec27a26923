"""The learning benchmark's table (mean ± std over seeds) and its plot of accuracy against p."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

METRICS = (
    ("global_accuracy", "global model, test split"),
    ("client_accuracy_mean", "personalised clients, local held-out (mean)"),
    ("unseen_speaker_accuracy", "global model, unseen speaker"),
    ("cloud_accuracy", "cloud model, test split"),
)


def _cells(records: Sequence[dict[str, Any]]) -> dict[tuple[str, str, float], list[dict[str, Any]]]:
    cells: dict[tuple[str, str, float], list[dict[str, Any]]] = defaultdict(list)
    for record in records:
        cells[(record["setting"], record["method"], float(record["p"]))].append(record)
    return cells


def _mean_std(values: list[float | None]) -> str:
    finite = [v for v in values if v is not None and np.isfinite(v)]
    if not finite:
        return "–"
    return f"{100 * np.mean(finite):.1f} ± {100 * np.std(finite):.1f}"


def markdown_table(records: Sequence[dict[str, Any]]) -> str:
    """Per setting, one table per metric: a row per method, a column per p, accuracy in % (mean ± std)."""
    cells = _cells(records)
    out = []
    for setting in sorted({r["setting"] for r in records}):
        ps = sorted({p for s, _, p in cells if s == setting})
        methods = list(dict.fromkeys(r["method"] for r in records if r["setting"] == setting))
        seeds = len({r["seed"] for r in records if r["setting"] == setting})
        out.append(f"### {setting} (accuracy %, mean ± std over {seeds} seed(s))\n")
        for key, label in METRICS:
            if not any(r.get(key) is not None for r in records if r["setting"] == setting):
                continue
            out.append(f"{label}:\n")
            header = ["method"] + [f"p={p:g}" for p in ps]
            out.append("| " + " | ".join(header) + " |")
            out.append("|" + "---|" * len(header))
            for method in methods:
                row = [method] + [_mean_std([r.get(key) for r in cells.get((setting, method, p), [])]) for p in ps]
                out.append("| " + " | ".join(row) + " |")
            out.append("")
    return "\n".join(out) + "\n"


def plot_accuracy(records: Sequence[dict[str, Any]], path: Path) -> None:
    """Global and client accuracy against p, one line per method (error bars: std over seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = _cells(records)
    settings = sorted({r["setting"] for r in records})
    figure, axes = plt.subplots(len(settings), 2, figsize=(11, 4 * len(settings)), squeeze=False)
    for row, setting in enumerate(settings):
        methods = list(dict.fromkeys(r["method"] for r in records if r["setting"] == setting))
        for col, (key, label) in enumerate((("global_accuracy", "global model"),
                                            ("client_accuracy_mean", "personalised clients (mean)"))):
            ax = axes[row][col]
            for method in methods:
                ps = sorted(p for s, m, p in cells if s == setting and m == method)
                values = [[r[key] for r in cells[(setting, method, p)]] for p in ps]
                ax.errorbar(ps, [100 * np.mean(v) for v in values], yerr=[100 * np.std(v) for v in values],
                            marker="o", capsize=3, label=method)
            ax.set_title(f"{setting}: {label}")
            ax.set_xlabel("fraction of clients missing one modality (p)")
            ax.set_ylabel("accuracy (%)")
            ax.grid(alpha=0.3)
        axes[row][0].legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main(argv: list[str] | None = None) -> int:
    """Merges results.json files (e.g. one per setting, run in parallel) into one table and plot."""
    import argparse
    import json

    parser = argparse.ArgumentParser(prog="python -m benchmarks.learning_report",
                                     description="Merge learning-benchmark results and redraw the table and plot.")
    parser.add_argument("results", type=Path, nargs="+", help="results.json files to merge")
    parser.add_argument("--out", type=Path, required=True, help="directory for the merged outputs")
    args = parser.parse_args(argv)
    records = [r for path in args.results for r in json.loads(path.read_text())]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(records, indent=1))
    table = markdown_table(records)
    (args.out / "results.md").write_text(table)
    plot_accuracy(records, args.out / "accuracy_vs_p.png")
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
