"""The host node's WebSocket session (``/v1/ws``), over the one metering core.

Every prompt becomes one metered OpenAI request through :mod:`sidecar.exchange`. Nothing here
keeps a token count: the ledger keys every record by job, so a session's tokens accumulate
across its prompts and reconnects, and only settlement ends them. A socket that ends
(``session_end``, a close, a dropped connection) asks the chain service to settle its job once
no other socket of that job is open; HTTP-only sessions settle by ``--settle-after-idle``.

Plaintext and encrypted sessions share everything but the replies' form: an encrypted session
(``encrypted_session_init``, accepted again before every prompt with a new session key) gets its
prompts in ``encrypted_message`` boxes and its tokens as ``encrypted_chunk`` boxes, then an
``encrypted_response`` and a plaintext ``stream_end`` (``node_e2ee`` seals and opens them).
Every ``error`` echoes the ``id`` and ``session_id`` of the message it answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Protocol

import aiohttp
from aiohttp import WSMsgType, web

from sidecar.auth import Requester
from sidecar.errors import BadRequest, JobRefused, SidecarError, UpstreamError
from sidecar.exchange import Exchange
from sidecar.ledger import Ledger
from sidecar.metered_stream import MeteredStream
from sidecar.metering import Endpoint, InvalidJobId, safejson
from sidecar.shells.node_http import Measured, NodeHttp, engine_refusal
from sidecar.shells.node_protocol import (
    InferenceParams,
    answer_fields,
    chain_id_of,
    chunk_text,
    close_code,
    job_of,
    parse_inference,
    show,
    to_openai,
    usage_json,
)
from sidecar.shells.rate import MessageRate

if TYPE_CHECKING:  # the cipher's libraries load with the first encrypted session
    from sidecar.chain.worker import ClaimEvent  # web3 only with a chain
    from sidecar.crypto import HostKey
    from sidecar.shells.node_e2ee import ReplySealer

log = logging.getLogger("sidecar.node")

_DATA_FRAMES = (WSMsgType.TEXT, WSMsgType.BINARY)
WS_HEARTBEAT = 30.0  # seconds: pings find half-open connections (a client that vanished)


class Settlement(Protocol):
    """What sessions need of the chain service: settling a job, and news of its claims."""

    async def request_settlement(self, job_id: int) -> None: ...

    def on_claim(self, listener: Callable[[ClaimEvent], None]) -> None: ...


@dataclass
class _Generation:
    stream: MeteredStream | None = None
    task: asyncio.Task[None] | None = None
    echo: dict[str, Any] = field(default_factory=dict)  # the id (and session) replies carry
    measured: Measured = field(default_factory=lambda: Measured(None, None))  # the prompt's

    @property
    def running(self) -> bool:
        return self.task is not None and not self.task.done()


@dataclass(eq=False)  # hashed by identity: the sockets of a job are a set
class _Socket:
    ws: web.WebSocketResponse
    session_id: str | None = None
    job_id: int | None = None
    chain_id: int | None = None
    generation: _Generation = field(default_factory=_Generation)
    session_key: bytes | None = field(default=None, repr=False)  # the last encrypted init's
    requester: Requester | None = None  # who signed the last encrypted init

    async def send(self, message: dict[str, Any]) -> None:
        if not self.ws.closed:
            await self.ws.send_str(json.dumps(message))

    async def error(self, code: str, message: str, answering: dict[str, Any]) -> None:
        await self.send({"type": "error", "code": code, "message": message, **answering})

    def echo(self, obj: dict[str, Any]) -> dict[str, Any]:
        """The ``id`` and ``session_id`` a reply to ``obj`` carries."""
        out: dict[str, Any] = {}
        if "id" in obj:
            out["id"] = obj["id"]
        session_id = obj.get("session_id", obj.get("sessionId", self.session_id))
        if session_id is not None:
            out["session_id"] = session_id
        return out


class _PlainReplies:
    """A plaintext session's stream: ``stream_chunk`` per token, an empty one at the end."""

    def chunk(self, text: str) -> dict[str, Any]:
        return {"type": "stream_chunk", "content": text, "tokens": 1}

    def last(self, finish_reason: str) -> list[dict[str, Any]]:
        return [{"type": "stream_chunk", "content": "", "tokens": 0}]


