"""Soak benchmark: honest devices and hostile ones against one coordinator for many minutes.

    python -m benchmarks.soak --devices 200 --hostile-fraction 0.1 --minutes 30 --out runs/soak
    python -m benchmarks.soak --devices 200 --hostile-fraction 0 --minutes 30 --out runs/soak-clean

A coordinator subprocess on PostgreSQL and Redis (fresh database and key prefix), simulated honest devices
(``benchmarks.simdevice``) that download and upload every round, and hostile devices
(``benchmarks.soak_hostile``: idle streams, staging fill, floods, garbage frames). Rounds run back to back
until the time is up. Every ``--sample-s`` seconds it records the coordinator's resident memory (with its
heartbeat process), open file descriptors, staged upload bytes, open upload streams and the database's
rows; per round its outcome, wall time and the staged bytes right after it closed.

It writes ``results.json`` (the timeline, the rounds and a summary), ``results.md`` and ``soak.png``. The
summary checks the targets: every round committed, RSS after the first 5 minutes within 10% of its value
then, staged bytes 0 after every round; honest upload p99 is reported for comparison with a run without
hostile devices (``--hostile-fraction 0``). Long: run it in the background, not in CI.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import shutil
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import psutil
import sqlalchemy as sa

from benchmarks.load import federation_config
from benchmarks.load_coordinator import AdminClient, CoordinatorProcess, backing_stores
from benchmarks.load_model import model_for_params
from benchmarks.load_report import percentile
from benchmarks.simdevice import FleetOptions, make_specs
from benchmarks.simfleet import Fleet
from benchmarks.soak_hostile import HostileOptions, hostile_process

IDLE_TIMEOUT_S = 10
"""The coordinator's upload idle timeout in the soak (shorter than the default 30 s: more churn per minute)."""
WARM_UP_S = 300.0
"""RSS is judged against its value this long after the start (allocators and caches settle first)."""
TABLES = ("updates", "refusals", "rounds", "model_versions", "audit_log", "devices")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.soak", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", type=int, default=200, help="devices in all, honest and hostile (default 200)")
    parser.add_argument("--hostile-fraction", type=float, default=0.1,
                        help="share of the devices that attack, 0 for the baseline run (default 0.1)")
    parser.add_argument("--minutes", type=float, default=30.0, help="how long rounds run (default 30)")
    parser.add_argument("--payload-params", type=int, default=100_000,
                        help="parameters of the shared adapter each honest device uploads (default 100000)")
    parser.add_argument("--round-deadline-s", type=float, default=20.0,
                        help="rounds close at this deadline when hostile devices never finish (default 20)")
    parser.add_argument("--sample-s", type=float, default=5.0, help="seconds between samples (default 5)")
    parser.add_argument("--device-procs", type=int, default=2, help="processes for the honest devices (default 2)")
    parser.add_argument("--database-url", default=None,
                        help="database to use as given (default: a fresh database on the local PostgreSQL, dropped "
                             "afterwards)")
    parser.add_argument("--redis-url", default=None,
                        help="Redis to use (default: the local one, under a key prefix of the run's own)")
    parser.add_argument("--out", type=Path, required=True, help="directory for results.json, results.md, soak.png")
    return parser


def _sample(coordinator: CoordinatorProcess, admin: AdminClient, engine: sa.Engine, started: float) -> dict[str, Any]:
    fds = 0
    for pid in coordinator.pids:
        with contextlib.suppress(psutil.Error):  # a heartbeat process being restarted
            fds += psutil.Process(pid).num_fds()
    metrics = admin.metrics()
    with engine.connect() as connection:
        rows = {table: int(connection.execute(sa.text(f"SELECT count(*) FROM {table}")).scalar_one())
                for table in TABLES}

    def gauge(name: str) -> float:
        return float(sum(value for (series, _), value in metrics.items() if series == name))

    return {"t_s": round(time.monotonic() - started, 1), "rss_mib": coordinator.rss_mib(), "open_fds": fds,
            "staged_bytes": gauge("mlecs_staged_bytes"), "upload_streams": gauge("mlecs_upload_streams_open"),
            "rows": rows}


