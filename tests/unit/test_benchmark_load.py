"""The load benchmark's pure parts: percentiles, the table, the model search, the devices' deltas, the CLI."""

from __future__ import annotations

import json
import math
import pickle
from pathlib import Path
from typing import Any

import pytest

from benchmarks.load import (
    RunMeasurements,
    _json_safe,
    build_parser,
    build_record,
    default_poll_s,
    federation_config,
)
from benchmarks.load_model import count_shared_params, model_for_params
from benchmarks.load_report import (
    REQUIRED_KEYS,
    coordinator_breakdown,
    heartbeat_process_breakdown,
    latency_summary,
    latency_timeline,
    markdown_table,
    noise_lines,
    parse_prometheus,
    percentile,
    plot_load,
    report_text,
    target_lines,
)
from benchmarks.simdevice import FleetStats, make_delta, make_specs, tensor_allowed
from mlecs.codec import decode_tensors, encode_tensors

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SHAPES = {
    "connector.core.fuse.weight": (8, 6),
    "connector.slots.audio.linear.weight": (4, 4),
    "connector.slots.image.linear.weight": (4, 4),
    "extractors.audio.proj.weight": (4, 3),
    "extractors.image.conv1.bias": (2,),
    "head.bias": (10,),
    "lora.layer0.query.A": (4, 8),
    "fused.z": (3, 8),
}


def _record(devices: int, **overrides: Any) -> dict[str, Any]:
    record: dict[str, Any] = {
        "devices": devices, "payload_params": 1_298_694, "rounds": 3, "round_wall_s_median": 1.5,
        "heartbeat_p99_ms": 12.5, "upload_p99_ms": 900.0, "cpu_s_per_update": 0.05, "peak_rss_mib": 600.0,
        "wire_bytes_per_update": 2_400_000.0, "rounds_committed": 3, "rss_before_rounds_mib": 500.0,
    }
    return record | overrides


# ---- percentiles and summaries ----------------------------------------------------------------


def test_percentile_interpolates_between_closest_ranks() -> None:
    values = [4.0, 1.0, 3.0, 2.0]

    assert percentile(values, 0) == 1.0
    assert percentile(values, 100) == 4.0
    assert percentile(values, 50) == 2.5
    assert percentile(list(map(float, range(101))), 99) == 99.0
    assert percentile([7.0], 99) == 7.0


def test_percentile_of_nothing_is_nan_and_an_out_of_range_q_is_refused() -> None:
    assert math.isnan(percentile([], 50))
    with pytest.raises(ValueError, match="percentile"):
        percentile([1.0], 101)


def test_latency_summary_reports_milliseconds_and_counts_and_skips_empty_methods() -> None:
    summary = latency_summary({"Heartbeat": [0.001, 0.002, 0.003], "GetTask": []})

    assert summary == {"Heartbeat": {"p50": 2.0, "p99": 2.98, "count": 3}}


BEFORE = """# HELP mlecs_rpc_duration_seconds Device RPC handling time
# TYPE mlecs_rpc_duration_seconds histogram
mlecs_rpc_duration_seconds_sum{method="Heartbeat",code="OK"} 1.5
mlecs_rpc_duration_seconds_sum{method="UploadUpdate",code="OK"} 10.0
mlecs_aggregation_seconds_sum 0.0
mlecs_aggregation_seconds_count 0.0
mlecs_upload_bytes_total 100.0
"""
AFTER = BEFORE.replace("1.5", "2.0").replace("} 10.0", "} 40.0").replace("_sum 0.0", "_sum 3.0").replace(
    "_count 0.0", "_count 2.0").replace("total 100.0", "total 1100.0") + (
    'mlecs_rpc_duration_seconds_sum{method="UploadUpdate",code="INVALID_ARGUMENT"} 1.0\n')


def test_prometheus_samples_are_read_with_their_labels_and_comments_are_skipped() -> None:
    samples = parse_prometheus(BEFORE)

    assert samples[("mlecs_rpc_duration_seconds_sum", (("code", "OK"), ("method", "Heartbeat")))] == 1.5
    assert samples[("mlecs_aggregation_seconds_count", ())] == 0.0
    assert len(samples) == 5


def test_the_breakdown_is_what_the_coordinator_spent_between_two_scrapes() -> None:
    breakdown = coordinator_breakdown(parse_prometheus(BEFORE), parse_prometheus(AFTER))

    assert breakdown["rpc_handling_s"] == {"Heartbeat": 0.5, "UploadUpdate": 31.0}
    assert breakdown["aggregations"] == 2 and breakdown["aggregation_s_mean"] == 1.5
    assert breakdown["upload_bytes"] == 1000.0 and breakdown["download_bytes"] == 0.0


