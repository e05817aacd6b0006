"""Faults between the sidecar and the chain: nothing lost, nothing paid twice.

Real anvil, real engine, the sidecar as a process where it must be killed with SIGKILL.
"""

from __future__ import annotations

import asyncio
import sqlite3

import aiohttp
import pytest
from eth_account import Account

from sidecar.ledger import ClaimKind, ClaimState
from tests.integration.test_chain_e2e import chain_options, generate, wait_for
from tests.support.sidecar import SidecarProcess
from tests.support.tokens import job_token

pytestmark = pytest.mark.integration


def claims_in(path) -> list[tuple]:
    conn = sqlite3.connect(path)
    try:
        return conn.execute(
            "SELECT job_id, seq, kind, tokens, state, tx_hash FROM claims ORDER BY seq"
        ).fetchall()
    finally:
        conn.close()


async def test_kill_9_between_send_and_receipt_pays_once(llama_server, devnet, tmp_path):
    deployment = devnet.deploy("v1", dispute_window=30)
    job = devnet.create_session_job(deployment)
    key_file = devnet.write_host_key_file(tmp_path / "host.key")
    ledger_path = tmp_path / "ledger.db"
    options = chain_options(devnet, deployment, key_file)
    del options["session_auth"]  # sidecar serve's default with a chain: bound
    args = [item for k, v in options.items() for item in (f"--{k.replace('_', '-')}", str(v))]
    # The client's own key (not the depositor's) binds the job; the binding outlives the process.
    client_key = Account.create()
    token = job_token(devnet, deployment, job, signer=client_key)
    devnet.increase_time(60)
    devnet.mine()
    devnet.rpc("evm_setAutomine", [False])  # the claim will wait in the mempool
    try:
        first = SidecarProcess(llama_server.base_url, ledger_path, tmp_path / "s1.log", *args)
        try:
            await first.wait_ready()
            await generate(first.url, job, [180], token)

            async def sent() -> bool:
                return any(row[4] == "sent" and row[5] for row in claims_in(ledger_path))

            await wait_for(sent, what="the claim to be sent")
            first.kill9()  # after the send, before any receipt
        finally:
            first.stop()
        devnet.mine()  # the transaction is mined while no sidecar runs
    finally:
        devnet.rpc("evm_setAutomine", [True])

    second = SidecarProcess(llama_server.base_url, ledger_path, tmp_path / "s2.log", *args)
    try:
        await second.wait_ready()

        async def confirmed() -> bool:
            return [row[4] for row in claims_in(ledger_path)] == ["confirmed"]

        await wait_for(confirmed, what="the claim confirmed after the restart")
        stranger = job_token(devnet, deployment, job, signer=devnet.stranger)
        async with aiohttp.ClientSession() as http:
            for key, status in ((stranger, 403), (token, 200)):
                async with http.post(
                    f"{second.url}/v1/completions",
                    json={"prompt": "x", "max_tokens": 2, "job_id": job},
                    headers={"Authorization": f"Bearer {key}"},
                ) as resp:
                    assert resp.status == status, await resp.text()
                    if status == 403:
                        body = await resp.json()
                        assert body["error"]["code"] == "job_bound_to_another_client"
    finally:
        assert second.stop() == 0
    assert devnet.session_job(deployment, job)["tokensUsed"] == 180
    [(_, seq, kind, tokens, state, tx_hash)] = claims_in(ledger_path)
    assert (seq, kind, tokens, state) == (1, "proof", 180, "confirmed") and tx_hash
    binding = sqlite3.connect(ledger_path).execute("SELECT address, proof FROM job_bindings")
    assert binding.fetchall() == [(client_key.address.lower(), "job token")]


