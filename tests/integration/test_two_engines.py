"""The same metering on both real engines, with `--engine auto` (the default): llama-cpp-python
(no usage in streams: chunks counted) and llama.cpp's llama-server (usage when asked). The counts
equal each engine's own `usage` for the same request, on the OpenAI routes and the node API."""

from __future__ import annotations

import json

import aiohttp
import pytest
from openai import AsyncOpenAI

from sidecar.ledger import RecordState

pytestmark = pytest.mark.integration

DIALECT = {"Engine": "llama-cpp-python", "LlamaCppServer": "llama-server"}
SOURCE = {"llama-cpp-python": "counted", "llama-server": "reported"}  # a stream's count


async def engine_usage(engine, path: str, body: dict) -> dict:
    """The engine's own usage for a request, asked directly (not through the sidecar)."""
    async with aiohttp.ClientSession() as http:
        async with http.post(engine.base_url + path, json=body) as resp:
            return (await resp.json())["usage"]


async def test_auto_recognises_each_engine_and_counts_match_its_usage(
    any_engine, sidecar_factory
) -> None:
    dialect = DIALECT[type(any_engine).__name__]
    sidecar = await sidecar_factory(any_engine.base_url)  # --engine auto
    async with aiohttp.ClientSession() as http:
        async with http.get(sidecar.url + "/sidecar/health") as resp:
            engine = (await resp.json())["upstream"]["engine"]
    assert engine["dialect"] == dialect and engine["configured"] == "auto", engine

    client = AsyncOpenAI(base_url=sidecar.url + "/v1", api_key="none", max_retries=0)
    job = 301
    prompt = {"model": any_engine.model_id, "prompt": "Once upon a time", "temperature": 0}
    for n in (5, 17):
        direct = await engine_usage(any_engine, "/v1/completions", {**prompt, "max_tokens": n})
        answer = await client.completions.create(**prompt, max_tokens=n, extra_body={"job_id": job})
        assert answer.usage is not None
        assert answer.usage.completion_tokens == direct["completion_tokens"] == n
        stream = await client.completions.create(
            **prompt, max_tokens=n, stream=True, extra_body={"job_id": job}
        )
        pieces = [c async for c in stream]
        # The client did not ask for usage: an injected usage-only chunk is not passed on.
        assert all(not c.choices or c.usage is None or c.choices for c in pieces)
    messages = [{"role": "user", "content": "Tell me a story."}]
    chat = await client.chat.completions.create(
        model=any_engine.model_id, messages=messages, max_tokens=9, extra_body={"job_id": job}
    )
    direct = await engine_usage(
        any_engine,
        "/v1/chat/completions",
        {"model": any_engine.model_id, "messages": messages, "max_tokens": 9},
    )
    assert chat.usage is not None
    assert chat.usage.completion_tokens == direct["completion_tokens"] == 9
    assert chat.usage.prompt_tokens == direct["prompt_tokens"]

    records = [r for r in await sidecar.ledger.records(job) if r.state is RecordState.FINAL]
    assert [r.completion_tokens for r in records] == [5, 5, 17, 17, 9]
    assert [r.source.value for r in records][1::2][:2] == [SOURCE[dialect]] * 2
    totals = await sidecar.ledger.job(job)
    assert totals is not None and totals.billable_tokens == 53


async def test_node_api_on_each_engine(any_engine, sidecar_factory) -> None:
    sidecar = await sidecar_factory(any_engine.base_url)
    job = 302
    async with aiohttp.ClientSession() as http:
        body = {"model": any_engine.model_id, "prompt": "hello", "max_tokens": 8, "jobId": job}
        async with http.post(sidecar.url + "/v1/inference", json=body) as resp:
            answer = await resp.json()
        assert resp.status == 200 and answer["tokens_used"] == 8
        async with http.ws_connect(sidecar.url + "/v1/ws") as ws:
            assert (await ws.receive_json())["type"] == "connected"
            await ws.send_json(
                {
                    "type": "prompt",
                    "jobId": str(job),
                    "id": "p1",
                    "request": {"prompt": "tell me", "max_tokens": 6, "stream": True},
                }
            )
            tokens = 0
            while (message := json.loads((await ws.receive()).data))["type"] == "stream_chunk":
                tokens += message["tokens"]
    assert message["type"] == "stream_end" and message["tokens_used"] == 6
    assert message["usage"]["prompt_tokens"] > 0  # the engine's tokenizer, or its own usage
    totals = await sidecar.ledger.job(job)
    assert totals is not None and totals.billable_tokens == 14


