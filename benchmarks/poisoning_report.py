"""The poisoning benchmark's table (defence x attack, mean ± std), its target checks and its bar chart.

The targets (issue 5): under each 20% attack the best robust option keeps global accuracy within 2
points of its own no-attack run, and that option's no-attack run loses at most 1 point against plain
MMA (defence ``none``). Differences are taken per seed first — a seed fixes the data partition, the
initial model and the attackers for every cell — and then averaged, which removes the seed-to-seed
spread that the cells' own standard deviations carry.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.adversary import DEFENCES

CLEAN, PLAIN = "none", "none"
"""The no-attack column and the no-defence row (plain MMA)."""
ATTACK_BOUND, CLEAN_BOUND = 2.0, 1.0
"""The targets, in accuracy points."""


def _cells(records: Sequence[dict[str, Any]]) -> dict[tuple[str, str], dict[int, float]]:
    """(defence, attack) -> {seed: global accuracy in points}."""
    cells: dict[tuple[str, str], dict[int, float]] = defaultdict(dict)
    for record in records:
        cells[(record["defence"], record["attack"])][int(record["seed"])] = 100 * float(record["global_accuracy"])
    return cells


def _order(records: Sequence[dict[str, Any]], key: str) -> list[str]:
    return list(dict.fromkeys(r[key] for r in records))


def _mean_std(values: Sequence[float], seeds: int = 0) -> str:
    """mean ± std; a cell with fewer runs than the table's ``seeds`` says how many it has."""
    if not len(values):
        return "–"
    if len(values) == 1 and seeds > 1:
        return f"{values[0]:.1f} (1 seed)"
    cell = f"{np.mean(values):.1f} ± {np.std(values):.1f}"
    return cell if len(values) >= seeds else f"{cell} ({len(values)} seeds)"


def _paired(a: dict[int, float], b: dict[int, float]) -> list[float]:
    """a - b for the seeds both have."""
    return [a[s] - b[s] for s in sorted(a.keys() & b.keys())]


@dataclass(frozen=True)
class OptionCheck:
    """One robust option against the targets (accuracy points, mean over seeds of paired differences)."""

    defence: str
    drops: dict[str, float]
    """Per attack: its clean run minus its attacked run (positive: accuracy lost to the attack)."""
    clean_loss: float
    """Plain MMA's clean run minus this option's clean run."""
    seeds: dict[str, int] = field(default_factory=dict)
    """Per attack: the seeds its drop is averaged over."""

    @property
    def worst_drop(self) -> float:
        return max(self.drops.values())

    @property
    def meets_attack_target(self) -> bool:
        return self.worst_drop <= ATTACK_BOUND

    @property
    def meets_clean_target(self) -> bool:
        return self.clean_loss <= CLEAN_BOUND


def option_checks(records: Sequence[dict[str, Any]]) -> list[OptionCheck]:
    """Every robust option that has a clean run, a run under each attack, and plain MMA's clean run to compare."""
    cells = _cells(records)
    attacks = [a for a in _order(records, "attack") if a != CLEAN]
    plain = cells.get((PLAIN, CLEAN), {})
    checks = []
    for defence in _order(records, "defence"):
        clean = cells.get((defence, CLEAN), {})
        if defence == PLAIN or not clean or not plain or not attacks:
            continue
        drops = {a: _paired(clean, cells.get((defence, a), {})) for a in attacks}
        if not all(drops.values()):
            continue
        checks.append(OptionCheck(defence, {a: float(np.mean(d)) for a, d in drops.items()},
                                  float(np.mean(_paired(plain, clean))), {a: len(d) for a, d in drops.items()}))
    return checks


def best_option(checks: Sequence[OptionCheck]) -> OptionCheck | None:
    """The option losing least under its worst attack; ties go to the smaller clean loss."""
    return min(checks, key=lambda c: (round(c.worst_drop, 6), c.clean_loss), default=None)


def _verdict(met: bool) -> str:
    return "**met**" if met else "**missed**"