class Sampler(threading.Thread):
    def __init__(self, sample: Any, interval_s: float) -> None:
        super().__init__(daemon=True)
        self._sample, self._interval_s = sample, interval_s
        self.timeline: list[dict[str, Any]] = []
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.wait(self._interval_s):
            try:
                self.timeline.append(self._sample())
            except Exception as exc:  # a missed sample is noted, not fatal
                self.timeline.append({"error": str(exc)[:200]})


def summarise(timeline: list[dict[str, Any]], rounds: list[dict[str, Any]], upload_s: list[float],
              hostile: dict[str, int], hostile_details: dict[str, str] | None = None) -> dict[str, Any]:
    samples = [s for s in timeline if "rss_mib" in s]
    settled = [s for s in samples if s["t_s"] >= WARM_UP_S]
    rss_growth = (max(s["rss_mib"] for s in settled) / settled[0]["rss_mib"] - 1) if len(settled) > 1 else None
    committed = sum(r["state"] == "committed" for r in rounds)
    return {
        "rounds": len(rounds), "rounds_committed": committed,
        "every_round_committed": bool(rounds) and committed == len(rounds),
        "honest_upload_p99_ms": 1000 * percentile(upload_s, 99) if upload_s else None,
        "rss_start_mib": samples[0]["rss_mib"] if samples else None,
        "rss_end_mib": samples[-1]["rss_mib"] if samples else None,
        "rss_growth_after_warm_up": rss_growth,
        # None: the run was shorter than the warm-up, so there is nothing to judge.
        "rss_flat_within_10pct": None if rss_growth is None else rss_growth <= 0.10,
        "open_fds_max": max((s["open_fds"] for s in samples), default=None),
        "staged_bytes_after_rounds_max": max((r["staged_bytes_after"] for r in rounds), default=None),
        "staged_bytes_back_to_0": all(r["staged_bytes_after"] == 0 for r in rounds),
        "hostile_outcomes": hostile,
        "hostile_details": hostile_details or {},
    }