async def test_a_dropped_transaction_is_resent_with_the_same_proof(
    llama_server, devnet, sidecar_factory, tmp_path
):
    deployment = devnet.deploy("v1", dispute_window=30)
    job = devnet.create_session_job(deployment)
    key_file = devnet.write_host_key_file(tmp_path / "host.key")
    devnet.increase_time(60)
    devnet.mine()
    devnet.rpc("evm_setAutomine", [False])
    try:
        sidecar = await sidecar_factory(
            llama_server.base_url, **chain_options(devnet, deployment, key_file)
        )
        await generate(sidecar.url, job, [150])

        async def sent_hash() -> str | None:
            claims = await sidecar.ledger.claims(job)
            return claims[0].tx_hash if claims and claims[0].state is ClaimState.SENT else None

        tx_hash = await wait_for(sent_hash, what="the claim to be sent")
        await sidecar.stop()  # the sidecar stops while its transaction waits
        devnet.rpc("anvil_dropTransaction", [tx_hash])  # and the node forgets it
    finally:
        devnet.rpc("evm_setAutomine", [True])
    ledger_path = sidecar.ledger.path  # type: ignore[attr-defined]
    again = await sidecar_factory(
        llama_server.base_url,
        ledger_path=ledger_path,
        **chain_options(devnet, deployment, key_file),
    )

    async def confirmed() -> bool:
        claims = await again.ledger.claims(job)
        return bool(claims) and claims[0].state is ClaimState.CONFIRMED

    await wait_for(confirmed, what="the resent claim")
    assert devnet.session_job(deployment, job)["tokensUsed"] == 150
    assert len(await again.ledger.claims(job)) == 1


async def test_claims_and_a_settlement_share_one_nonce_queue(
    llama_server, devnet, sidecar_factory, tmp_path
):
    deployment = devnet.deploy("v1", dispute_window=30)
    jobs = [devnet.create_session_job(deployment) for _ in range(3)]
    key_file = devnet.write_host_key_file(tmp_path / "host.key")
    sidecar = await sidecar_factory(
        llama_server.base_url, **chain_options(devnet, deployment, key_file)
    )
    devnet.increase_time(60)
    devnet.mine()
    await generate(sidecar.url, jobs[2], [120])

    async def first_claim_done() -> bool:
        claims = await sidecar.ledger.claims(jobs[2])
        return bool(claims) and claims[0].state is ClaimState.CONFIRMED

    await wait_for(first_claim_done, what="job 3's claim")
    # Now at once: two jobs cross the checkpoint while the third settles.
    async with aiohttp.ClientSession() as http:
        settle = http.post(f"{sidecar.url}/sidecar/jobs/{jobs[2]}/settle")
        results = await asyncio.gather(
            generate(sidecar.url, jobs[0], [130]), generate(sidecar.url, jobs[1], [140]), settle
        )
        assert results[2].status == 202

    async def all_done() -> bool:
        claims = await sidecar.ledger.claims()
        return len(claims) == 4 and all(c.state is ClaimState.CONFIRMED for c in claims)

    await wait_for(all_done, what="two claims and a settlement")
    claims = await sidecar.ledger.claims()
    nonces = [c.nonce for c in claims]
    assert len(set(nonces)) == 4
    assert [c.kind for c in claims if c.job_id == jobs[2]] == [ClaimKind.PROOF, ClaimKind.SETTLE]
    assert [devnet.session_job(deployment, j)["tokensUsed"] for j in jobs] == [130, 140, 120]