def markdown_report(records: Sequence[dict[str, Any]]) -> str:
    """Global accuracy (%) by defence (rows) and attack (columns), the per-option checks and the verdict."""
    cells = _cells(records)
    attacks, defences = _order(records, "attack"), _order(records, "defence")
    seeds = len({r["seed"] for r in records})
    out = [f"Global accuracy (%, test split), mean ± std over {seeds} seed(s) (fewer where a cell says so):\n",
           "| defence | " + " | ".join(f"attack {a}" for a in attacks) + " |",
           "|---|" + "---|" * len(attacks)]
    for defence in defences:
        row = [_mean_std(list(cells.get((defence, a), {}).values()), seeds) for a in attacks]
        out.append(f"| {defence} | " + " | ".join(row) + " |")
    excluded = _exclusions(records)
    if excluded:
        out += ["", "Updates left out as outliers over the run (mean per run: attackers / honest):", "",
                "| defence | " + " | ".join(f"attack {a}" for a in attacks) + " |",
                "|---|" + "---|" * len(attacks)]
        for defence in [d for d in defences if d in excluded]:
            out.append(f"| {defence} | " + " | ".join(excluded[defence].get(a, "–") for a in attacks) + " |")
    separation = _cosine_separation(records)
    if separation:
        out += ["", "Cosine with the weighted median over every round of every run (lowest honest / highest "
                "attacker; below 0 an update points away from it):", "",
                "| defence | " + " | ".join(f"attack {a}" for a in attacks) + " |",
                "|---|" + "---|" * len(attacks)]
        for defence in [d for d in defences if d in separation]:
            out.append(f"| {defence} | " + " | ".join(separation[defence].get(a, "–") for a in attacks) + " |")
    checks = option_checks(records)
    if checks:
        attack_names = list(checks[0].drops)
        out += ["", "Targets, per robust option (points; per-seed differences, averaged): drop = its clean run "
                "minus its attacked run, clean loss = plain MMA's clean run minus its clean run:", "",
                "| defence | " + " | ".join(f"drop {a}" for a in attack_names) + " | clean loss |",
                "|---|" + "---:|" * (len(attack_names) + 1)]
        most = max(n for check in checks for n in check.seeds.values()) if checks[0].seeds else 0
        for check in checks:
            drops = " | ".join(f"{check.drops[a]:+.1f}" + (f" ({check.seeds[a]} seed{'s' * (check.seeds[a] > 1)})"
                                                           if check.seeds.get(a, most) < most else "")
                               for a in attack_names)
            out.append(f"| {check.defence} | {drops} | {check.clean_loss:+.1f} |")
        best = best_option(checks) or checks[0]  # never None: checks is not empty
        out += ["", f"Best option (smallest worst-case drop): `{best.defence}`.",
                f"- within {ATTACK_BOUND:g} points of its no-attack run under every attack: "
                f"{_verdict(best.meets_attack_target)} (worst drop {best.worst_drop:+.1f});",
                f"- clean run at most {CLEAN_BOUND:g} point below plain MMA: "
                f"{_verdict(best.meets_clean_target)} (loss {best.clean_loss:+.1f})."]
        both = [c.defence for c in checks if c.meets_attack_target and c.meets_clean_target]
        out.append(f"- options meeting both: {', '.join(f'`{d}`' for d in both) if both else 'none'}.")
    return "\n".join(out) + "\n"


def _exclusions(records: Sequence[dict[str, Any]]) -> dict[str, dict[str, str]]:
    """defence -> attack -> 'attackers / honest' updates excluded per run (means), for defences that exclude."""
    sums: dict[tuple[str, str], list[tuple[float, float]]] = defaultdict(list)
    for record in records:
        if "excluded_attackers" in record:
            sums[(record["defence"], record["attack"])].append(
                (float(record["excluded_attackers"]), float(record["excluded_honest"])))
    out: dict[str, dict[str, str]] = defaultdict(dict)
    for (defence, attack), pairs in sums.items():
        excluding = defence in DEFENCES and DEFENCES[defence].excludes
        if excluding or any(a or h for a, h in pairs):
            attacked, honest = np.mean(pairs, axis=0)
            out[defence][attack] = f"{attacked:.1f} / {honest:.1f}"
    return dict(out)


