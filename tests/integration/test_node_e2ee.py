"""Encrypted sessions on /v1/ws (NODE_PROTOCOL.md §1-2) against the real llama-cpp-python server.

The client here is written from NODE_PROTOCOL.md, as the SDK behaves: its own static key signs
the E2EEv1 digest, a fresh ephemeral key seals each init to the host key, a new session key and
``message_0`` before every prompt, and it opens every ``encrypted_chunk`` with the AAD it names.
"""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from sidecar import crypto
from sidecar.crypto import HostKey
from sidecar.ledger import RecordState

pytestmark = pytest.mark.integration

HOST = HostKey(bytes.fromhex("11" * 32))
CLIENT = HostKey(bytes.fromhex("22" * 32))  # the SDK's EncryptionManager key
ALG = "secp256k1-ecdh(ephemeral\u2192static)+hkdf(sha256)+xchacha20-poly1305"


@pytest.fixture
def host_key_file(tmp_path: Path) -> str:
    path = tmp_path / "host.key"
    path.write_text("0x" + "11" * 32)
    return str(path)


async def receive(ws: aiohttp.ClientWebSocketResponse) -> dict[str, Any]:
    msg = await asyncio.wait_for(ws.receive(), 30)
    assert msg.type is aiohttp.WSMsgType.TEXT, msg
    return json.loads(msg.data)


def sealed_init(
    job: int | str,
    session_key: bytes,
    host_public_key: bytes = HOST.public_key,
    client: HostKey = CLIENT,
    model: str = "sidecar-tiny",
    chain_id: int | None = 31337,
):
    """An encrypted_session_init frame, built as the SDK builds it (§1.2), signed by ``client``
    (``chain_id`` None: the frame names none)."""
    ephemeral = HostKey(os.urandom(32))
    key = crypto.init_key(ephemeral.shared_x(host_public_key))
    plaintext = json.dumps(
        {
            "sessionKey": session_key.hex(),
            "jobId": str(job),
            "modelName": model,
            "pricePerToken": 0,
            "recoveryPublicKey": "0x" + client.public_key.hex(),
        },
        separators=(",", ":"),
    ).encode()
    nonce, box = crypto.seal(key, plaintext, b"")
    digest = crypto.e2ee_digest(ephemeral.public_key, host_public_key, nonce)
    compact, recid = client.sign_digest(digest)
    frame = {
        "type": "encrypted_session_init",
        "payload": {
            "ephPubHex": ephemeral.public_key.hex(),
            "saltHex": "00" * 32,
            "nonceHex": nonce.hex(),
            "ciphertextHex": box.hex(),
            "signatureHex": (compact + bytes([recid])).hex(),
            "recid": recid,
            "alg": ALG,
            "info": "",
            "aadHex": "",
        },
        "chain_id": chain_id,
        "session_id": str(job),
        "job_id": str(job),
    }
    if chain_id is None:
        del frame["chain_id"]
    return frame


def sealed_message(session_key: bytes, job: int, request: dict[str, Any], index: int = 0):
    nonce, box = crypto.seal(session_key, json.dumps(request).encode(), crypto.message_aad(index))
    return {
        "type": "encrypted_message",
        "session_id": str(job),
        "id": f"{index}-{os.urandom(4).hex()}",
        "payload": {
            "ciphertextHex": box.hex(),
            "nonceHex": nonce.hex(),
            "aadHex": crypto.message_aad(index).hex(),
        },
    }


async def encrypted_prompt(
    ws: aiohttp.ClientWebSocketResponse,
    job: int,
    max_tokens: int,
    host: HostKey = HOST,
    client: HostKey = CLIENT,
) -> tuple[str, list[dict[str, Any]], dict[str, Any]]:
    """Re-init with a new session key, then one encrypted prompt: (text, chunks, stream_end)."""
    session_key = os.urandom(32)
    await ws.send_json(sealed_init(job, session_key, host.public_key, client))
    ack = await receive(ws)
    assert ack["type"] == "session_init_ack" and ack["status"] == "success", ack
    assert ack["client_address"] == client.address and ack["job_id"] == job
    request = {"prompt": "Hello", "model": "sidecar-tiny", "max_tokens": max_tokens}
    message = sealed_message(session_key, job, request)
    await ws.send_json(message)
    text, chunks = "", []
    while (reply := await receive(ws))["type"] == "encrypted_chunk":
        payload = reply["payload"]
        assert reply["id"] == message["id"] and reply["session_id"] == str(job)
        assert bytes.fromhex(payload["aadHex"]) == crypto.chunk_aad(payload["index"])
        assert payload["index"] == len(chunks)
        text += crypto.open_box(
            session_key,
            bytes.fromhex(payload["nonceHex"]),
            bytes.fromhex(payload["ciphertextHex"]),
            bytes.fromhex(payload["aadHex"]),
        ).decode()
        chunks.append(reply)
    assert chunks[-1].get("final") is True and chunks[-1]["tokens"] == 0
    assert reply["type"] == "encrypted_response", reply
    finish = crypto.open_box(
        session_key,
        bytes.fromhex(reply["payload"]["nonceHex"]),
        bytes.fromhex(reply["payload"]["ciphertextHex"]),
        crypto.FINAL_RESPONSE_AAD,
    ).decode()
    end = await receive(ws)
    assert end["type"] == "stream_end" and end["reason"] == "complete", end
    assert end["finish_reason"] == finish and end["id"] == message["id"]
    return text, chunks, end


