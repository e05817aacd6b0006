"""A response's usage record is committed before its last byte reaches the client.

The ledger's commit is slowed down on purpose; the client notes when it sees the end of the
response. If the proxy sent ``[DONE]`` (or the JSON body) before the commit finished, the client's
moment would come first. Engine: FaultyUpstream (fake), ledger: the real SQLite one.
"""

from __future__ import annotations

import asyncio
import time

import aiohttp

from sidecar.ledger import RecordState

CHAT = "/v1/chat/completions"
COMMIT_DELAY = 0.3


def slow_commits(ledger, committed: dict[str, float]) -> None:
    """Delay every final commit's acknowledgement and note when it was acknowledged."""
    original = ledger.submit
    tasks: set[asyncio.Task] = set()

    def submit(record):
        inner = original(record)
        if record.state is RecordState.OPEN:
            return inner
        loop = asyncio.get_running_loop()
        outer = loop.create_future()

        async def later() -> None:
            await inner
            await asyncio.sleep(COMMIT_DELAY)
            committed[record.key] = time.monotonic()
            outer.set_result(None)

        task = loop.create_task(later())
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        return outer

    ledger.submit = submit


async def test_done_and_json_body_wait_for_the_commit(sidecar_factory, faulty_upstream) -> None:
    sidecar = await sidecar_factory(faulty_upstream.url)
    committed: dict[str, float] = {}
    slow_commits(sidecar.ledger, committed)
    async with aiohttp.ClientSession() as client:
        async with client.post(
            sidecar.url + CHAT, json={"model": "m", "stream": True, "max_tokens": 3, "job_id": 1}
        ) as resp:
            key = resp.headers["X-Sidecar-Request-Id"]
            async for line in resp.content:
                if line.startswith(b"data: [DONE]"):
                    done_seen = time.monotonic()
        assert key in committed and committed[key] <= done_seen

        async with client.post(
            sidecar.url + CHAT, json={"model": "m", "max_tokens": 3, "job_id": 1}
        ) as resp:
            await resp.read()
            body_seen = time.monotonic()
            key = resp.headers["X-Sidecar-Request-Id"]
        assert key in committed and committed[key] <= body_seen
    [stream, body] = await sidecar.ledger.records(1)
    assert stream.state is body.state is RecordState.FINAL