def test_the_breakdown_counts_refusals_by_reason_between_the_scrapes() -> None:
    before = parse_prometheus('mlecs_refusals_total{method="UploadUpdate",reason="late"} 2.0\n')
    after = parse_prometheus('mlecs_refusals_total{method="UploadUpdate",reason="late"} 5.0\n'
                             'mlecs_refusals_total{method="Heartbeat",reason="late"} 1.0\n'
                             'mlecs_refusals_total{method="Heartbeat",reason="rate_limited"} 0.0\n')
    assert coordinator_breakdown(before, after)["refusals"] == {"late": 4}


def test_the_heartbeat_process_breakdown_reads_only_heartbeats_and_its_loop_lag() -> None:
    before = parse_prometheus("")
    after = parse_prometheus(
        'mlecs_rpc_duration_seconds_count{method="Heartbeat",code="OK"} 4.0\n'
        'mlecs_rpc_duration_seconds_sum{method="Heartbeat",code="OK"} 0.02\n'
        'mlecs_rpc_duration_seconds_bucket{method="Heartbeat",code="OK",le="0.001"} 1.0\n'
        'mlecs_rpc_duration_seconds_bucket{method="Heartbeat",code="OK",le="0.01"} 4.0\n'
        'mlecs_rpc_duration_seconds_bucket{method="Heartbeat",code="OK",le="+Inf"} 4.0\n'
        'mlecs_rpc_duration_seconds_count{method="Enrol",code="OK"} 9.0\n'
        'mlecs_event_loop_lag_seconds_bucket{le="0.005"} 99.0\n'
        'mlecs_event_loop_lag_seconds_bucket{le="1.0"} 100.0\n'
        'mlecs_event_loop_lag_seconds_bucket{le="+Inf"} 100.0\n')
    breakdown = heartbeat_process_breakdown(before, after)
    assert breakdown["heartbeats"] == 4 and breakdown["handling_s_mean"] == 0.005
    assert breakdown["handling_p99_s"] == 0.01 and breakdown["event_loop_lag_p99_s"] == 0.005


def test_the_latency_timeline_groups_calls_by_the_window_they_started_in() -> None:
    calls = [(100.0, 0.010), (101.0, 0.030), (106.0, 1.0), (99.0, 5.0), (130.0, 7.0)]
    timeline = latency_timeline(calls, since=100.0, until=120.0, bucket_s=5.0)
    assert [(w["t_s"], w["count"], w["max_ms"]) for w in timeline] == [(0.0, 2, 30.0), (5.0, 1, 1000.0)]
    assert timeline[0]["p50_ms"] == 20.0


def test_no_aggregation_between_the_scrapes_leaves_its_mean_unmeasured() -> None:
    assert math.isnan(coordinator_breakdown({}, {})["aggregation_s_mean"])


# ---- the table and the targets -----------------------------------------------------------------


def test_the_table_has_a_header_and_one_row_per_run() -> None:
    table = markdown_table([_record(8), _record(32, rounds_committed=2)])
    lines = table.strip().splitlines()

    assert len(lines) == 4
    assert lines[0].startswith("| devices | params | committed | round wall s (median) |")
    assert lines[2].startswith("| 8 | 1,298,694 | 3/3 | 1.50 | 12.5 | 900 | 0.050 | 600 | 2,400,000 |")
    assert "| 32 | 1,298,694 | 2/3 |" in lines[3]


def test_missing_or_unmeasured_values_show_as_a_dash() -> None:
    row = markdown_table([_record(8, heartbeat_p99_ms=None, upload_p99_ms=math.nan)]).splitlines()[2]

    assert row.count("–") == 2


def test_targets_are_marked_met_or_missed_for_the_runs_that_measured_them() -> None:
    lines = target_lines([_record(32), _record(1000, heartbeat_p99_ms=250.0, peak_rss_mib=1500.0,
                                               rounds_committed=3)])

    assert lines[0] == "N=32: median round wall 1.50 s (target <= 2 s): met"
    assert lines[1].endswith("(target < 100 ms): MISSED")
    assert lines[2] == "N=1000: 3/3 rounds committed (target: all): met"
    assert lines[3] == "peak RSS N=1000 / N=32 = 2.50 (target <= 2): MISSED"
    assert target_lines([_record(8)]) == ["the issue's targets concern N=32, N=1000 and N=10000; none ran"]