class _SealedReplies:
    """An encrypted session's stream: ``encrypted_chunk`` boxes, the last one empty and
    ``final``, then the ``encrypted_response`` holding the finish reason."""

    def __init__(self, session_key: bytes) -> None:
        from sidecar.shells.node_e2ee import ReplySealer  # see the TYPE_CHECKING import

        self.sealer: ReplySealer = ReplySealer(session_key)

    def chunk(self, text: str) -> dict[str, Any]:
        return self.sealer.chunk(text, tokens=1)

    def last(self, finish_reason: str) -> list[dict[str, Any]]:
        return [self.sealer.chunk("", tokens=0, final=True), self.sealer.response(finish_reason)]


_Replies = _PlainReplies | _SealedReplies


class NodeWebSocket:
    def __init__(
        self,
        exchange: Exchange,
        http: NodeHttp,
        ledger: Ledger,
        settlement: Settlement | None,
        *,
        max_message_bytes: int,
        messages_per_second: float = 20.0,
        message_burst: int = 40,
        host_key: HostKey | None = None,
    ) -> None:
        self.exchange = exchange
        self.host_key = host_key  # without it, encrypted sessions are refused as the node does
        self.http = http  # for the checks the HTTP routes make too
        self.ledger = ledger
        self.settlement = settlement
        self.max_message_bytes = max_message_bytes
        self.messages_per_second = messages_per_second
        self.message_burst = message_burst
        self._sockets_of_job: dict[int, set[_Socket]] = {}
        self._settling: set[asyncio.Task[None]] = set()
        if settlement is not None:
            settlement.on_claim(self._claimed)

    def routes(self) -> list[web.RouteDef]:
        return [web.get("/v1/ws", self.websocket)]

    async def websocket(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(heartbeat=WS_HEARTBEAT, max_msg_size=self.max_message_bytes)
        await ws.prepare(request)
        sock = _Socket(ws)
        loop = asyncio.get_running_loop()
        rate = MessageRate(self.messages_per_second, self.message_burst, loop.time())
        try:
            await sock.send({"type": "connected", "message": "WebSocket connected successfully"})
            async for msg in ws:
                if msg.type in _DATA_FRAMES and not rate.allow(loop.time()):
                    await self._too_fast(sock, rate, loop.time())
                    continue
                if not await self._on_frame(sock, msg):
                    break
        finally:
            await self._end(sock)
        return ws

    async def _too_fast(self, sock: _Socket, rate: MessageRate, now: float) -> None:
        """A message over the socket's rate: dropped unread; the client told once a second."""
        self.exchange.metrics.rejected.labels("rate_limited").inc()
        if rate.should_warn(now):
            log.info("websocket of job %s sends too fast: messages dropped", sock.job_id)
            await sock.error(
                "RATE_LIMITED",
                f"more than {self.messages_per_second:g} messages a second (bursts of "
                f"{self.message_burst}): messages were dropped unread; slow down",
                {} if sock.session_id is None else {"session_id": sock.session_id},
            )

    async def _on_frame(self, sock: _Socket, msg: aiohttp.WSMessage) -> bool:
        """Handle one frame; False ends the session."""
        if msg.type is WSMsgType.BINARY:
            await sock.error("binary_not_supported", "send messages as JSON text frames", {})
            return True
        if msg.type is WSMsgType.ERROR:
            # aiohttp closes the socket itself (1009 for a message over --ws-max-message-bytes).
            log.info("websocket of job %s failed: %s", sock.job_id, sock.ws.exception())
            return False
        if msg.type is not WSMsgType.TEXT:
            return msg.type is not WSMsgType.CLOSE
        try:
            obj = safejson.loads(msg.data)
        except (ValueError, RecursionError):
            await sock.error("invalid_json", "the message is not valid JSON", {})
            return True
        if type(obj) is not dict or type(obj.get("type")) is not str:
            await sock.error("invalid_message", 'a message is a JSON object with a "type"', {})
            return True
        try:
            return await self._on_message(sock, obj)
        except InvalidJobId as exc:
            await sock.error("invalid_job_id", str(exc), sock.echo(obj))
        except SidecarError as exc:
            await sock.send({**exc.socket_message(), **sock.echo(obj)})
        return True

    async def _on_message(self, sock: _Socket, obj: dict[str, Any]) -> bool:
        kind = obj["type"]
        if kind == "session_init":
            return await self._session_init(sock, obj)
        if kind == "encrypted_session_init":
            return await self._encrypted_session_init(sock, obj)
        if kind in ("prompt", "inference"):
            await self._prompt(sock, obj)
        elif kind == "encrypted_message":
            await self._encrypted_message(sock, obj)
        elif kind == "stream_cancel":
            await self._cancel(sock, str(obj.get("reason") or "cancelled by the client"))
        elif kind == "session_end":
            await self._cancel(sock, "session ended")
            await sock.send({"type": "session_ended", "session_id": sock.session_id})
            return False
        elif kind == "ping":
            pass  # the SDK's heartbeat; the node answers none
        else:
            await sock.error(
                "unknown_message_type", f"unknown message type {show(kind)}", sock.echo(obj)
            )
        return True

    async def _session_init(self, sock: _Socket, obj: dict[str, Any]) -> bool:
        session_id = obj.get("session_id", obj.get("sessionId"))
        job_id = job_of(
            [("jobId", obj.get("jobId")), ("job_id", obj.get("job_id"))],
            [("session_id", session_id)],
        )
        ack = {"message": "Session initialized successfully"}
        return await self._open_session(sock, obj, job_id, None, ack)

    async def _encrypted_session_init(self, sock: _Socket, obj: dict[str, Any]) -> bool:
        """The SDK's default: the session key in a box to the host key, sent again before every
        prompt (each time a new key, the message counter back at 0). The job is the one inside
        the box; the outer ``job_id`` is not trusted (the node ignores it too)."""
        if self.host_key is None:
            raise BadRequest(
                "encrypted sessions need the host key (--host-key-file); use session_init",
                code="ENCRYPTION_NOT_SUPPORTED",
            )
        from sidecar.shells.node_e2ee import open_init  # see the TYPE_CHECKING import

        init = open_init(self.host_key, obj)
        job_id = job_of([("the init's jobId", init.job_id)], [])
        ack = {
            "client_address": init.client_address,
            "message": "Encrypted session initialized successfully",
        }
        requester = Requester(init.client_address, "encrypted session")
        if not await self._open_session(sock, obj, job_id, requester, ack):
            return False
        sock.session_key = init.session_key
        sock.requester = requester
        return True

    async def _open_session(
        self,
        sock: _Socket,
        obj: dict[str, Any],
        job_id: int | None,
        requester: Requester | None,
        ack_fields: dict[str, str],
    ) -> bool:
        """Admit the session's job and acknowledge; False when the job is refused (the socket
        is then closed, as this host must not serve it)."""
        session_id = obj.get("session_id", obj.get("sessionId"))
        if sock.job_id is not None and job_id is not None and job_id != sock.job_id:
            raise BadRequest(
                f"this socket serves job {sock.job_id}, not {job_id}", code="job_mismatch"
            )
        chain_id = chain_id_of(obj)
        await self.http.check(InferenceParams("-", 1, 0.0, False, chain_id=chain_id), job_id)
        if job_id is not None:
            try:
                await self.exchange.admit_job(job_id, requester)
            except JobRefused as exc:
                await sock.send({**exc.socket_message(), **sock.echo(obj)})
                await sock.ws.close(code=close_code(exc.status), message=exc.code.encode())
                return False
        sock.session_id = None if session_id is None else str(session_id)
        sock.chain_id = chain_id
        self._attach(sock, job_id)
        ack: dict[str, Any] = {
            "type": "session_init_ack",
            "status": "success",
            "session_id": sock.session_id or "unknown",
            "job_id": job_id,
            "chain_id": chain_id,
            **ack_fields,
        }
        if "id" in obj:
            ack["id"] = obj["id"]
        if job_id is not None:
            ack["tokens_used"] = await self._job_tokens(job_id)
        await sock.send(ack)
        return True

    def _attach(self, sock: _Socket, job_id: int | None) -> None:
        if job_id is not None and sock.job_id is None:
            sock.job_id = job_id
            self._sockets_of_job.setdefault(job_id, set()).add(sock)

    def _claimed(self, event: ClaimEvent) -> None:
        """A claim of a job with open sessions was mined (or refused): tell them, in the
        shapes the SDK listens for (the node itself never sends these)."""
        sockets = self._sockets_of_job.get(event.job_id)
        if not sockets or event.kind.value != "proof":
            return
        now = int(time.time() * 1000)
        for sock in list(sockets):
            session_id = sock.session_id or str(event.job_id)
            status: dict[str, Any] = {
                "status": event.state.value,
                "error": event.error,
                "checkpoint_index": event.seq,
                "tokens": event.tokens,
                "tx_hash": event.tx_hash,
            }
            messages: list[dict[str, Any]] = [
                {"type": "session_status", "session_id": session_id, "checkpoint": status}
            ]
            if event.state.value == "confirmed":
                messages.insert(
                    0,
                    {
                        "type": "checkpoint_submitted",
                        "session_id": session_id,
                        "checkpoint_index": event.seq,
                        "tokens": event.tokens,
                        "tx_hash": event.tx_hash,
                    },
                )
            for message in messages:
                task = asyncio.create_task(sock.send({**message, "timestamp": now}))
                self._settling.add(task)  # kept until sent, like the settlements
                task.add_done_callback(self._sent_or_gone)

    async def _job_tokens(self, job_id: int) -> int:
        return await self.ledger.job_tokens(job_id)

    async def _prompt(self, sock: _Socket, obj: dict[str, Any]) -> None:
        request = obj.get("request")
        if request is None:
            request = {k: v for k, v in obj.items() if k != "type"}
        elif type(request) is dict and "prompt" not in request and "prompt" in obj:
            request = {**request, "prompt": obj["prompt"]}
        params = parse_inference(request, default_stream=True)
        fields = request if type(request) is dict else {}
        job_id = job_of(
            [
                ("socket's job", sock.job_id),
                ("jobId", obj.get("jobId")),
                ("job_id", obj.get("job_id")),
                ("request.jobId", fields.get("jobId")),
                ("request.job_id", fields.get("job_id")),
            ],
            [
                ("session_id", obj.get("session_id")),
                ("request.session_id", fields.get("session_id")),
            ],
        )
        # The node's plaintext stream messages carry the prompt's id, not the session's.
        echo = {"id": obj["id"]} if "id" in obj else {}
        await self._start(sock, params, job_id, echo, _PlainReplies())

    async def _encrypted_message(self, sock: _Socket, obj: dict[str, Any]) -> None:
        """A prompt in a box under the session key of the socket's last encrypted init."""
        named = obj.get("session_id", obj.get("sessionId"))
        if sock.session_key is None or (named is not None and str(named) != sock.session_id):
            raise BadRequest(
                "no encrypted session with this session_id on this socket: send "
                "encrypted_session_init first",
                code="SESSION_KEY_NOT_FOUND",
            )
        from sidecar.shells.node_e2ee import open_message  # see the TYPE_CHECKING import

        request = open_message(sock.session_key, obj)
        params = parse_inference(request, default_stream=True)
        if not params.stream:
            params = replace(params, stream=True)  # the node always streams this path
        await self._start(
            sock, params, sock.job_id, sock.echo(obj), _SealedReplies(sock.session_key)
        )

    async def _start(
        self,
        sock: _Socket,
        params: InferenceParams,
        job_id: int | None,
        echo: dict[str, Any],
        replies: _Replies,
    ) -> None:
        params = await self.http.check(params, job_id)
        if sock.generation.running:
            raise BadRequest(
                "a generation is running on this socket: wait for its end or send stream_cancel",
                code="generation_in_progress",
            )
        if job_id is not None and sock.job_id is None:
            # Only a client the job admits joins its session: a stranger's socket must neither
            # settle the job when it closes nor hold its settlement off while it stays open.
            await self.exchange.admit_job(job_id, sock.requester)
        self._attach(sock, job_id)
        generation = _Generation(echo=echo)
        generation.task = asyncio.create_task(
            self._generate(sock, generation, params, job_id, replies)
        )
        sock.generation = generation

    async def _generate(
        self,
        sock: _Socket,
        generation: _Generation,
        params: InferenceParams,
        job_id: int | None,
        replies: _Replies,
    ) -> None:
        endpoint, body = to_openai(params)
        echo = generation.echo
        try:
            measured = await self.http.measure(params)
            if not params.stream:
                await self._respond(sock, params, endpoint, body, job_id, echo, measured)
                return
            try:
                generation.stream = await self.exchange.call_stream(
                    endpoint, body, job_id, sock.requester
                )
            except UpstreamError as exc:
                raise engine_refusal(exc) from None
            generation.measured = measured
            await self._relay_stream(sock, generation, job_id, replies)
        except SidecarError as exc:
            with contextlib.suppress(ConnectionError):
                await sock.send({**exc.socket_message(), **echo})
                await sock.send({"type": "stream_end", "reason": "error", "tokens_used": 0, **echo})
        except ConnectionError:
            pass  # the socket is gone; _end records and settles

    async def _respond(
        self,
        sock: _Socket,
        params: InferenceParams,
        endpoint: Endpoint,
        body: dict[str, Any],
        job_id: int | None,
        echo: dict[str, Any],
        measured: Measured,
    ) -> None:
        answer, reply = await self.http.call(endpoint, body, job_id, sock.requester)
        message: dict[str, Any] = {
            "type": "response",
            **answer_fields(reply, answer.usage, params.request_id or answer.key, measured),
            **echo,
        }
        if job_id is not None:
            message["session_tokens"] = await self._job_tokens(job_id)
        await sock.send(message)

    async def _relay_stream(
        self, sock: _Socket, generation: _Generation, job_id: int | None, replies: _Replies
    ) -> None:
        stream, echo = generation.stream, generation.echo
        assert stream is not None  # started by _generate
        finish = "stop"
        async with contextlib.aclosing(stream.events()) as events:
            async for chunk in events:
                text, reason = chunk_text(chunk)
                finish = reason or finish
                if text:
                    await sock.send({**replies.chunk(text), **echo})
        # The iteration ended: the record is committed; its count is the one billed.
        for message in replies.last(finish):
            await sock.send({**message, **echo})
        await self._stream_end(sock, generation, job_id, "complete", finish, echo)

    async def _stream_end(
        self,
        sock: _Socket,
        generation: _Generation,
        job_id: int | None,
        reason: str,
        finish: str,
        echo: dict[str, Any],
    ) -> None:
        stream, measured = generation.stream, generation.measured
        assert stream is not None  # only a started stream ends
        usage = stream.usage
        prompt_tokens = usage.prompt_tokens or measured.prompt_tokens
        message: dict[str, Any] = {
            "type": "stream_end",
            "reason": reason,
            "tokens_used": usage.completion_tokens,
            "finish_reason": finish,
            "usage": usage_json(prompt_tokens, usage.completion_tokens, measured.context_window),
            "request_id": stream.key,
            **echo,
        }
        if job_id is not None:
            message["session_tokens"] = await self._job_tokens(job_id)
        await sock.send(message)

    async def _stop_generation(self, sock: _Socket) -> bool:
        """Cancel the running generation (its stream closes the engine request and records
        the tokens so far); False if none was running."""
        task = sock.generation.task
        if task is None or task.done():
            return False
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        return True

    async def _cancel(self, sock: _Socket, reason: str) -> None:
        """Stop the running generation and say so with a ``stream_end``."""
        if not await self._stop_generation(sock):
            return
        generation = sock.generation
        if generation.stream is not None and not sock.ws.closed:
            log.info("generation on job %s cancelled: %s", sock.job_id, reason)
            echo = {**generation.echo}
            if sock.session_id is not None:
                echo["session_id"] = sock.session_id
            with contextlib.suppress(ConnectionError):
                await self._stream_end(sock, generation, None, "cancelled", "cancelled", echo)

    async def _end(self, sock: _Socket) -> None:
        """The session is over (session_end, close, dropped connection): settle its job once
        no other socket of the job is open."""
        with contextlib.suppress(Exception):
            await self._stop_generation(sock)
        if not sock.ws.closed:
            with contextlib.suppress(Exception):
                await sock.ws.close()
        job_id = sock.job_id
        if job_id is None:
            return
        sockets = self._sockets_of_job.get(job_id, set())
        sockets.discard(sock)
        if sockets:
            return
        self._sockets_of_job.pop(job_id, None)
        if self.settlement is not None:
            # Its own task: this handler may be cancelled (the client dropped the connection).
            task = asyncio.create_task(
                self._settle(self.settlement, job_id), name=f"sidecar-settle-{job_id}"
            )
            self._settling.add(task)
            task.add_done_callback(self._settling.discard)

    def _sent_or_gone(self, task: asyncio.Task[None]) -> None:
        self._settling.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.debug("a claim notice found its socket gone: %s", task.exception())

    async def _settle(self, settlement: Settlement, job_id: int) -> None:
        try:
            await settlement.request_settlement(job_id)
            log.info("session of job %s ended: final claim and settlement requested", job_id)
        except JobRefused as exc:
            log.warning("session of job %s ended but cannot settle: %s", job_id, exc)
        except Exception:
            log.exception("session of job %s ended; requesting its settlement failed", job_id)
