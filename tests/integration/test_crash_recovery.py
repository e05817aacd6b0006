"""``kill -9`` of the sidecar process during streams, then a restart on the same ledger.

Finished responses must all be in the ledger with exact counts; unfinished streams within the
progress bound (64 tokens or one second of tokens); the ledger must open cleanly. The engine is
FaultyUpstream (a fake), because the test needs streams that stay open on cue.
"""

from __future__ import annotations

import asyncio
import sqlite3

import aiohttp
import pytest

from sidecar.ledger import RecordState, open_ledger
from tests.support.sidecar import SidecarProcess

pytestmark = pytest.mark.integration

CHAT = "/v1/chat/completions"
SLOW_TOKENS_PER_SECOND = 50  # FaultyUpstream's fault:slow sends a chunk every 20 ms


async def test_kill_9_loses_nothing_finished(faulty_upstream, tmp_path) -> None:
    ledger_path = tmp_path / "ledger.db"
    proc = SidecarProcess(faulty_upstream.url, ledger_path, tmp_path / "sidecar.log")
    try:
        await proc.wait_ready()
        seen_slow: dict[int, int] = {}

        async with aiohttp.ClientSession() as http:

            async def finished(i: int) -> int:
                body = {
                    "model": "m",
                    "max_tokens": 5 + i,
                    "job_id": 1000 + i % 3,
                    "stream": i % 2 == 0,
                }
                async with http.post(proc.url + CHAT, json=body) as resp:
                    payload = await resp.read()
                    assert resp.status == 200
                    if body["stream"]:
                        assert payload.endswith(b"data: [DONE]\n\n")
                return 5 + i

            async def slow(job: int) -> None:
                resp = await http.post(
                    proc.url + CHAT, json={"model": "fault:slow", "stream": True, "job_id": job}
                )
                seen_slow[job] = 0
                async for line in resp.content:
                    seen_slow[job] += line.count(b'"content": "tok"')

            slow_tasks = [asyncio.create_task(slow(job)) for job in (2001, 2002, 2003)]
            done = await asyncio.gather(*(finished(i) for i in range(20)))
            while min(seen_slow.values(), default=0) < 120:
                await asyncio.sleep(0.05)
            proc.kill9()
            for task in slow_tasks:
                with pytest.raises(aiohttp.ClientError):
                    await task
    finally:
        proc.stop()

    conn = sqlite3.connect(ledger_path)
    assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    conn.close()

    restarted = SidecarProcess(faulty_upstream.url, ledger_path, tmp_path / "sidecar2.log")
    try:
        await restarted.wait_ready()
    finally:
        assert restarted.stop() == 0

    ledger = open_ledger(f"sqlite:///{ledger_path}")
    await ledger.open()
    try:
        for job in (1000, 1001, 1002):
            totals = await ledger.job(job)
            assert totals is not None
            assert totals.completion_tokens == sum(
                n for i, n in enumerate(done) if i % 3 == job - 1000
            )
            assert totals.open_requests == 0
        bound = max(64, SLOW_TOKENS_PER_SECOND)
        for job, seen in seen_slow.items():
            [record] = await ledger.records(job)
            # The restart closed the interrupted stream's record with what was persisted.
            assert record.state is RecordState.ABORTED
            assert seen - bound <= record.completion_tokens <= seen + bound, (job, seen, record)
    finally:
        await ledger.close()