def _staged_bytes(admin: AdminClient) -> float:
    return float(sum(value for (series, _), value in admin.metrics().items() if series == "mlecs_staged_bytes"))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    hostile_n = round(args.devices * args.hostile_fraction)
    honest_n = args.devices - hostile_n
    if honest_n < 1 or not 0 <= args.hostile_fraction < 1 or args.minutes <= 0:
        print("error: need at least one honest device, --hostile-fraction in [0, 1) and --minutes > 0",
              file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    model, params = model_for_params(args.payload_params)
    with tempfile.TemporaryDirectory(prefix="mlecs-soak-") as tmp, \
            backing_stores(args.database_url, args.redis_url, False, lambda m: print(m, file=sys.stderr)) as stores:
        coordinator = CoordinatorProcess(Path(tmp) / "coordinator", stores, heartbeat_s=5, presence_ttl_s=20.0,
                                         extra_env={"MLECS_UPLOAD_IDLE_TIMEOUT_S": str(IDLE_TIMEOUT_S)})
        coordinator.start()
        admin = AdminClient(coordinator.admin_url, coordinator.admin_token)
        engine = sa.create_engine(stores.database_url or "")
        federation = f"soak-{uuid.uuid4().hex[:8]}"
        config = {**federation_config(model, honest_n, 0), "round_deadline_s": args.round_deadline_s}
        admin.create_federation(federation, config)
        context = multiprocessing.get_context("spawn")
        stop, results = context.Event(), context.Queue()
        hostile = context.Process(target=hostile_process, daemon=True, args=(
            HostileOptions(coordinator.grpc_address, federation, hostile_n), stop, results))
        fleet = Fleet(make_specs(honest_n, 0), FleetOptions(address=coordinator.grpc_address, federation=federation),
                      processes=args.device_procs)
        started = time.monotonic()
        sampler = Sampler(lambda: _sample(coordinator, admin, engine, started), args.sample_s)
        rounds: list[dict[str, Any]] = []
        try:
            with fleet:
                fleet.start(timeout_s=300)
                if hostile_n:
                    hostile.start()
                    results.get(timeout=300)  # enrolled
                sampler.start()
                while time.monotonic() - started < 60 * args.minutes:
                    admin.wait_online(federation, honest_n, timeout_s=120)
                    opened = admin.start_round(federation)
                    body = admin.wait_round(opened["id"], args.round_deadline_s + 120, poll_s=0.2)
                    time.sleep(1.0)  # the close retires partial uploads right after the commit
                    rounds.append({"number": body["number"], "state": body["state"],
                                   "participants": body.get("metrics", {}).get("participants"),
                                   "t_s": round(time.monotonic() - started, 1),
                                   "staged_bytes_after": _staged_bytes(admin)})
                    print(f"[{rounds[-1]['t_s']:7.1f}s] round {body['number']} {body['state']}, staged after: "
                          f"{rounds[-1]['staged_bytes_after']:.0f} B", file=sys.stderr, flush=True)
                stats = fleet.stop()
        finally:
            stop.set()
            sampler.stop.set()
            reported: dict[str, Any] = {}
            if hostile_n and hostile.is_alive():
                try:
                    _, reported = results.get(timeout=60)
                except Exception:  # the hostile process died: its counts are lost, the run's samples are not
                    reported = {}
                hostile.join(timeout=10)
            admin.close()
            engine.dispose()
            coordinator.stop()
            if coordinator.log_path.exists():  # the coordinator's warnings and errors, beside the results
                shutil.copyfile(coordinator.log_path, args.out / "coordinator.log")
    summary = summarise(sampler.timeline, rounds, stats.latencies("UploadUpdate"), reported.get("counts", {}),
                        reported.get("details", {}))
    record = {"devices": args.devices, "hostile": hostile_n, "minutes": args.minutes, "payload_params": params,
              "summary": summary, "rounds": rounds, "timeline": sampler.timeline}
    (args.out / "results.json").write_text(json.dumps(record, indent=1))
    report = report_text(record)
    (args.out / "results.md").write_text(report)
    _plot(record, args.out / "soak.png")
    print(report)
    return 0


def report_text(record: dict[str, Any]) -> str:
    """results.md: the soak's checks and the hostile calls by outcome."""
    s = record["summary"]
    lines = [f"Soak: {record['devices']} devices ({record['hostile']} hostile), {record['minutes']:g} minutes, "
             f"adapter of {record['payload_params']} parameters.", "", "| check | value |", "|---|---|"]
    for key in ("rounds", "rounds_committed", "every_round_committed", "honest_upload_p99_ms", "rss_start_mib",
                "rss_end_mib", "rss_growth_after_warm_up", "rss_flat_within_10pct", "open_fds_max",
                "staged_bytes_after_rounds_max", "staged_bytes_back_to_0"):
        value = s[key]
        lines.append(f"| {key} | {value:.3g} |" if isinstance(value, float) else f"| {key} | {value} |")
    outcomes = ", ".join(f"{k} {v}" for k, v in sorted(s["hostile_outcomes"].items()))
    lines += ["", f"Hostile calls by outcome: {outcomes or 'none'}", ""]
    lines += [f"- {key}: {detail}" for key, detail in sorted(s.get("hostile_details", {}).items())]
    return "\n".join(lines) + "\n"


def _plot(record: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    samples = [s for s in record["timeline"] if "rss_mib" in s]
    if not samples:
        return
    t = [s["t_s"] / 60 for s in samples]
    figure, axes = plt.subplots(2, 2, figsize=(11, 7), sharex=True)
    axes[0][0].plot(t, [s["rss_mib"] for s in samples])
    axes[0][0].set_title("coordinator RSS (MiB)")
    axes[0][1].plot(t, [s["open_fds"] for s in samples])
    axes[0][1].set_title("open file descriptors")
    axes[1][0].plot(t, [s["staged_bytes"] / 2**20 for s in samples], label="staged MiB")
    axes[1][0].plot(t, [s["upload_streams"] for s in samples], label="open upload streams")
    axes[1][0].legend()
    axes[1][0].set_title("staging")
    for table in ("updates", "refusals", "rounds"):
        axes[1][1].plot(t, [s["rows"][table] for s in samples], label=table)
    axes[1][1].legend()
    axes[1][1].set_title("database rows")
    for axis in axes[1]:
        axis.set_xlabel("minutes")
    figure.suptitle(f"soak: {record['devices']} devices, {record['hostile']} hostile")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


if __name__ == "__main__":
    raise SystemExit(main())
