"""Running a sidecar as an operator does: probes, SIGTERM during streams, JSON logs, backups.

The SIGTERM test uses FaultyUpstream (a fake) for streams that stay open until cut; the probes
run against the real llama-cpp-python server."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time

import aiohttp
import pytest

from sidecar.ledger import RecordState, UsageRecord, open_ledger
from sidecar.metering import Source
from tests.support.sidecar import REPO, SidecarProcess, free_port

pytestmark = pytest.mark.integration

CHAT = "/v1/chat/completions"
GRACE = 2


async def test_sigterm_lets_short_streams_finish_cuts_long_ones_with_counts_and_exits_0(
    faulty_upstream, tmp_path
) -> None:
    ledger_path = tmp_path / "ledger.db"
    proc = SidecarProcess(
        faulty_upstream.url,
        ledger_path,
        tmp_path / "sidecar.log",
        "--shutdown-grace",
        str(GRACE),
        "--log-format",
        "json",
    )
    seen: dict[int, int] = {}
    try:
        await proc.wait_ready()
        async with aiohttp.ClientSession() as http:

            async def endless(job: int) -> None:
                body = {"model": "fault:slow", "stream": True, "job_id": job}
                seen[job] = 0
                try:
                    async with http.post(proc.url + CHAT, json=body) as resp:
                        async for line in resp.content:
                            seen[job] += line.count(b'"content": "tok"')
                except aiohttp.ClientError:
                    pass  # cut at the end of the grace period

            streams = [asyncio.create_task(endless(job)) for job in (31, 32, 33)]
            while min(seen.values(), default=0) < 10:
                await asyncio.sleep(0.02)
            stopped_at = time.monotonic()
            proc.proc.send_signal(signal.SIGTERM)
            await asyncio.wait_for(asyncio.gather(*streams), timeout=GRACE + 20)
            code = await asyncio.to_thread(proc.proc.wait, GRACE + 20)
            took = time.monotonic() - stopped_at
    finally:
        proc.stop()
    assert code == 0
    assert took < GRACE + 15, took  # the grace period, then a bounded cleanup
    ledger = open_ledger(f"sqlite:///{ledger_path}")
    await ledger.open()
    try:
        for job, received in seen.items():
            [record] = await ledger.records(job)
            # Cut, not lost: every token the client read is in the ledger (relayed >= read).
            assert record.state is RecordState.ABORTED
            assert record.completion_tokens >= received > 0
    finally:
        await ledger.close()
    lines = [json.loads(line) for line in proc.log_path.read_text().splitlines() if line]
    assert any("stopping" in line["message"] for line in lines)
    assert {"ts", "level", "logger", "message"} <= set(lines[0])


async def test_live_and_ready_probes(llama_server, tmp_path) -> None:
    up = SidecarProcess(llama_server.base_url, tmp_path / "a.db", tmp_path / "a.log")
    down = SidecarProcess(f"http://127.0.0.1:{free_port()}", tmp_path / "b.db", tmp_path / "b.log")
    try:
        await up.wait_ready()
        await down.wait_ready()
        async with aiohttp.ClientSession() as http:
            async with http.get(up.url + "/sidecar/ready") as resp:
                body = await resp.json()
                assert resp.status == 200, body
                assert body == {"status": "ready", "checks": {"ledger": "ok", "engine": "ok"}}
            async with http.get(down.url + "/sidecar/live") as resp:
                assert resp.status == 200
            async with http.get(down.url + "/sidecar/ready") as resp:
                body = await resp.json()
                assert resp.status == 503
                assert body["checks"]["engine"] == "unreachable"
    finally:
        assert up.stop() == 0
        assert down.stop() == 0


def _record(key: str, job: int, tokens: int) -> UsageRecord:
    return UsageRecord(
        key, job, "chat", "tiny", 1, tokens, tokens, Source.REPORTED, RecordState.FINAL, 200, 1, 2
    )


def _sidecar(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sidecar", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={"PATH": "/usr/bin:/bin", "HOME": str(REPO)},
        timeout=60,
    )


async def test_ledger_backup_is_a_consistent_copy_taken_while_writing(tmp_path) -> None:
    source = tmp_path / "ledger.db"
    ledger = open_ledger(f"sqlite:///{source}")
    await ledger.open()
    try:
        for n in range(50):
            await ledger.write(_record(f"k{n}", 7 + n % 2, n))
        writing = asyncio.gather(*(ledger.submit(_record(f"w{n}", 9, 1)) for n in range(500)))
        done = await asyncio.to_thread(
            _sidecar,
            "ledger",
            "backup",
            str(tmp_path / "copy.db"),
            "--ledger",
            f"sqlite:///{source}",
        )
        await writing
    finally:
        await ledger.close()
    assert done.returncode == 0, done.stderr
    copy = open_ledger(f"sqlite:///{tmp_path / 'copy.db'}")
    await copy.open()
    try:
        assert [await copy.job_tokens(job) for job in (7, 8)] == [
            sum(range(0, 50, 2)),
            sum(range(1, 50, 2)),
        ]
        assert 0 <= await copy.job_tokens(9) <= 500  # a snapshot: all, some or none of the burst
    finally:
        await copy.close()


def test_postgres_backup_gives_pg_dump_advice_without_the_password() -> None:
    done = _sidecar("ledger", "backup", "x.dump", "--ledger", "postgresql://u:hunter2@db/ledger")
    assert done.returncode == 2
    assert "pg_dump" in done.stderr and "hunter2" not in done.stderr + done.stdout
