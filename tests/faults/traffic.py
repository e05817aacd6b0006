"""Mixed client traffic for the fault campaign: every API the sidecar speaks, in lanes.

A lane is one client that sends requests one after the other until it is told to stop (or its
sidecar is gone), and notes what it saw of each (:class:`~tests.faults.invariants.Seen`): the
record key the sidecar told it, the tokens it received, whether it got the whole answer. The
kinds:

* ``openai-json``       POST /v1/completions, non-stream (the OpenAI routes)
* ``openai-chat``       POST /v1/chat/completions, streamed
* ``openai-stream``     POST /v1/completions, streamed
* ``inference-json``    POST /v1/inference (the host node's API), JSON
* ``inference-sse``     POST /v1/inference, streamed (SSE)
* ``ws``                /v1/ws plaintext session: session_init, then streamed prompts
* ``ws-encrypted``      /v1/ws encrypted session, as the marketplace SDK does by default

Tokens of OpenAI streams are counted with the sidecar's own meter over the bytes the client
received (the same rule the sidecar bills by); node-API streams by their ``tokens`` fields.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from sidecar import crypto
from sidecar.crypto import HostKey
from sidecar.metering import Endpoint, StreamMeter
from tests.faults.invariants import Seen
from tests.integration.test_node_e2ee import sealed_init

REQUEST_ID = "X-Sidecar-Request-Id"
KINDS = (
    "openai-json",
    "openai-chat",
    "openai-stream",
    "inference-json",
    "inference-sse",
    "ws",
    "ws-encrypted",
)
STREAMS = {"openai-chat", "openai-stream", "inference-sse", "ws", "ws-encrypted"}
ALG = "secp256k1-ecdh(ephemeral\u2192static)+hkdf(sha256)+xchacha20-poly1305"


@dataclass
class Lane:
    kind: str
    job: int
    min_tokens: int = 16
    max_tokens: int = 400
    seen: list[Seen] = field(default_factory=list)
    model: str = "sidecar-tiny"
    # a lane's requests may be refused on purpose (disk full): the lane goes on after an error
    keep_going: bool = False

    @property
    def name(self) -> str:
        return f"{self.kind}@{self.job}"


@dataclass
class Traffic:
    """Lanes against one sidecar URL, until ``stop`` is set."""

    url: str
    lanes: Sequence[Lane]
    rng: random.Random
    chain_id: int | None = None
    host_public_key: bytes | None = None  # for encrypted sessions
    timeout: float = 60.0
    pause: float = 0.0  # seconds between a lane's requests
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    on_error: Callable[[Lane, Seen], None] | None = None

    async def run(self) -> list[Seen]:
        """Run every lane until ``stop`` (or, for lanes that stop at errors, until the sidecar
        is gone); every request each lane made."""
        timeout = aiohttp.ClientTimeout(total=None, sock_read=self.timeout, sock_connect=5)
        connector = aiohttp.TCPConnector(limit=0, force_close=True)
        async with aiohttp.ClientSession(timeout=timeout, connector=connector) as http:
            await asyncio.gather(*(self._lane(http, lane) for lane in self.lanes))
        return [s for lane in self.lanes for s in lane.seen]

    def tokens_for(self, lane: Lane) -> int:
        return self.rng.randint(lane.min_tokens, lane.max_tokens)

    async def _lane(self, http: aiohttp.ClientSession, lane: Lane) -> None:
        runner = _WS if lane.kind in ("ws", "ws-encrypted") else _HTTP
        await runner(self, http, lane).run()


class _HTTP:
    def __init__(self, traffic: Traffic, http: aiohttp.ClientSession, lane: Lane) -> None:
        self.traffic, self.http, self.lane = traffic, http, lane

    async def run(self) -> None:
        t, lane = self.traffic, self.lane
        while not t.stop.is_set():
            n = t.tokens_for(lane)
            seen = Seen(lane.name, lane.kind, lane.job, lane.kind in STREAMS, n)
            lane.seen.append(seen)
            try:
                await self.one(seen)
                if seen.error:
                    await asyncio.sleep(0.05)  # refused: not a tight loop
            except aiohttp.ClientConnectorError as exc:
                seen.error = f"connect: {type(exc).__name__}"
                if not lane.keep_going:
                    return
                await asyncio.sleep(0.1)
            except (aiohttp.ClientError, ConnectionError, TimeoutError) as exc:
                seen.error = f"{type(exc).__name__}: {exc}"[:200]
                if t.on_error is not None:
                    t.on_error(lane, seen)
                if not lane.keep_going:
                    return
                await asyncio.sleep(0.05)
            if t.pause:
                await asyncio.sleep(t.pause)

    async def one(self, seen: Seen) -> None:
        t, lane, n = self.traffic, self.lane, seen.max_tokens
        if lane.kind.startswith("openai"):
            chat = lane.kind == "openai-chat"
            path = "/v1/chat/completions" if chat else "/v1/completions"
            body: dict[str, Any] = {"model": lane.model, "max_tokens": n, "job_id": lane.job}
            if chat:
                body["messages"] = [{"role": "user", "content": "tell me a story"}]
            else:
                body["prompt"] = "tell me a story"
            body["stream"] = seen.stream
        else:
            path = "/v1/inference"
            body = {
                "model": lane.model,
                "prompt": "tell me a story",
                "max_tokens": n,
                "jobId": lane.job,
                "stream": seen.stream,
            }
            if t.chain_id is not None:
                body["chain_id"] = t.chain_id
        seen.sent = True
        async with self.http.post(t.url + path, json=body) as resp:
            seen.status = resp.status
            seen.key = resp.headers.get(REQUEST_ID)
            if "X-Sidecar-Max-Tokens" in resp.headers:
                seen.max_tokens = int(resp.headers["X-Sidecar-Max-Tokens"])
            if resp.status != 200 or not seen.stream:
                raw = await resp.read()
                self.answer(seen, resp.status, raw)
                return
            if lane.kind.startswith("openai"):
                await self.openai_stream(
                    seen, resp, Endpoint.CHAT if chat else Endpoint.COMPLETIONS
                )
            else:
                await self.inference_stream(seen, resp)

    def answer(self, seen: Seen, status: int, raw: bytes) -> None:
        try:
            obj = json.loads(raw)
        except ValueError:
            obj = None
        if status != 200:
            error = obj.get("error") if isinstance(obj, dict) else None
            seen.code = error.get("code") if isinstance(error, dict) else None
            seen.error = f"HTTP {status} {seen.code or raw[:80]!r}"
            return
        if not isinstance(obj, dict):
            seen.error = f"200 with a body that is not JSON: {raw[:80]!r}"
            return
        usage = obj.get("usage") or {}
        seen.tokens = int(usage.get("completion_tokens", obj.get("tokens_used", 0)))
        if seen.key is None and "request_id" in obj:
            seen.key = str(obj["request_id"])
        seen.finished = True

    async def openai_stream(
        self, seen: Seen, resp: aiohttp.ClientResponse, endpoint: Endpoint
    ) -> None:
        meter = StreamMeter(endpoint)
        async for chunk in resp.content.iter_any():
            meter.feed(chunk)
            seen.tokens = meter.usage().completion_tokens
            if meter.done:
                seen.finished = True  # [DONE]: the record was committed before it
        if not seen.finished:
            seen.error = "stream ended without [DONE]"

    async def inference_stream(self, seen: Seen, resp: aiohttp.ClientResponse) -> None:
        buffer = b""
        async for chunk in resp.content.iter_any():
            buffer += chunk
            while b"\n\n" in buffer:
                event, buffer = buffer.split(b"\n\n", 1)
                if not event.startswith(b"data: "):
                    continue
                obj = json.loads(event[6:])
                seen.tokens += int(obj.get("tokens", 0))
                if obj.get("finish_reason") is not None:
                    seen.finished = True  # the last event: sent after the commit
        if not seen.finished:
            seen.error = "stream ended without its last event"


class _WS:
    """One socket per lane, reconnected after a failure; a session of the lane's job."""

    def __init__(self, traffic: Traffic, http: aiohttp.ClientSession, lane: Lane) -> None:
        self.traffic, self.http, self.lane = traffic, http, lane
        self.client = HostKey(os.urandom(32))
        self.index = 0

    async def run(self) -> None:
        t, lane = self.traffic, self.lane
        while not t.stop.is_set():
            try:
                async with self.http.ws_connect(
                    t.url.replace("http", "ws", 1) + "/v1/ws", heartbeat=None, autoclose=False
                ) as ws:
                    # Leaving the block closes the socket, which ends the session: the sidecar
                    # then claims the rest and settles the job (the tests settle at the end).
                    await self.session(ws)
            except aiohttp.ClientConnectorError:
                if not lane.keep_going:
                    return
                await asyncio.sleep(0.1)
            except (aiohttp.ClientError, ConnectionError, TimeoutError) as exc:
                if lane.seen and not lane.seen[-1].finished and lane.seen[-1].error is None:
                    lane.seen[-1].error = f"{type(exc).__name__}: {exc}"[:200]
                if not lane.keep_going:
                    return
                await asyncio.sleep(0.05)
            if not lane.keep_going and lane.seen and lane.seen[-1].error:
                return

    async def receive(self, ws: aiohttp.ClientWebSocketResponse) -> dict[str, Any]:
        msg = await asyncio.wait_for(ws.receive(), self.traffic.timeout)
        if msg.type is not aiohttp.WSMsgType.TEXT:
            raise ConnectionError(f"socket ended: {msg.type.name} {msg.data!r}"[:200])
        obj = json.loads(msg.data)
        return obj if isinstance(obj, dict) else {}

    async def receive_reply(self, ws: aiohttp.ClientWebSocketResponse) -> dict[str, Any]:
        while True:
            obj = await self.receive(ws)
            if obj.get("type") not in ("checkpoint_submitted", "session_status"):
                return obj

    async def session(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        t, lane = self.traffic, self.lane
        greeting = await self.receive(ws)
        if greeting.get("type") != "connected":
            raise ConnectionError(f"no greeting: {greeting}")
        if lane.kind == "ws":
            init = {"type": "session_init", "session_id": str(lane.job), "jobId": str(lane.job)}
            if t.chain_id is not None:
                init["chain_id"] = t.chain_id
            await ws.send_json(init)
            ack = await self.receive_reply(ws)
            if ack.get("type") != "session_init_ack":
                raise ConnectionError(f"session_init refused: {ack}")
        while not t.stop.is_set():
            n = t.tokens_for(lane)
            seen = Seen(lane.name, lane.kind, lane.job, True, n)
            lane.seen.append(seen)
            if lane.kind == "ws":
                await self.plain_prompt(ws, seen)
            else:
                await self.encrypted_prompt(ws, seen)
            if seen.error:
                if not lane.keep_going:
                    return
                await asyncio.sleep(0.05)
            if t.pause:
                await asyncio.sleep(t.pause)

    async def plain_prompt(self, ws: aiohttp.ClientWebSocketResponse, seen: Seen) -> None:
        job = str(self.lane.job)
        request = {"prompt": "tell me a story", "max_tokens": seen.max_tokens, "stream": True}
        seen.sent = True
        await ws.send_json(
            {"type": "prompt", "jobId": job, "prompt": request["prompt"], "request": request}
        )
        while True:
            message = await self.receive_reply(ws)
            kind = message.get("type")
            if kind == "stream_chunk":
                seen.tokens += int(message.get("tokens", 0))
            elif kind == "stream_end":
                self.end(seen, message)
                return
            elif kind == "error":
                seen.code = message.get("code")
                seen.error = f"error {seen.code}: {message.get('message', '')[:100]}"

    async def encrypted_prompt(self, ws: aiohttp.ClientWebSocketResponse, seen: Seen) -> None:
        t, job = self.traffic, self.lane.job
        assert t.host_public_key is not None, "encrypted sessions need the host's public key"
        session_key = os.urandom(32)
        await ws.send_json(self.sealed_init(session_key))
        ack = await self.receive_reply(ws)
        if ack.get("type") != "session_init_ack":
            seen.code = ack.get("code")
            seen.error = f"encrypted init refused: {ack}"[:200]
            return
        request = {
            "prompt": "tell me a story",
            "model": self.lane.model,
            "max_tokens": seen.max_tokens,
        }
        nonce, box = crypto.seal(session_key, json.dumps(request).encode(), crypto.message_aad(0))
        self.index += 1
        seen.sent = True
        await ws.send_json(
            {
                "type": "encrypted_message",
                "session_id": str(job),
                "id": f"m{self.index}",
                "payload": {
                    "ciphertextHex": box.hex(),
                    "nonceHex": nonce.hex(),
                    "aadHex": crypto.message_aad(0).hex(),
                },
            }
        )
        while True:
            message = await self.receive_reply(ws)
            kind = message.get("type")
            if kind == "encrypted_chunk":
                payload = message["payload"]
                crypto.open_box(  # the client reads what it is billed for
                    session_key,
                    bytes.fromhex(payload["nonceHex"]),
                    bytes.fromhex(payload["ciphertextHex"]),
                    bytes.fromhex(payload["aadHex"]),
                )
                seen.tokens += int(message.get("tokens", 0))
            elif kind == "stream_end":
                self.end(seen, message)
                return
            elif kind == "error":
                seen.code = message.get("code")
                seen.error = f"error {seen.code}: {message.get('message', '')[:100]}"

    def end(self, seen: Seen, message: dict[str, Any]) -> None:
        if message.get("reason") == "complete":
            seen.key = message.get("request_id")
            seen.finished = True
            if int(message.get("tokens_used", -1)) != seen.tokens:
                seen.error = (
                    f"stream_end says {message.get('tokens_used')} tokens, "
                    f"{seen.tokens} chunks came"
                )
        else:
            seen.error = seen.error or f"stream_end {message.get('reason')}"

    def sealed_init(self, session_key: bytes) -> dict[str, Any]:
        """An encrypted_session_init as the SDK builds it (NODE_PROTOCOL.md §1.2)."""
        t = self.traffic
        assert t.host_public_key is not None
        frame: dict[str, Any] = sealed_init(
            self.lane.job,
            session_key,
            t.host_public_key,
            self.client,
            model=self.lane.model,
            chain_id=t.chain_id,
        )
        return frame


async def run_until(traffic: Traffic, seconds: float) -> list[Seen]:
    """Run ``traffic`` for ``seconds``, then stop it and wait for its lanes."""
    task = asyncio.create_task(traffic.run())
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(asyncio.shield(task), seconds)
    traffic.stop.set()
    return await task
