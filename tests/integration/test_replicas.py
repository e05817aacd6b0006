"""Three sidecar processes on one PostgreSQL ledger in front of the real engine, with anvil and
the JobMarketplace doubles: concurrent requests for the same job through all three add up
exactly, exactly one replica sends the host's transactions, and when that one is killed with -9
another takes over from the outbox: every metered token is claimed once, none twice."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import pytest

from devtools.demo_market import chain_flags
from sidecar.ledger import ClaimKind, ClaimState
from sidecar.ledger.postgres import PostgresLedger
from tests.support.sidecar import SidecarProcess

pytestmark = pytest.mark.integration

TAKEOVER = 3  # --submitter-takeover, seconds
CHECKPOINT = 100


async def complete(http: aiohttp.ClientSession, url: str, job: int, n: int, stream: bool) -> int:
    body = {"model": "tiny", "prompt": "tell me", "max_tokens": n, "job_id": job}
    if stream:
        body |= {"stream": True, "stream_options": {"include_usage": True}}
    async with http.post(url + "/v1/completions", json=body) as resp:
        assert resp.status == 200, await resp.text()
        await resp.read()
    return n


async def submitters(replicas: list[SidecarProcess]) -> list[int]:
    """Which replicas say they hold the submitter lease (their readiness probe tells)."""
    held = []
    async with aiohttp.ClientSession() as http:
        for index, replica in enumerate(replicas):
            if replica.proc.poll() is not None:
                continue
            async with http.get(replica.url + "/sidecar/ready") as resp:
                if (await resp.json())["checks"].get("submitter"):
                    held.append(index)
    return held


async def test_three_replicas_meter_exactly_and_one_claims_even_after_a_kill_9(
    llama_server, devnet, postgres, tmp_path
) -> None:
    deployment = devnet.deploy("v1", dispute_window=30)
    job = devnet.create_session_job(deployment)
    devnet.increase_time(3600)  # the rate cap allows far more than this test serves
    devnet.mine()
    key_file = devnet.write_host_key_file(tmp_path / "host.key")
    url = postgres.new_database()
    flags = [
        *chain_flags(devnet, deployment, key_file),
        "--session-auth",
        "none",
        "--submitter-takeover",
        str(TAKEOVER),
        "--checkpoint-tokens",
        str(CHECKPOINT),
    ]
    replicas = [
        SidecarProcess(llama_server.base_url, url, tmp_path / f"replica{n}.log", *flags)
        for n in range(3)
    ]
    ledger = PostgresLedger(url)
    try:
        for replica in replicas:
            await replica.wait_ready(60)
        await ledger.open()
        assert len(await submitters(replicas)) == 1  # one sender per host key

        async with aiohttp.ClientSession() as http:
            served = sum(
                await asyncio.gather(
                    *(
                        complete(http, replicas[n % 3].url, job, 10 + n % 7, n % 2 == 0)
                        for n in range(24)
                    )
                )
            )
            assert await ledger.job_tokens(job) == served  # exact, across three writers

            # Kill the submitter while it claims, serve more through the others.
            [leader] = await submitters(replicas)
            deadline = time.monotonic() + 30
            while not await ledger.claims(job) and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            replicas[leader].kill9()
            killed_at = time.monotonic()
            survivors = [r for n, r in enumerate(replicas) if n != leader]
            served += sum(
                await asyncio.gather(
                    *(complete(http, survivors[n % 2].url, job, 12, n % 2 == 1) for n in range(12))
                )
            )
        assert await ledger.job_tokens(job) == served

        while not await submitters(replicas):
            assert time.monotonic() - killed_at < TAKEOVER + 15, "no replica took over"
            await asyncio.sleep(0.1)
        assert len(await submitters(replicas)) == 1

        async def claimed_on_chain() -> int:
            return int(devnet.session_job(deployment, job)["tokensUsed"])

        deadline = time.monotonic() + 60
        while served - await claimed_on_chain() >= CHECKPOINT:
            assert time.monotonic() < deadline, (await claimed_on_chain(), served)
            await asyncio.sleep(0.2)
        await asyncio.sleep(2)  # nothing more goes out for the same tokens
        proofs = [c for c in await ledger.claims(job) if c.kind is ClaimKind.PROOF]
        assert all(c.state is ClaimState.CONFIRMED for c in proofs), proofs
        # Contiguous, disjoint ranges from 0: each metered token claimed at most once...
        assert [c.first_token for c in proofs] == [0, *[c.end_token for c in proofs[:-1]]]
        on_chain = await claimed_on_chain()
        assert sum(c.tokens for c in proofs) == on_chain <= served
        # ...and none left behind beyond what waits for the next checkpoint.
        assert served - on_chain < CHECKPOINT
    finally:
        await ledger.close()
        for replica in replicas:
            replica.stop()