async def test_encrypted_session_reinit_before_every_prompt(
    llama_server, sidecar_factory, host_key_file
) -> None:
    sidecar = await sidecar_factory(llama_server.base_url, host_key_file=host_key_file)
    job = 77
    async with aiohttp.ClientSession() as http:
        async with http.ws_connect(sidecar.url + "/v1/ws") as ws:
            assert (await receive(ws))["type"] == "connected"
            await ws.send_str('{"type": "ping"}')  # the SDK's heartbeat: tolerated, unanswered
            total = 0
            for n in (5, 12, 3):
                text, chunks, end = await encrypted_prompt(ws, job, n)
                assert sum(c["tokens"] for c in chunks) == n == end["tokens_used"]
                assert text and end["usage"]["completion_tokens"] == n
                total += n
                assert end["session_tokens"] == total
    records = [r for r in await sidecar.ledger.records(job) if r.state is RecordState.FINAL]
    assert [r.completion_tokens for r in records] == [5, 12, 3]


async def test_bad_encrypted_input_gets_the_nodes_codes_and_meters_nothing(
    llama_server, sidecar_factory, host_key_file
) -> None:
    sidecar = await sidecar_factory(llama_server.base_url, host_key_file=host_key_file)
    job = 78
    good = sealed_init(job, os.urandom(32))

    def with_payload(**changes: Any) -> dict[str, Any]:
        return {**good, "payload": {**good["payload"], **changes}, "id": "m-1"}

    tampered = bytearray.fromhex(good["payload"]["ciphertextHex"])
    tampered[3] ^= 0x40
    other_host = sealed_init(job, os.urandom(32), HostKey(bytes.fromhex("55" * 32)).public_key)
    cases = [
        (with_payload(nonceHex="zz" * 24), "INVALID_HEX_ENCODING"),
        (with_payload(nonceHex="00" * 12), "INVALID_NONCE_SIZE"),
        (with_payload(ciphertextHex=tampered.hex()), "DECRYPTION_FAILED"),
        ({**other_host, "id": "m-1"}, "DECRYPTION_FAILED"),
        ({**good, "payload": {"ephPubHex": "02"}, "id": "m-1"}, "INVALID_PAYLOAD"),
        (
            {"type": "encrypted_session_init", "session_id": str(job), "id": "m-1"},
            "MISSING_PAYLOAD",
        ),
    ]
    async with aiohttp.ClientSession() as http:
        async with http.ws_connect(sidecar.url + "/v1/ws") as ws:
            assert (await receive(ws))["type"] == "connected"
            for frame, code in cases:
                await ws.send_json(frame)
                error = await receive(ws)
                assert error["type"] == "error" and error["code"] == code, (code, error)
                assert error["id"] == "m-1" and error["session_id"] == str(job)
                assert "11" * 16 not in json.dumps(error)
            # A message before any init, and one under the wrong key after an init.
            stray = sealed_message(os.urandom(32), job, {"prompt": "x", "max_tokens": 2})
            await ws.send_json(stray)
            error = await receive(ws)
            assert error["code"] == "SESSION_KEY_NOT_FOUND" and error["id"] == stray["id"]
            await ws.send_json(good)
            assert (await receive(ws))["type"] == "session_init_ack"
            await ws.send_json(stray)
            error = await receive(ws)
            assert error["code"] == "DECRYPTION_FAILED" and error["id"] == stray["id"]
            # The socket is still alive and the session still works.
            _, _, end = await encrypted_prompt(ws, job, 2)
            assert end["tokens_used"] == 2
    assert [r.completion_tokens for r in await sidecar.ledger.records(job)] == [2]


