"""A Python client for the marketplace's encrypted WebSocket session, as the SDK speaks it.

For scripts and the demo: what the marketplace SDK (TypeScript) does, in a few lines of Python::

    async with EncryptedSession.open(url, host_public_key, job_id, client_key) as session:
        text, end = await session.prompt("Hello", max_tokens=64)

Before every prompt it sends a new ``encrypted_session_init`` (a fresh session key sealed to the
host key, signed over the ``E2EEv1`` digest by ``client_key``, which names the client), then the
prompt as ``encrypted_message``, and opens each ``encrypted_chunk`` until ``stream_end``
(NODE_PROTOCOL.md §1). A host error arrives as :class:`SessionError` with the node's code.
"""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aiohttp

from sidecar.crypto import (
    FINAL_RESPONSE_AAD,
    HostKey,
    chunk_aad,
    e2ee_digest,
    init_key,
    message_aad,
    open_box,
    seal,
)

ALG = "secp256k1-ecdh(ephemeral\u2192static)+hkdf(sha256)+xchacha20-poly1305"
RECEIVE_TIMEOUT = 180.0  # the SDK's wait for a first chunk


class SessionError(RuntimeError):
    def __init__(self, message: dict[str, Any]) -> None:
        self.code = str(message.get("code") or "error")
        self.message = message
        super().__init__(f"{self.code}: {message.get('message') or message.get('error')}")


class EncryptedSession:
    def __init__(
        self,
        ws: aiohttp.ClientWebSocketResponse,
        host_public_key: bytes,
        job_id: int,
        client_key: bytes,
        chain_id: int,
    ) -> None:
        self._ws = ws
        self._host_public_key = host_public_key
        self._client = HostKey(client_key)
        self.job_id = job_id
        self.chain_id = chain_id
        self.acks: list[dict[str, Any]] = []
        self.notices: list[dict[str, Any]] = []  # checkpoint_submitted / session_status

    @classmethod
    @asynccontextmanager
    async def open(
        cls,
        url: str,
        host_public_key: bytes,
        job_id: int,
        client_key: bytes,
        *,
        chain_id: int = 84532,
    ) -> AsyncIterator[EncryptedSession]:
        """``url``: the host's ``apiUrl`` (``http(s)://host:port``); ``/v1/ws`` is added."""
        ws_url = url.replace("https://", "wss://").replace("http://", "ws://") + "/v1/ws"
        async with aiohttp.ClientSession() as http, http.ws_connect(ws_url) as ws:
            session = cls(ws, host_public_key, job_id, client_key, chain_id)
            first = await session.receive()
            if first.get("type") != "connected":
                raise SessionError(first)
            yield session

    @property
    def client_address(self) -> str:
        return self._client.address

    async def prompt(
        self, text: str, *, max_tokens: int, model: str | None = None, temperature: float = 0.7
    ) -> tuple[str, dict[str, Any]]:
        """One prompt under a new session key: the generated text and the ``stream_end``."""
        session_key = os.urandom(32)
        await self._ws.send_json(self._init(session_key))
        ack = await self.receive()
        if ack.get("type") != "session_init_ack":
            raise SessionError(ack)
        self.acks.append(ack)
        request: dict[str, Any] = {"prompt": text, "max_tokens": max_tokens, "stream": True}
        request["temperature"] = temperature
        if model is not None:
            request["model"] = model
        nonce, box = seal(session_key, json.dumps(request).encode(), message_aad(0))
        message_id = f"{os.urandom(6).hex()}"
        await self._ws.send_json(
            {
                "type": "encrypted_message",
                "session_id": str(self.job_id),
                "id": message_id,
                "payload": {
                    "ciphertextHex": box.hex(),
                    "nonceHex": nonce.hex(),
                    "aadHex": message_aad(0).hex(),
                },
            }
        )
        parts: list[str] = []
        while True:
            reply = await self.receive()
            kind = reply.get("type")
            if kind == "encrypted_chunk":
                parts.append(self._open(session_key, reply["payload"]).decode())
            elif kind == "encrypted_response":
                self._open(session_key, reply["payload"], FINAL_RESPONSE_AAD)
            elif kind == "stream_end":
                return "".join(parts), reply
            elif kind == "error":
                raise SessionError(reply)

    def _init(self, session_key: bytes) -> dict[str, Any]:
        ephemeral = HostKey(os.urandom(32))
        payload = {
            "sessionKey": session_key.hex(),
            "jobId": str(self.job_id),
            "modelName": "",
            "pricePerToken": 0,
            "recoveryPublicKey": "0x" + self._client.public_key.hex(),
        }
        key = init_key(ephemeral.shared_x(self._host_public_key))
        nonce, box = seal(key, json.dumps(payload, separators=(",", ":")).encode(), b"")
        digest = e2ee_digest(ephemeral.public_key, self._host_public_key, nonce)
        signature, recid = self._client.sign_digest(digest)
        return {
            "type": "encrypted_session_init",
            "payload": {
                "ephPubHex": ephemeral.public_key.hex(),
                "saltHex": "00" * 32,
                "nonceHex": nonce.hex(),
                "ciphertextHex": box.hex(),
                "signatureHex": (signature + bytes([recid])).hex(),
                "recid": recid,
                "alg": ALG,
                "info": "",
                "aadHex": "",
            },
            "chain_id": self.chain_id,
            "session_id": str(self.job_id),
            "job_id": str(self.job_id),
        }

    def _open(self, key: bytes, payload: dict[str, Any], aad: bytes | None = None) -> bytes:
        aad_bytes = bytes.fromhex(payload.get("aadHex", "")) if aad is None else aad
        if aad is None and "index" in payload and aad_bytes != chunk_aad(payload["index"]):
            raise SessionError({"code": "BAD_CHUNK", "message": "a chunk's AAD is not its index"})
        return open_box(
            key,
            bytes.fromhex(payload["nonceHex"]),
            bytes.fromhex(payload["ciphertextHex"]),
            aad_bytes,
        )

    async def receive(self) -> dict[str, Any]:
        while True:
            msg = await self._ws.receive(timeout=RECEIVE_TIMEOUT)
            if msg.type is not aiohttp.WSMsgType.TEXT:
                raise SessionError({"code": "CLOSED", "message": f"the socket ended ({msg.type})"})
            message = json.loads(msg.data)
            if message.get("type") in ("checkpoint_submitted", "session_status"):
                self.notices.append(message)
                continue
            return dict(message)