def _cosine_separation(records: Sequence[dict[str, Any]]) -> dict[str, dict[str, str]]:
    """defence -> attack -> 'lowest honest / highest attacker' cosine over all rounds, where runs recorded them."""
    lows: dict[tuple[str, str], list[float]] = defaultdict(list)
    highs: dict[tuple[str, str], list[float]] = defaultdict(list)
    for record in records:
        key = (record["defence"], record["attack"])
        for entry in record.get("history", []):
            if "cosine_min_honest" in entry:
                lows[key].append(float(entry["cosine_min_honest"]))
            if "cosine_max_attacker" in entry:
                highs[key].append(float(entry["cosine_max_attacker"]))
    out: dict[str, dict[str, str]] = defaultdict(dict)
    for key in lows.keys() | highs.keys():
        low = f"{min(lows[key]):+.2f}" if lows[key] else "–"
        high = f"{max(highs[key]):+.2f}" if highs[key] else "–"
        out[key[0]][key[1]] = f"{low} / {high}"
    return dict(out)


def plot_accuracy(records: Sequence[dict[str, Any]], path: Path) -> None:
    """Grouped bars: a group per defence, a bar per attack (error bars: std over seeds); a line at plain MMA clean."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = _cells(records)
    attacks, defences = _order(records, "attack"), _order(records, "defence")
    width = 0.8 / max(len(attacks), 1)
    x = np.arange(len(defences))
    figure, ax = plt.subplots(figsize=(max(7.0, 1.5 * len(defences) + 2), 4.5))
    for offset, attack in enumerate(attacks):
        values = [list(cells.get((d, attack), {}).values()) for d in defences]
        means = [float(np.mean(v)) if v else 0.0 for v in values]
        stds = [float(np.std(v)) if v else 0.0 for v in values]
        ax.bar(x + (offset - (len(attacks) - 1) / 2) * width, means, width, yerr=stds, capsize=3,
               label=f"attack {attack}")
    plain = list(cells.get((PLAIN, CLEAN), {}).values())
    if plain:
        ax.axhline(float(np.mean(plain)), color="black", linestyle="--", linewidth=1, label="plain MMA, no attack")
    ax.set_xticks(x, defences, rotation=15)
    ax.set_ylabel("global accuracy (%)")
    ax.set_ylim(0, 100)
    fractions = sorted({float(r["fraction"]) for r in records if "fraction" in r})
    share = "/".join(f"{100 * f:g}%" for f in fractions) or "a share"
    ax.set_title(f"Global accuracy with {share} of clients poisoning their updates")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="lower left")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main(argv: list[str] | None = None) -> int:
    """Merges results.json files (e.g. one per process) into one table and chart."""
    import argparse
    import json

    parser = argparse.ArgumentParser(prog="python -m benchmarks.poisoning_report",
                                     description="Merge poisoning-benchmark results and redraw the table and chart.")
    parser.add_argument("results", type=Path, nargs="+", help="results.json files to merge")
    parser.add_argument("--out", type=Path, required=True, help="directory for the merged outputs")
    args = parser.parse_args(argv)
    records = [r for path in args.results for r in json.loads(path.read_text())]
    write_outputs(records, args.out)
    return 0


def write_outputs(records: Sequence[dict[str, Any]], out: Path) -> str:
    """Writes results.json, results.md and poisoning.png under ``out``; prints and returns the report."""
    import json

    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(list(records), indent=1))
    report = markdown_report(records)
    (out / "results.md").write_text(report)
    plot_accuracy(records, out / "poisoning.png")
    print(report)
    return report


if __name__ == "__main__":
    raise SystemExit(main())