def test_the_ten_thousand_device_targets_are_heartbeats_memory_per_device_and_a_committed_round() -> None:
    lines = target_lines([_record(10000, heartbeat_p99_ms=40.0, rss_kib_per_connected_device=120.0,
                                  clients_per_round=1000, rounds=1, rounds_committed=1, round_wall_s_median=90.0)])

    assert lines == ["N=10000, cohort 1000: heartbeat p99 40.0 ms (target < 100 ms): met",
                     "N=10000: coordinator memory 120.0 KiB per connected device above its idle footprint "
                     "(target <= 100 KiB): MISSED",
                     "N=10000: 1/1 rounds committed, median 90.0 s (target: committed): met"]


def test_the_report_is_the_table_followed_by_the_targets() -> None:
    text = report_text([_record(32)])

    assert text.startswith(markdown_table([_record(32)]))
    assert text.rstrip().endswith("N=32: median round wall 1.50 s (target <= 2 s): met")


def test_a_run_shared_with_other_busy_processes_is_flagged() -> None:
    quiet, busy = _record(8, other_cpu_s=0.5, rounds_phase_s=10.0), _record(32, other_cpu_s=4.0, rounds_phase_s=10.0)

    assert noise_lines([quiet, busy]) == [
        "N=32: the rest of the machine (other processes, kernel network work) used 4.0 CPU s during the 10.0 s "
        "rounds phase; its numbers are skewed"]
    assert noise_lines([_record(8)]) == []


def test_the_plot_is_a_png(tmp_path: Path) -> None:
    path = tmp_path / "load.png"
    plot_load([_record(8), _record(32, round_wall_s_median=2.0, peak_rss_mib=700.0)], path)

    assert path.read_bytes().startswith(PNG_MAGIC)


def test_results_json_stays_strict_json_when_a_metric_was_not_measured() -> None:
    record = _json_safe(_record(8, heartbeat_p99_ms=math.nan, round_wall_s=[1.0, math.inf]))

    assert record["heartbeat_p99_ms"] is None and record["round_wall_s"] == [1.0, None]
    json.dumps(record, allow_nan=False)


def test_a_record_holds_the_issues_keys_computed_from_the_rounds_phase_only() -> None:
    stats = FleetStats()
    stats.record("Heartbeat", 5.0, 9.0)  # before the rounds phase: left out
    # The last heartbeat starts after the rounds, inside the heartbeat window; the late upload is not counted.
    for started, seconds in ((11.0, 0.010), (12.0, 0.020), (13.0, 0.030), (21.0, 0.040)):
        stats.record("Heartbeat", started, seconds)
    stats.record("UploadUpdate", 12.0, 0.5)
    stats.record("UploadUpdate", 21.0, 9.0)
    stats.uploads_accepted, stats.upload_wire_bytes, stats.payload_bytes, stats.payloads = 4, 4000, 3900, 2
    rounds = [{"number": n, "state": "committed", "wall_s": wall, "observed_s": wall + 0.1, "participants": 2.0,
               "failure_reason": None} for n, wall in ((1, 1.0), (2, 3.0))]
    measured = RunMeasurements(devices=2, model={"backbone": "tiny"}, payload_params=96_330, rounds=rounds,
                               stats=stats, window=(10.0, 20.0), heartbeat_window=(10.0, 22.0),
                               coordinator_cpu_s=2.0,
                               peak_rss_mib=700.0, rss_before_rounds_mib=600.0, rss_sampled_peak_mib=690.0,
                               coordinator_breakdown={}, poll_s=0.2, device_procs=2)
    args = build_parser().parse_args(["--devices", "2", "--rounds", "2", "--out", "x"])

    record = build_record(measured, args)

    assert set(REQUIRED_KEYS) <= set(record)
    assert record["round_wall_s_median"] == 2.0 and record["rounds_committed"] == 2
    assert record["heartbeat_p50_ms"] == pytest.approx(25.0) and record["rpc_latency_ms"]["Heartbeat"]["count"] == 4
    assert record["upload_p99_ms"] == pytest.approx(500.0)
    assert record["cpu_s_per_update"] == pytest.approx(0.5)  # 2 CPU seconds over 2 x 2 accepted updates
    assert record["wire_bytes_per_update"] == 1000 and record["payload_bytes"] == 1950


# ---- the federation's model --------------------------------------------------------------------