async def test_chain_outage_keeps_serving_and_claims_later(llama_server, sidecar_factory, tmp_path):
    from devtools.devnet import Devnet

    with Devnet.start(state_path=tmp_path / "anvil-state.json", log_dir=tmp_path) as chain:
        deployment = chain.deploy("v1", dispute_window=30)
        job = chain.create_session_job(deployment)
        key_file = chain.write_host_key_file(tmp_path / "host.key")
        sidecar = await sidecar_factory(
            llama_server.base_url, **chain_options(chain, deployment, key_file)
        )
        chain.increase_time(60)
        chain.mine()
        await generate(sidecar.url, job, [20])  # the job is now known (cached view)
        chain.stop()  # the chain goes away, its state kept on disk
        await generate(sidecar.url, job, [90, 90])  # still served and metered
        await asyncio.sleep(1.5)  # the worker tries, fails, backs off
        assert await sidecar.ledger.claims(job) == [] or all(
            c.state in (ClaimState.PENDING, ClaimState.SENT)
            for c in await sidecar.ledger.claims(job)
        )
        chain.restart()

        async def confirmed() -> int:
            claims = await sidecar.ledger.claims(job)
            return sum(c.tokens for c in claims if c.state is ClaimState.CONFIRMED)

        assert await wait_for(confirmed, timeout=60, what="the claim after the outage") == 200
        assert chain.session_job(deployment, job)["tokensUsed"] == 200
        assert len(await sidecar.ledger.claims(job)) == 1


async def test_sidecar_settle_command(llama_server, devnet, tmp_path) -> None:
    import subprocess
    import sys

    from tests.support.sidecar import REPO

    deployment = devnet.deploy("v1", dispute_window=30)
    job = devnet.create_session_job(deployment)
    key_file = devnet.write_host_key_file(tmp_path / "host.key")
    options = chain_options(devnet, deployment, key_file)
    args = [item for k, v in options.items() for item in (f"--{k.replace('_', '-')}", str(v))]
    devnet.increase_time(60)
    devnet.mine()
    proc = SidecarProcess(
        llama_server.base_url, tmp_path / "l.db", tmp_path / "s.log", *args, "--admin-token", "tok"
    )
    try:
        await proc.wait_ready()
        await generate(proc.url, job, [110])
        settle = await asyncio.to_thread(
            subprocess.run,
            [
                sys.executable,
                "-m",
                "sidecar",
                "settle",
                f"{job}n",
                "--listen",
                f"127.0.0.1:{proc.port}",
                "--admin-token",
                "tok",
            ],
            capture_output=True,
            text=True,
            cwd=REPO,
            timeout=60,
        )
        assert settle.returncode == 0, settle.stderr
        assert "requested" in settle.stdout

        async def settled() -> bool:
            return devnet.session_job(deployment, job)["statusName"] == "Completed"

        await wait_for(settled, what="the settlement asked for on the command line")
    finally:
        assert proc.stop() == 0
    assert devnet.session_job(deployment, job)["tokensUsed"] == 110
    unknown = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "sidecar", "settle", "5", "--listen", f"127.0.0.1:{proc.port}"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
    )
    assert unknown.returncode == 1 and "no sidecar answers" in unknown.stderr


async def test_tokens_metered_before_a_restart_are_claimed_after_it(
    llama_server, devnet, sidecar_factory, tmp_path
):
    deployment = devnet.deploy("v1", dispute_window=30)
    job = devnet.create_session_job(deployment)
    key_file = devnet.write_host_key_file(tmp_path / "host.key")
    ledger_path = tmp_path / "ledger.db"
    first = await sidecar_factory(
        llama_server.base_url,
        ledger_path=ledger_path,
        **chain_options(devnet, deployment, key_file),
    )
    # Right after the session began, the rate cap (20 tokens/s) does not allow 400 tokens yet:
    # the sidecar waits, and is stopped while it waits.
    await generate(first.url, job, [400])
    await first.stop()
    devnet.increase_time(120)
    devnet.mine()
    second = await sidecar_factory(
        llama_server.base_url,
        ledger_path=ledger_path,
        **chain_options(devnet, deployment, key_file),
    )

    async def confirmed() -> int:
        claims = await second.ledger.claims(job)
        return sum(c.tokens for c in claims if c.state is ClaimState.CONFIRMED)

    # No new request for the job: the restarted sidecar takes it up from its ledger.
    assert await wait_for(confirmed, what="the claim after the restart") == 400
    assert devnet.session_job(deployment, job)["tokensUsed"] == 400
