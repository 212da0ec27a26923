"""Every Prometheus metric the coordinator exports, declared once. Labels are bounded: never a device id."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram, start_http_server

RPC_DURATION = Histogram(
    "mlecs_rpc_duration_seconds", "Device RPC handling time", ["method", "code"],
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
ENROLMENTS = Counter("mlecs_enrolments_total", "Device enrolments", ["outcome"])
ROUNDS = Counter("mlecs_rounds_total", "Rounds that reached a terminal state", ["state"])
EVENT_LOOP_LAG = Histogram(
    "mlecs_event_loop_lag_seconds",
    "How late a 100 ms timer on the coordinator's event loop fires: every gRPC call waits this long first",
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
ROUND_DURATION = Histogram(
    "mlecs_round_duration_seconds", "Wall time from open to commit/failure",
    buckets=(1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1800),
)
# Gauges of "the latest round" or "the current version" carry the federation's name: with several
# federations, one value per process would be whichever committed last.
ROUND_PARTICIPANTS = Gauge("mlecs_round_participants", "Participants of the federation's latest round",
                           ["federation", "kind"])
UPDATES = Counter("mlecs_updates_total", "Uploaded updates by outcome", ["outcome"])
UPDATE_REJECTIONS = Counter("mlecs_update_rejections_total", "Refused updates by reason", ["reason"])
REFUSALS = Counter("mlecs_refusals_total", "Device requests refused on purpose, by RPC and reason",
                   ["method", "reason"])
REFUSALS_UNRECORDED = Counter(
    "mlecs_refusals_unrecorded_total",
    "Refusals counted but not written to the refusals table: thinned (a flood from one caller), queue_full, "
    "or store_error", ["cause"])
UPLOAD_BYTES = Counter("mlecs_upload_bytes_total", "Update bytes received from devices")
DOWNLOAD_BYTES = Counter("mlecs_download_bytes_total", "Global adapter/anchor bytes sent to devices")
PUBLIC_SHARD_BYTES = Counter("mlecs_public_shard_bytes_total", "Public-shard archive bytes sent to devices")
PUBLIC_COPY_SAMPLES = Counter("mlecs_public_copy_samples_total", "Samples of devices' own public-set copies "
                              "checked: verified, refused (not the coordinator's), unchecked (it holds none)",
                              ["result"])
GLOBAL_ACCURACY = Gauge("mlecs_global_accuracy", "Test accuracy of the federation's current global version",
                        ["federation", "modalities"])
CLIENT_ACCURACY = Gauge("mlecs_client_accuracy_mean", "Mean personalised accuracy reported in the federation's "
                        "latest round", ["federation"])
AGGREGATION_SECONDS = Histogram(
    "mlecs_aggregation_seconds", "Time to aggregate and evaluate a round",
    buckets=(0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60),
)
DEVICES_ONLINE = Gauge("mlecs_devices_online", "Devices with a live heartbeat", ["modalities"])
HEARTBEAT_PROCESS_RESTARTS = Counter(
    "mlecs_heartbeat_process_restarts_total",
    "Times the heartbeat process (MLECS_HEARTBEAT_PORT) exited and was started again")
HEARTBEAT_PORT = Gauge(
    "mlecs_heartbeat_port", "Port devices are told to send heartbeats to; 0: the device port (no heartbeat process "
    "serving)")
LEASES_HELD = Gauge("mlecs_leases_held", "Federations whose rounds this replica drives (lease held)")

# ---- for the Grafana dashboards (deploy/grafana/dashboards) ----------------------------------------------------
DEVICES_ENROLLED = Gauge("mlecs_devices_enrolled", "Enrolled, unrevoked devices", ["modalities"])
REVOCATIONS = Counter("mlecs_device_revocations_total", "Devices revoked by an operator")
ROUNDS_IN_STATE = Gauge("mlecs_rounds_in_state", "Unfinished rounds (every federation) by state", ["state"])
MODALITY_COVERAGE = Gauge(
    "mlecs_round_modality_coverage",
    "Share of the federation's latest committed round's updates that carry each modality", ["federation", "modality"])
AGGREGATION_WEIGHT_SHARE = Gauge(
    "mlecs_round_aggregation_weight_share",
    "Share of the federation's latest committed round's aggregation weight (MMA or FedAvg, with staleness and "
    "agreement factors) held by each modality set", ["federation", "modalities"])
ROUND_UPLOAD_BYTES = Gauge("mlecs_round_upload_bytes",
                           "Bytes of the updates the federation's latest committed round aggregated", ["federation"])
UPDATE_WIRE_BYTES = Counter("mlecs_update_wire_bytes_total", "Bytes of accepted updates as uploaded (encoded)")
UPDATE_RAW_BYTES = Counter(
    "mlecs_update_raw_bytes_total",
    "fp32 bytes of the accepted updates' tensors: wire / raw is the upload compression ratio")
STAGED_BYTES = Gauge("mlecs_staged_bytes", "Bytes of unfinished uploads staged by this replica")
UPLOAD_STREAMS = Gauge("mlecs_upload_streams_open", "Upload streams open on this replica (with or without a header)")
DEPENDENCY_UP = Gauge("mlecs_dependency_up", "1 when the dependency answered the latest health probe, else 0",
                      ["dependency"])



def serve_http(host: str, port: int) -> None:
    """Exposes this process's metrics on ``http://host:port/metrics`` (processes without the admin API)."""
    start_http_server(port, addr=host)


# Outcome counters start at 0 for every outcome they can take: a series that appears only at its first
# increment is invisible to increase()/rate(), so the first enrolment or failed round would never show.
for _outcome in ("accepted", "refused"):
    ENROLMENTS.labels(_outcome)
for _outcome in ("committed", "failed"):
    ROUNDS.labels(_outcome)
for _outcome in ("accepted", "rejected"):
    UPDATES.labels(_outcome)
for _outcome in ("verified", "refused", "unchecked"):
    PUBLIC_COPY_SAMPLES.labels(_outcome)
CLOUD_JOBS = Counter("mlecs_cloud_jobs_total", "Cloud jobs (tuning, anchors, evaluation of a version) by outcome: "
                     "done, failed (out of attempts), retried (an attempt raised), skipped (already settled)",
                     ["outcome"])
CLOUD_JOB_SECONDS = Histogram("mlecs_cloud_job_seconds", "Time one cloud job attempt took, by outcome", ["outcome"],
                              buckets=(0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600))
CLOUD_QUEUE_DEPTH = Gauge("mlecs_cloud_queue_depth", "Cloud jobs waiting on the queue (queued now, or scheduled for a "
                          "retry)")
CLOUD_WORK_OWED = Gauge("mlecs_cloud_work_owed", "Versions whose cloud work is pending (queued or running)")
CLOUD_REDELIVERIES = Counter("mlecs_cloud_redeliveries_total", "Cloud jobs put on the queue again because none "
                             "finished within cloud_job_timeout_s (a worker died running it, or the queue lost it)")
