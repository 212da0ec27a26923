"""The learning benchmark's report: tables with 95% intervals, the paired comparisons behind every target,
and plots of accuracy against p and of the learning curves.

Methods are compared seed by seed (a seed fixes the partition, the initial model and the missing
pattern): a comparison is the mean of the per-seed differences with its 95% paired-t interval, so the
seed-to-seed spread that every cell carries cancels. A target counts as met only where the interval
clears it (see :data:`TARGETS`); with one seed there is no interval and nothing is met.

    python -m benchmarks.learning_report runs/a/results.json runs/b/results.json --out docs/benchmarks/learning
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

Record = dict[str, Any]

METRICS = (
    ("global_accuracy", "global model, test split (each test clip with 5 images; the held-out speaker apart)"),
    ("client_accuracy_mean", "personalised clients, their own held-out data (mean over clients)"),
    ("cloud_accuracy", "cloud model, test split"),
)
REFERENCE_ORDER = ("centralised-full", "centralised", "cloud-alone")


def interval(values: Sequence[float]) -> tuple[float, float, float]:
    """(mean, lower, upper) of the 95% Student-t interval of the mean; nan bounds for fewer than 2 values."""
    data = np.asarray(values, dtype=np.float64)
    mean = float(np.mean(data)) if len(data) else math.nan
    if len(data) < 2:
        return mean, math.nan, math.nan
    from scipy import stats

    half = float(stats.t.ppf(0.975, len(data) - 1) * np.std(data, ddof=1) / math.sqrt(len(data)))
    return mean, mean - half, mean + half


def _p_matches(record: Record, p: float | None) -> bool:
    # References that do not depend on the missing pattern carry p None and stand for every p.
    return record["p"] is None or p is None or abs(float(record["p"]) - p) < 1e-9


def select(records: Sequence[Record], *, setting: str, missing: str, method: str, p: float | None) -> dict[int, Record]:
    """seed -> record of one cell (p-independent references match any missing scheme and p)."""
    chosen = {}
    for r in records:
        if r["setting"] == setting and r["method"] == method and _p_matches(r, p) \
                and r["missing"] in (missing, "any"):
            chosen[int(r["seed"])] = r
    return chosen


@dataclass(frozen=True)
class Comparison:
    label: str
    mean: float
    lower: float
    upper: float
    seeds: int

    def cell(self) -> str:
        if self.seeds == 0:
            return "–"
        if math.isnan(self.lower):
            return f"{self.mean:+.1f} (1 seed, no interval)"
        return f"{self.mean:+.1f} [{self.lower:+.1f}, {self.upper:+.1f}]"


def paired(records: Sequence[Record], key: str, a: dict[str, Any], b: dict[str, Any] | None, label: str) -> Comparison:
    """Mean per-seed difference a - b in points (b None: a's own value) over the seeds both cells have."""
    left = select(records, **a)
    right = select(records, **b) if b is not None else None
    diffs = []
    for seed, record in sorted(left.items()):
        x = record.get(key)
        y = 0.0 if right is None else (right[seed].get(key) if seed in right else None)
        if x is None or y is None or not (np.isfinite(x) and np.isfinite(y)):
            continue
        diffs.append(100.0 * (x - y))
    mean, lower, upper = interval(diffs)
    return Comparison(label, mean, lower, upper, len(diffs))


@dataclass(frozen=True)
class Target:
    """One claim: a comparison and the rule its interval must clear."""

    name: str
    compare: Compare
    rule: str
    """``above:X``: the interval's lower bound > X; ``mean_and_positive:X``: mean >= X and lower bound > 0."""

    def verdict(self, comparison: Comparison) -> str:
        if comparison.seeds < 2:
            return "not enough seeds"
        kind, bound = self.rule.split(":")
        limit = float(bound)
        met = comparison.lower > limit if kind == "above" else comparison.mean >= limit and comparison.lower > 0
        return "met" if met else "**not met**"

    def condition(self) -> str:
        kind, bound = self.rule.split(":")
        if kind == "above":
            return f"interval above {float(bound):+g}"
        return f"mean ≥ {float(bound):+g} and interval above 0"


def _hard(method: str, p: float | None, missing: str = "audio") -> dict[str, Any]:
    return {"setting": "hard", "missing": missing, "method": method, "p": p}


Compare = Callable[[Sequence[Record]], Comparison]


def _compare(key: str, a: dict[str, Any], b: dict[str, Any] | None, label: str) -> Compare:
    def compare(records: Sequence[Record]) -> Comparison:
        return paired(records, key, a, b, label)
    return compare


def _targets() -> list[Target]:
    g, client, cloud = "global_accuracy", "client_accuracy_mean", "cloud_accuracy"
    targets = [
        Target("centralised-full ≥ 80% (hard)", _compare(g, _hard("centralised-full", None), None, "centralised-full"),
               "above:80"),
        Target("ML-ECS within 5 points of centralised at p = 0",
               _compare(g, _hard("mlecs", 0.0), _hard("centralised", 0.0), "mlecs − centralised, p=0"), "above:-5"),
        Target("ML-ECS loses at most 2 points from p = 0 to p = 0.4 (headline)",
               _compare(g, _hard("mlecs", 0.4), _hard("mlecs", 0.0), "mlecs p=0.4 − p=0"), "above:-2"),
        Target("FedAvg's drop from p = 0 to p = 0.4 (beside the headline; no target)",
               _compare(g, _hard("fedavg", 0.4), _hard("fedavg", 0.0), "fedavg p=0.4 − p=0"), "above:-100"),
    ]
    targets += [Target(f"ML-ECS ≥ FedAvg + 3 at p = {p}",
                       _compare(g, _hard("mlecs", p), _hard("fedavg", p), f"mlecs − fedavg, p={p}"),
                       "mean_and_positive:3") for p in (0.4, 0.6)]
    targets += [Target(f"personalised ML-ECS clients ≥ Local-only + 5 at p = {p}",
                       _compare(client, _hard("mlecs", p), _hard("local", p), f"client mlecs − local, p={p}"),
                       "mean_and_positive:5") for p in (0.0, 0.2, 0.4, 0.6)]
    targets += [Target(f"cloud model ≥ cloud-alone + 3 at p = {p}",
                       _compare(cloud, _hard("mlecs", p), _hard("cloud-alone", None), f"cloud − cloud-alone, p={p}"),
                       "mean_and_positive:3") for p in (0.0, 0.4)]
    canonical = {"setting": "canonical", "missing": "audio", "method": "mlecs", "p": 0.0}
    targets.append(Target("canonical: ML-ECS ≥ 95% at p = 0", _compare(g, canonical, None, "mlecs canonical"),
                          "above:95"))
    targets += [Target(f"ML-ECS − {a} at p = 0.4 (ablation; no target)",
                       _compare(g, _hard("mlecs", 0.4), _hard(a, 0.4), f"mlecs − {a}"), "above:-100")
                for a in ("mlecs-no-ccl", "mlecs-no-seccl", "mlecs-no-mma", "mlecs-no-slm", "mlecs-public-upload")]
    targets.append(Target("ML-ECS − FedAvg at p = 0.4, missing alternate (no target)",
                          _compare(g, _hard("mlecs", 0.4, "alternate"), _hard("fedavg", 0.4, "alternate"),
                                   "mlecs − fedavg, alternate"), "above:-100"))
    return targets


TARGETS = _targets()


def _cell(values: Sequence[float | None]) -> str:
    finite = [100 * v for v in values if v is not None and np.isfinite(v)]
    if not finite:
        return "–"
    mean, lower, upper = interval(finite)
    if math.isnan(lower):
        return f"{mean:.1f}"
    return f"{mean:.1f} ± {(upper - lower) / 2:.1f}"


def _groups(records: Sequence[Record]) -> list[tuple[str, str]]:
    return sorted({(r["setting"], r["missing"]) for r in records if r["missing"] != "any"}) or \
        sorted({(r["setting"], "audio") for r in records})


def markdown_report(records: Sequence[Record]) -> str:
    """Tables (mean ± 95% half-width over seeds, in %) per setting and missing scheme, then the targets."""
    out = []
    backbones = sorted({r.get("backbone", "?") for r in records})
    out.append(f"Backbone: {', '.join(backbones)}. Cells: mean ± half-width of the 95% t-interval over seeds, "
               "in %; references without p (centralised-full, cloud-alone) do not depend on the missing pattern.\n")
    for setting, missing in _groups(records):
        ps = sorted({float(r["p"]) for r in records if r["setting"] == setting and r["p"] is not None
                     and r["missing"] == missing})
        present = {r["method"] for r in records if r["setting"] == setting and r["missing"] in (missing, "any")}
        methods = [m for m in REFERENCE_ORDER if m in present] + sorted(present - set(REFERENCE_ORDER))
        seeds = len({r["seed"] for r in records if r["setting"] == setting and r["missing"] in (missing, "any")})
        out.append(f"### {setting}, missing {missing} ({seeds} seed(s))\n")
        for key, label in METRICS:
            rows = []
            for method in methods:
                cells = [_cell([r.get(key) for r in select(records, setting=setting, missing=missing, method=method,
                                                             p=p).values()]) for p in ps]
                if any(c != "–" for c in cells):
                    rows.append("| " + " | ".join([method, *cells]) + " |")
            if rows:
                out += [f"{label}:\n", "| " + " | ".join(["method"] + [f"p={p:g}" for p in ps]) + " |",
                        "|" + "---|" * (len(ps) + 1), *rows, ""]
        out.append("rounds run (epochs for references) / rounds to 95% of the final accuracy / minutes per run:\n")
        out += ["| " + " | ".join(["method"] + [f"p={p:g}" for p in ps]) + " |", "|" + "---|" * (len(ps) + 1)]
        for method in methods:
            cells = []
            for p in ps:
                chosen = list(select(records, setting=setting, missing=missing, method=method, p=p).values())
                cells.append("–" if not chosen else
                             f"{np.mean([r['rounds'] for r in chosen]):.0f} / "
                             f"{np.mean([r.get('rounds_to_95', r['rounds']) for r in chosen]):.0f} / "
                             f"{np.mean([r['seconds'] for r in chosen]) / 60:.1f}")
            out.append("| " + " | ".join([method, *cells]) + " |")
        out.append("")
    out.append("### Targets (paired per seed: mean difference in points [95% interval])\n")
    out += ["| target | comparison | seeds | condition | verdict |", "|---|---|---|---|---|"]
    for target in TARGETS:
        comparison = target.compare(records)
        if comparison.seeds == 0:
            continue
        verdict = target.verdict(comparison) if "no target" not in target.name else "–"
        out.append(f"| {target.name} | {comparison.cell()} | {comparison.seeds} | "
                   f"{target.condition() if verdict != '–' else '–'} | {verdict} |")
    return "\n".join(out) + "\n"


def _colours(records: Sequence[Record]) -> dict[str, str]:
    """One colour per method, the same in every panel and plot."""
    return {method: f"C{i % 10}" for i, method in enumerate(sorted({r["method"] for r in records}))}


def plot_accuracy(records: Sequence[Record], path: Path) -> None:
    """Global and client accuracy against p per method (95% intervals), references as lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = _groups(records)
    colours = _colours(records)
    figure, axes = plt.subplots(len(groups), 2, figsize=(12, 4.2 * len(groups)), squeeze=False)
    for row, (setting, missing) in enumerate(groups):
        ps = sorted({float(r["p"]) for r in records if r["setting"] == setting and r["p"] is not None
                     and r["missing"] == missing})
        methods = sorted({r["method"] for r in records if r["setting"] == setting and r["missing"] == missing})
        for col, (key, label) in enumerate((("global_accuracy", "global model"),
                                            ("client_accuracy_mean", "personalised clients (mean)"))):
            ax = axes[row][col]
            for method in methods:
                xs, ys, errs = [], [], []
                for p in ps:
                    values = [100 * r[key] for r in select(records, setting=setting, missing=missing, method=method,
                                                           p=p).values() if r.get(key) is not None]
                    if values:
                        mean, lower, _ = interval(values)
                        xs.append(p)
                        ys.append(mean)
                        errs.append(0.0 if math.isnan(lower) else mean - lower)
                if xs:
                    ax.errorbar(xs, ys, yerr=errs, marker="o", capsize=3, label=method, color=colours[method],
                                linestyle="--" if method == "centralised" else "-")
            if key == "global_accuracy":
                for reference, style in (("centralised-full", ":"), ("cloud-alone", "-.")):
                    values = [100 * r["global_accuracy"] for r in records
                              if r["setting"] == setting and r["method"] == reference]
                    if values:
                        ax.axhline(float(np.mean(values)), color="grey", linestyle=style, label=reference)
            ax.set_title(f"{setting}, missing {missing}: {label}")
            ax.set_xlabel("fraction of devices missing a modality (p)")
            ax.set_ylabel("accuracy (%)")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def plot_curves(records: Sequence[Record], path: Path) -> None:
    """Global test accuracy against rounds, one thin line per seed, per method and p (hard setting first)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = _groups(records)
    panels = [(s, m, p) for s, m in groups for p in sorted({float(r["p"]) for r in records if r["setting"] == s
                                                            and r["missing"] == m and r["p"] is not None})]
    if not panels:
        return
    columns = min(4, len(panels))
    rows = -(-len(panels) // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 3.4 * rows), squeeze=False)
    colours = _colours(records)
    for index, (setting, missing, p) in enumerate(panels):
        ax = axes[index // columns][index % columns]
        for method in sorted({r["method"] for r in records if r["setting"] == setting}):
            for seed, record in sorted(select(records, setting=setting, missing=missing, method=method, p=p).items()):
                curve = [100 * h["global_accuracy"] for h in record.get("history", [])]
                if not curve:
                    continue
                ax.plot(range(1, len(curve) + 1), curve, color=colours[method], linewidth=0.9, alpha=0.8,
                        label=method if seed == min(select(records, setting=setting, missing=missing,
                                                           method=method, p=p)) else None)
        ax.set_title(f"{setting}, {missing}, p={p:g}", fontsize=9)
        ax.set_xlabel("round (epoch for references)")
        ax.set_ylabel("global accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    for index in range(len(panels), rows * columns):
        axes[index // columns][index % columns].axis("off")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def write_report(records: Sequence[Record], out: Path) -> str:
    """Writes results.md, accuracy_vs_p.png and curves.png into ``out``; returns the markdown."""
    out.mkdir(parents=True, exist_ok=True)
    table = markdown_report(records)
    (out / "results.md").write_text(table)
    plot_accuracy(records, out / "accuracy_vs_p.png")
    plot_curves(records, out / "curves.png")
    return table


def main(argv: list[str] | None = None) -> int:
    """Merges results.json files (chunks run apart) into one results.json, table and plots."""
    import argparse
    import json

    parser = argparse.ArgumentParser(prog="python -m benchmarks.learning_report",
                                     description="Merge learning-benchmark results and redraw the tables and plots. "
                                                 "A later file's record replaces an earlier one of the same run.")
    parser.add_argument("results", type=Path, nargs="+", help="results.json files to merge")
    parser.add_argument("--out", type=Path, required=True, help="directory for the merged outputs")
    args = parser.parse_args(argv)
    merged: dict[tuple[Any, ...], Record] = {}
    for path in args.results:
        for record in json.loads(path.read_text()):
            key = (record["setting"], record["missing"], record.get("backbone"), record["method"], record["p"],
                   record["seed"])
            merged[key] = record
    records = list(merged.values())
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(records, indent=1))
    print(write_report(records, args.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
