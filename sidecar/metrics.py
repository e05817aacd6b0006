"""Prometheus metrics, on a registry of the app's own (several apps can live in one process).

Metrics are updated once per response, never per streamed chunk, to keep the relay's hot path
free of bookkeeping.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

UNATTRIBUTED = "unattributed"

_LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "sidecar_requests",
            "Responses relayed, by metered endpoint and HTTP status.",
            ("endpoint", "status"),
            registry=r,
        )
        self.tokens = Counter(
            "sidecar_tokens",
            "Tokens metered, by job, kind (prompt, completion, billable) and "
            "source (reported, counted, estimated).",
            ("job", "kind", "source"),
            registry=r,
        )
        self.upstream_latency = Histogram(
            "sidecar_upstream_latency_seconds",
            "Time from request to the engine's response headers.",
            ("endpoint",),
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.ledger_write_latency = Histogram(
            "sidecar_ledger_write_seconds",
            "Time from submitting a final usage record to its durable commit.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.streams_in_flight = Gauge(
            "sidecar_streams_in_flight", "Streamed responses being relayed now.", registry=r
        )
        self.upstream_errors = Counter(
            "sidecar_upstream_errors",
            "Engine failures seen by the sidecar, by kind.",
            ("kind",),
            registry=r,
        )
        self.stream_anomalies = Counter(
            "sidecar_stream_anomalies",
            "Malformed or truncated engine streams (relayed as is).",
            registry=r,
        )
        self.ledger_errors = Counter(
            "sidecar_ledger_errors", "Usage records that could not be committed.", registry=r
        )
        self.rejected = Counter(
            "sidecar_rejected_requests",
            "Requests refused by the sidecar itself, by reason.",
            ("reason",),
            registry=r,
        )

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
