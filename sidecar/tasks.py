"""Stopping a background task for certain.

``task.cancel()`` asks once, and a library may swallow that one request: aiohttp's and
asyncio's timeouts turn a cancellation that races their own deadline into a ``TimeoutError``,
which a probe then catches as "no answer". A task stopped that way runs on, and whoever awaited
it (a shutdown) waits forever. :func:`stop_task` asks again until the task has ended.
"""

from __future__ import annotations

import asyncio

RETRY_SECONDS = 1.0


async def stop_task(task: asyncio.Task[None]) -> None:
    while not task.done():
        task.cancel()
        await asyncio.wait({task}, timeout=RETRY_SECONDS)
    if not task.cancelled():
        error = task.exception()
        if error is not None:
            raise error
