"""The sidecar's wall clock jumps forward and backward under mixed traffic, with claims on anvil.

libfaketime (Debian's ``faketime`` package) is preloaded into the sidecar process only; its
offset is read from a file on every clock call (``FAKETIME_NO_CACHE=1``), so the test moves the
process's wall clock while it serves: hours and days forward, then back past where it started.
The monotonic clock is left alone (``FAKETIME_DONT_FAKE_MONOTONIC=1``), as on a host whose NTP
steps the clock. Midway the process is killed with SIGKILL and restarted under a clock a day
behind. Every invariant must hold, claims included (their clock is the chain's).
"""

from __future__ import annotations

import asyncio
import os
import random
import time
from pathlib import Path
from unittest import mock

import pytest

from tests.faults import harness
from tests.faults.campaign import SEED, TALLY
from tests.faults.invariants import (
    Checks,
    check_chain,
    check_responses,
    read_ledger,
    wait_caught_up,
)
from tests.support.sidecar import SidecarProcess

LIBFAKETIME = Path("/usr/lib/x86_64-linux-gnu/faketime/libfaketimeMT.so.1")

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(
        not LIBFAKETIME.exists(),
        reason=f"libfaketime is not installed ({LIBFAKETIME}): apt-get install faketime",
    ),
]
# (offset of the sidecar's wall clock, seconds held); "kill" kills and restarts the process
JUMPS = (
    ("+0", 1.5),
    ("+2h", 1.5),
    ("-1h", 1.5),  # three hours back
    ("+30d", 1.5),
    ("-1d", 1.0),
    ("kill", 0.0),  # restarted a day behind
    ("-1d", 1.5),
    ("+0", 1.5),
    ("-10m", 1.5),
    ("+0", 1.5),
)


@pytest.mark.timeout(300)
async def test_clock_jumps(llama_server, devnet, tmp_path) -> None:
    family = TALLY.family("clock jump")
    started = time.monotonic()
    rng = random.Random(f"{SEED}-clock")
    deployment = devnet.deploy("v1", dispute_window=30)
    jobs = harness.new_jobs(devnet, deployment, 6)
    key_file = devnet.write_host_key_file(tmp_path / "host.key")
    ledger_path = tmp_path / "ledger.db"
    read = harness.chain_reader(devnet, deployment)
    clock = tmp_path / "faketime"
    clock.write_text("+0\n")
    fake = {
        "LD_PRELOAD": str(LIBFAKETIME),
        "FAKETIME_TIMESTAMP_FILE": str(clock),
        "FAKETIME_NO_CACHE": "1",
        "FAKETIME_DONT_FAKE_MONOTONIC": "1",
    }
    flags = harness.chain_flags(devnet, deployment, key_file)

    def start(n: int) -> SidecarProcess:
        with mock.patch.dict(os.environ, fake):  # the child's environment only
            return SidecarProcess(
                llama_server.base_url, ledger_path, tmp_path / f"sidecar-{n}.log", *flags
            )

    checks = Checks()
    proc = start(0)
    restarts = 0
    try:
        await proc.wait_ready(timeout=60)
        _, traffic, task = harness.endless_traffic(
            proc.url, devnet, jobs, llama_server.model_id, rng, short=True
        )
        for offset, hold in JUMPS:
            if offset == "kill":
                proc.kill9()
                proc.stop()
                restarts += 1
                proc = start(restarts)
                await proc.wait_ready(timeout=60)
                traffic.url = proc.url
                family.count("kill -9 under a jumped clock")
                continue
            clock.write_text(offset + "\n")
            family.count("clock jumps")
            # Chain time lets the backlog be claimed now, under this clock: the claims commit
            # to records whose start times the next jump puts out of order.
            harness.let_time_pass(devnet, ledger_path, deployment, jobs)
            await asyncio.sleep(hold)
        traffic.stop.set()
        seen = await asyncio.wait_for(task, 120)
        clock.write_text("+0\n")
        await asyncio.sleep(0.5)  # records of streams cut by the stop: written unawaited

        ledger, onchain, _ = await wait_caught_up(
            ledger_path, read, jobs, timeout=120, nudge=harness.time_nudge(devnet)
        )
        responses, counters = check_responses(ledger, seen, set(), streams_over=True)
        checks.extend(responses)
        checks.extend(check_chain(ledger, onchain, quiescent=True))
        checks.extend(await harness.settle_all(proc.url, ledger_path, devnet, deployment, jobs))
        for name, n in counters.items():
            family.count(name, n)
        family.count("responses finished", sum(s.finished for s in seen))
        times = sorted(r.started_ms for r in read_ledger(ledger_path).records.values())
        family.notes.append(
            f"records' start times span {(times[-1] - times[0]) / 3_600_000:.0f} h of wall clock"
        )
    finally:
        code = proc.stop()
        family.seconds += time.monotonic() - started
    found = family.trial(checks, trials=len(JUMPS))
    for v in found:
        print(f"VIOLATION {v.name}: {v.detail}")
    assert code == 0, proc.log_tail()
    assert not found, "\n".join(f"{v.name}: {v.detail}" for v in found[:30])


