"""Bad input and engine faults: clear OpenAI-shaped errors, never a crash, a hang or a lost count.

The engine here is FaultyUpstream (tests/support/faulty_upstream.py), a fake that fails on cue;
the sidecar and its SQLite ledger are the real ones.
"""

from __future__ import annotations

import asyncio
import json

import aiohttp
import pytest

from sidecar.ledger import RecordState
from sidecar.metering import Source
from tests.support.sidecar import free_port

CHAT = "/v1/chat/completions"


def assert_openai_error(payload: dict, code: str | None = None) -> str:
    assert set(payload) == {"error"}
    error = payload["error"]
    assert isinstance(error["message"], str) and error["message"]
    assert "type" in error
    if code is not None:
        assert error["code"] == code
    return error["message"]


async def test_upstream_down_is_a_clear_502(sidecar_factory, tmp_path) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    sidecar = await sidecar_factory(dead)
    async with aiohttp.ClientSession() as client:
        async with client.post(sidecar.url + CHAT, json={"model": "m", "job_id": 1}) as resp:
            assert resp.status == 502
            message = assert_openai_error(await resp.json(), "upstream_unreachable")
            assert dead in message
        async with client.get(sidecar.url + "/v1/models") as resp:
            assert resp.status == 502
        async with client.get(sidecar.url + "/sidecar/health") as resp:
            health = await resp.json()
            assert health["status"] == "degraded"
            assert health["upstream"]["reachable"] is False


async def test_invalid_json_body_is_400(sidecar_factory, faulty_upstream) -> None:
    sidecar = await sidecar_factory(faulty_upstream.url)
    async with aiohttp.ClientSession() as client:
        for body in (b"{not json", b"[1, 2]", b"", b'"just a string"'):
            async with client.post(
                sidecar.url + CHAT, data=body, headers={"Content-Type": "application/json"}
            ) as resp:
                assert resp.status == 400, body
                assert_openai_error(await resp.json(), "invalid_request_body")
    assert faulty_upstream.requests == []


async def test_oversized_body_is_413(sidecar_factory, faulty_upstream) -> None:
    sidecar = await sidecar_factory(faulty_upstream.url)
    big = b'{"model": "m", "prompt": "' + b"x" * (20 * 1024 * 1024) + b'"}'
    async with aiohttp.ClientSession() as client:
        async with client.post(sidecar.url + CHAT, data=big) as resp:
            assert resp.status == 413
            assert "8388608" in assert_openai_error(await resp.json(), "request_too_large")

        async def chunked():  # no Content-Length: the limit must hold while reading
            for _ in range(30):
                yield b"x" * (1024 * 1024)

        async with client.post(sidecar.url + CHAT, data=chunked()) as resp:
            assert resp.status == 413
    small = await sidecar_factory(faulty_upstream.url, max_body_bytes=1000)
    async with aiohttp.ClientSession() as client:
        async with client.post(small.url + CHAT, data=b"{" + b" " * 2000 + b"}") as resp:
            assert resp.status == 413


@pytest.mark.parametrize(
    "bad", ["abc", "-1", "1.5", "0x10", "12nn", "", str(2**256), True, 1.5, -3, [1], {"id": 1}]
)
async def test_malformed_job_id_is_400(sidecar_factory, faulty_upstream, bad) -> None:
    sidecar = await sidecar_factory(faulty_upstream.url)
    async with aiohttp.ClientSession() as client:
        async with client.post(sidecar.url + CHAT, json={"model": "m", "job_id": bad}) as resp:
            assert resp.status == 400
            assert_openai_error(await resp.json(), "invalid_job_id")
    assert faulty_upstream.requests == []


async def test_conflicting_job_ids_are_400(sidecar_factory, faulty_upstream) -> None:
    sidecar = await sidecar_factory(faulty_upstream.url)
    async with aiohttp.ClientSession() as client:
        async with client.post(
            sidecar.url + CHAT, json={"model": "m", "job_id": 1}, headers={"X-Job-Id": "2"}
        ) as resp:
            assert resp.status == 400
        async with client.post(
            sidecar.url + CHAT, json={"model": "m", "job_id": "7", "session_id": "7n"}
        ) as resp:
            assert resp.status == 200  # the same job named twice is fine