async def test_no_host_key_means_no_encrypted_sessions(llama_server, sidecar_factory) -> None:
    sidecar = await sidecar_factory(llama_server.base_url)
    async with aiohttp.ClientSession() as http:
        async with http.ws_connect(sidecar.url + "/v1/ws") as ws:
            assert (await receive(ws))["type"] == "connected"
            await ws.send_json(sealed_init(79, os.urandom(32)))
            error = await receive(ws)
            assert error["code"] == "ENCRYPTION_NOT_SUPPORTED" and error["session_id"] == "79"


async def test_v1_health_and_the_key_challenge(
    llama_server, sidecar_factory, host_key_file
) -> None:
    import hashlib

    vectors = json.loads(
        (Path(__file__).parents[1] / "fixtures" / "vectors" / "e2ee.json").read_text()
    )
    sidecar = await sidecar_factory(llama_server.base_url, host_key_file=host_key_file)
    bare = await sidecar_factory(llama_server.base_url)
    async with aiohttp.ClientSession() as http:
        async with http.get(sidecar.url + "/v1/health") as resp:
            health = await resp.json()
        assert resp.status == 200 and health["status"] == "healthy" and health["healthy"] is True
        assert "issues" not in health
        challenge = vectors["challengeHex"]
        async with http.post(
            sidecar.url + "/v1/auth/challenge", json={"challenge": challenge}
        ) as resp:
            answer = await resp.json()
        assert answer == {
            "signature": vectors["challengeSignatureCompact"],
            "recid": vectors["challengeRecid"],
        }
        fresh = os.urandom(32)
        async with http.post(
            sidecar.url + "/v1/auth/challenge", json={"challenge": fresh.hex()}
        ) as resp:
            answer = await resp.json()
        signature = bytes.fromhex(answer["signature"]) + bytes([answer["recid"]])
        digest = hashlib.sha256(fresh).digest()
        assert crypto.recover_address(digest, signature) == HOST.address
        for body in ({"challenge": "abcd"}, {"challenge": "zz" * 32}, {"nope": 1}):
            async with http.post(sidecar.url + "/v1/auth/challenge", json=body) as resp:
                assert resp.status == 400
                assert (await resp.json())["error"]["param"] == "challenge"
        async with http.post(
            bare.url + "/v1/auth/challenge", json={"challenge": challenge}
        ) as resp:
            assert resp.status == 404


async def test_encrypted_stream_cancel_and_a_reconnect(
    llama_server, sidecar_factory, host_key_file
) -> None:
    """stream_cancel mid-answer (the SDK's own frame, plaintext): a stream_end cancelled with
    no encrypted_response, the tokens sent metered; a new socket goes on with the same job."""
    sidecar = await sidecar_factory(llama_server.base_url, host_key_file=host_key_file)
    job = 79
    async with aiohttp.ClientSession() as http:
        async with http.ws_connect(sidecar.url + "/v1/ws") as ws:
            assert (await receive(ws))["type"] == "connected"
            session_key = os.urandom(32)
            await ws.send_json(sealed_init(job, session_key))
            assert (await receive(ws))["type"] == "session_init_ack"
            message = sealed_message(session_key, job, {"prompt": "go", "max_tokens": 1900})
            await ws.send_json(message)
            assert (await receive(ws))["type"] == "encrypted_chunk"
            await ws.send_json(
                {"type": "stream_cancel", "session_id": str(job), "reason": "user_cancelled"}
            )
            kinds, chunks = [], 1
            while (reply := await receive(ws))["type"] != "stream_end":
                kinds.append(reply["type"])
                chunks += reply["type"] == "encrypted_chunk"
            assert set(kinds) <= {"encrypted_chunk"}  # no encrypted_response after a cancel
            assert reply["reason"] == "cancelled" and reply["finish_reason"] == "cancelled"
            assert reply["id"] == message["id"] and reply["session_id"] == str(job)
            assert chunks <= reply["tokens_used"] < 1900
        async with http.ws_connect(sidecar.url + "/v1/ws") as ws:  # a reconnect
            assert (await receive(ws))["type"] == "connected"
            _, _, end = await encrypted_prompt(ws, job, 4)
            assert end["session_tokens"] == reply["tokens_used"] + 4
    totals = await sidecar.ledger.job(job)
    assert totals is not None and totals.billable_tokens == reply["tokens_used"] + 4