async def test_claims_stay_auditable_under_concurrent_requests(
    faulty_upstream, devnet, sidecar_factory, tmp_path
) -> None:
    """The same invariant without any clock jump: a stream of the job runs while a claim is made.

    A claim commits to the job's records in the ledger's order (their start times) with their
    billable tokens at that moment, the running stream's persisted progress included. The
    stream started before the JSON answer the claim covers and ends after the claim, with
    another count (or, left out, sorting before the answer): the claim's records root can no
    longer be recomputed from the ledger. (On llama-cpp-python, which runs one request at a
    time, this needs a stream beside short answers; an engine that batches does it in normal
    service.)"""
    import aiohttp

    from tests.integration.test_chain_e2e import chain_options

    family = TALLY.family("claim order")
    started = time.monotonic()
    deployment = devnet.deploy("v1", dispute_window=30)
    [job] = harness.new_jobs(devnet, deployment, 1)
    key_file = devnet.write_host_key_file(tmp_path / "host.key")
    ledger_path = tmp_path / "order.db"
    sidecar = await sidecar_factory(
        faulty_upstream.url,
        ledger_path=ledger_path,
        **chain_options(devnet, deployment, key_file),
    )
    devnet.increase_time(60)  # the rate cap allows the claim below at once
    devnet.mine()
    read = harness.chain_reader(devnet, deployment)
    seen_slow = 0
    async with aiohttp.ClientSession() as http:
        slow = await http.post(
            sidecar.url + "/v1/chat/completions",
            json={"model": "fault:slow", "stream": True, "job_id": job, "messages": []},
        )
        key = slow.headers["X-Sidecar-Request-Id"]
        async for line in slow.content:
            seen_slow += line.count(b'"content": "tok"')
            if seen_slow >= 5:
                break
        async with http.post(
            sidecar.url + "/v1/chat/completions",
            json={"model": "m", "max_tokens": 150, "job_id": job, "messages": []},
        ) as answer:
            assert answer.status == 200

        async def claimed() -> bool:
            return any(c.state == "confirmed" for c in read_ledger(ledger_path).claims)

        for _ in range(400):
            if await claimed():
                break
            await asyncio.sleep(0.05)
        slow.close()  # the stream ends after the claim: its record comes last, sorts first
    await asyncio.sleep(0.5)
    ledger, onchain = read_ledger(ledger_path), {job: read(job)}
    assert ledger.records[key].state == "aborted"
    checks = check_chain(ledger, onchain, quiescent=False)
    found = family.trial(checks)
    family.seconds += time.monotonic() - started
    for v in found:
        print(f"VIOLATION {v.name}: {v.detail}")
    assert not found, "\n".join(f"{v.name}: {v.detail}" for v in found)
