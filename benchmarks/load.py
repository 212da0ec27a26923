"""Load benchmark: one coordinator on this machine against N simulated devices over real gRPC.

    python -m benchmarks.load --devices 8,32,128,1000 --payload-params 1300000 --rounds 3 --out runs/load

For every N it starts a coordinator subprocess (fresh PostgreSQL database and Redis prefix by default),
creates a federation whose shared adapter has about P parameters, starts N torch-free simulated devices
(``benchmarks.simdevice``) in a few processes, runs R rounds in which every device downloads the global
version and uploads an fp16 delta, and measures round wall time, RPC latency percentiles, coordinator CPU
seconds per accepted update, coordinator peak RSS and bytes on the wire. It writes ``results.json`` (one
record per N), ``results.md`` and, for more than one N, ``load.png``, and prints the table. Progress goes
to stderr.

Exit codes: 0 every run finished; 1 a run failed (the others are still reported); 2 bad arguments.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from benchmarks.load_coordinator import (
    AdminClient,
    CoordinatorProcess,
    CpuAccount,
    LoadBenchmarkError,
    RssSampler,
    backing_stores,
)
from benchmarks.load_model import model_for_params
from benchmarks.load_report import (
    coordinator_breakdown,
    heartbeat_process_breakdown,
    latency_summary,
    latency_timeline,
    percentile,
    plot_load,
    report_text,
)
from benchmarks.simdevice import FleetError, FleetOptions, FleetStats, make_specs
from benchmarks.simfleet import Fleet

_POLL_RATE_PER_S = 160.0
_STARTED = time.monotonic()


def progress(message: str) -> None:
    print(f"[{time.monotonic() - _STARTED:7.1f}s] {message}", file=sys.stderr, flush=True)


# ---- command line --------------------------------------------------------------------------


def _device_counts(text: str) -> list[int]:
    try:
        counts = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated device counts such as 8,32,128, "
                                         f"got {text!r}") from None
    if not counts or any(n < 1 for n in counts):
        raise argparse.ArgumentTypeError(f"every device count must be >= 1, got {text!r}")
    return counts


def _at_least(minimum: int) -> Any:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value
    return parse


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0 or not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be > 0, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.load",
        description="Drive N simulated devices (real gRPC over loopback, real codec, no torch) against one "
                    "coordinator and report round wall time, RPC latency, coordinator CPU per update, "
                    "coordinator peak RSS and bytes on the wire.",
        epilog="Example: python -m benchmarks.load --devices 8,32,128,1000 --rounds 3 --out runs/load")
    parser.add_argument("--devices", type=_device_counts, required=True,
                        help="comma-separated device counts, one run each (e.g. 8,32,128,1000)")
    parser.add_argument("--payload-params", type=_at_least(1000), default=1_300_000,
                        help="shared adapter parameters per update; the closest model is picked and its exact "
                             "count reported (default 1300000)")
    parser.add_argument("--rounds", type=_at_least(1), default=3, help="rounds per run (default 3)")
    parser.add_argument("--out", type=Path, required=True, help="directory for results.json, results.md, load.png")
    parser.add_argument("--clients-per-round", "--cohort", dest="clients_per_round", type=_at_least(0), default=0,
                        help="devices invited per round, the cohort (default 0: every device)")
    parser.add_argument("--device-procs", type=_at_least(1), default=None,
                        help="processes running the devices (default min(4, N))")
    parser.add_argument("--heartbeat-procs", type=_at_least(0), default=1,
                        help="processes sending the devices' heartbeats, apart from the device processes' tasks "
                             "and transfers (default 1; 0: each device heartbeats from its device process, "
                             "where its heartbeats also time that process's turns)")
    parser.add_argument("--device-heartbeat-nice", type=int, default=-10,
                        help="nice value of the processes sending the devices' heartbeats (default -10; needs "
                             "root or CAP_SYS_NICE, else they run at the inherited priority, as the record shows): "
                             "real devices send heartbeats from their own CPUs, not from the coordinator's")
    parser.add_argument("--heartbeat-s", type=_at_least(1), default=5,
                        help="heartbeat interval the coordinator hands out, in whole seconds (default 5); "
                             "presence expires after 4 intervals")
    parser.add_argument("--poll-s", type=_positive_float, default=None,
                        help="longest wait between a device's GetTask calls while it waits for a round "
                             f"(default: N/{_POLL_RATE_PER_S:.0f} s within [0.2, 2], about "
                             f"{_POLL_RATE_PER_S:.0f} polls/s in all)")
    parser.add_argument("--round-timeout-s", type=_positive_float, default=600.0,
                        help="give up on a round after this long (default 600, the round deadline)")
    parser.add_argument("--database-url", default=None,
                        help="the coordinator's database, used as given (default: a fresh PostgreSQL database on "
                             "127.0.0.1:5432, dropped afterwards; SQLite if that server is unreachable)")
    parser.add_argument("--redis-url", default=None,
                        help="Redis for presence (default redis://127.0.0.1:6379/0 under a unique key prefix; "
                             "in-process presence if it is unreachable)")
    parser.add_argument("--embedded", action="store_true",
                        help="use the coordinator's embedded SQLite and in-process presence")
    parser.add_argument("--seed", type=int, default=0, help="seed of the devices' random deltas (default 0)")
    parser.add_argument("--robust-rule", choices=("none", "median", "trimmed_mean"), default="none",
                        help="aggregate with this robust rule (every update spilled to disk and reduced in coordinate "
                             "blocks) instead of the streamed weighted mean (default none)")
    parser.add_argument("--no-heartbeat-process", dest="heartbeat_process", action="store_false",
                        help="serve heartbeats on the device port, as without MLECS_HEARTBEAT_PORT (default: in the "
                             "coordinator's heartbeat process, when Redis is used)")
    parser.add_argument("--shared-channel", action="store_true",
                        help="one connection per device process instead of one per device (as real devices "
                             "have); heartbeats then wait behind other devices' transfers on that connection")
    parser.add_argument("--payload-variants", type=_at_least(0), default=0,
                        help="devices of a process with the same modalities share this many encoded updates "
                             "(default 0: one per device; set it for fleets whose updates would not fit in memory)")
    parser.add_argument("--federations", type=_at_least(1), default=1,
                        help="run this many federations of --devices devices each on one coordinator, each alone and "
                             "then all at once, and report each one's median round both ways (default 1)")
    parser.add_argument("--profile", type=Path, default=None, metavar="SVG",
                        help="sample the coordinator with py-spy during the rounds and write a flame graph here "
                             "(one N only; py-spy may need root or ptrace permission)")
    return parser


@contextlib.contextmanager
def profiled(pid: int, svg: Path | None) -> Iterator[None]:
    """Samples process ``pid`` (its threads, native frames left out) with py-spy while the block runs, and
    writes the flame graph to ``svg``; does nothing without ``svg``."""
    if svg is None:
        yield
        return
    svg.parent.mkdir(parents=True, exist_ok=True)
    executable = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))  # beside this Python
    spy = subprocess.Popen([executable, "record", "--pid", str(pid), "--rate", "200",
                            "--format", "flamegraph", "--output", str(svg), "--nonblocking"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        yield
    finally:
        spy.send_signal(signal.SIGINT)  # py-spy writes its output when interrupted
        _, errors = spy.communicate(timeout=60)
        if not svg.exists():
            progress(f"py-spy wrote no flame graph: {errors.strip()[-300:]}")
        else:  # py-spy titles the graph with its command line: this machine's paths and pid, not the graph's
            svg.write_text(re.sub(r'(<text id="title"[^>]*>)[^<]*(</text>)',
                                  r"\1the coordinator during the load benchmark's rounds (py-spy, 200 Hz)\2",
                                  svg.read_text(), count=1))


def default_poll_s(devices: int) -> float:
    """A poll interval that keeps the fleet's waiting GetTask calls near a fixed total rate."""
    return min(2.0, max(0.2, devices / _POLL_RATE_PER_S))


