"""A long stream is claimed while it runs, from its persisted progress: a session never goes
unproven for the contract's timeout because one stream has not ended yet.

Real anvil with the v1 double; the engine is FaultyUpstream's ``fault:slow`` (a fake: the real
engine cannot be made to stream for as long as a test needs on cue).
"""

from __future__ import annotations

import asyncio

import aiohttp
import pytest

from sidecar.chain.proofs import GENESIS, ClaimProof, pieces_root
from sidecar.ledger import ClaimKind, ClaimState, RecordState
from tests.integration.test_chain_e2e import chain_options, wait_for

pytestmark = pytest.mark.integration

CHAT = "/v1/chat/completions"


async def test_an_open_stream_is_claimed_while_it_runs(
    faulty_upstream, devnet, sidecar_factory, tmp_path
) -> None:
    deployment = devnet.deploy("v1", dispute_window=30)
    job = devnet.create_session_job(deployment)
    key_file = devnet.write_host_key_file(tmp_path / "host.key")
    sidecar = await sidecar_factory(
        faulty_upstream.url, **chain_options(devnet, deployment, key_file), checkpoint_tokens=100
    )
    devnet.increase_time(60)  # the rate cap allows the claims
    devnet.mine()

    async def confirmed() -> int:
        claims = await sidecar.ledger.claims(job)
        return sum(
            c.tokens
            for c in claims
            if c.kind is ClaimKind.PROOF and c.state is ClaimState.CONFIRMED
        )

    seen = 0
    async with aiohttp.ClientSession() as http:
        body = {"model": "fault:slow", "stream": True, "job_id": job}
        async with http.post(sidecar.url + CHAT, json=body) as resp:
            assert resp.status == 200

            async def read() -> None:
                nonlocal seen
                async for line in resp.content:
                    seen += line.count(b'"content": "tok"')

            reader = asyncio.create_task(read())
            claimed_while_open = await wait_for(confirmed, timeout=60, what="a claim mid-stream")
            [record] = await sidecar.ledger.records(job)
            assert record.state is RecordState.OPEN  # the stream is still running
            assert claimed_while_open >= 100
            assert devnet.session_job(deployment, job)["tokensUsed"] == claimed_while_open
            reader.cancel()
    [record] = await sidecar.ledger.records(job)
    await wait_for(
        lambda: _is_closed(sidecar, job), timeout=10, what="the stream's record to close"
    )
    [record] = await sidecar.ledger.records(job)
    assert record.completion_tokens >= claimed_while_open  # never more claimed than served
    assert record.completion_tokens <= seen + 64
    on_chain = devnet.session_job(deployment, job)["tokensUsed"]
    assert on_chain == await confirmed() <= record.billable_tokens
    # Auditable though the record grew after it was claimed: each claim's root is its pieces
    # chained from the previous one's, and the pieces of the stream's record add up to at most
    # its final count.
    root = GENESIS
    committed = 0
    for claim in await sidecar.ledger.claims(job):
        if claim.kind is not ClaimKind.PROOF or claim.state is not ClaimState.CONFIRMED:
            continue
        assert claim.pieces is not None and {key for key, _ in claim.pieces} == {record.key}
        root = pieces_root(root, claim.pieces)
        assert ClaimProof.from_payload(claim.payload).records_root == root
        committed += sum(tokens for _, tokens in claim.pieces)
    assert committed == on_chain <= record.billable_tokens


async def _is_closed(sidecar, job: int) -> bool:
    records = await sidecar.ledger.records(job)
    return bool(records) and records[0].state is not RecordState.OPEN
