"""Every Prometheus metric the coordinator exports, declared once. Labels are bounded: never a device id."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

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
ROUND_PARTICIPANTS = Gauge("mlecs_round_participants", "Participants of the latest round", ["kind"])
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
GLOBAL_ACCURACY = Gauge("mlecs_global_accuracy", "Test accuracy of the current global version", ["modalities"])
CLIENT_ACCURACY = Gauge("mlecs_client_accuracy_mean", "Mean personalised accuracy reported in the latest round")
AGGREGATION_SECONDS = Histogram(
    "mlecs_aggregation_seconds", "Time to aggregate and evaluate a round",
    buckets=(0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60),
)
DEVICES_ONLINE = Gauge("mlecs_devices_online", "Devices with a live heartbeat", ["modalities"])
LEASES_HELD = Gauge("mlecs_leases_held", "Federations whose rounds this replica drives (lease held)")
