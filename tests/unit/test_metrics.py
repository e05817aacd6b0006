"""Metrics: bounded cardinality whatever the jobs, GenAI names, a scrape off the event loop."""

from __future__ import annotations

import asyncio
import threading

from prometheus_client.parser import text_string_to_metric_families

from sidecar.metrics import Metrics


def serve_jobs(metrics: Metrics, jobs: int) -> None:
    for job in range(jobs):
        metrics.count_response("chat", 200, job, "reported", 11, 7, 7)
        metrics.count_response("completions", 200, job, "counted", None, 3, 3)
        metrics.count_response("embeddings", 200, None, "reported", 5, 0, 5)


def test_a_scrape_does_not_grow_with_the_jobs_served() -> None:
    few, many = Metrics(), Metrics()
    serve_jobs(few, 10)
    serve_jobs(many, 20_000)
    small, large = few.exposition(), many.exposition()
    assert len(large) < 200_000
    assert len(large.splitlines()) == len(small.splitlines())  # the same series, other values
    assert b"job=" not in large


def test_token_counters_and_their_gen_ai_names() -> None:
    metrics = Metrics()
    serve_jobs(metrics, 3)
    families = {f.name: f for f in text_string_to_metric_families(metrics.exposition().decode())}
    tokens = {
        (s.labels["kind"], s.labels["source"]): s.value
        for s in families["sidecar_tokens"].samples
        if s.name == "sidecar_tokens_total"
    }
    assert tokens[("completion", "reported")] == 21 and tokens[("completion", "counted")] == 9
    assert tokens[("prompt", "reported")] == 3 * 11 + 3 * 5
    usage = {
        (s.labels["gen_ai_operation_name"], s.labels["gen_ai_token_type"]): s.value
        for s in families["gen_ai_client_token_usage"].samples
        if s.name == "gen_ai_client_token_usage_sum"
    }
    assert usage == {
        ("chat", "input"): 33,
        ("chat", "output"): 21,
        ("text_completion", "output"): 9,  # no prompt count reported: no input observation
        ("embeddings", "input"): 15,
    }
    unattributed = families["sidecar_unattributed_responses"].samples[0]
    assert unattributed.value == 3


async def test_a_scrape_renders_on_a_worker_thread() -> None:
    metrics = Metrics()
    serve_jobs(metrics, 2)
    threads: list[threading.Thread] = []
    render = metrics.exposition

    def spy() -> bytes:
        threads.append(threading.current_thread())
        return render()

    metrics.exposition = spy  # type: ignore[method-assign]
    body = await metrics.scrape()
    assert body == render()
    assert threads and threads[0] is not threading.main_thread()
    assert asyncio.get_running_loop().is_running()
