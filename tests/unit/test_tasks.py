"""stop_task: a background task that swallows a cancellation is still stopped."""

from __future__ import annotations

import asyncio

from sidecar.tasks import stop_task


async def test_a_task_that_swallows_one_cancel_is_stopped_all_the_same() -> None:
    swallowed = []

    async def stubborn() -> None:
        while True:
            try:
                await asyncio.sleep(10)
            except asyncio.CancelledError:
                if swallowed:
                    raise
                swallowed.append(True)  # as a timeout racing the cancel turns it into "no answer"

    task = asyncio.create_task(stubborn())
    await asyncio.sleep(0)
    await asyncio.wait_for(stop_task(task), 5)
    assert task.cancelled() and swallowed == [True]


async def test_a_finished_task_is_left_as_it_is() -> None:
    task = asyncio.create_task(asyncio.sleep(0))
    await task
    await stop_task(task)
    assert task.done() and not task.cancelled()
