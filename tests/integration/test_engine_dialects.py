"""The include_usage seam: engines that report stream usage only when asked (vLLM, llama.cpp's
server, Ollama, SGLang, TGI) are asked, and the extra usage chunk is removed from the stream of a
client that did not ask. The engine is FaultyUpstream replaying that wire format (those engines
cannot run here); llama-cpp-python itself is covered against the real server elsewhere."""

from __future__ import annotations

import aiohttp

from sidecar.metering import Source

CHAT = "/v1/chat/completions"


async def stream(url: str, body: dict) -> bytes:
    async with aiohttp.ClientSession() as client:
        async with client.post(url + CHAT, json=body) as resp:
            assert resp.status == 200
            return await resp.read()


async def test_usage_is_requested_and_stripped_for_include_usage_engines(
    sidecar_factory, faulty_upstream
) -> None:
    sidecar = await sidecar_factory(faulty_upstream.url, engine="vllm")
    relayed = await stream(
        sidecar.url, {"model": "m", "stream": True, "max_tokens": 6, "job_id": 1}
    )
    assert faulty_upstream.requests[-1]["stream_options"] == {"include_usage": True}
    assert b'"usage"' not in relayed and relayed.endswith(b"data: [DONE]\n\n")
    assert relayed.count(b'"content": "tok"') == 6

    asked = {
        "model": "m",
        "stream": True,
        "max_tokens": 4,
        "job_id": 1,
        "stream_options": {"include_usage": True},
    }
    direct = await stream(faulty_upstream.url, {k: v for k, v in asked.items() if k != "job_id"})
    relayed_asked = await stream(sidecar.url, asked)
    assert relayed_asked == direct  # the client asked: its stream is untouched

    records = await sidecar.ledger.records(1)
    assert [(r.prompt_tokens, r.completion_tokens, r.source) for r in records] == [
        (5, 6, Source.REPORTED),
        (5, 4, Source.REPORTED),
    ]


async def test_llama_cpp_python_requests_are_forwarded_unchanged(
    sidecar_factory, faulty_upstream
) -> None:
    sidecar = await sidecar_factory(faulty_upstream.url)  # engine llama-cpp-python (default)
    await stream(sidecar.url, {"model": "m", "stream": True, "max_tokens": 3, "job_id": 2})
    assert "stream_options" not in faulty_upstream.requests[-1]
    [record] = await sidecar.ledger.records(2)
    assert (record.completion_tokens, record.source) == (3, Source.COUNTED)
