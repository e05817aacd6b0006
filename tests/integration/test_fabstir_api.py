"""The host node's own API (/v1/inference, /v1/ws) on the real llama-cpp-python server, the real
ledger and, where the chain matters, a real anvil: a marketplace client's session is metered in
the same ledger as the OpenAI routes, accumulates across prompts and reconnects, and settles."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import openai
import pytest
from openai import AsyncOpenAI

from sidecar.ledger import ClaimKind, ClaimState, RecordState
from tests.integration.test_chain_e2e import chain_options, wait_for

pytestmark = pytest.mark.integration


async def receive(ws: aiohttp.ClientWebSocketResponse) -> dict[str, Any]:
    msg = await asyncio.wait_for(ws.receive(), 30)
    assert msg.type is aiohttp.WSMsgType.TEXT, msg
    return json.loads(msg.data)


@contextlib.asynccontextmanager
async def node_socket(
    http: aiohttp.ClientSession, base_url: str
) -> AsyncIterator[aiohttp.ClientWebSocketResponse]:
    """/v1/ws, past the node's greeting (the first message on every socket)."""
    async with http.ws_connect(base_url + "/v1/ws") as ws:
        assert await receive(ws) == {
            "type": "connected",
            "message": "WebSocket connected successfully",
        }
        yield ws


async def init(ws: aiohttp.ClientWebSocketResponse, job: int | str) -> dict[str, Any]:
    await ws.send_json(
        {
            "type": "session_init",
            "session_id": f"sess-{job}",
            "jobId": str(job),
            "chain_id": 31337,
            "user_address": "0x0000000000000000000000000000000000000001",
        }
    )
    return await receive(ws)


NOTICES = ("checkpoint_submitted", "session_status")  # may come at any time, as the SDK allows


