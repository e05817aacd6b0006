"""Prompts through the sidecar on the real engine, claims and settlement on a real anvil with the
JobMarketplace test doubles: what the chain says was used equals what the ledger claimed."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3

import aiohttp
import pytest
from openai import AsyncOpenAI

from sidecar.ledger import ClaimKind, ClaimState, RecordState
from tests.support.tokens import job_token

pytestmark = pytest.mark.integration


async def wait_for(predicate, timeout: float = 30.0, what: str = "condition"):
    for _ in range(int(timeout / 0.05)):
        value = await predicate()
        if value:
            return value
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


async def generate(url: str, job: int, sizes: list[int], token: str = "none") -> None:
    """Completions of ``sizes`` tokens for ``job``; ``token`` is the client's API key (a job
    token where the sidecar binds jobs to their clients)."""
    client = AsyncOpenAI(base_url=url + "/v1", api_key=token, max_retries=0)
    for n in sizes:
        answer = await client.completions.create(
            model="tiny", prompt="tell me", max_tokens=n, extra_body={"job_id": job}
        )
        assert answer.usage is not None and answer.usage.completion_tokens == n


def chain_options(devnet, deployment, key_file, session_auth: str = "none") -> dict:
    """The sidecar's chain settings. Jobs are open to whoever names them unless a test is
    about who may use them (``session_auth="bound"``, the default of ``sidecar serve``)."""
    return {
        "session_auth": session_auth,
        "rpc_url": devnet.rpc_url,
        "chain_id": devnet.chain_id,
        "marketplace": deployment.marketplace,
        "contract_version": deployment.version,
        "host_key_file": str(key_file),
        "dispute_window": deployment.dispute_window,
    }


async def sidecar_for_tokens(llama_server, devnet, sidecar_factory, tmp_path, tokens: int):
    """A v1 job whose deposit pays for ``tokens`` tokens, and a sidecar with the chain."""
    deployment = devnet.deploy("v1", dispute_window=30)
    price = 10**12
    job = devnet.create_session_job(deployment, deposit=tokens * price, price_per_token=price)
    key_file = devnet.write_host_key_file(tmp_path / "host.key")
    sidecar = await sidecar_factory(
        llama_server.base_url, **chain_options(devnet, deployment, key_file)
    )
    return job, sidecar


async def test_v1_claims_and_settles_exactly(llama_server, devnet, sidecar_factory, tmp_path):
    deployment = devnet.deploy("v1", dispute_window=30)
    job = devnet.create_session_job(deployment)
    before = devnet.session_job(deployment, job)
    key_file = devnet.write_host_key_file(tmp_path / "host.key")
    options = chain_options(devnet, deployment, key_file, session_auth="bound")
    sidecar = await sidecar_factory(llama_server.base_url, **options)
    devnet.increase_time(60)  # the rate cap (20 tokens/s since the start) allows 1,200
    devnet.mine()
    token = job_token(devnet, deployment, job)  # the depositor's: its client binds the job
    await generate(sidecar.url, job, [250], token)  # one claim of 250 billable tokens

    async def confirmed() -> int:
        claims = await sidecar.ledger.claims(job)
        return sum(c.tokens for c in claims if c.state is ClaimState.CONFIRMED)

    assert await wait_for(confirmed, what="the claims of 250 tokens") == 250
    assert devnet.session_job(deployment, job)["tokensUsed"] == 250

    await generate(sidecar.url, job, [42], token)  # a remainder under the contract's minimum
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{sidecar.url}/sidecar/jobs/{job}/settle") as resp:
            assert resp.status == 202

    async def settled() -> bool:
        claims = await sidecar.ledger.claims(job)
        return any(c.kind is ClaimKind.SETTLE and c.state is ClaimState.CONFIRMED for c in claims)

    await wait_for(settled, what="the settlement")
    after = devnet.session_job(deployment, job)
    assert after["statusName"] == "Completed"
    assert after["tokensUsed"] == 250
    claims = await sidecar.ledger.claims(job)
    assert [c.tokens for c in claims if c.state is ClaimState.UNCLAIMABLE] == [42]
    totals = await sidecar.ledger.job(job)
    assert totals is not None and totals.billable_tokens == 292 == 250 + 42
    price = before["pricePerToken"]
    gross = 250 * price
    assert devnet.host_earnings(deployment) >= gross - gross * 250 // 10_000

    async with aiohttp.ClientSession() as http:
        async with http.get(f"{sidecar.url}/sidecar/jobs/{job}") as resp:
            view = await resp.json()
        async with http.get(f"{sidecar.url}/sidecar/health") as resp:
            health = await resp.json()
        async with http.get(f"{sidecar.url}/metrics") as resp:
            metrics = await resp.text()
    assert health["status"] == "ok" and health["chain"]["reachable"] is True
    assert health["ledger"]["marketplace"] == {
        "chain_id": devnet.chain_id,
        "marketplace": deployment.marketplace.lower(),
        "contract_version": "v1",
    }
    assert int(health["chain"]["host_balance_wei"]) > 0
    assert health["chain"]["unfinished_claims"] == 0
    assert view["tokens_confirmed"] == 250 and view["tokens_unclaimable"] == 42
    assert view["onchain"]["tokens_used"] == 250
    assert [c["state"] for c in view["claims"]] == ["confirmed", "unclaimable", "confirmed"]
    for line in (
        'sidecar_claims_total{kind="proof",outcome="confirmed"} 1.0',
        'sidecar_claims_total{kind="proof",outcome="unclaimable"} 1.0',
        'sidecar_claims_total{kind="settle",outcome="confirmed"} 1.0',
    ):
        assert line in metrics


async def test_unknown_and_foreign_jobs_are_refused(
    llama_server, devnet, sidecar_factory, tmp_path
) -> None:
    deployment = devnet.deploy("v1", dispute_window=30)
    foreign = devnet.create_session_job(deployment, host=devnet.stranger.address)
    key_file = devnet.write_host_key_file(tmp_path / "host.key")
    sidecar = await sidecar_factory(
        llama_server.base_url, **chain_options(devnet, deployment, key_file)
    )
    async with aiohttp.ClientSession() as http:
        for job, status, code in ((999_999, 402, "unknown_job"), (foreign, 403, "foreign_job")):
            async with http.post(
                f"{sidecar.url}/v1/completions",
                json={"prompt": "x", "max_tokens": 3, "job_id": job},
            ) as resp:
                assert resp.status == status
                assert (await resp.json())["error"]["code"] == code


async def test_v2_claims_and_settles_exactly(llama_server, devnet, sidecar_factory, tmp_path):
    deployment = devnet.deploy("v2", dispute_window=30)
    job = devnet.create_session_job(deployment)
    key_file = devnet.write_host_key_file(tmp_path / "host.key")
    sidecar = await sidecar_factory(
        llama_server.base_url, **chain_options(devnet, deployment, key_file)
    )
    devnet.increase_time(5)
    devnet.mine()
    await generate(sidecar.url, job, [300])

    async def confirmed() -> int:
        claims = await sidecar.ledger.claims(job)
        return sum(c.tokens for c in claims if c.state is ClaimState.CONFIRMED)

    assert await wait_for(confirmed, what="the v2 claim") == 300
    devnet.increase_time(60)  # v2's dispute window counts from the last proof
    devnet.mine()
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{sidecar.url}/sidecar/jobs/{job}/settle") as resp:
            assert resp.status == 202

    async def settled() -> bool:
        return any(
            c.kind is ClaimKind.SETTLE and c.state is ClaimState.CONFIRMED
            for c in await sidecar.ledger.claims(job)
        )

    await wait_for(settled, what="the v2 settlement")
    after = devnet.session_job(deployment, job)
    assert after["statusName"] == "Completed" and after["tokensUsed"] == 300


async def test_budget_lowers_max_tokens_then_refuses(
    llama_server, devnet, sidecar_factory, tmp_path
) -> None:
    job, sidecar = await sidecar_for_tokens(llama_server, devnet, sidecar_factory, tmp_path, 200)
    async with aiohttp.ClientSession() as http:
        async with http.post(
            f"{sidecar.url}/v1/completions", json={"prompt": "x", "max_tokens": 500, "job_id": job}
        ) as resp:
            assert resp.status == 200
            assert resp.headers["X-Sidecar-Max-Tokens"] == "200"
            assert (await resp.json())["usage"]["completion_tokens"] == 200
        async with http.post(
            f"{sidecar.url}/v1/completions", json={"prompt": "x", "max_tokens": 5, "job_id": job}
        ) as resp:
            assert resp.status == 402
            assert (await resp.json())["error"]["code"] == "budget_spent"


async def test_idle_sessions_settle_by_themselves(
    llama_server, devnet, sidecar_factory, tmp_path
) -> None:
    """HTTP has no disconnect: --settle-after-idle settles a session nobody uses any more."""
    deployment = devnet.deploy("v1", dispute_window=30)
    job = devnet.create_session_job(deployment)
    key_file = devnet.write_host_key_file(tmp_path / "host.key")
    sidecar = await sidecar_factory(
        llama_server.base_url, settle_after_idle=1, **chain_options(devnet, deployment, key_file)
    )
    devnet.increase_time(60)
    devnet.mine()
    await generate(sidecar.url, job, [130])

    async def settled() -> bool:
        return any(
            c.kind is ClaimKind.SETTLE and c.state is ClaimState.CONFIRMED
            for c in await sidecar.ledger.claims(job)
        )

    await wait_for(settled, what="the idle settlement")
    after = devnet.session_job(deployment, job)
    assert after["statusName"] == "Completed" and after["tokensUsed"] == 130
    # The idle settlement, as every settlement request, was a ledger row before it was sent.
    with contextlib.closing(sqlite3.connect(sidecar.ledger.path)) as conn:
        assert conn.execute("SELECT job_id FROM settle_requests").fetchall() == [(str(job),)]


async def test_concurrent_streams_are_never_served_past_the_deposit(
    llama_server, devnet, sidecar_factory, tmp_path
) -> None:
    """16 streams at once on a job whose deposit covers 300 tokens, asking 16 x 50: what is
    served never exceeds the deposit, the last ones are lowered or refused (402), and every
    hold is released once the records are in."""
    from sidecar.app import EXCHANGE_KEY

    job, sidecar = await sidecar_for_tokens(llama_server, devnet, sidecar_factory, tmp_path, 300)

    async def stream(http: aiohttp.ClientSession) -> tuple[int, int, str | None]:
        body = {"prompt": "x", "max_tokens": 50, "stream": True, "job_id": job}
        async with http.post(f"{sidecar.url}/v1/completions", json=body) as resp:
            if resp.status != 200:
                return resp.status, 0, (await resp.json())["error"]["code"]
            lowered = resp.headers.get("X-Sidecar-Max-Tokens")
            raw = await resp.read()
        chunks = raw.count(b'"text"') - 1  # llama-cpp-python: one chunk per token, then a final
        return 200, chunks, lowered

    async with aiohttp.ClientSession() as http:
        results = await asyncio.gather(*(stream(http) for _ in range(16)))
    records = [r for r in await sidecar.ledger.records(job) if r.state is not RecordState.OPEN]
    served = sum(r.completion_tokens for r in records)
    assert served <= 300, results
    assert sum(tokens for status, tokens, _ in results if status == 200) == served
    refused = [code for status, _, code in results if status != 200]
    assert refused and set(refused) == {"budget_spent"}
    assert served >= 250  # the deposit is used, not left idle
    assert sidecar.runner.app[EXCHANGE_KEY].reservations.held(job) == 0


async def test_receipts_on_json_answers_and_asked_for_streams(
    llama_server, devnet, sidecar_factory, tmp_path
) -> None:
    """Every JSON answer carries the job, its billable tokens, the job's so far and what the
    deposit still covers; a stream whose client asks (X-Sidecar-Receipt: 1) gets the same as an SSE
    comment before [DONE], and the OpenAI SDK reads that stream as any other."""
    job, sidecar = await sidecar_for_tokens(llama_server, devnet, sidecar_factory, tmp_path, 1000)
    async with aiohttp.ClientSession() as http:
        body = {"prompt": "x", "max_tokens": 7, "job_id": job}
        ask = {"X-Sidecar-Receipt": "1"}
        async with http.post(f"{sidecar.url}/v1/completions", json=body, headers=ask) as resp:
            assert resp.status == 200
            receipt = {
                k: v
                for k, v in resp.headers.items()
                if k.startswith("X-Sidecar-") and k != "X-Sidecar-Request-Id"
            }
        assert receipt == {
            "X-Sidecar-Job": str(job),
            "X-Sidecar-Tokens": "7",
            "X-Sidecar-Job-Tokens": "7",
            "X-Sidecar-Deposit-Left": "993",
        }
        async with http.post(f"{sidecar.url}/v1/completions", json=body) as resp:
            plain = {k: v for k, v in resp.headers.items() if k.startswith("X-Sidecar-")}
        # Unasked too: every metered JSON answer carries the whole receipt.
        assert plain["X-Sidecar-Job-Tokens"] == "14" and plain["X-Sidecar-Deposit-Left"] == "986"
        stream_body = {**body, "max_tokens": 5, "stream": True}
        headers = {"X-Sidecar-Receipt": "1"}
        async with http.post(
            f"{sidecar.url}/v1/completions", json=stream_body, headers=headers
        ) as resp:
            raw = await resp.read()
        expected = {
            "X-Sidecar-Job": str(job),
            "X-Sidecar-Tokens": "5",
            "X-Sidecar-Job-Tokens": "19",
            "X-Sidecar-Deposit-Left": "981",
        }
        line = b": sidecar-receipt " + json.dumps(expected, separators=(",", ":")).encode()
        assert line + b"\n\n" in raw, raw[-300:]
        assert raw.index(b": sidecar-receipt") < raw.index(b"data: [DONE]")
        async with http.post(f"{sidecar.url}/v1/completions", json=stream_body) as resp:
            assert b"sidecar-receipt" not in await resp.read()  # only when asked
    client = AsyncOpenAI(
        base_url=sidecar.url + "/v1",
        api_key="none",
        max_retries=0,
        default_headers={"X-Sidecar-Receipt": "1"},
    )
    stream = await client.completions.create(
        model="m", prompt="x", max_tokens=4, stream=True, extra_body={"job_id": job}
    )
    texts = [chunk.choices[0].text async for chunk in stream if chunk.choices]
    assert len([t for t in texts if t]) == 4