async def test_require_job_is_402(sidecar_factory, faulty_upstream) -> None:
    sidecar = await sidecar_factory(faulty_upstream.url, require_job=True)
    async with aiohttp.ClientSession() as client:
        async with client.post(sidecar.url + CHAT, json={"model": "m"}) as resp:
            assert resp.status == 402
            assert_openai_error(await resp.json(), "job_required")
        async with client.post(
            sidecar.url + CHAT,
            json={"model": "m", "max_tokens": 3},
            headers={"X-Session-Id": "164n"},
        ) as resp:
            assert resp.status == 200
    totals = await sidecar.ledger.job(164)
    assert totals is not None and totals.completion_tokens == 3


async def test_job_fields_never_reach_the_engine(sidecar_factory, faulty_upstream) -> None:
    sidecar = await sidecar_factory(faulty_upstream.url)
    async with aiohttp.ClientSession() as client:
        for field_name in ("job_id", "jobId", "session_id", "sessionId"):
            async with client.post(
                sidecar.url + CHAT,
                json={"model": "m", "max_tokens": 2, field_name: "164n", "extra": "kept"},
            ) as resp:
                assert resp.status == 200
    for seen in faulty_upstream.requests:
        assert seen == {"model": "m", "max_tokens": 2, "extra": "kept"}
    totals = await sidecar.ledger.job(164)
    assert totals is not None and totals.requests == 4 and totals.completion_tokens == 8


async def test_engine_dies_mid_stream(sidecar_factory, faulty_upstream) -> None:
    sidecar = await sidecar_factory(faulty_upstream.url)
    received = b""
    async with aiohttp.ClientSession() as client:
        async with client.post(
            sidecar.url + CHAT, json={"model": "fault:die-after-5", "stream": True, "job_id": 9}
        ) as resp:
            assert resp.status == 200
            with pytest.raises(aiohttp.ClientPayloadError):
                async for chunk in resp.content.iter_any():
                    received += chunk
    assert received.count(b'"content": "tok"') == 5
    assert b"[DONE]" not in received
    records = await sidecar.ledger.records(9)
    assert len(records) == 1
    assert records[0].state is RecordState.ABORTED
    assert records[0].completion_tokens == 5
    assert records[0].source is Source.COUNTED
    # The sidecar is still healthy.
    async with aiohttp.ClientSession() as client:
        async with client.post(sidecar.url + CHAT, json={"model": "m", "max_tokens": 1}) as resp:
            assert resp.status == 200


async def test_malformed_sse_is_relayed_as_is_and_counted(
    sidecar_factory, faulty_upstream, caplog
) -> None:
    sidecar = await sidecar_factory(faulty_upstream.url)
    body = {"model": "fault:malformed", "stream": True}
    async with aiohttp.ClientSession() as client:
        async with client.post(faulty_upstream.url + CHAT, json=body) as resp:
            direct = await resp.read()
        async with client.post(sidecar.url + CHAT, json={**body, "job_id": 3}) as resp:
            relayed = await resp.read()
    assert relayed == direct
    totals = await sidecar.ledger.job(3)
    assert totals is not None and totals.completion_tokens == 3
    assert any("malformed" in r.getMessage() for r in caplog.records)


async def test_stream_without_done_is_recorded(sidecar_factory, faulty_upstream) -> None:
    sidecar = await sidecar_factory(faulty_upstream.url)
    async with aiohttp.ClientSession() as client:
        async with client.post(
            sidecar.url + CHAT,
            json={"model": "fault:no-done", "stream": True, "max_tokens": 7, "job_id": 4},
        ) as resp:
            assert b"[DONE]" not in await resp.read()
    [record] = await sidecar.ledger.records(4)
    assert record.completion_tokens == 7 and record.state is RecordState.FINAL