def federation_config(model: dict[str, Any], invited: int, clients_per_round: int,
                      robust_rule: str = "none") -> dict[str, Any]:
    return {"model": model, "server_learning": False, "fused_upload_samples": 0, "upload_codec": "fp16",
            "max_chunk_bytes": 1024 * 1024, "min_updates": invited, "clients_per_round": clients_per_round,
            "round_deadline_s": 600, "robust_rule": robust_rule}


# ---- one run -------------------------------------------------------------------------------


def _seconds_between(start: str | None, end: str | None) -> float:
    if not start or not end:
        return math.nan
    return (datetime.fromisoformat(end) - datetime.fromisoformat(start)).total_seconds()


def _run_rounds(admin: AdminClient, federation: str, devices: int, args: argparse.Namespace,
                label: str) -> list[dict[str, Any]]:
    results = []
    rounds = args.rounds
    for number in range(1, rounds + 1):
        try:  # a round invites the devices online when it opens; under load a heartbeat can come late
            admin.wait_online(federation, devices, timeout_s=60 + 0.1 * devices)
        except LoadBenchmarkError as exc:
            progress(f"{label} round {number}/{rounds} not started: {exc}")
            break
        posted = time.monotonic()
        opened = admin.start_round(federation)
        body = admin.wait_round(opened["id"], args.round_timeout_s)
        observed = time.monotonic() - posted
        result = {"number": body["number"], "state": body["state"],
                  "wall_s": _seconds_between(body.get("opened_at"), body.get("closed_at")),
                  "observed_s": observed, "participants": body.get("metrics", {}).get("participants"),
                  "invited": len(body.get("participants", [])), "failure_reason": body.get("failure_reason")}
        results.append(result)
        progress(f"{label} round {number}/{rounds}: {body['state']} in {result['wall_s']:.2f} s "
                 f"(observed {observed:.2f} s)" + (f": {body['failure_reason']}" if body.get("failure_reason") else ""))
        if body["state"] not in ("committed", "failed"):
            break  # still running: the next round could not start
    return results


