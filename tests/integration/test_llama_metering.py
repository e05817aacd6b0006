"""The real engines on the tiny model (llama-cpp-python, and llama.cpp's llama-server for the
OpenAI-route tests, both with --engine auto), the OpenAI SDK as the client, the sidecar in
between: what is metered equals what the engine says it generated."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest
from openai import AsyncOpenAI

from sidecar.ledger import RecordState
from sidecar.metering import Source

pytestmark = pytest.mark.integration


# A stream's count: llama-cpp-python reports no usage in streams (its chunks are counted); the
# sidecar asks llama-server for it (reported).
STREAM_SOURCE = {"Engine": Source.COUNTED, "LlamaCppServer": Source.REPORTED}


def client_for(url: str, **kwargs) -> AsyncOpenAI:
    return AsyncOpenAI(base_url=url + "/v1", api_key="not-needed", max_retries=0, **kwargs)


async def test_non_stream_counts_equal_engine_usage(any_engine, sidecar_factory) -> None:
    sidecar = await sidecar_factory(any_engine.base_url)
    client = client_for(sidecar.url)
    chat = await client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "hello there"}],
        max_tokens=17,
        extra_body={"job_id": "164n"},
    )
    completion = await client.completions.create(
        model="tiny",
        prompt="Once upon a time",
        max_tokens=11,
        extra_body={"job_id": 164},
    )
    assert chat.usage is not None and completion.usage is not None
    assert chat.usage.completion_tokens == 17 and completion.usage.completion_tokens == 11
    records = await sidecar.ledger.records(164)
    assert [(r.prompt_tokens, r.completion_tokens, r.source, r.state) for r in records] == [
        (chat.usage.prompt_tokens, 17, Source.REPORTED, RecordState.FINAL),
        (completion.usage.prompt_tokens, 11, Source.REPORTED, RecordState.FINAL),
    ]
    totals = await sidecar.ledger.job(164)
    assert totals is not None
    assert totals.billable_tokens == 28  # --bill completion (the default)
    assert totals.prompt_tokens == chat.usage.prompt_tokens + completion.usage.prompt_tokens


async def test_streams_count_max_tokens(any_engine, sidecar_factory) -> None:
    sidecar = await sidecar_factory(any_engine.base_url)
    client = client_for(sidecar.url)
    chat = await client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "count"}],
        max_tokens=40,
        stream=True,
        extra_body={"session_id": "21"},
    )
    pieces = [
        c.choices[0].delta.content async for c in chat if c.choices and c.choices[0].delta.content
    ]
    completion = await client.completions.create(
        model="tiny",
        prompt="abc",
        max_tokens=33,
        stream=True,
        extra_headers={"X-Job-Id": "21"},
    )
    texts = [c.choices[0].text async for c in completion if c.choices and c.choices[0].text]
    assert len(pieces) == 40 and len(texts) == 33
    records = await sidecar.ledger.records(21)
    source = STREAM_SOURCE[type(any_engine).__name__]
    assert [(r.completion_tokens, r.source, r.state) for r in records] == [
        (40, source, RecordState.FINAL),
        (33, source, RecordState.FINAL),
    ]


async def test_total_billing_counts_the_prompt(any_engine, sidecar_factory) -> None:
    sidecar = await sidecar_factory(any_engine.base_url, bill="total")
    client = client_for(sidecar.url)
    answer = await client.completions.create(
        model="tiny", prompt="one two three", max_tokens=5, extra_body={"jobId": "8"}
    )
    assert answer.usage is not None
    totals = await sidecar.ledger.job(8)
    assert totals is not None and totals.billable_tokens == answer.usage.total_tokens


async def test_eight_concurrent_streams_over_three_jobs(any_engine, sidecar_factory) -> None:
    sidecar = await sidecar_factory(any_engine.base_url)
    client = client_for(sidecar.url)
    plan = [(1, 10), (2, 20), (3, 30), (1, 15), (2, 25), (3, 35), (1, 12), (2, 18)]

    async def one(job: int, max_tokens: int) -> int:
        stream = await client.chat.completions.create(
            model="tiny",
            messages=[{"role": "user", "content": f"job {job}"}],
            max_tokens=max_tokens,
            stream=True,
            extra_body={"job_id": job},
        )
        return len([c async for c in stream if c.choices and c.choices[0].delta.content])

    seen = await asyncio.gather(*(one(job, n) for job, n in plan))
    assert seen == [n for _, n in plan]
    for job in (1, 2, 3):
        totals = await sidecar.ledger.job(job)
        assert totals is not None
        assert totals.completion_tokens == sum(n for j, n in plan if j == job)
        assert totals.requests == sum(1 for j, _ in plan if j == job)
        assert totals.open_requests == 0
    async with aiohttp.ClientSession() as http:
        async with http.get(sidecar.url + "/sidecar/jobs") as resp:
            jobs = {j["job_id"]: j for j in (await resp.json())["jobs"]}
    assert jobs["2"]["billable_tokens"] == 63
    source = STREAM_SOURCE[type(any_engine).__name__].value
    assert jobs["3"]["billable_tokens_by_source"] == {source: 65}


def engine_disconnects(llama_server) -> int:
    """How many times the engine has logged that a client went away mid-stream."""
    return llama_server.log_path.read_text(errors="replace").count("Disconnected from client")


async def test_client_disconnect_stops_the_engine(llama_server, sidecar_factory) -> None:
    """Leaving a long stream early closes the engine's request: the engine says so in its log
    (and stops generating: 1,800 tokens take several seconds on this model)."""
    sidecar = await sidecar_factory(llama_server.base_url)
    before = engine_disconnects(llama_server)
    async with aiohttp.ClientSession() as http:
        resp = await http.post(
            sidecar.url + "/v1/completions",
            json={"prompt": "go", "max_tokens": 1800, "stream": True, "job_id": 77},
        )
        got = 0
        async for line in resp.content:
            if line.startswith(b"data: {"):
                got += 1
            if got >= 5:
                break
        resp.close()
    for _ in range(250):
        if engine_disconnects(llama_server) > before:
            break
        await asyncio.sleep(0.02)
    assert engine_disconnects(llama_server) == before + 1
    for _ in range(250):
        records = await sidecar.ledger.records(77)
        if records and records[0].state is not RecordState.OPEN:
            break
        await asyncio.sleep(0.02)
    [record] = records
    assert record.state is RecordState.ABORTED
    assert 5 <= record.completion_tokens < 1800


@pytest.fixture(scope="module")
def embedding_server(tmp_path_factory):
    from tests.support.llama import LlamaServer

    with LlamaServer(tmp_path_factory.mktemp("llama-emb"), extra_args=["--embedding", "True"]) as s:
        yield s


async def test_embeddings_bill_their_input(embedding_server, sidecar_factory) -> None:
    sidecar = await sidecar_factory(embedding_server.base_url)
    client = client_for(sidecar.url)
    answer = await client.embeddings.create(
        model="tiny", input=["hello world", "abc"], extra_body={"job_id": 31}
    )
    assert answer.usage.prompt_tokens > 0 and len(answer.data) == 2
    [record] = await sidecar.ledger.records(31)
    assert (record.prompt_tokens, record.completion_tokens, record.source) == (
        answer.usage.prompt_tokens,
        0,
        Source.REPORTED,
    )
    assert record.billable_tokens == answer.usage.prompt_tokens