async def prompt(
    ws: aiohttp.ClientWebSocketResponse,
    job: int,
    max_tokens: int,
    notices: list[dict[str, Any]] | None = None,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """One streamed prompt as the SDK sends it: the chunks, then stream_end (claim notices
    in between go to ``notices``)."""
    await ws.send_json(
        {
            "type": "prompt",
            "jobId": str(job),
            "prompt": "tell me",
            "request": {"prompt": "tell me", "max_tokens": max_tokens, "stream": True},
        }
    )
    chunks = []
    while True:
        message = await receive(ws)
        if message["type"] in NOTICES and notices is not None:
            notices.append(message)
            continue
        if message["type"] != "stream_chunk":
            assert message["type"] == "stream_end", message
            return chunks, message
        chunks.append(message)


async def finished_records(sidecar, job: int) -> list:
    return [r for r in await sidecar.ledger.records(job) if r.state is not RecordState.OPEN]


# -- the WebSocket session protocol ---------------------------------------------------------


async def test_ws_session_accumulates_across_prompts_and_reconnects(
    any_engine, sidecar_factory
) -> None:
    sidecar = await sidecar_factory(any_engine.base_url)
    job = 41
    async with aiohttp.ClientSession() as http:
        async with node_socket(http, sidecar.url) as ws:
            ack = await init(ws, f"{job}n")
            assert ack["type"] == "session_init_ack" and ack["job_id"] == job
            assert ack["tokens_used"] == 0
            totals = []
            for n in (7, 12, 20, 3, 31):
                chunks, end = await prompt(ws, job, n)
                assert sum(c["tokens"] for c in chunks) == n == end["tokens_used"]
                assert end["usage"]["completion_tokens"] == n
                record = (await finished_records(sidecar, job))[-1]
                assert record.key == end["request_id"] and record.completion_tokens == n
                totals.append(end["session_tokens"])
            assert totals == [7, 19, 39, 42, 73]  # grows, never resets
        async with node_socket(http, sidecar.url) as ws:  # a reconnect: same job
            ack = await init(ws, job)
            assert ack["tokens_used"] == 73
            _, end = await prompt(ws, job, 5)
            assert end["session_tokens"] == 78
            # The older message form, and a non-stream prompt.
            await ws.send_json(
                {
                    "type": "inference",
                    "request": {"prompt": "x", "max_tokens": 4, "stream": False, "jobId": job},
                }
            )
            response = await receive(ws)
            assert response["type"] == "response" and response["tokens_used"] == 4
            assert response["session_tokens"] == 82
            await ws.send_json({"type": "session_end"})
            assert (await receive(ws))["type"] == "session_ended"
    totals_row = await sidecar.ledger.job(job)
    assert totals_row is not None and totals_row.billable_tokens == 82
    assert totals_row.requests == 7


async def test_stream_end_usage_counts_the_prompt_and_the_window(
    llama_server, sidecar_factory
) -> None:
    """The stream carries no prompt count (llama-cpp-python): the engine's tokenizer gives it;
    the window is the operator's --context-window, as llama-cpp-python does not say its own."""
    sidecar = await sidecar_factory(llama_server.base_url, context_window=llama_server.n_ctx)
    async with aiohttp.ClientSession() as http:
        async with http.post(
            llama_server.base_url + "/extras/tokenize/count", json={"input": "tell me"}
        ) as resp:
            engine_count = (await resp.json())["count"]
        async with node_socket(http, sidecar.url) as ws:
            await init(ws, 42)
            _, end = await prompt(ws, 42, 6)
    assert engine_count > 0
    assert end["usage"] == {
        "prompt_tokens": engine_count,
        "completion_tokens": 6,
        "total_tokens": engine_count + 6,
        "context_window_size": llama_server.n_ctx,
    }


@pytest.mark.parametrize("window", [16, None])
async def test_a_prompt_over_the_window_is_token_limit_exceeded(
    llama_server, sidecar_factory, window
) -> None:
    """Checked before generating where the window is known (--context-window 16), else from
    the engine's own refusal (its n_ctx is 2048): the node's code and numbers either way.
    (llama-cpp-python refuses only non-stream requests in words; a stream it just ends.)"""
    options = {} if window is None else {"context_window": window}
    sidecar = await sidecar_factory(llama_server.base_url, **options)
    words = "tell me more " * (20 if window else 900)
    stream = window is not None
    async with aiohttp.ClientSession() as http:
        async with node_socket(http, sidecar.url) as ws:
            await ws.send_json(
                {
                    "type": "prompt",
                    "jobId": "43",
                    "id": "long-1",
                    "request": {"prompt": words, "max_tokens": 4, "stream": stream},
                }
            )
            error = await receive(ws)
            end = await receive(ws)
        async with http.post(
            sidecar.url + "/v1/inference",
            json={"model": llama_server.model_id, "prompt": words, "max_tokens": 4},
        ) as resp:
            status, body = resp.status, await resp.json()
    assert error["type"] == "error" and error["code"] == "TOKEN_LIMIT_EXCEEDED", error
    assert error["id"] == "long-1"
    assert error["context_window_size"] == (window or llama_server.n_ctx)
    assert error["prompt_tokens"] > error["context_window_size"]
    assert error["message"] == (
        f"Prompt ({error['prompt_tokens']} tokens) exceeds context window "
        f"({error['context_window_size']} tokens)"
    )
    assert end == {"type": "stream_end", "reason": "error", "tokens_used": 0, "id": "long-1"}
    assert status == 400 and body["error"]["code"] == "TOKEN_LIMIT_EXCEEDED"
    totals = await sidecar.ledger.job(43)
    assert totals is None or totals.billable_tokens == 0


async def test_stream_cancel_stops_the_engine_and_keeps_the_tokens(
    llama_server, sidecar_factory
) -> None:
    sidecar = await sidecar_factory(llama_server.base_url)
    job = 42
    async with aiohttp.ClientSession() as http:
        async with node_socket(http, sidecar.url) as ws:
            await init(ws, job)
            await ws.send_json(
                {"type": "prompt", "jobId": job, "request": {"prompt": "go", "max_tokens": 1900}}
            )
            first = await receive(ws)
            assert first["type"] == "stream_chunk"
            await ws.send_json({"type": "stream_cancel", "session_id": "sess", "reason": "stop"})
            relayed = 1
            while True:
                message = await receive(ws)
                if message["type"] != "stream_chunk":
                    break
                relayed += 1
            assert message["type"] == "stream_end" and message["finish_reason"] == "cancelled"
            assert relayed <= message["tokens_used"] < 1900

            async def aborted():
                records = await finished_records(sidecar, job)
                return records and records[-1].state is RecordState.ABORTED and records[-1]

            record = await wait_for(aborted, what="the aborted record")
            assert record.completion_tokens == message["tokens_used"]
            _, end = await prompt(ws, job, 6)  # the session goes on
            assert end["session_tokens"] == message["tokens_used"] + 6


async def test_two_sockets_for_one_job_share_its_count(llama_server, sidecar_factory) -> None:
    sidecar = await sidecar_factory(llama_server.base_url)
    job = 43
    async with aiohttp.ClientSession() as http:
        async with (
            node_socket(http, sidecar.url) as one,
            node_socket(http, sidecar.url) as two,
        ):
            await init(one, job)
            await init(two, job)
            ends = await asyncio.gather(prompt(one, job, 9), prompt(two, job, 13))
            assert sorted(end["tokens_used"] for _, end in ends) == [9, 13]
            await one.close()
            _, end = await prompt(two, job, 2)
            assert end["session_tokens"] == 24
    totals = await sidecar.ledger.job(job)
    assert totals is not None and totals.billable_tokens == 24


async def test_malformed_frames_get_errors_and_the_session_goes_on(
    llama_server, sidecar_factory
) -> None:
    sidecar = await sidecar_factory(
        llama_server.base_url, max_body_bytes=4096, ws_max_message_bytes=4096
    )
    job = 44
    async with aiohttp.ClientSession() as http:
        async with node_socket(http, sidecar.url) as ws:
            await init(ws, job)
            cases = [
                ("not json", "invalid_json"),
                ("[1, 2]", "invalid_message"),
                ('{"no": "type"}', "invalid_message"),
                ('{"type": "teleport"}', "unknown_message_type"),
                ('{"type": "encrypted_session_init", "payload": {}}', "ENCRYPTION_NOT_SUPPORTED"),
                ('{"type": "prompt", "request": {"max_tokens": 3}}', "invalid_request"),
                ('{"type": "prompt", "jobId": "x", "request": {}}', "invalid_request"),
                (
                    '{"type": "prompt", "jobId": 7, "prompt": "a", "max_tokens": 3}',
                    "invalid_job_id",
                ),
            ]
            for frame, code in cases:
                await ws.send_str(frame)
                message = await receive(ws)
                assert message["type"] == "error" and message["code"] == code, (frame, message)
                assert message["message"]
            await ws.send_bytes(b"\x00\x01binary")
            assert (await receive(ws))["code"] == "binary_not_supported"
            _, end = await prompt(ws, job, 4)  # still serving
            assert end["tokens_used"] == 4
            await ws.send_str(json.dumps({"type": "prompt", "prompt": "x" * 10_000}))
            closed = await asyncio.wait_for(ws.receive(), 30)
            assert closed.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
            assert ws.close_code == aiohttp.WSCloseCode.MESSAGE_TOO_BIG
    totals = await sidecar.ledger.job(job)
    assert totals is not None and totals.billable_tokens == 4


# -- POST /v1/inference and the GET routes --------------------------------------------------


async def test_inference_over_http_streamed_and_not(any_engine, sidecar_factory) -> None:
    sidecar = await sidecar_factory(any_engine.base_url)
    job = 45
    async with aiohttp.ClientSession() as http:
        body = {"model": any_engine.model_id, "prompt": "hello", "max_tokens": 11}
        async with http.post(
            sidecar.url + "/v1/inference",
            json={**body, "session_id": f"{job}n", "request_id": "r-1"},
        ) as resp:
            assert resp.status == 200
            answer = await resp.json()
        assert answer["tokens_used"] == 11 == answer["usage"]["completion_tokens"]
        assert answer["request_id"] == "r-1" and answer["model"] == any_engine.model_id
        assert answer["finish_reason"] == "length" and isinstance(answer["content"], str)
        assert answer["usage"]["total_tokens"] == (
            answer["usage"]["prompt_tokens"] + answer["usage"]["completion_tokens"]
        )
        async with http.post(
            sidecar.url + "/v1/inference",
            json={**body, "max_tokens": 8, "stream": True, "sessionId": f"{job}n"},
        ) as resp:
            assert resp.status == 200
            assert resp.headers["Content-Type"].startswith("text/event-stream")
            raw = (await resp.read()).decode()
        events = [json.loads(line[6:]) for line in raw.split("\n\n") if line.startswith("data: ")]
        assert events[-1] == {"content": "", "tokens": 0, "finish_reason": "length"}
        assert [e["tokens"] for e in events[:-1]] == [1] * 8
        assert all(e["finish_reason"] is None for e in events[:-1])
        # The OpenAI routes meter into the same job: one count, in one place.
        client = AsyncOpenAI(base_url=sidecar.url + "/v1", api_key="none", max_retries=0)
        await client.completions.create(
            model="tiny", prompt="x", max_tokens=5, extra_body={"job_id": job}
        )
    totals = await sidecar.ledger.job(job)
    assert totals is not None and totals.billable_tokens == 11 + 8 + 5 and totals.requests == 3


@pytest.mark.parametrize(
    ("change", "param"),
    [
        ({"prompt": None}, "prompt"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"temperature": 3}, "temperature"),
        ({"model": "no-such-model"}, "model"),
        ({"session_id": "12x"}, "job_id"),
    ],
)
async def test_inference_validation_names_the_field(
    llama_server, sidecar_factory, change, param
) -> None:
    sidecar = await sidecar_factory(llama_server.base_url)
    body = {"prompt": "hello", "max_tokens": 3, **change}
    body = {k: v for k, v in body.items() if v is not None}
    async with aiohttp.ClientSession() as http:
        async with http.post(sidecar.url + "/v1/inference", json=body) as resp:
            assert resp.status == (404 if param == "model" else 400)  # OpenAI's model_not_found
            error = (await resp.json())["error"]
    assert error["param"] == param
    assert param.split("_")[0] in error["message"]
    assert await sidecar.ledger.jobs() == []