def run_load(devices: int, model: dict[str, Any], params: int, args: argparse.Namespace) -> dict[str, Any]:
    """Runs one N end to end and returns its record."""
    label = f"[N={devices}]"
    with tempfile.TemporaryDirectory(prefix="mlecs-load-") as tmp, \
            backing_stores(args.database_url, args.redis_url, args.embedded, progress) as stores:
        coordinator = CoordinatorProcess(Path(tmp) / "coordinator", stores, args.heartbeat_s,
                                         presence_ttl_s=4.0 * args.heartbeat_s,
                                         heartbeat_process=args.heartbeat_process)
        progress(f"{label} starting the coordinator (database {stores.database}, presence {stores.presence})")
        admin: AdminClient | None = None
        try:
            coordinator.start()  # makes the admin token the client sends
            admin = AdminClient(coordinator.admin_url, coordinator.admin_token)
            record = _measure(coordinator, admin, devices, model, params, args, label)
        finally:
            if admin is not None:
                admin.close()
            code = coordinator.stop()
            progress(f"{label} coordinator stopped (exit code {code})")
            # Its warnings and errors (it logs at WARNING), kept beside the results: the devices see only
            # statuses, the reasons are here.
            if coordinator.log_path.exists():
                args.out.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(coordinator.log_path, args.out / f"coordinator-{devices}.log")
        record.update(database=stores.database, presence=stores.presence,
                      heartbeat_process=coordinator.heartbeat_process)
    return record


def _measure(coordinator: CoordinatorProcess, admin: AdminClient, devices: int, model: dict[str, Any], params: int,
             args: argparse.Namespace, label: str) -> dict[str, Any]:
    federation = f"load-{devices}-{uuid.uuid4().hex[:8]}"
    invited = min(args.clients_per_round, devices) if args.clients_per_round else devices
    admin.create_federation(federation, federation_config(model, invited, args.clients_per_round, args.robust_rule))
    poll_s = args.poll_s or default_poll_s(devices)
    options = FleetOptions(address=coordinator.grpc_address, federation=federation, poll_s=poll_s,
                           shared_channel=args.shared_channel, heartbeat_procs=args.heartbeat_procs,
                           payload_variants=args.payload_variants,
                           heartbeat_nice=args.device_heartbeat_nice)
    fleet = Fleet(make_specs(devices, args.seed), options, processes=args.device_procs)
    rss_idle = coordinator.rss_mib()  # before any device connects: what each connected device adds is above it
    with fleet:
        progress(f"{label} enrolling {devices} devices in {fleet.process_count} process(es), preparing their updates")
        fleet.start(timeout_s=120 + 0.5 * devices)
        admin.wait_online(federation, devices, timeout_s=60 + 0.1 * devices)
        progress(f"{label} all {devices} devices online; running {args.rounds} round(s)")
        priorities = {"heartbeat_process": [os.getpriority(os.PRIO_PROCESS, pid)
                                            for pid in coordinator.heartbeat_process_pids()],
                      "device_heartbeat_procs": fleet.heartbeat_nice()}
        rss_before, scraped = coordinator.rss_mib(), admin.metrics()
        scraped_heartbeats = coordinator.heartbeat_metrics()
        heartbeat_cpu = CpuAccount(coordinator.heartbeat_process_pids(), [], None)
        cpu = CpuAccount(coordinator.pids, fleet.pids, coordinator.stores.database_name)
        window_start = time.time()
        with RssSampler(coordinator.pids) as sampler, profiled(coordinator.pid, args.profile):
            rounds = _run_rounds(admin, federation, devices, args, label)
        window_end, used = time.time(), cpu.used()
        # Heartbeats are timed over at least two of their intervals: short rounds can otherwise end
        # before any heartbeat starts, and leave nothing to take a percentile of.
        heartbeat_window_end = max(window_end, window_start + 2 * args.heartbeat_s + 0.5)
        time.sleep(max(0.0, heartbeat_window_end - time.time()))
        breakdown = coordinator_breakdown(scraped, admin.metrics())
        if coordinator.heartbeat_process:
            breakdown["heartbeat_process"] = {
                **heartbeat_process_breakdown(scraped_heartbeats, coordinator.heartbeat_metrics()),
                "cpu_s": heartbeat_cpu.used().coordinator_s}
        peaks = coordinator.peak_rss_by_process_mib()
        peak_rss, children_peak_rss = sum(peaks.values()), sum(v for pid, v in peaks.items() if pid != coordinator.pid)
        stats = fleet.stop()
    return build_record(RunMeasurements(
        devices=devices, model=model, payload_params=params, rounds=rounds, stats=stats,
        window=(window_start, window_end), heartbeat_window=(window_start, heartbeat_window_end),
        coordinator_cpu_s=used.coordinator_s,
        peak_rss_mib=peak_rss, heartbeat_process_peak_rss_mib=children_peak_rss,
        rss_before_rounds_mib=rss_before, rss_sampled_peak_mib=sampler.peak_mib, rss_idle_mib=rss_idle,
        coordinator_breakdown=breakdown, poll_s=poll_s, device_procs=fleet.process_count,
        device_cpu_s=used.devices_s, stores_cpu_s=used.stores_s, other_cpu_s=used.other_s,
        priorities=priorities), args)