async def test_client_disconnect_cancels_engine_and_keeps_count(
    sidecar_factory, faulty_upstream
) -> None:
    sidecar = await sidecar_factory(faulty_upstream.url)
    seen_tokens = 0
    async with aiohttp.ClientSession() as client:
        resp = await client.post(
            sidecar.url + CHAT, json={"model": "fault:slow", "stream": True, "job_id": 5}
        )
        async for line in resp.content:
            seen_tokens += line.count(b'"content": "tok"')
            if seen_tokens >= 10:
                break
        resp.close()  # the client goes away mid-stream
    for _ in range(200):
        if faulty_upstream.cancelled_streams:
            break
        await asyncio.sleep(0.02)
    assert faulty_upstream.cancelled_streams == 1
    for _ in range(100):
        records = await sidecar.ledger.records(5)
        if records and records[0].state is not RecordState.OPEN:
            break
        await asyncio.sleep(0.02)
    [record] = records
    assert record.state is RecordState.ABORTED
    assert record.completion_tokens >= seen_tokens


async def test_non_stream_without_usage_is_estimated(sidecar_factory, faulty_upstream) -> None:
    sidecar = await sidecar_factory(faulty_upstream.url)
    async with aiohttp.ClientSession() as client:
        async with client.post(
            sidecar.url + CHAT, json={"model": "fault:no-usage", "max_tokens": 6, "job_id": 6}
        ) as resp:
            assert resp.status == 200
            assert "usage" not in await resp.json()
        async with client.post(
            sidecar.url + CHAT, json={"model": "fault:not-json", "job_id": 7}
        ) as resp:
            assert resp.status == 200
            assert await resp.read() == b"<html>oops</html>"
    [estimated] = await sidecar.ledger.records(6)
    assert estimated.source is Source.ESTIMATED and estimated.completion_tokens > 0
    [unusable] = await sidecar.ledger.records(7)
    assert unusable.completion_tokens == 0


@pytest.mark.parametrize("from_file", [False, True], ids=["flag", "file"])
async def test_admin_token_guards_admin_routes_only(
    sidecar_factory, faulty_upstream, tmp_path, from_file: bool
) -> None:
    if from_file:  # --admin-token-file: the token stays out of the command line
        secret = tmp_path / "admin_token"
        secret.write_text("s3cret-token\n")
        sidecar = await sidecar_factory(faulty_upstream.url, admin_token_file=str(secret))
    else:
        sidecar = await sidecar_factory(faulty_upstream.url, admin_token="s3cret-token")
    async with aiohttp.ClientSession() as client:
        async with client.post(
            sidecar.url + CHAT, json={"model": "m", "max_tokens": 4, "job_id": "12"}
        ) as resp:
            assert resp.status == 200
        async with client.get(sidecar.url + "/sidecar/jobs") as resp:
            assert resp.status == 401
            text = await resp.text()
            assert "s3cret" not in text
        async with client.get(
            sidecar.url + "/sidecar/jobs", headers={"Authorization": "Bearer wrong"}
        ) as resp:
            assert resp.status == 401
        auth = {"Authorization": "Bearer s3cret-token"}
        async with client.get(sidecar.url + "/sidecar/jobs", headers=auth) as resp:
            assert resp.status == 200
            jobs = (await resp.json())["jobs"]
            assert [j["job_id"] for j in jobs] == ["12"]
            assert jobs[0]["billable_tokens"] == 4
        async with client.get(sidecar.url + "/sidecar/jobs/12", headers=auth) as resp:
            assert (await resp.json())["completion_tokens"] == 4
        async with client.get(sidecar.url + "/sidecar/jobs/99", headers=auth) as resp:
            assert resp.status == 404
        async with client.get(sidecar.url + "/sidecar/jobs/nope", headers=auth) as resp:
            assert resp.status == 400
        async with client.get(sidecar.url + "/sidecar/nothing", headers=auth) as resp:
            assert resp.status == 404
            assert_openai_error(await resp.json(), "unknown_route")
        async with client.get(sidecar.url + "/sidecar/nothing") as resp:
            assert resp.status == 401
        async with client.get(sidecar.url + "/metrics") as resp:
            assert resp.status == 200
            metrics = await resp.text()
    assert 'sidecar_tokens_total{kind="completion",source="reported"} 4.0' in metrics
    assert "sidecar_streams_in_flight" in metrics
    assert "s3cret" not in metrics


async def test_unmetered_routes_are_relayed(sidecar_factory, faulty_upstream) -> None:
    sidecar = await sidecar_factory(faulty_upstream.url)
    async with aiohttp.ClientSession() as client:
        async with client.get(sidecar.url + "/v1/models") as resp:
            assert resp.status == 200
            assert json.loads(await resp.read())["data"][0]["id"] == "fake"
        async with client.get(sidecar.url + "/nothing/here?x=1") as resp:
            assert resp.status == 404
    assert await sidecar.ledger.jobs() == []


