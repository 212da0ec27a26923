"""The load benchmark's numbers: percentiles, the results table, the issue's targets and the plot."""

from __future__ import annotations

import math
import re
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

REQUIRED_KEYS = ("devices", "payload_params", "rounds", "round_wall_s_median", "heartbeat_p99_ms", "upload_p99_ms",
                 "cpu_s_per_update", "peak_rss_mib", "wire_bytes_per_update")
"""Every record of results.json has at least these keys (the issue's list)."""

# (record key, column title, format)
COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("devices", "devices", "{:d}"),
    ("payload_params", "params", "{:,d}"),
    ("rounds_committed", "committed", "{:d}"),
    ("round_wall_s_median", "round wall s (median)", "{:.2f}"),
    ("heartbeat_p99_ms", "heartbeat p99 ms", "{:.1f}"),
    ("upload_p99_ms", "upload p99 ms", "{:.0f}"),
    ("cpu_s_per_update", "coord CPU s/update", "{:.3f}"),
    ("peak_rss_mib", "coord peak RSS MiB", "{:.0f}"),
    ("wire_bytes_per_update", "wire bytes/update", "{:,.0f}"),
)


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100), interpolating linearly between closest ranks; NaN for no values."""
    if not 0 <= q <= 100:
        raise ValueError(f"percentile must be in [0, 100], got {q}")
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def latency_timeline(samples: Sequence[tuple[float, float]], since: float, until: float,
                     bucket_s: float = 5.0) -> list[dict[str, float]]:
    """Calls (start time, seconds) started within [since, until], by ``bucket_s`` windows of their start:
    {t_s (window start, from ``since``), count, p50_ms, p99_ms, max_ms}; windows without calls left out.
    Shows when in a round slow calls happen."""
    windows: dict[int, list[float]] = defaultdict(list)
    for started, seconds in samples:
        if since <= started <= until:
            windows[int((started - since) // bucket_s)].append(seconds)
    return [{"t_s": index * bucket_s, "count": len(values), "p50_ms": round(1000 * percentile(values, 50), 1),
             "p99_ms": round(1000 * percentile(values, 99), 1), "max_ms": round(1000 * max(values), 1)}
            for index, values in sorted(windows.items())]


def latency_summary(samples: Mapping[str, Sequence[float]]) -> dict[str, dict[str, float]]:
    """Method -> {p50, p99 (milliseconds), count} for methods with at least one sample."""
    return {method: {"p50": round(1000 * percentile(values, 50), 3), "p99": round(1000 * percentile(values, 99), 3),
                     "count": len(values)}
            for method, values in sorted(samples.items()) if values}


_SAMPLE = re.compile(r'^([A-Za-z_:][A-Za-z0-9_:]*)(?:\{(.*)\})?\s+(\S+)$')
_LABEL = re.compile(r'([A-Za-z_][A-Za-z0-9_]*)="((?:[^"\\]|\\.)*)"')

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]
"""(sample name, sorted label pairs) -> value, read from a Prometheus text exposition."""


def parse_prometheus(text: str) -> Samples:
    """The samples of a Prometheus text exposition (comments and malformed lines skipped)."""
    samples: Samples = {}
    for line in text.splitlines():
        match = _SAMPLE.match(line.strip())
        if match is None or line.startswith("#"):
            continue
        name, labels, value = match.groups()
        try:
            samples[(name, tuple(sorted(_LABEL.findall(labels or ""))))] = float(value)
        except ValueError:
            continue
    return samples


def growth_by_label(before: Samples, after: Samples, name: str, label: str) -> dict[str, float]:
    """How much each value of ``label`` added to the counter ``name`` between two scrapes."""
    out: dict[str, float] = defaultdict(float)
    for (sample, labels), value in after.items():
        if sample == name:
            out[dict(labels).get(label, "")] += value - before.get((sample, labels), 0.0)
    return dict(out)


def coordinator_breakdown(before: Samples, after: Samples) -> dict[str, Any]:
    """Where the coordinator's own time went between two scrapes of its /metrics.

    ``rpc_handling_s``: seconds spent handling each device RPC (summed over concurrent calls, so it can exceed
    wall time); ``aggregation_s_mean``: seconds per aggregation (NaN: none ran); ``upload_bytes`` and
    ``download_bytes``: update and global-version bytes the coordinator counted; ``refusals``: requests the
    coordinator refused on purpose, by reason.
    """
    handled = growth_by_label(before, after, "mlecs_rpc_duration_seconds_sum", "method")
    aggregated = growth_by_label(before, after, "mlecs_aggregation_seconds_sum", "")
    aggregations = growth_by_label(before, after, "mlecs_aggregation_seconds_count", "")
    seconds, count = sum(aggregated.values()), sum(aggregations.values())
    lag = growth_by_label(before, after, "mlecs_event_loop_lag_seconds_bucket", "le")
    return {
        "event_loop_lag_p99_s": bucket_quantile(lag, 0.99),
        "rpc_handling_s": {method: round(value, 3) for method, value in sorted(handled.items())},
        "aggregations": int(count),
        "aggregation_s_mean": seconds / count if count else math.nan,
        "upload_bytes": sum(growth_by_label(before, after, "mlecs_upload_bytes_total", "").values()),
        "download_bytes": sum(growth_by_label(before, after, "mlecs_download_bytes_total", "").values()),
        # Refused on purpose, by reason (a refused upload stream can reach the device as INTERNAL when the
        # coordinator answers before the device finished sending: gRPC's, not the coordinator's, status).
        "refusals": {reason: int(count) for reason, count in sorted(
            growth_by_label(before, after, "mlecs_refusals_total", "reason").items()) if count},
    }


def heartbeat_process_breakdown(before: Samples, after: Samples) -> dict[str, Any]:
    """What the heartbeat process measured of itself between two scrapes of its /metrics: heartbeats it
    answered, the time it spent handling them (mean and p99, as histogram bucket bounds), and how late its
    event loop ran (the wait before a heartbeat's handler starts)."""
    def only_heartbeats(samples: Samples) -> Samples:
        return {key: value for key, value in samples.items() if ("method", "Heartbeat") in key[1]}

    b, a = only_heartbeats(before), only_heartbeats(after)
    count = sum(growth_by_label(b, a, "mlecs_rpc_duration_seconds_count", "").values())
    seconds = sum(growth_by_label(b, a, "mlecs_rpc_duration_seconds_sum", "").values())
    lag = growth_by_label(before, after, "mlecs_event_loop_lag_seconds_bucket", "le")
    return {
        "heartbeats": int(count),
        "handling_s_mean": seconds / count if count else math.nan,
        "handling_p99_s": bucket_quantile(growth_by_label(b, a, "mlecs_rpc_duration_seconds_bucket", "le"), 0.99),
        "event_loop_lag_p99_s": bucket_quantile(lag, 0.99),
    }


def bucket_quantile(buckets: Mapping[str, float], q: float) -> float:
    """Upper bound of the histogram bucket holding quantile ``q``, from cumulative counts by ``le``
    (NaN: no observations; inf: above the largest finite bucket)."""
    ordered = sorted((float(le), count) for le, count in buckets.items())
    total = ordered[-1][1] if ordered else 0.0
    if total <= 0:
        return math.nan
    return next(le for le, count in ordered if count >= q * total)


def _cell(record: Mapping[str, Any], key: str, fmt: str) -> str:
    value = record.get(key)
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    if key == "rounds_committed":
        return f"{value}/{record.get('rounds', '?')}"
    return fmt.format(int(value) if fmt.endswith("d}") else value)


def markdown_table(records: Sequence[Mapping[str, Any]]) -> str:
    """One row per run, the issue's metrics as columns."""
    lines = ["| " + " | ".join(title for _, title, _ in COLUMNS) + " |",
             "|" + "---:|" * len(COLUMNS)]
    lines += ["| " + " | ".join(_cell(r, key, fmt) for key, _, fmt in COLUMNS) + " |" for r in records]
    return "\n".join(lines) + "\n"


def target_lines(records: Sequence[Mapping[str, Any]]) -> list[str]:
    """The issue's targets, each marked met, missed, or not measured by these runs."""
    by_n = {int(r["devices"]): r for r in records}

    def verdict(ok: bool) -> str:
        return "met" if ok else "MISSED"

    lines = []
    small, large = by_n.get(32), by_n.get(1000)
    if small is not None:
        wall = small.get("round_wall_s_median", math.nan)
        lines.append(f"N=32: median round wall {wall:.2f} s (target <= 2 s): {verdict(wall <= 2.0)}")
    if large is not None:
        p99 = large.get("heartbeat_p99_ms", math.nan)
        lines.append(f"N=1000: heartbeat p99 {p99:.1f} ms (target < 100 ms): {verdict(p99 < 100)}")
        committed = large.get("rounds_committed", 0)
        lines.append(f"N=1000: {committed}/{large['rounds']} rounds committed (target: all): "
                     f"{verdict(committed == large['rounds'])}")
    if small is not None and large is not None:
        ratio = large["peak_rss_mib"] / small["peak_rss_mib"]
        lines.append(f"peak RSS N=1000 / N=32 = {ratio:.2f} (target <= 2): {verdict(ratio <= 2)}")
    huge = by_n.get(10000)
    if huge is not None:  # results.json holds null where a value was not measured (a round that never committed)
        def number(key: str) -> float:
            value = huge.get(key)
            return math.nan if value is None else float(value)

        p99, per_device, wall = number("heartbeat_p99_ms"), number("rss_kib_per_connected_device"), number(
            "round_wall_s_median")
        committed = huge.get("rounds_committed", 0)
        cohort = huge.get("clients_per_round") or huge["devices"]
        lines.append(f"N=10000, cohort {cohort}: heartbeat p99 {p99:.1f} ms (target < 100 ms): {verdict(p99 < 100)}")
        lines.append(f"N=10000: coordinator memory {per_device:.1f} KiB per connected device above its idle footprint "
                     f"(target <= 100 KiB): {verdict(per_device <= 100)}")
        lines.append(f"N=10000: {committed}/{huge['rounds']} rounds committed, median {wall:.1f} s "
                     "(target: committed): "
                     f"{verdict(committed == huge['rounds'])}")
    if not lines:
        lines.append("the issue's targets concern N=32, N=1000 and N=10000; none ran")
    return lines


def noise_lines(records: Sequence[Mapping[str, Any]], threshold: float = 0.25) -> list[str]:
    """A warning for each run during which the rest of the machine kept a CPU more than ``threshold`` busy."""
    lines = []
    for record in records:
        other, phase = record.get("other_cpu_s"), record.get("rounds_phase_s")
        if other is not None and phase and other > threshold * phase:
            lines.append(f"N={record['devices']}: the rest of the machine (other processes, kernel network work) "
                         f"used {other:.1f} CPU s during the {phase:.1f} s rounds phase; its numbers are skewed")
    return lines


def report_text(records: Sequence[Mapping[str, Any]]) -> str:
    """The table followed by the targets and any noise warnings, as written to results.md and printed."""
    notes = target_lines(records) + noise_lines(records)
    return markdown_table(records) + "\n" + "\n".join(f"- {line}" for line in notes) + "\n"


def plot_load(records: Sequence[Mapping[str, Any]], path: Path) -> None:
    """Median round wall time and coordinator peak RSS against the number of devices (log x)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ordered = sorted(records, key=lambda r: r["devices"])
    devices = [r["devices"] for r in ordered]
    fig, (wall_axis, rss_axis) = plt.subplots(1, 2, figsize=(10, 4))
    wall_axis.plot(devices, [r["round_wall_s_median"] for r in ordered], marker="o")
    wall_axis.set_ylabel("median round wall time (s)")
    rss_axis.plot(devices, [r["peak_rss_mib"] for r in ordered], marker="o", label="peak (VmHWM)")
    if all("rss_before_rounds_mib" in r for r in ordered):
        rss_axis.plot(devices, [r["rss_before_rounds_mib"] for r in ordered], marker="s", linestyle="--",
                      label="before the rounds")
        rss_axis.legend()
    rss_axis.set_ylabel("coordinator RSS (MiB)")
    for axis in (wall_axis, rss_axis):
        axis.set_xscale("log")
        axis.set_xlabel("devices")
        axis.set_xticks(devices, [str(n) for n in devices])
        axis.grid(True, alpha=0.3)
    params = ordered[0]["payload_params"]
    fig.suptitle(f"coordinator under load: {params:,} adapter parameters per update")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