@pytest.mark.parametrize("target", [100_000, 1_300_000])
def test_model_for_params_picks_a_tiny_model_within_a_few_percent_and_reports_its_exact_size(target: int) -> None:
    model, params = model_for_params(target)

    assert model["backbone"] == "tiny" and model["fused_dim"] % 4 == 0
    assert abs(params - target) / target < 0.03
    assert params == count_shared_params(model)


def test_model_for_params_refuses_a_non_positive_size() -> None:
    with pytest.raises(ValueError, match="positive"):
        model_for_params(0)


def test_the_federation_only_aggregates_and_waits_for_every_invited_device() -> None:
    config = federation_config({"backbone": "tiny"}, invited=32, clients_per_round=0)

    assert config["server_learning"] is False and config["fused_upload_samples"] == 0
    assert config["min_updates"] == 32 and config["clients_per_round"] == 0 and config["upload_codec"] == "fp16"


def test_the_default_poll_interval_is_short_for_small_fleets_and_capped_for_large_ones() -> None:
    assert default_poll_s(8) == 0.2
    assert default_poll_s(1000) == 2.0
    assert 0.2 < default_poll_s(128) < 2.0


# ---- the simulated devices' updates ------------------------------------------------------------


def test_a_device_holds_only_the_extractors_and_connector_slots_of_its_own_modalities() -> None:
    image_only = frozenset({"image"})

    assert tensor_allowed("extractors.image.conv1.bias", image_only)
    assert tensor_allowed("connector.slots.image.linear.weight", image_only)
    assert not tensor_allowed("extractors.audio.proj.weight", image_only)
    assert not tensor_allowed("connector.slots.audio.linear.weight", image_only)
    assert tensor_allowed("connector.core.fuse.weight", image_only)
    assert tensor_allowed("lora.layer0.query.A", image_only)


def test_a_device_never_sends_the_fused_tensor() -> None:
    assert not tensor_allowed("fused.z", frozenset({"image", "audio"}))


def test_the_delta_is_small_float32_noise_for_the_allowed_tensors_only_and_depends_on_the_seed() -> None:
    delta = make_delta(SHAPES, frozenset({"audio"}), seed=3)

    assert sorted(delta) == ["connector.core.fuse.weight", "connector.slots.audio.linear.weight",
                             "extractors.audio.proj.weight", "head.bias", "lora.layer0.query.A"]
    assert all(delta[name].shape == SHAPES[name] and delta[name].dtype.name == "float32" for name in delta)
    assert max(float(abs(v).max()) for v in delta.values()) < 0.01
    again, other = make_delta(SHAPES, frozenset({"audio"}), seed=3), make_delta(SHAPES, frozenset({"audio"}), seed=4)
    assert all((again[n] == delta[n]).all() for n in delta)
    assert any((other[n] != delta[n]).any() for n in delta)


def test_an_encoded_delta_decodes_to_the_same_names_and_shapes() -> None:
    delta = make_delta(SHAPES, frozenset({"image", "audio"}), seed=0)

    decoded = decode_tensors(encode_tensors(delta, "fp16"))

    assert {n: v.shape for n, v in decoded.items()} == {n: v.shape for n, v in delta.items()}


def test_devices_spread_over_the_three_modality_sets_with_distinct_names_and_seeds() -> None:
    specs = make_specs(6, seed=1)

    assert [s.modalities for s in specs[:3]] == [("image",), ("audio",), ("audio", "image")]
    assert len({s.name for s in specs}) == 6 and len({s.seed for s in specs}) == 6


def test_fleet_stats_merge_and_filter_latencies_by_start_time_and_survive_the_result_queue() -> None:
    first, second = FleetStats(), FleetStats()
    first.record("Heartbeat", 10.0, 0.004)
    second.record("Heartbeat", 20.0, 0.006)
    second.record("UploadUpdate", 21.0, 0.5)
    second.uploads_accepted, second.upload_wire_bytes = 1, 1000

    first.merge(pickle.loads(pickle.dumps(second.plain())))

    assert first.latencies("Heartbeat") == [0.004, 0.006]
    assert first.latencies("Heartbeat", since=15.0) == [0.006]
    assert first.latencies("GetTask") == []
    assert (first.uploads_accepted, first.upload_wire_bytes) == (1, 1000)


def test_calls_cancelled_by_stopping_the_fleet_are_not_counted_as_errors() -> None:
    stats = FleetStats()
    stats.note_failure("Heartbeat:UNAVAILABLE", "connection refused")
    stats.stopping = True
    stats.note_failure("Heartbeat:CANCELLED", "CANCELLED")

    assert stats.errors == {"Heartbeat:UNAVAILABLE": 1}
    assert stats.error_samples == {"Heartbeat:UNAVAILABLE": "connection refused"}