async def test_engine_generation_aliases_are_metered_and_native_routes_refused(
    sidecar_factory, faulty_upstream
) -> None:
    sidecar = await sidecar_factory(faulty_upstream.url)
    async with aiohttp.ClientSession() as client:
        # An engine's alias of an OpenAI route is metered as that route.
        body = {"model": "m", "max_tokens": 3, "job_id": 71}
        async with client.post(sidecar.url + "/chat/completions", json=body) as resp:
            assert resp.status == 200
        # The engine's own formats cannot be metered: refused, never relayed for free.
        for path in ("/completion", "/api/generate", "/generate", "/v1/messages", "/infill"):
            async with client.post(sidecar.url + path, json={"prompt": "x"}) as resp:
                assert resp.status == 403, path
                assert_openai_error(await resp.json(), "unmetered_route")
    assert [r.completion_tokens for r in await sidecar.ledger.records(71)] == [3]
    assert faulty_upstream.requests[-1]["model"] == "m"  # nothing else reached the engine
    relaying = await sidecar_factory(faulty_upstream.url, relay_native_generation=True)
    async with aiohttp.ClientSession() as client:
        async with client.post(relaying.url + "/completion", json={"prompt": "x"}) as resp:
            assert resp.status == 404  # relayed: FaultyUpstream has no such route


async def test_nothing_is_served_unrecorded_when_the_ledger_fails(
    sidecar_factory, faulty_upstream, tmp_path
) -> None:
    """A real SQLite failure (a trigger refusing every insert): a JSON answer becomes a 503, a
    stream is cut before [DONE]; the sidecar itself keeps running."""
    import sqlite3

    ledger_path = tmp_path / "failing.db"
    sidecar = await sidecar_factory(faulty_upstream.url, ledger_path=ledger_path)
    conn = sqlite3.connect(ledger_path)
    conn.execute(
        "CREATE TRIGGER refuse BEFORE INSERT ON usage_records "
        "BEGIN SELECT RAISE(ABORT, 'the disk is gone'); END"
    )
    conn.commit()
    conn.close()
    async with aiohttp.ClientSession() as client:
        async with client.post(sidecar.url + CHAT, json={"model": "m", "job_id": 1}) as resp:
            assert resp.status == 503
            assert_openai_error(await resp.json(), "ledger_unavailable")
        received = b""
        with pytest.raises(aiohttp.ClientPayloadError):
            async with client.post(
                sidecar.url + CHAT,
                json={"model": "m", "stream": True, "max_tokens": 3, "job_id": 1},
            ) as resp:
                async for chunk in resp.content.iter_any():
                    received += chunk
        assert b"[DONE]" not in received
        async with client.get(sidecar.url + "/sidecar/health") as resp:
            assert resp.status == 200
    assert await sidecar.ledger.records(1) == []


async def test_both_health_routes_mean_the_same_by_healthy(
    sidecar_factory, faulty_upstream
) -> None:
    """/sidecar/health and the node API's /health make one probe of the engine: healthy is a 200
    with a model list. An engine that answers /v1/models with a 404 is reachable, not healthy."""
    sidecar = await sidecar_factory(faulty_upstream.url)
    async with aiohttp.ClientSession() as client:
        async with client.get(sidecar.url + "/sidecar/health") as resp:
            admin = await resp.json()
        async with client.get(sidecar.url + "/health") as resp:
            node_status, node = resp.status, await resp.json()
        assert admin["status"] == "ok" and admin["upstream"]["models"] == ["fake"]
        assert node_status == 200 and node["status"] == "healthy"
        faulty_upstream.models_status = 404
        async with client.get(sidecar.url + "/sidecar/health") as resp:
            admin = await resp.json()
        async with client.get(sidecar.url + "/health") as resp:
            node_status, node = resp.status, await resp.json()
    assert admin["status"] == "degraded"
    assert admin["upstream"]["reachable"] is True and admin["upstream"]["status"] == 404
    assert node_status == 503 and node["status"] == "degraded" and node["healthy"] is False
    assert node["issues"] == ["the engine's /v1/models answered 404 without a model list"]