@dataclass
class RunMeasurements:
    """What one run used and observed, before it becomes a record."""

    devices: int
    model: dict[str, Any]
    payload_params: int
    """Exact parameter count of ``model``'s shared adapter."""
    rounds: list[dict[str, Any]]
    """Per round: number, state, wall_s (closed_at - opened_at), observed_s, participants, failure_reason."""
    stats: FleetStats
    window: tuple[float, float]
    """Wall-clock start and end of the rounds phase; latencies count the calls started within it."""
    heartbeat_window: tuple[float, float]
    """The rounds phase, extended to at least two heartbeat intervals: the window heartbeats are timed over."""
    coordinator_cpu_s: float
    """Coordinator CPU seconds (user + system) over the rounds phase."""
    peak_rss_mib: float
    """Of the coordinator and its heartbeat process together (the sum of their high-water marks)."""
    rss_before_rounds_mib: float
    rss_sampled_peak_mib: float
    coordinator_breakdown: dict[str, Any]
    """Server-side time by RPC method and per aggregation over the rounds phase (from its /metrics)."""
    poll_s: float
    device_procs: int
    device_cpu_s: float = math.nan
    """CPU seconds of the device processes over the rounds phase (the load generator's own cost)."""
    stores_cpu_s: float = math.nan
    """CPU seconds of the PostgreSQL backends serving the run and of Redis over the rounds phase."""
    other_cpu_s: float = math.nan
    """CPU seconds the rest of the machine used over the rounds phase: other work skews every number."""
    rss_idle_mib: float = math.nan
    """The coordinator's RSS before any device connected (its idle footprint)."""
    heartbeat_process_peak_rss_mib: float = 0.0
    """The heartbeat process's part of ``peak_rss_mib`` (0 without one)."""
    priorities: dict[str, list[int]] = field(default_factory=dict)
    """Nice values the coordinator's heartbeat process and the devices' heartbeat processes ran at."""


