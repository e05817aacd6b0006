"""The bounds on what a client or an engine can make the sidecar hold or wait for.

The engine is FaultyUpstream (a fake, for faults on cue); the sidecar, its ledger and the
sockets are the real ones. The endless-line test runs the sidecar as a process, to read its
peak memory from /proc.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import aiohttp
import pytest

from sidecar.ledger import RecordState
from tests.integration.test_proxy_faults import assert_openai_error
from tests.support.sidecar import SidecarProcess

pytestmark = pytest.mark.integration

CHAT = "/v1/chat/completions"


def peak_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM in /proc status")


async def test_an_endless_line_is_relayed_in_bounded_memory(faulty_upstream, tmp_path) -> None:
    proc = SidecarProcess(faulty_upstream.url, tmp_path / "ledger.db", tmp_path / "sidecar.log")
    try:
        await proc.wait_ready()
        async with aiohttp.ClientSession() as http:
            # Warm up (first stream, first imports), then read the peak before the long line.
            async with http.post(proc.url + CHAT, json={"model": "m", "stream": True}) as resp:
                await resp.read()
            before = peak_rss_kib(proc.proc.pid)
            body = {"model": "fault:long-line-64", "stream": True, "job_id": 31}
            received = 0
            async with http.post(proc.url + CHAT, json=body) as resp:
                assert resp.status == 200
                async for chunk in resp.content.iter_any():
                    received += len(chunk)
                    last = chunk
            after = peak_rss_kib(proc.proc.pid)
            async with http.get(proc.url + "/sidecar/jobs/31") as resp:
                job = await resp.json()
    finally:
        proc.stop()
    assert received > 64 * 1024 * 1024  # every byte of the line reached the client
    assert last.endswith(b"data: [DONE]\n\n")
    assert (after - before) < 64 * 1024, f"peak memory grew by {(after - before) // 1024} MiB"
    assert job["billable_tokens"] == 2  # the chunks around the line; the line is not metered
    assert "longer than 1048576 bytes was relayed but not metered" in proc.log_tail()


async def test_an_engine_that_never_answers_is_a_504(sidecar_factory, faulty_upstream) -> None:
    sidecar = await sidecar_factory(faulty_upstream.url, upstream_first_byte_timeout=1)
    async with aiohttp.ClientSession() as http:
        async with http.post(sidecar.url + CHAT, json={"model": "fault:hang", "job_id": 4}) as r:
            assert r.status == 504
            message = assert_openai_error(await r.json(), "upstream_timeout")
    assert "within 1 s" in message
    assert await sidecar.ledger.records(4) == []  # nothing was served


async def test_a_stalled_stream_is_cut_and_its_tokens_recorded(
    sidecar_factory, faulty_upstream
) -> None:
    sidecar = await sidecar_factory(faulty_upstream.url, upstream_idle_timeout=1)
    body = {"model": "fault:stall-after-7", "stream": True, "job_id": 5}
    received = b""
    async with aiohttp.ClientSession() as http:
        async with http.post(sidecar.url + CHAT, json=body) as resp:
            assert resp.status == 200
            with pytest.raises(aiohttp.ClientPayloadError):
                async for chunk in resp.content.iter_any():
                    received += chunk
    assert received.count(b'"content": "tok"') == 7
    [record] = await sidecar.ledger.records(5)
    assert record.state is RecordState.ABORTED and record.completion_tokens == 7


async def test_streams_per_job_are_bounded(sidecar_factory, faulty_upstream) -> None:
    sidecar = await sidecar_factory(faulty_upstream.url, max_streams_per_job=2)
    slow = {"model": "fault:slow", "stream": True, "job_id": 6}
    async with aiohttp.ClientSession() as http:
        first = await http.post(sidecar.url + CHAT, json=slow)
        second = await http.post(sidecar.url + CHAT, json=slow)
        assert first.status == second.status == 200
        async with http.post(sidecar.url + CHAT, json=slow) as third:
            assert third.status == 429
            assert_openai_error(await third.json(), "too_many_streams")
        # Other jobs and non-stream requests of the job are not affected.
        async with http.post(sidecar.url + CHAT, json={**slow, "job_id": 7}) as other:
            assert other.status == 200
            await other.content.readany()
        async with http.post(sidecar.url + CHAT, json={"model": "m", "job_id": 6}) as plain:
            assert plain.status == 200
        first.close()
        for _ in range(100):  # the slot comes back once the stream's end is recorded
            await asyncio.sleep(0.05)
            async with http.post(sidecar.url + CHAT, json=slow) as again:
                if again.status == 200:
                    await again.content.readany()
                    break
        else:
            raise AssertionError("the job's stream slot never came back")
        second.close()


async def test_open_connections_are_bounded(sidecar_factory, faulty_upstream) -> None:
    sidecar = await sidecar_factory(faulty_upstream.url, max_connections=3)
    host, port = sidecar.url.removeprefix("http://").split(":")
    idle = [await asyncio.open_connection(host, int(port)) for _ in range(3)]
    try:
        reader, writer = await asyncio.open_connection(host, int(port))
        answer = await asyncio.wait_for(reader.read(), 5)  # answered, then closed
        writer.close()
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 503")
        assert json.loads(body)["error"]["code"] == "too_many_connections"
    finally:
        for _, w in idle:
            w.close()
    for _ in range(100):  # the slots come back when the idle connections close
        await asyncio.sleep(0.05)
        async with aiohttp.ClientSession() as http:
            try:
                async with http.get(sidecar.url + "/sidecar/live") as resp:
                    if resp.status == 200:
                        break
            except aiohttp.ClientError:
                continue
    else:
        raise AssertionError("connections were never accepted again")
    async with aiohttp.ClientSession() as http:
        async with http.get(sidecar.url + "/metrics") as resp:
            metrics = await resp.text()
    assert 'sidecar_rejected_requests_total{reason="too_many_connections"} 1.0' in metrics


async def test_a_websocket_flood_is_dropped_and_told(sidecar_factory, faulty_upstream) -> None:
    sidecar = await sidecar_factory(faulty_upstream.url, ws_messages_per_second=2)
    async with aiohttp.ClientSession() as http:
        async with http.ws_connect(sidecar.url + "/v1/ws") as ws:
            assert (await ws.receive_json())["type"] == "connected"
            for _ in range(50):
                await ws.send_str(json.dumps({"type": "nonsense"}))
            replies = []
            while True:
                try:
                    replies.append(await ws.receive_json(timeout=1))
                except TimeoutError:
                    break
            codes = [r.get("code") for r in replies]
            # The burst (4) is answered; the rest dropped unread, the client told once.
            assert codes.count("unknown_message_type") == 4
            assert codes.count("RATE_LIMITED") == 1
            await asyncio.sleep(1.0)  # the bucket refills: the socket works again
            await ws.send_str(json.dumps({"type": "nonsense"}))
            assert (await ws.receive_json(timeout=5))["code"] == "unknown_message_type"


async def test_a_websocket_message_over_the_bound_closes_with_1009(
    sidecar_factory, faulty_upstream
) -> None:
    sidecar = await sidecar_factory(faulty_upstream.url, ws_max_message_bytes=1000)
    async with aiohttp.ClientSession() as http:
        async with http.ws_connect(sidecar.url + "/v1/ws") as ws:
            assert (await ws.receive_json())["type"] == "connected"
            await ws.send_str(json.dumps({"type": "prompt", "prompt": "x" * 2000}))
            msg = await ws.receive(timeout=5)
            assert msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
            assert ws.close_code == 1009
