"""``benchmarks.load --federations K``: K federations on one coordinator, each with its own simulated fleet.

Every federation runs its rounds alone first (one after another, the other fleets connected and idle), then
all K run their rounds at the same time, one driver thread each. The record gives each federation's median
round alone and together, and their ratio: issue 19 asks for at most 1.5 (one federation's rounds do not wait
for another's). The same coordinator, stores and fleets serve both phases, so the two differ only in the
rounds the other federations run meanwhile.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from benchmarks.load_coordinator import AdminClient, CoordinatorProcess, CpuAccount, backing_stores
from benchmarks.simdevice import FleetOptions, make_specs
from benchmarks.simfleet import Fleet

RunRounds = Callable[[AdminClient, str, int, argparse.Namespace, str], list[dict[str, Any]]]
TARGET_RATIO = 1.5


def _median_committed(rounds: Sequence[Mapping[str, Any]]) -> float:
    walls = [r["wall_s"] for r in rounds if r["state"] == "committed"]
    return statistics.median(walls) if walls else math.nan


def run_federations(count: int, devices: int, model: dict[str, Any], params: int, args: argparse.Namespace,
                    run_rounds: RunRounds, federation_config: Callable[[int], dict[str, Any]],
                    progress: Callable[[str], None]) -> dict[str, Any]:
    """One record: ``count`` federations of ``devices`` devices each, alone and then together."""
    label = f"[{count} x N={devices}]"
    with tempfile.TemporaryDirectory(prefix="mlecs-load-") as tmp, \
            backing_stores(args.database_url, args.redis_url, args.embedded, progress) as stores, ExitStack() as stack:
        coordinator = CoordinatorProcess(Path(tmp) / "coordinator", stores, args.heartbeat_s,
                                         presence_ttl_s=4.0 * args.heartbeat_s,
                                         heartbeat_process=args.heartbeat_process)
        progress(f"{label} starting the coordinator (database {stores.database}, presence {stores.presence})")
        coordinator.start()
        stack.callback(coordinator.stop)
        admins = [AdminClient(coordinator.admin_url, coordinator.admin_token) for _ in range(count)]
        for admin in admins:
            stack.callback(admin.close)
        names = [f"load-f{i}-{uuid.uuid4().hex[:6]}" for i in range(count)]
        fleets = []
        for index, name in enumerate(names):
            admins[0].create_federation(name, federation_config(devices))
            options = FleetOptions(address=coordinator.grpc_address, federation=name, poll_s=args.poll_s or 0.2,
                                   shared_channel=args.shared_channel, heartbeat_procs=args.heartbeat_procs,
                                   heartbeat_nice=args.device_heartbeat_nice)
            fleet = Fleet(make_specs(devices, args.seed + index), options, processes=args.device_procs)
            stack.enter_context(fleet)
            fleet.start(timeout_s=120 + 0.5 * devices)
            fleets.append(fleet)
        for name in names:
            admins[0].wait_online(name, devices, timeout_s=60 + 0.1 * devices * count)
        progress(f"{label} {count * devices} devices online in {count} federations; each runs {args.rounds} "
                 "round(s) alone")
        alone = [run_rounds(admins[i], name, devices, args, f"{label} {name} alone")
                 for i, name in enumerate(names)]
        progress(f"{label} now all {count} at once")
        together: list[list[dict[str, Any]]] = [[] for _ in names]
        cpu = CpuAccount(coordinator.pids, [pid for fleet in fleets for pid in fleet.pids], stores.database_name)

        def drive(index: int) -> None:
            together[index] = run_rounds(admins[index], names[index], devices, args, f"{label} {names[index]}")

        started = time.monotonic()
        threads = [threading.Thread(target=drive, args=(i,)) for i in range(count)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        phase_s, used = time.monotonic() - started, cpu.used()
        for fleet in fleets:
            fleet.stop()
    alone_s = [_median_committed(r) for r in alone]
    together_s = [_median_committed(r) for r in together]
    ratios = [t / a if a and math.isfinite(a) and math.isfinite(t) else math.nan
              for a, t in zip(alone_s, together_s, strict=True)]
    return {
        "federations": count, "devices_per_federation": devices, "payload_params": params, "rounds": args.rounds,
        "alone_round_wall_s_median": alone_s, "together_round_wall_s_median": together_s,
        "ratio": ratios, "max_ratio": max(ratios) if ratios else math.nan, "target_ratio": TARGET_RATIO,
        "alone_round_wall_s": [[r["wall_s"] for r in rounds] for rounds in alone],
        "together_round_wall_s": [[r["wall_s"] for r in rounds] for rounds in together],
        "rounds_committed_together": [sum(r["state"] == "committed" for r in rounds) for rounds in together],
        "together_phase_s": phase_s, "coordinator_cpu_s_together": used.coordinator_s,
        "device_cpu_s_together": used.devices_s, "other_cpu_s_together": used.other_s,
        "database": stores.database, "presence": stores.presence, "model": model,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
    }


def federations_text(records: Sequence[Mapping[str, Any]]) -> str:
    """A table per record: each federation's median round alone and together, and the ratio."""
    out = []
    for record in records:
        out.append(f"{record['federations']} federations x {record['devices_per_federation']} devices, "
                   f"{record['payload_params']:,} parameters, {record['rounds']} rounds each\n")
        out.append("| federation | median round alone (s) | median round, all at once (s) | ratio |")
        out.append("|---|---|---|---|")
        for index, (alone, together, ratio) in enumerate(zip(record["alone_round_wall_s_median"],
                                                             record["together_round_wall_s_median"],
                                                             record["ratio"], strict=True)):
            out.append(f"| {index + 1} | {alone:.3f} | {together:.3f} | {ratio:.2f} |")
        verdict = "met" if record["max_ratio"] <= record["target_ratio"] else "missed"
        out.append(f"\n- Worst ratio {record['max_ratio']:.2f} (target at most {record['target_ratio']}): {verdict}.")
        out.append(f"- Coordinator CPU while all ran: {record['coordinator_cpu_s_together']:.1f} s over "
                   f"{record['together_phase_s']:.1f} s; devices {record['device_cpu_s_together']:.1f} s; "
                   f"the rest of the machine {record['other_cpu_s_together']:.1f} s "
                   f"({record['machine']['cpus']} CPUs).\n")
    return "\n".join(out) + "\n"