# ---- the command line --------------------------------------------------------------------------


def test_help_describes_the_options(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["--help"])

    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for option in ("--devices", "--payload-params", "--rounds", "--out", "--clients-per-round", "--device-procs",
                   "--heartbeat-s", "--database-url", "--redis-url"):
        assert option in text


def test_the_defaults_follow_the_issue() -> None:
    args = build_parser().parse_args(["--devices", "8,32,128,1000", "--out", "x"])

    assert args.devices == [8, 32, 128, 1000]
    assert (args.payload_params, args.rounds, args.clients_per_round, args.heartbeat_s) == (1_300_000, 3, 0, 5)


@pytest.mark.parametrize(("argv", "message"), [
    (["--devices", "8,many", "--out", "x"], "comma-separated device counts"),
    (["--devices", "0", "--out", "x"], "every device count must be >= 1"),
    (["--devices", "8", "--rounds", "0", "--out", "x"], "--rounds: must be >= 1"),
    (["--devices", "8", "--payload-params", "lots", "--out", "x"], "expected an integer"),
    (["--devices", "8", "--poll-s", "-1", "--out", "x"], "must be > 0"),
    (["--devices", "8"], "--out"),
])
def test_bad_arguments_are_refused_with_a_message_naming_the_problem(
        argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(argv)

    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_the_simulated_devices_import_no_torch() -> None:
    import subprocess
    import sys

    probe = "import benchmarks.simdevice, sys; assert 'torch' not in sys.modules"
    assert subprocess.run([sys.executable, "-c", probe], capture_output=True).returncode == 0


def test_bucket_quantile_reads_the_bucket_holding_the_quantile() -> None:
    from benchmarks.load_report import bucket_quantile

    cumulative = {"0.01": 90.0, "0.1": 99.0, "1.0": 100.0, "+Inf": 100.0}
    assert bucket_quantile(cumulative, 0.5) == 0.01
    assert bucket_quantile(cumulative, 0.99) == 0.1
    assert bucket_quantile(cumulative, 1.0) == 1.0
    assert math.isnan(bucket_quantile({"0.1": 0.0, "+Inf": 0.0}, 0.99))  # nothing observed
    assert bucket_quantile({"0.1": 1.0, "+Inf": 3.0}, 0.99) == float("inf")


def test_federations_are_a_flag_and_their_table_says_whether_the_ratio_target_was_met() -> None:
    from benchmarks.load_federations import federations_text

    args = build_parser().parse_args(["--devices", "8", "--federations", "4", "--out", "x"])
    assert args.federations == 4
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--devices", "8", "--federations", "0", "--out", "x"])
    record = {"federations": 2, "devices_per_federation": 8, "payload_params": 1000, "rounds": 3,
              "alone_round_wall_s_median": [0.2, 0.25], "together_round_wall_s_median": [0.28, 0.5],
              "ratio": [1.4, 2.0], "max_ratio": 2.0, "target_ratio": 1.5, "together_phase_s": 3.0,
              "coordinator_cpu_s_together": 1.5, "device_cpu_s_together": 0.5, "other_cpu_s_together": 0.1,
              "machine": {"cpus": 2}}
    text = federations_text([record])
    assert "| 2 | 0.250 | 0.500 | 2.00 |" in text and "Worst ratio 2.00 (target at most 1.5): missed." in text
    assert "met." in federations_text([{**record, "ratio": [1.1, 1.2], "max_ratio": 1.2}])


def test_devices_share_a_few_encoded_updates_when_told_to_and_each_has_its_own_otherwise() -> None:
    from benchmarks.simdevice import FleetOptions, FleetStats, SimDevice, make_specs

    shapes = {"head.weight": (4, 8), "head.bias": (4,)}
    specs = [s for s in make_specs(12) if s.modalities == make_specs(12)[0].modalities]
    assert len(specs) >= 3

    def payloads(variants: int) -> list[bytes]:
        options = FleetOptions(address="unused", federation="f", payload_variants=variants)
        shared: dict = {}
        devices = [SimDevice(None, spec, options, FleetStats()) for spec in specs]  # type: ignore[arg-type]
        for device in devices:
            device.prepare(shapes, shared=shared)
        return [device._payload.data for device in devices]  # type: ignore[union-attr]

    assert len(set(payloads(0))) == len(specs)
    shared = payloads(2)
    assert len({id(p) for p in shared}) <= 2 and len(set(shared)) <= 2
