"""Prometheus metrics, on a registry of the app's own (several apps can live in one process).

Metrics are updated once per response, never per streamed chunk, to keep the relay's hot path
free of bookkeeping. Every label has a fixed, small set of values: nothing a client or an
engine sends (a job id, a model name) becomes a label, so a scrape stays the same size however
many jobs a host serves (per-job figures are in the ledger: ``/sidecar/jobs``, ``sidecar
jobs``). Token usage is also exported under the OpenTelemetry GenAI name,
``gen_ai.client.token.usage`` (a histogram of tokens per response by ``gen_ai.token.type``),
as its Prometheus form ``gen_ai_client_token_usage``.
"""

from __future__ import annotations

import asyncio
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# The OpenTelemetry GenAI operation names of the metered routes.
_GEN_AI_OPERATIONS = {
    "chat": "chat",
    "completions": "text_completion",
    "embeddings": "embeddings",
    "responses": "chat",
}
# The bucket boundaries the GenAI semantic conventions advise for gen_ai.client.token.usage.
_TOKEN_BUCKETS = tuple(float(4**i) for i in range(14))  # 1, 4, 16, ... 67108864

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
            "Tokens metered, by kind (prompt, completion, billable; cached and reasoning "
            "where the engine reports them) and source (reported, counted, estimated). "
            "Per-job totals: /sidecar/jobs.",
            ("kind", "source"),
            registry=r,
        )
        self.unattributed = Counter(
            "sidecar_unattributed_responses",
            "Responses relayed that named no job (billed to nobody).",
            registry=r,
        )
        self.gen_ai_tokens = Histogram(
            "gen_ai_client_token_usage",
            "OpenTelemetry GenAI gen_ai.client.token.usage: tokens per response, by "
            "gen_ai.token.type (input, output) and gen_ai.operation.name.",
            ("gen_ai_operation_name", "gen_ai_token_type"),
            buckets=_TOKEN_BUCKETS,
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
        self.submitter = Gauge(
            "sidecar_submitter",
            "1 while this process holds the submitter lease (sends the host's transactions).",
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
        self.claims = Counter(
            "sidecar_claims",
            "On-chain claims and settlements by kind (proof, settle) and "
            "outcome (confirmed, already_on_chain, wait, failed, unclaimable).",
            ("kind", "outcome"),
            registry=r,
        )
        self.chain_errors = Counter(
            "sidecar_chain_errors",
            "Chain steps that failed transiently (RPC down, timeouts) and will be retried.",
            registry=r,
        )
        self.rejected = Counter(
            "sidecar_rejected_requests",
            "Requests refused by the sidecar itself, by reason.",
            ("reason",),
            registry=r,
        )

        # labels() costs a lock and a tuple build per call: keep the children of hot label sets.
        self._children: dict[tuple[object, ...], Any] = {}

    def _child(self, metric: Any, *labels: str) -> Any:
        key = (id(metric), *labels)  # the metrics live as long as this object
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def observe_upstream(self, endpoint: str, seconds: float) -> None:
        self._child(self.upstream_latency, endpoint).observe(seconds)

    def count_response(
        self,
        endpoint: str,
        status: int,
        job: int | None,
        source: str,
        prompt_tokens: int | None,
        completion_tokens: int,
        billable_tokens: int,
        cached_tokens: int | None = None,
        reasoning_tokens: int | None = None,
    ) -> None:
        """One relayed response's request and token counters."""
        self._child(self.requests, endpoint, str(status)).inc()
        if job is None:
            self.unattributed.inc()
        if prompt_tokens:
            self._child(self.tokens, "prompt", source).inc(prompt_tokens)
        if completion_tokens:
            self._child(self.tokens, "completion", source).inc(completion_tokens)
        if billable_tokens:
            self._child(self.tokens, "billable", source).inc(billable_tokens)
        if cached_tokens:
            self._child(self.tokens, "cached", source).inc(cached_tokens)
        if reasoning_tokens:
            self._child(self.tokens, "reasoning", source).inc(reasoning_tokens)
        if status < 300:
            operation = _GEN_AI_OPERATIONS.get(endpoint, endpoint)
            if prompt_tokens is not None:
                self._child(self.gen_ai_tokens, operation, "input").observe(prompt_tokens)
            if operation != "embeddings":  # an embedding generates nothing
                self._child(self.gen_ai_tokens, operation, "output").observe(completion_tokens)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)

    async def scrape(self) -> bytes:
        """The exposition, rendered on a worker thread: a scrape never holds the event loop
        (prometheus_client's metrics are thread-safe)."""
        return await asyncio.get_running_loop().run_in_executor(None, self.exposition)