def build_record(m: RunMeasurements, args: argparse.Namespace) -> dict[str, Any]:
    """The results.json record of one run: the issue's keys first, then the details behind them."""
    rounds, stats, cpu_s = m.rounds, m.stats, m.coordinator_cpu_s
    committed = [r for r in rounds if r["state"] == "committed"]
    walls = [r["wall_s"] for r in committed]
    counted = [r["participants"] for r in committed if r["participants"] is not None]
    # The rounds' own count, which excludes uploads accepted for a round that then failed.
    accepted = int(sum(counted)) if len(counted) == len(committed) else stats.uploads_accepted
    latencies = {method: stats.latencies(method, *(m.heartbeat_window if method == "Heartbeat" else m.window))
                 for method in stats.calls}
    heartbeats, uploads = latencies.get("Heartbeat", []), latencies.get("UploadUpdate", [])
    return {
        "devices": m.devices,
        "payload_params": m.payload_params,
        "rounds": args.rounds,
        "round_wall_s_median": statistics.median(walls) if walls else math.nan,
        "heartbeat_p99_ms": 1000 * percentile(heartbeats, 99),
        "upload_p99_ms": 1000 * percentile(uploads, 99),
        "cpu_s_per_update": cpu_s / accepted if accepted else math.nan,
        "peak_rss_mib": m.peak_rss_mib,
        "wire_bytes_per_update": stats.upload_wire_bytes / stats.uploads_accepted if stats.uploads_accepted
        else math.nan,
        "rounds_committed": len(committed),
        "round_wall_s": [r["wall_s"] for r in rounds],
        "round_observed_s": [r["observed_s"] for r in rounds],
        "round_states": [r["state"] for r in rounds],
        "round_failures": [r["failure_reason"] for r in rounds if r["failure_reason"]],
        "rpc_latency_ms": latency_summary(latencies),
        "heartbeat_p50_ms": 1000 * percentile(heartbeats, 50),
        "heartbeat_timeline": latency_timeline(stats.calls.get("Heartbeat", []), *m.heartbeat_window),
        "upload_p50_ms": 1000 * percentile(uploads, 50),
        "accepted_updates": accepted,
        "coordinator_cpu_s": cpu_s,
        "heartbeat_process_peak_rss_mib": m.heartbeat_process_peak_rss_mib,
        "rss_before_rounds_mib": m.rss_before_rounds_mib,
        "rss_idle_mib": m.rss_idle_mib,
        # What each connected device costs the coordinator, online and heartbeating, before the rounds.
        "rss_kib_per_connected_device": 1024 * (m.rss_before_rounds_mib - m.rss_idle_mib) / m.devices,
        "rss_rounds_sampled_peak_mib": m.rss_sampled_peak_mib,
        "payload_bytes": stats.payload_bytes / stats.payloads if stats.payloads else math.nan,
        "download_wire_bytes_per_update": stats.download_wire_bytes / stats.downloads if stats.downloads
        else math.nan,
        "coordinator_breakdown": m.coordinator_breakdown,
        "uploads_rejected": stats.uploads_rejected,
        "device_errors": dict(stats.errors),
        "device_error_samples": dict(stats.error_samples),
        "poll_s": m.poll_s,
        "heartbeat_s": args.heartbeat_s,
        "device_procs": m.device_procs,
        "heartbeat_procs": args.heartbeat_procs,
        "nice": m.priorities,
        "connections": "one per process" if args.shared_channel else "one per device",
        "robust_rule": args.robust_rule,
        "clients_per_round": args.clients_per_round,
        "model": m.model,
        "rounds_phase_s": m.window[1] - m.window[0],
        "device_cpu_s": m.device_cpu_s,
        "stores_cpu_s": m.stores_cpu_s,
        "other_cpu_s": m.other_cpu_s,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
    }


# ---- main ----------------------------------------------------------------------------------


def _json_safe(value: Any) -> Any:
    """NaN and infinity become null: results.json stays strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args.out.mkdir(parents=True, exist_ok=True)
    progress(f"choosing a model with about {args.payload_params:,} shared adapter parameters")
    model, params = model_for_params(args.payload_params)
    progress(f"model {model}: {params:,} parameters")
    if args.federations > 1:
        return _main_federations(args, model, params)
    records: list[dict[str, Any]] = []
    failed = False
    for devices in args.devices:
        try:
            records.append(run_load(devices, model, params, args))
        except (LoadBenchmarkError, FleetError) as exc:
            failed = True
            progress(f"[N={devices}] failed: {exc}")
            continue
        # Written after every run, so a long sweep that is interrupted keeps its finished runs.
        (args.out / "results.json").write_text(json.dumps(_json_safe(records), indent=1))
    if not records:
        progress("no run finished; nothing written")
        return 1
    text = report_text(records)
    (args.out / "results.md").write_text(text)
    if len(records) > 1:
        plot_load(records, args.out / "load.png")
    print(text, end="")
    progress(f"wrote {args.out / 'results.json'} and results.md" + (" and load.png" if len(records) > 1 else ""))
    return 1 if failed else 0


def _main_federations(args: argparse.Namespace, model: dict[str, Any], params: int) -> int:
    from benchmarks.load_federations import federations_text, run_federations

    records = []
    for devices in args.devices:
        def config(invited: int) -> dict[str, Any]:
            return federation_config(model, invited, args.clients_per_round, args.robust_rule)

        try:
            records.append(run_federations(args.federations, devices, model, params, args, _run_rounds, config,
                                           progress))
        except (LoadBenchmarkError, FleetError) as exc:
            progress(f"[{args.federations} x N={devices}] failed: {exc}")
            return 1
        (args.out / "results.json").write_text(json.dumps(_json_safe(records), indent=1))
    text = federations_text(records)
    (args.out / "results.md").write_text(text)
    print(text, end="")
    progress(f"wrote {args.out / 'results.json'} and results.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