async def test_models_serve_both_kinds_of_client(llama_server, sidecar_factory) -> None:
    sidecar = await sidecar_factory(llama_server.base_url)
    client = AsyncOpenAI(base_url=sidecar.url + "/v1", api_key="none", max_retries=0)
    listed = [m.id async for m in client.models.list()]
    assert listed == [llama_server.model_id]
    async with aiohttp.ClientSession() as http:
        async with http.get(sidecar.url + "/v1/models") as resp:
            body = await resp.json()
        assert body["models"] == [{"id": llama_server.model_id, "name": llama_server.model_id}]
        async with http.get(sidecar.url + "/health") as resp:
            assert resp.status == 200 and (await resp.json())["status"] == "healthy"
        async with http.get(sidecar.url + "/v1/version") as resp:
            assert "websocket-sessions" in (await resp.json())["features"]
        # No conversation checkpoints on S5 here: the node's 404, which the SDK reads as none.
        async with http.get(sidecar.url + "/v1/checkpoints/46") as resp:
            assert resp.status == 404
            assert await resp.json() == {"error": "No checkpoints found for session 46"}


async def test_marketplace_model_names_map_to_the_engines(llama_server, sidecar_factory) -> None:
    """--model NAME=ENGINE_MODEL: the names the marketplace uses, on every route."""
    name = "repo/tiny-chat.gguf"
    sidecar = await sidecar_factory(
        llama_server.base_url, model=(f"{name}={llama_server.model_id}", "alias-only")
    )
    client = AsyncOpenAI(base_url=sidecar.url + "/v1", api_key="none", max_retries=0)
    assert [m.id async for m in client.models.list()] == [name, "alias-only"]
    answer = await client.completions.create(
        model=name, prompt="hi", max_tokens=3, extra_body={"job_id": 61}
    )
    assert answer.usage is not None and answer.usage.completion_tokens == 3
    with pytest.raises(openai.NotFoundError) as info:
        await client.completions.create(model="gpt-4", prompt="hi", max_tokens=3)
    assert info.value.body["code"] == "model_not_found" and name in info.value.body["message"]
    async with aiohttp.ClientSession() as http:
        async with http.get(sidecar.url + "/v1/models") as resp:
            assert (await resp.json())["models"][0] == {"id": name, "name": name}
        body = {"model": name, "prompt": "hi", "max_tokens": 2, "jobId": 61}
        async with http.post(sidecar.url + "/v1/inference", json=body) as resp:
            assert resp.status == 200 and (await resp.json())["model"] == name
        async with http.post(
            sidecar.url + "/v1/inference", json={**body, "model": "nope", "request_id": "r9"}
        ) as resp:
            assert resp.status == 404
            assert (await resp.json())["error"]["code"] == "model_not_found"
        async with node_socket(http, sidecar.url) as ws:
            await ws.send_json(
                {
                    "type": "prompt",
                    "jobId": "61",
                    "id": "p-7",
                    "request": {"model": "nope", "prompt": "x", "max_tokens": 2},
                }
            )
            error = await receive(ws)
            assert error["type"] == "error" and error["code"] == "model_not_found"
            assert error["id"] == "p-7"
            await ws.send_json(
                {
                    "type": "prompt",
                    "jobId": "61",
                    "id": "p-8",
                    "request": {"model": name, "prompt": "x", "max_tokens": 2},
                }
            )
            while (message := await receive(ws))["type"] == "stream_chunk":
                assert message["id"] == "p-8"
            assert message["type"] == "stream_end" and message["tokens_used"] == 2
    totals = await sidecar.ledger.job(61)
    assert totals is not None and totals.billable_tokens == 3 + 2 + 2


