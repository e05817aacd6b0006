"""Who may spend a job (--session-auth), on the real engine and anvil: the first authenticated
client binds a job, a stranger is refused before anything is generated, on the socket and over
HTTP; under ``depositor`` only the job's depositor is served."""

from __future__ import annotations

import os

import aiohttp
import pytest
from eth_account import Account

from sidecar.crypto import HostKey
from sidecar.ledger import ClaimKind
from tests.integration.test_chain_e2e import chain_options, wait_for
from tests.integration.test_node_e2ee import encrypted_prompt, receive, sealed_init
from tests.support.tokens import job_token

pytestmark = pytest.mark.integration


def key_of(account) -> HostKey:
    return HostKey(bytes.fromhex(account.key.removeprefix("0x")))


def forged(token: str, job: int) -> str:
    """``token``'s signature under claims that name ``job`` instead: it recovers to some other
    address, never to the signer's."""
    import base64
    import json

    _, claims, signature = token.split(".")
    obj = json.loads(base64.urlsafe_b64decode(claims + "=" * (-len(claims) % 4)))
    obj["job"] = str(job)
    swapped = base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()
    return f"sjt1.{swapped}.{signature}"


async def sidecar_on_job(llama_server, devnet, sidecar_factory, tmp_path, mode: str):
    deployment = devnet.deploy("v1", dispute_window=30)
    job = devnet.create_session_job(deployment)
    key_file = devnet.write_host_key_file(tmp_path / "host.key")
    options = chain_options(devnet, deployment, key_file, session_auth=mode)
    sidecar = await sidecar_factory(llama_server.base_url, **options)
    return deployment, job, sidecar


async def complete(http, url: str, job: int, token: str | None, max_tokens: int = 3):
    headers = {} if token is None else {"Authorization": f"Bearer {token}"}
    async with http.post(
        f"{url}/v1/completions",
        json={"prompt": "x", "max_tokens": max_tokens, "job_id": job},
        headers=headers,
    ) as resp:
        return resp.status, await resp.json()


async def test_http_tokens_bind_a_job_and_strangers_are_refused(
    llama_server, devnet, sidecar_factory, tmp_path
) -> None:
    deployment, job, sidecar = await sidecar_on_job(
        llama_server, devnet, sidecar_factory, tmp_path, "bound"
    )
    client = Account.create()  # the client's own key: binds the job on first use
    token = job_token(devnet, deployment, job, signer=client)
    stranger = job_token(devnet, deployment, job, signer=devnet.stranger)
    async with aiohttp.ClientSession() as http:
        status, body = await complete(http, sidecar.url, job, None)
        assert status == 401 and body["error"]["code"] == "authentication_required"
        assert "sidecar token --job" in body["error"]["message"]
        assert await sidecar.ledger.binding(job) is None

        status, body = await complete(http, sidecar.url, job, token)
        assert status == 200, body
        assert await sidecar.ledger.binding(job) == client.address.lower()

        status, body = await complete(http, sidecar.url, job, stranger)
        assert status == 403 and body["error"]["code"] == "job_bound_to_another_client"

        # The depositor is the job's owner: never locked out by whoever bound it.
        status, _ = await complete(http, sidecar.url, job, job_token(devnet, deployment, job))
        assert status == 200

        for bad, why in (
            (token.replace("sjt1.", "sjt1.x", 1), "claims that are not base64url JSON"),
            (token[:-130] + "zz" * 65, "a signature that is not hex"),
            (job_token(devnet, deployment, job + 1, signer=client), "another job's token"),
        ):
            status, body = await complete(http, sidecar.url, job, bad)
            assert status == 401 and body["error"]["code"] == "invalid_job_token", why
            assert bad not in body["error"]["message"]
        # The client's signature over another job, its claims changed to this one: it proves
        # some other address, which is not the one the job is bound to.
        other_job_token = job_token(devnet, deployment, job + 1, signer=client)
        status, body = await complete(http, sidecar.url, job, forged(other_job_token, job))
        assert status == 403 and body["error"]["code"] == "job_bound_to_another_client"

        # The node's own route takes the same token.
        async with http.post(
            f"{sidecar.url}/v1/inference",
            json={"model": llama_server.model_id, "prompt": "x", "max_tokens": 2, "jobId": job},
            headers={"Authorization": f"Bearer {stranger}"},
        ) as resp:
            assert resp.status == 403
    records = await sidecar.ledger.records(job)
    assert sum(r.billable_tokens for r in records) == 6  # the two served requests only


async def test_an_expired_token_is_refused(llama_server, devnet, sidecar_factory, tmp_path) -> None:
    deployment, job, sidecar = await sidecar_on_job(
        llama_server, devnet, sidecar_factory, tmp_path, "bound"
    )
    from sidecar.auth.tokens import make_job_token

    expired = make_job_token(
        devnet.requester.key,
        chain_id=devnet.chain_id,
        marketplace=deployment.marketplace,
        host=devnet.host_account.address,
        job_id=job,
        expires_in=60,
        now=1_000_000,
    )
    async with aiohttp.ClientSession() as http:
        status, body = await complete(http, sidecar.url, job, expired)
    assert status == 401 and "expired" in body["error"]["message"]
    assert await sidecar.ledger.records(job) == []


