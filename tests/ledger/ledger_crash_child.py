"""Child process of the crash test: writes records forever, printing each one once durable.

Usage: python ledger_crash_child.py LEDGER_PATH. Prints ``<state> <key>`` only after the
record's future resolved, so every printed line is a promise the parent checks after a kill -9.
"""

from __future__ import annotations

import asyncio
import sys
import time

from sidecar.ledger import RecordState, UsageRecord
from sidecar.ledger.sqlite import SQLiteLedger
from sidecar.metering.types import Source

WORKERS = 16


def record(key: str, job_id: int, state: RecordState, completion: int) -> UsageRecord:
    now = int(time.time() * 1000)
    return UsageRecord(
        key=key,
        job_id=job_id,
        endpoint="chat",
        model="tiny",
        prompt_tokens=5,
        completion_tokens=completion,
        billable_tokens=5 + completion,
        source=Source.COUNTED,
        state=state,
        status=200,
        started_ms=now,
        updated_ms=now,
    )


async def worker(ledger: SQLiteLedger, number: int) -> None:
    job_id = 2**256 - 1 - number
    sequence = 0
    while True:
        key = f"w{number}-{sequence}"
        # A progress record, then the final one, as the proxy writes a streamed response.
        await ledger.submit(record(key, job_id, RecordState.OPEN, 1))
        print(f"open {key}", flush=True)
        await ledger.submit(record(key, job_id, RecordState.FINAL, 2))
        print(f"final {key}", flush=True)
        sequence += 1


async def main(path: str) -> None:
    ledger = SQLiteLedger(path)
    await ledger.open()
    print("ready", flush=True)
    await asyncio.gather(*(worker(ledger, n) for n in range(WORKERS)))


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))