# -- on the chain ----------------------------------------------------------------------------


async def drop(ws: aiohttp.ClientWebSocketResponse) -> None:
    """Cut the TCP connection without a close frame (a client that crashed)."""
    ws._conn.transport.abort()  # type: ignore[attr-defined]


@pytest.mark.parametrize("ending", ["close", "drop"])
async def test_ws_session_claims_and_settles_on_anvil(
    llama_server, devnet, sidecar_factory, tmp_path, ending
) -> None:
    deployment = devnet.deploy("v1", dispute_window=30)
    job = devnet.create_session_job(deployment)
    key_file = devnet.write_host_key_file(tmp_path / "host.key")
    sidecar = await sidecar_factory(
        llama_server.base_url, **chain_options(devnet, deployment, key_file)
    )
    devnet.increase_time(60)  # the rate cap allows 1,200 tokens; the dispute window is over
    devnet.mine()

    async def confirmed(kind: ClaimKind = ClaimKind.PROOF) -> list:
        claims = await sidecar.ledger.claims(job)
        return [c for c in claims if c.kind is kind and c.state is ClaimState.CONFIRMED]

    async with aiohttp.ClientSession() as http:
        ws = await http.ws_connect(sidecar.url + "/v1/ws")
        assert (await receive(ws))["type"] == "connected"
        ack = await init(ws, f"{job}n")
        assert ack["type"] == "session_init_ack"
        notices: list[dict[str, Any]] = []
        for n in (60, 60):  # crossing 100 tokens triggers a claim
            await prompt(ws, job, n, notices)
        first = await wait_for(confirmed, what="the first claim")
        assert [c.tokens for c in first] == [120]
        # The SDK's checkpoint_submitted / session_status, once the claim is mined.
        while len(notices) < 2:
            notices.append(await receive(ws))
        submitted, status = notices
        assert submitted["type"] == "checkpoint_submitted" and status["type"] == "session_status"
        assert submitted["session_id"] == f"sess-{job}n" and submitted["checkpoint_index"] == 1
        assert submitted["tokens"] == 120 and submitted["tx_hash"] == first[0].tx_hash
        assert status["checkpoint"]["status"] == "confirmed"
        assert status["checkpoint"]["checkpoint_index"] == 1
        assert type(submitted["timestamp"]) is int
        devnet.increase_time(60)
        devnet.mine()
        for n in (10, 10, 110):
            await prompt(ws, job, n, notices)
        if ending == "close":
            await ws.close()
        else:
            await drop(ws)
        await wait_for(lambda: confirmed(ClaimKind.SETTLE), what="the settlement")
    proofs = await confirmed()
    assert [c.tokens for c in proofs] == [120, 130]  # the final claim was mined first
    after = devnet.session_job(deployment, job)
    totals = await sidecar.ledger.job(job)
    assert after["statusName"] == "Completed"
    assert totals is not None and after["tokensUsed"] == totals.billable_tokens == 250