async def test_sockets_bind_to_the_encrypted_sessions_signer(
    llama_server, devnet, sidecar_factory, tmp_path
) -> None:
    deployment, job, sidecar = await sidecar_on_job(
        llama_server, devnet, sidecar_factory, tmp_path, "bound"
    )
    host = key_of(devnet.host_account)
    client, stranger = HostKey(os.urandom(32)), HostKey(os.urandom(32))
    async with aiohttp.ClientSession() as http:
        async with http.ws_connect(sidecar.url.replace("http", "ws") + "/v1/ws") as ws:
            assert (await receive(ws))["type"] == "connected"
            # A plaintext session proves nobody: refused under bound, saying how to authenticate.
            await ws.send_json({"type": "session_init", "jobId": str(job), "id": "p1"})
            refused = await receive(ws)
            assert refused["type"] == "error" and refused["code"] == "authentication_required"
            assert refused["id"] == "p1" and "encrypted_session_init" in refused["message"]
        async with http.ws_connect(sidecar.url.replace("http", "ws") + "/v1/ws") as ws:
            assert (await receive(ws))["type"] == "connected"
            _, _, end = await encrypted_prompt(ws, job, 4, host=host, client=client)
            assert end["tokens_used"] == 4
            assert await sidecar.ledger.binding(job) == client.address
            # While the client's session is open (its end settles the job):
            async with http.ws_connect(sidecar.url.replace("http", "ws") + "/v1/ws") as other:
                assert (await receive(other))["type"] == "connected"
                await other.send_json(sealed_init(job, os.urandom(32), host.public_key, stranger))
                refused = await receive(other)
                assert refused["type"] == "error", refused
                assert refused["code"] == "job_bound_to_another_client"
                assert refused["session_id"] == str(job)
            # HTTP agrees with the socket: the job is the encrypted client's.
            token = job_token(devnet, deployment, job, signer=devnet.stranger)
            status, _ = await complete(http, sidecar.url, job, token)
            assert status == 403
            _, _, end = await encrypted_prompt(ws, job, 2, host=host, client=client)
            assert end["tokens_used"] == 2
    totals = await sidecar.ledger.job(job)
    assert totals is not None and totals.billable_tokens == 6


async def test_a_strangers_socket_does_not_join_the_jobs_session(
    llama_server, devnet, sidecar_factory, tmp_path
) -> None:
    """A plaintext prompt names the job but proves nobody: refused, and the socket does not
    join the job's session. Had it joined, its close could settle the job, and while open it
    would hold off the settlement the client's own close asks for."""
    _, job, sidecar = await sidecar_on_job(llama_server, devnet, sidecar_factory, tmp_path, "bound")
    host = key_of(devnet.host_account)
    client = HostKey(os.urandom(32))
    url = sidecar.url.replace("http", "ws") + "/v1/ws"
    async with aiohttp.ClientSession() as http:
        async with http.ws_connect(url) as stranger:
            assert (await receive(stranger))["type"] == "connected"
            async with http.ws_connect(url) as ws:
                assert (await receive(ws))["type"] == "connected"
                _, _, end = await encrypted_prompt(ws, job, 2, host=host, client=client)
                assert end["tokens_used"] == 2
                await stranger.send_json(
                    {
                        "type": "prompt",
                        "prompt": "hi",
                        "max_tokens": 3,
                        "jobId": str(job),
                        "id": "s1",
                    }
                )
                refused = await receive(stranger)
                assert refused["code"] == "authentication_required" and refused["id"] == "s1"
            # The client's session is over: its job settles though the stranger is still here.

            async def settle_requested() -> bool:
                return job in await sidecar.ledger.settlement_requests() or any(
                    c.kind is ClaimKind.SETTLE for c in await sidecar.ledger.claims(job)
                )

            await wait_for(settle_requested, timeout=10, what="the client's settlement")
    assert (await sidecar.ledger.job(job)).billable_tokens == 2