async def test_responses_api_is_metered_on_llama_server(llama_cpp_server, sidecar_factory) -> None:
    """/v1/responses, JSON and streamed (the usage in response.completed, no [DONE]): the
    ledger's counts equal the engine's own input/output tokens, committed before the end."""
    sidecar = await sidecar_factory(llama_cpp_server.base_url)
    job = 303
    body = {"model": llama_cpp_server.model_id, "input": "Tell me a story.", "temperature": 0}
    client = AsyncOpenAI(base_url=sidecar.url + "/v1", api_key="none", max_retries=0)
    answer = await client.responses.create(**body, max_output_tokens=7, extra_body={"job_id": job})
    assert answer.usage is not None and answer.usage.output_tokens == 7
    direct = await engine_usage(llama_cpp_server, "/v1/responses", {**body, "max_output_tokens": 7})
    assert direct["output_tokens"] == 7 and direct["input_tokens"] == answer.usage.input_tokens

    events = []
    stream = await client.responses.create(
        **body, max_output_tokens=11, stream=True, extra_body={"job_id": job}
    )
    async for item in stream:
        events.append(item.type)
        if item.type == "response.completed":
            # The record is committed before the event that ends the stream is relayed.
            records = await sidecar.ledger.records(job)
            assert [r.state for r in records] == [RecordState.FINAL, RecordState.FINAL]
    assert events[-1] == "response.completed" and events.count("response.output_text.delta") == 11
    records = await sidecar.ledger.records(job)
    assert [(r.endpoint, r.completion_tokens, r.source.value) for r in records] == [
        ("responses", 7, "reported"),
        ("responses", 11, "reported"),
    ]
    assert records[0].prompt_tokens == answer.usage.input_tokens
    # llama-server reports input_tokens_details.cached_tokens: kept per record, summed per job.
    cached = answer.usage.input_tokens_details.cached_tokens
    assert records[0].cached_tokens == cached and records[1].cached_tokens is not None
    totals = await sidecar.ledger.job(job)
    assert totals is not None and totals.billable_tokens == 18
    assert totals.cached_tokens == cached + records[1].cached_tokens
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{sidecar.url}/sidecar/jobs/{job}") as resp:
            view = await resp.json()
        async with http.get(f"{sidecar.url}/metrics") as resp:
            metrics = await resp.text()
    assert view["cached_tokens"] == totals.cached_tokens and view["reasoning_tokens"] == 0
    if totals.cached_tokens:
        assert 'sidecar_tokens_total{kind="cached",source="reported"}' in metrics


async def test_bill_total_counts_a_streams_prompt_with_the_engines_tokenizer(
    llama_server, sidecar_factory
) -> None:
    """llama-cpp-python's streams carry no usage: under --bill total the prompt is counted by
    its own tokenizer, exact for a completion (equal to its non-stream prompt_tokens)."""
    sidecar = await sidecar_factory(llama_server.base_url, bill="total")
    body = {
        "model": llama_server.model_id,
        "prompt": "Once upon a time there was",
        "temperature": 0,
    }
    direct = await engine_usage(llama_server, "/v1/completions", {**body, "max_tokens": 4})
    client = AsyncOpenAI(base_url=sidecar.url + "/v1", api_key="none", max_retries=0)
    stream = await client.completions.create(
        **body, max_tokens=4, stream=True, extra_body={"job_id": 304}
    )
    assert sum(1 for c in [c async for c in stream] if c.choices and c.choices[0].text) == 4
    [record] = await sidecar.ledger.records(304)
    assert record.prompt_tokens == direct["prompt_tokens"]
    assert record.billable_tokens == direct["prompt_tokens"] + 4