async def test_http_only_session_settles_when_idle(
    llama_server, devnet, sidecar_factory, tmp_path
) -> None:
    deployment = devnet.deploy("v1", dispute_window=30)
    job = devnet.create_session_job(deployment)
    key_file = devnet.write_host_key_file(tmp_path / "host.key")
    sidecar = await sidecar_factory(
        llama_server.base_url, settle_after_idle=1, **chain_options(devnet, deployment, key_file)
    )
    devnet.increase_time(60)
    devnet.mine()
    async with aiohttp.ClientSession() as http:
        for max_tokens, stream in ((70, False), (60, True)):
            async with http.post(
                sidecar.url + "/v1/inference",
                json={
                    "prompt": "x",
                    "max_tokens": max_tokens,
                    "stream": stream,
                    "session_id": f"{job}n",
                },
            ) as resp:
                assert resp.status == 200
                await resp.read()

    async def settled() -> bool:
        return any(
            c.kind is ClaimKind.SETTLE and c.state is ClaimState.CONFIRMED
            for c in await sidecar.ledger.claims(job)
        )

    await wait_for(settled, what="the idle settlement")
    after = devnet.session_job(deployment, job)
    assert after["statusName"] == "Completed" and after["tokensUsed"] == 130


async def test_ws_refuses_foreign_and_unknown_jobs(
    llama_server, devnet, sidecar_factory, tmp_path
) -> None:
    deployment = devnet.deploy("v1", dispute_window=30)
    foreign = devnet.create_session_job(deployment, host=devnet.stranger.address)
    key_file = devnet.write_host_key_file(tmp_path / "host.key")
    sidecar = await sidecar_factory(
        llama_server.base_url, **chain_options(devnet, deployment, key_file)
    )
    async with aiohttp.ClientSession() as http:
        for job, code in ((foreign, "foreign_job"), (999_999, "unknown_job")):
            async with node_socket(http, sidecar.url) as ws:
                message = await init(ws, job)
                assert message["type"] == "error" and message["code"] == code
                assert str(job) in message["message"]
                closed = await asyncio.wait_for(ws.receive(), 30)
                assert closed.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
                assert ws.close_code == aiohttp.WSCloseCode.POLICY_VIOLATION
        async with http.post(
            sidecar.url + "/v1/inference",
            json={"prompt": "x", "max_tokens": 3, "jobId": foreign},
        ) as resp:
            assert resp.status == 403
            assert (await resp.json())["error"]["code"] == "foreign_job"
    assert await sidecar.ledger.jobs() == []