async def test_depositor_mode_serves_the_depositor_only(
    llama_server, devnet, sidecar_factory, tmp_path
) -> None:
    deployment, job, sidecar = await sidecar_on_job(
        llama_server, devnet, sidecar_factory, tmp_path, "depositor"
    )
    host = key_of(devnet.host_account)
    async with aiohttp.ClientSession() as http:
        async with http.ws_connect(sidecar.url.replace("http", "ws") + "/v1/ws") as ws:
            assert (await receive(ws))["type"] == "connected"
            stranger = key_of(devnet.stranger)
            await ws.send_json(sealed_init(job, os.urandom(32), host.public_key, stranger))
            refused = await receive(ws)
            assert refused["type"] == "error" and refused["code"] == "not_the_depositor"
        async with http.ws_connect(sidecar.url.replace("http", "ws") + "/v1/ws") as ws:
            assert (await receive(ws))["type"] == "connected"
            depositor = key_of(devnet.requester)
            _, _, end = await encrypted_prompt(ws, job, 3, host=host, client=depositor)
            assert end["tokens_used"] == 3
        status, body = await complete(
            http, sidecar.url, job, job_token(devnet, deployment, job, signer=devnet.stranger)
        )
        assert status == 403 and body["error"]["code"] == "not_the_depositor"
        status, _ = await complete(http, sidecar.url, job, job_token(devnet, deployment, job))
        assert status == 200
    assert await sidecar.ledger.binding(job) is None  # depositor mode binds nothing


async def test_sidecar_token_reads_the_scope_from_the_sidecar(
    llama_server, devnet, sidecar_factory, tmp_path
) -> None:
    """The command a client runs: its token, made against the host's published scope, is what
    the OpenAI SDK sends as its API key."""
    import asyncio
    import subprocess
    import sys

    from openai import AsyncOpenAI

    deployment, job, sidecar = await sidecar_on_job(
        llama_server, devnet, sidecar_factory, tmp_path, "bound"
    )
    key_file = tmp_path / "client.key"
    key_file.write_text(devnet.requester.key)
    command = [sys.executable, "-m", "sidecar", "token", "--job", f"{job}n"]
    command += ["--key-file", str(key_file), "--sidecar", sidecar.url, "--expires", "10m"]
    # From a thread, while this loop goes on serving the child's /v1/health request.
    result = await asyncio.to_thread(
        subprocess.run, command, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    token = result.stdout.strip()
    assert devnet.requester.key.removeprefix("0x") not in result.stdout + result.stderr
    async with AsyncOpenAI(base_url=sidecar.url + "/v1", api_key=token, max_retries=0) as client:
        answer = await client.completions.create(
            model="tiny", prompt="hi", max_tokens=5, extra_body={"job_id": job}
        )
    assert answer.usage is not None and answer.usage.completion_tokens == 5
    async with AsyncOpenAI(
        base_url=sidecar.url + "/v1", api_key="sk-not-a-token", max_retries=0
    ) as stranger:
        with pytest.raises(Exception) as info:
            await stranger.completions.create(
                model="tiny", prompt="hi", max_tokens=5, extra_body={"job_id": job}
            )
    assert getattr(info.value, "status_code", None) == 401
    # The depositor's first use bound the job to it: a stranger's own token cannot take it.
    assert await sidecar.ledger.binding(job) == devnet.requester.address.lower()
    async with aiohttp.ClientSession() as http:
        stranger_token = job_token(devnet, deployment, job, signer=devnet.stranger)
        status, body = await complete(http, sidecar.url, job, stranger_token)
    assert status == 403 and body["error"]["code"] == "job_bound_to_another_client"


async def test_a_dropped_encrypted_session_settles_what_the_ledger_confirmed(
    llama_server, devnet, sidecar_factory, tmp_path
) -> None:
    """The SDK's default session (encrypted, re-init before every prompt), cut without a close
    frame: the job settles with tokensUsed equal to the ledger's confirmed claims."""
    from sidecar.ledger import ClaimKind, ClaimState
    from tests.integration.test_chain_e2e import wait_for

    deployment, job, sidecar = await sidecar_on_job(
        llama_server, devnet, sidecar_factory, tmp_path, "bound"
    )
    devnet.increase_time(60)  # the rate cap allows 1,200 tokens; the dispute window is over
    devnet.mine()
    host, client = key_of(devnet.host_account), HostKey(os.urandom(32))
    served = []
    async with aiohttp.ClientSession() as http:
        ws = await http.ws_connect(sidecar.url.replace("http", "ws") + "/v1/ws")
        assert (await receive(ws))["type"] == "connected"
        for n in (50, 40, 30):
            _, chunks, end = await encrypted_prompt(ws, job, n, host=host, client=client)
            assert end["tokens_used"] == n == sum(c["tokens"] for c in chunks)
            served.append(end["usage"]["completion_tokens"])
        ws._conn.transport.abort()  # type: ignore[attr-defined]  # a client that crashed

        async def settled() -> list:
            claims = await sidecar.ledger.claims(job)
            done = [c for c in claims if c.kind is ClaimKind.SETTLE]
            return done if done and done[0].state is ClaimState.CONFIRMED else []

        await wait_for(settled, what="the settlement")
    claims = await sidecar.ledger.claims(job)
    confirmed = sum(
        c.tokens for c in claims if c.kind is ClaimKind.PROOF and c.state is ClaimState.CONFIRMED
    )
    after = devnet.session_job(deployment, job)
    totals = await sidecar.ledger.job(job)
    assert after["statusName"] == "Completed"
    assert after["tokensUsed"] == confirmed == totals.billable_tokens == sum(served) == 120
