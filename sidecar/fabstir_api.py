"""The host node's own API (fabstir-llm-node), translated onto the engine's OpenAI routes.

Marketplace clients speak this API to a host: ``POST /v1/inference`` over HTTP and a session
protocol over the WebSocket ``/v1/ws``. Every prompt becomes one OpenAI request through
:meth:`Proxy.metered_call` / :meth:`Proxy.metered_stream`: the same admission, metering,
ledger and chain service as the OpenAI routes, so a job used over both is counted once.

Nothing here keeps a token count: the ledger keys every record by job, so a session's tokens
accumulate across its prompts and reconnects, and only settlement ends them. A socket that
ends (``session_end``, a close, a dropped connection) asks the chain service to settle its job
once no other socket of that job is open; HTTP-only sessions settle by ``--settle-after-idle``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from dataclasses import dataclass
from typing import Any

import aiohttp
from aiohttp import WSMsgType, web

from sidecar import __version__
from sidecar.config import Settings
from sidecar.errors import error_response
from sidecar.ledger import Claim, ClaimKind, Ledger
from sidecar.metering import Endpoint, safejson
from sidecar.metering.jobs import InvalidJobId, parse_job_id, resolve_job_id
from sidecar.proxy import MeteredCallError, MeteredStream, Proxy

log = logging.getLogger("sidecar.fabstir")

DEFAULT_TEMPERATURE = 0.7
MODELS_MAX_AGE = 30.0  # seconds the engine's model list is trusted for validation
WS_HEARTBEAT = 30.0  # seconds: pings find half-open connections (a client that vanished)
MAX_ERROR_TEXT = 200

# -- the request, parsed and checked (pure) -----------------------------------------------


class BadRequest(ValueError):
    """A request or message that cannot be served; ``param`` names the field at fault."""

    def __init__(self, message: str, *, param: str | None = None, code: str = "invalid_request"):
        super().__init__(message)
        self.param = param
        self.code = code


@dataclass(frozen=True, slots=True)
class InferenceParams:
    prompt: str
    max_tokens: int
    temperature: float
    stream: bool
    model: str | None = None
    request_id: str | None = None
    chain_id: int | None = None
    context: tuple[tuple[str, str], ...] = ()  # (role, content) of earlier turns


def parse_inference(obj: object, *, default_stream: bool = False) -> InferenceParams:
    """Check a node-API inference request (``/v1/inference`` body, or a WS ``request``)."""
    if type(obj) is not dict:
        raise BadRequest("the request must be a JSON object", param="request")
    prompt = obj.get("prompt")
    if type(prompt) is not str or not prompt:
        raise BadRequest("prompt is required: a non-empty string", param="prompt")
    max_tokens = obj.get("max_tokens")
    if type(max_tokens) is not int or max_tokens <= 0:
        raise BadRequest(
            f"max_tokens must be an integer above 0, got {_show(max_tokens)}", param="max_tokens"
        )
    temperature = obj.get("temperature", DEFAULT_TEMPERATURE)
    if temperature is None:
        temperature = DEFAULT_TEMPERATURE
    if type(temperature) not in (int, float) or not 0 <= temperature <= 2:
        raise BadRequest(
            f"temperature must be a number from 0 to 2, got {_show(temperature)}",
            param="temperature",
        )
    stream = obj.get("stream", default_stream)
    if type(stream) is not bool:
        raise BadRequest(f"stream must be true or false, got {_show(stream)}", param="stream")
    model = obj.get("model")
    if model is not None and (type(model) is not str or not model):
        raise BadRequest(f"model must be a model name, got {_show(model)}", param="model")
    request_id = obj.get("request_id")
    if request_id is not None and type(request_id) not in (str, int):
        raise BadRequest("request_id must be a string", param="request_id")
    return InferenceParams(
        prompt=prompt,
        max_tokens=max_tokens,
        temperature=float(temperature),
        stream=stream,
        model=model,
        request_id=None if request_id is None else str(request_id),
        chain_id=_chain_id(obj),
        context=_context(obj.get("conversation_context")),
    )


def _chain_id(obj: dict[str, Any]) -> int | None:
    value = obj.get("chain_id", obj.get("chainId"))
    if value is None:
        return None
    if type(value) is str and value.isascii() and value.isdigit():
        return int(value)
    if type(value) is not int or value < 0:
        raise BadRequest(f"chain_id must be an integer, got {_show(value)}", param="chain_id")
    return value


def _context(value: object) -> tuple[tuple[str, str], ...]:
    if value is None:
        return ()
    if type(value) is not list:
        raise BadRequest("conversation_context must be a list", param="conversation_context")
    turns = []
    for item in value:
        if type(item) is str:
            turns.append(("user", item))
        elif (
            type(item) is dict
            and type(item.get("role")) is str
            and type(item.get("content")) is str
        ):
            turns.append((item["role"], item["content"]))
        else:
            raise BadRequest(
                "conversation_context items must be {role, content} objects",
                param="conversation_context",
            )
    return tuple(turns)


def to_openai(params: InferenceParams) -> tuple[Endpoint, dict[str, Any]]:
    """The OpenAI request for a node-API inference: a completion, or a chat with context."""
    body: dict[str, Any] = {"max_tokens": params.max_tokens, "temperature": params.temperature}
    if params.model is not None:
        body["model"] = params.model
    if not params.context:
        return Endpoint.COMPLETIONS, {**body, "prompt": params.prompt}
    messages = [{"role": role, "content": content} for role, content in params.context]
    messages.append({"role": "user", "content": params.prompt})
    return Endpoint.CHAT, {**body, "messages": messages}


def chunk_text(chunk: dict[str, Any]) -> tuple[str, str | None]:
    """The text and finish reason of one OpenAI stream chunk (completion or chat)."""
    choices = chunk.get("choices")
    if type(choices) is not list or not choices or type(choices[0]) is not dict:
        return "", None
    choice = choices[0]
    text = choice.get("text")
    if text is None and type(choice.get("delta")) is dict:
        text = choice["delta"].get("content")
    if text is None and type(choice.get("message")) is dict:
        text = choice["message"].get("content")
    reason = choice.get("finish_reason")
    return (text if type(text) is str else ""), (reason if type(reason) is str else None)


def job_of(named: list[tuple[str, object]], lenient: list[tuple[str, object]]) -> int | None:
    """The one job named by ``named`` (strict) and by ``lenient`` fields that look like ids.

    On the WebSocket a ``session_id`` may be an opaque label ("sess-1") as well as a job id
    ("164n"): it names the job only when it parses as one."""
    pairs = list(named)
    for where, value in lenient:
        with contextlib.suppress(InvalidJobId):
            parse_job_id(value, where=where)
            pairs.append((where, value))
    return resolve_job_id(pairs)


def _show(value: object) -> str:
    text = json.dumps(value) if type(value) in (int, float, str, bool, type(None)) else "an object"
    return text if len(text) <= 40 else text[:40] + "..."


def _usage_json(prompt_tokens: int | None, completion_tokens: int) -> dict[str, int]:
    prompt = prompt_tokens or 0
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt + completion_tokens,
    }


# -- the shell ------------------------------------------------------------------------------


@dataclass
class _Generation:
    task: asyncio.Task[None]
    stream: MeteredStream | None = None


@dataclass
class _Socket:
    ws: web.WebSocketResponse
    session_id: str | None = None
    job_id: int | None = None
    chain_id: int | None = None
    generation: _Generation | None = None

    async def send(self, message: dict[str, Any]) -> None:
        if not self.ws.closed:
            await self.ws.send_str(json.dumps(message))

    async def error(self, code: str, message: str) -> None:
        await self.send({"type": "error", "code": code, "message": message})


class FabstirApi:
    def __init__(self, settings: Settings, proxy: Proxy, ledger: Ledger) -> None:
        self.settings = settings
        self.proxy = proxy
        self.ledger = ledger
        self._models: tuple[float, list[str]] | None = None
        self._sockets_per_job: dict[int, int] = {}
        self._settling: set[asyncio.Task[None]] = set()

    def routes(self) -> list[web.RouteDef]:
        return [
            web.post("/v1/inference", self.inference),
            web.get("/v1/ws", self.websocket),
            web.get("/v1/models", self.models),
            web.get("/health", self.health),
            web.get("/v1/version", self.version),
            web.get("/v1/checkpoints/{session_id}", self.checkpoints),
        ]

    # -- shared checks ---------------------------------------------------------------------

    async def _check(self, params: InferenceParams, job_id: int | None) -> None:
        """Checks that need state: the job requirement, the chain id, the model name."""
        if job_id is None and self.settings.require_job:
            raise BadRequest(
                "this host serves marketplace jobs only: name the job with jobId or session_id",
                param="job_id",
                code="job_required",
            )
        mine = self.settings.chain_id
        if params.chain_id is not None and mine is not None and params.chain_id != mine:
            raise BadRequest(
                f"chain_id {params.chain_id} is not this host's chain ({mine})",
                param="chain_id",
                code="wrong_chain",
            )
        if params.model is not None:
            known = await self._engine_models()
            if known and params.model not in known:
                raise BadRequest(
                    f"model {_show(params.model)} is not served here; models: {', '.join(known)}",
                    param="model",
                    code="model_not_found",
                )

    async def _engine_models(self) -> list[str]:
        """The engine's model ids (cached); empty when the engine cannot say."""
        now = time.monotonic()
        if self._models is not None and now - self._models[0] < MODELS_MAX_AGE:
            return self._models[1]
        try:
            async with self.proxy.session.get(
                self.proxy.upstream_base + "/v1/models", timeout=aiohttp.ClientTimeout(total=5)
            ) as resp:
                data = json.loads(await resp.read())["data"]
            ids = [m["id"] for m in data if type(m) is dict and type(m.get("id")) is str]
        except (TimeoutError, aiohttp.ClientError, OSError, ValueError, KeyError, TypeError):
            return []
        self._models = (now, ids)
        return ids

    # -- POST /v1/inference ----------------------------------------------------------------

    async def inference(self, request: web.Request) -> web.StreamResponse:
        from sidecar.chain.service import JobRefused

        try:
            obj = await self._read_json(request)
            params = parse_inference(obj)
            job_id = resolve_job_id(
                (f"body field {k!r}", obj.get(k))
                for k in ("job_id", "jobId", "session_id", "sessionId")
            )
            await self._check(params, job_id)
        except InvalidJobId as exc:
            return error_response(400, str(exc), code="invalid_job_id", param="job_id")
        except BadRequest as exc:
            status = 402 if exc.code == "job_required" else 400
            return error_response(status, str(exc), code=exc.code, param=exc.param)
        endpoint, body = to_openai(params)
        try:
            if not params.stream:
                return await self._inference_json(params, endpoint, body, job_id)
            stream = await self.proxy.metered_stream(endpoint, body, job_id)
        except JobRefused as exc:
            return error_response(exc.status, str(exc), code=exc.code, param="job_id")
        except MeteredCallError as exc:
            return error_response(exc.status, str(exc), type="upstream_error", code=exc.code)
        return await self._inference_sse(request, params, stream)

    async def _read_json(self, request: web.Request) -> dict[str, Any]:
        raw = await request.read()
        try:
            obj = safejson.loads(raw)
        except (ValueError, RecursionError) as exc:
            raise BadRequest(f"request body is not valid JSON ({type(exc).__name__})") from None
        if type(obj) is not dict:
            raise BadRequest("request body must be a JSON object")
        return obj

    async def _inference_json(
        self,
        params: InferenceParams,
        endpoint: Endpoint,
        body: dict[str, Any],
        job_id: int | None,
    ) -> web.Response:
        answer = await self.proxy.metered_call(endpoint, body, job_id)
        try:
            reply = json.loads(answer.body)
        except ValueError:
            reply = None
        if answer.status >= 300 or type(reply) is not dict:
            return _engine_error(answer.status, answer.body)
        content, reason = chunk_text(reply)
        usage = answer.usage
        out: dict[str, Any] = {
            "model": params.model or reply.get("model"),
            "content": content,
            "tokens_used": usage.completion_tokens,
            "finish_reason": reason or "stop",
            "request_id": params.request_id or answer.key,
            "usage": _usage_json(usage.prompt_tokens, usage.completion_tokens),
        }
        if params.chain_id is not None or self.settings.chain_id is not None:
            out["chain_id"] = params.chain_id or self.settings.chain_id
        headers = {"X-Sidecar-Request-Id": answer.key}
        if answer.max_tokens is not None:
            headers["X-Sidecar-Max-Tokens"] = str(answer.max_tokens)
        return web.json_response(out, headers=headers)

    async def _inference_sse(
        self, request: web.Request, params: InferenceParams, stream: MeteredStream
    ) -> web.StreamResponse:
        headers = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        headers["X-Sidecar-Request-Id"] = stream.key
        if stream.max_tokens is not None:
            headers["X-Sidecar-Max-Tokens"] = str(stream.max_tokens)
        response = web.StreamResponse(headers=headers)
        finish = "stop"
        try:
            await response.prepare(request)
            async with contextlib.aclosing(stream.events()) as events:
                async for chunk in events:
                    text, reason = chunk_text(chunk)
                    finish = reason or finish
                    if text:
                        event = {"content": text, "tokens": 1, "finish_reason": None}
                        await response.write(_sse(event))
            # The record is committed when the iteration ends: only then the last event.
            await response.write(_sse({"content": "", "tokens": 0, "finish_reason": finish}))
            await response.write_eof()
        except MeteredCallError as exc:
            log.warning("node API stream broke (request %s): %s", stream.key, exc)
            if request.transport is not None:
                request.transport.abort()
        except ConnectionError:
            await stream.aclose()
        return response

    # -- GET routes -------------------------------------------------------------------------

    async def models(self, request: web.Request) -> web.StreamResponse:
        """The engine's OpenAI list, with the node API's ``models`` (and ``chain_id``) added.

        One body serves both kinds of client: OpenAI SDKs read ``data`` and ignore the rest;
        marketplace clients read ``models``."""
        try:
            async with self.proxy.session.get(
                self.proxy.upstream_base + request.path_qs
            ) as upstream:
                raw = await upstream.read()
                status, content_type = upstream.status, upstream.content_type
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            return self.proxy._upstream_error(exc)
        try:
            body = json.loads(raw) if status == 200 else None
        except ValueError:
            body = None
        if type(body) is not dict or type(body.get("data")) is not list:
            return web.Response(status=status, body=raw, content_type=content_type)
        body["models"] = [
            {"id": m["id"], "name": m["id"]}
            for m in body["data"]
            if type(m) is dict and type(m.get("id")) is str
        ]
        if self.settings.chain_id is not None:
            body["chain_id"] = self.settings.chain_id
        return web.json_response(body)

    async def health(self, request: web.Request) -> web.Response:
        models = await self._engine_models()
        healthy = bool(models)
        body = {
            "status": "healthy" if healthy else "degraded",
            "version": __version__,
            "engine": {"url": self.proxy.upstream_base, "models": models},
            "chain": self.settings.chain_id is not None and self.proxy.chain is not None,
        }
        return web.json_response(body, status=200 if healthy else 503)

    async def version(self, request: web.Request) -> web.Response:
        chains = [self.settings.chain_id] if self.settings.chain_id is not None else []
        features = ["inference", "streaming", "websocket-sessions", "checkpoints", "metering"]
        return web.json_response(
            {
                "version": __version__,
                "implementation": "sidecar",
                "features": features,
                "chains": chains,
            }
        )

    async def checkpoints(self, request: web.Request) -> web.Response:
        raw = request.match_info["session_id"]
        try:
            job_id = parse_job_id(raw, where="session id")
        except InvalidJobId as exc:
            return error_response(400, str(exc), code="invalid_job_id", param="session_id")
        claims = await self.ledger.claims(job_id)
        totals = await self.ledger.job(job_id)
        return web.json_response(
            {
                "session_id": raw,
                "job_id": str(job_id),
                "tokens_metered": 0 if totals is None else totals.billable_tokens,
                "checkpoints": [_checkpoint_json(c) for c in claims],
            }
        )

    # -- WebSocket /v1/ws -------------------------------------------------------------------

    async def websocket(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(
            heartbeat=WS_HEARTBEAT, max_msg_size=self.settings.max_body_bytes
        )
        await ws.prepare(request)
        sock = _Socket(ws)
        try:
            async for msg in ws:
                if not await self._on_frame(sock, msg):
                    break
        finally:
            await self._end(sock)
        return ws

    async def _on_frame(self, sock: _Socket, msg: aiohttp.WSMessage) -> bool:
        """Handle one frame; False ends the session."""
        if msg.type is WSMsgType.BINARY:
            await sock.error("binary_not_supported", "send messages as JSON text frames")
            return True
        if msg.type is WSMsgType.ERROR:
            # aiohttp closes the socket itself (1009 for a message over --max-body-bytes).
            log.info("websocket of job %s failed: %s", sock.job_id, sock.ws.exception())
            return False
        if msg.type is not WSMsgType.TEXT:
            return msg.type is not WSMsgType.CLOSE
        try:
            obj = safejson.loads(msg.data)
        except (ValueError, RecursionError):
            await sock.error("invalid_json", "the message is not valid JSON")
            return True
        if type(obj) is not dict or type(obj.get("type")) is not str:
            await sock.error("invalid_message", 'a message is a JSON object with a "type"')
            return True
        try:
            return await self._on_message(sock, obj)
        except InvalidJobId as exc:
            await sock.error("invalid_job_id", str(exc))
        except BadRequest as exc:
            await sock.error(exc.code, str(exc))
        return True

    async def _on_message(self, sock: _Socket, obj: dict[str, Any]) -> bool:
        kind = obj["type"]
        if kind == "session_init":
            return await self._session_init(sock, obj)
        if kind in ("prompt", "inference"):
            await self._prompt(sock, obj)
        elif kind == "stream_cancel":
            await self._cancel(sock, str(obj.get("reason") or "cancelled by the client"))
        elif kind == "session_end":
            await self._cancel(sock, "session ended")
            await sock.send({"type": "session_ended", "session_id": sock.session_id})
            return False
        elif kind == "encrypted_session_init":
            await sock.error(
                "encryption_not_supported",
                "encrypted sessions are not supported by this host; use session_init",
            )
        elif kind == "ping":
            await sock.send({"type": "pong"})
        else:
            await sock.error("unknown_message_type", f"unknown message type {_show(kind)}")
        return True

    async def _session_init(self, sock: _Socket, obj: dict[str, Any]) -> bool:
        from sidecar.chain.service import JobRefused

        session_id = obj.get("session_id", obj.get("sessionId"))
        job_id = job_of(
            [("jobId", obj.get("jobId")), ("job_id", obj.get("job_id"))],
            [("session_id", session_id)],
        )
        if sock.job_id is not None and job_id is not None and job_id != sock.job_id:
            raise BadRequest(
                f"this socket serves job {sock.job_id}, not {job_id}", code="job_mismatch"
            )
        chain_id = _chain_id(obj)
        await self._check(InferenceParams("-", 1, 0.0, False, chain_id=chain_id), job_id)
        if job_id is not None and self.proxy.chain is not None:
            try:
                await self.proxy.chain.admit(job_id)
            except JobRefused as exc:
                await sock.error(exc.code, str(exc))
                await sock.ws.close(code=_close_code(exc.status), message=exc.code.encode())
                return False
        sock.session_id = None if session_id is None else str(session_id)
        sock.chain_id = chain_id
        self._attach(sock, job_id)
        ack: dict[str, Any] = {
            "type": "session_init_ack",
            "session_id": sock.session_id,
            "job_id": None if job_id is None else str(job_id),
            "chain_id": chain_id,
            "status": "success",
        }
        if job_id is not None:
            ack["tokens_used"] = await self._job_tokens(job_id)
        await sock.send(ack)
        return True

    def _attach(self, sock: _Socket, job_id: int | None) -> None:
        if job_id is not None and sock.job_id is None:
            sock.job_id = job_id
            self._sockets_per_job[job_id] = self._sockets_per_job.get(job_id, 0) + 1

    async def _job_tokens(self, job_id: int) -> int:
        totals = await self.ledger.job(job_id)
        return 0 if totals is None else totals.billable_tokens

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
        await self._check(params, job_id)
        if sock.generation is not None and not sock.generation.task.done():
            raise BadRequest(
                "a generation is running on this socket: wait for its end or send stream_cancel",
                code="generation_in_progress",
            )
        self._attach(sock, job_id)
        generation = _Generation(task=None)  # type: ignore[arg-type]
        generation.task = asyncio.create_task(self._generate(sock, generation, params, job_id))
        sock.generation = generation

    async def _generate(
        self, sock: _Socket, generation: _Generation, params: InferenceParams, job_id: int | None
    ) -> None:
        from sidecar.chain.service import JobRefused

        endpoint, body = to_openai(params)
        try:
            if not params.stream:
                await self._respond(sock, params, endpoint, body, job_id)
                return
            generation.stream = await self.proxy.metered_stream(endpoint, body, job_id)
            await self._relay_stream(sock, generation.stream, job_id)
        except JobRefused as exc:
            await sock.error(exc.code, str(exc))
        except MeteredCallError as exc:
            await sock.error(exc.code, str(exc))
        except ConnectionError:
            pass  # the socket is gone; _end records and settles

    async def _respond(
        self,
        sock: _Socket,
        params: InferenceParams,
        endpoint: Endpoint,
        body: dict[str, Any],
        job_id: int | None,
    ) -> None:
        answer = await self.proxy.metered_call(endpoint, body, job_id)
        try:
            reply = json.loads(answer.body)
        except ValueError:
            reply = None
        if answer.status >= 300 or type(reply) is not dict:
            await sock.error("upstream_error", _engine_text(answer.status, answer.body))
            return
        content, reason = chunk_text(reply)
        usage = answer.usage
        message: dict[str, Any] = {
            "type": "response",
            "content": content,
            "tokens_used": usage.completion_tokens,
            "finish_reason": reason or "stop",
            "usage": _usage_json(usage.prompt_tokens, usage.completion_tokens),
            "request_id": params.request_id or answer.key,
        }
        if job_id is not None:
            message["session_tokens"] = await self._job_tokens(job_id)
        await sock.send(message)

    async def _relay_stream(self, sock: _Socket, stream: MeteredStream, job_id: int | None) -> None:
        finish = "stop"
        async with contextlib.aclosing(stream.events()) as events:
            async for chunk in events:
                text, reason = chunk_text(chunk)
                finish = reason or finish
                if text:
                    await sock.send({"type": "stream_chunk", "content": text, "tokens": 1})
        # The iteration ended: the record is committed; its count is the one billed.
        await self._stream_end(sock, stream, job_id, finish)

    async def _stream_end(
        self, sock: _Socket, stream: MeteredStream, job_id: int | None, finish: str
    ) -> None:
        usage = stream.usage
        message: dict[str, Any] = {
            "type": "stream_end",
            "tokens_used": usage.completion_tokens,
            "usage": _usage_json(usage.prompt_tokens, usage.completion_tokens),
            "finish_reason": finish,
            "request_id": stream.key,
        }
        if job_id is not None:
            message["session_tokens"] = await self._job_tokens(job_id)
        await sock.send(message)

    async def _cancel(self, sock: _Socket, reason: str) -> None:
        """Stop the running generation: the engine request is closed, its tokens recorded."""
        generation = sock.generation
        if generation is None or generation.task.done():
            return
        generation.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await generation.task
        stream = generation.stream
        if stream is not None and not sock.ws.closed:
            log.info("generation on job %s cancelled: %s", sock.job_id, reason)
            with contextlib.suppress(ConnectionError):
                await self._stream_end(sock, stream, None, "cancelled")

    async def _end(self, sock: _Socket) -> None:
        """The session is over (session_end, close, dropped connection): settle its job once
        no other socket of the job is open."""
        generation = sock.generation
        if generation is not None and not generation.task.done():
            generation.task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await generation.task
        if not sock.ws.closed:
            with contextlib.suppress(Exception):
                await sock.ws.close()
        job_id = sock.job_id
        if job_id is None:
            return
        left = self._sockets_per_job.get(job_id, 1) - 1
        if left > 0:
            self._sockets_per_job[job_id] = left
            return
        self._sockets_per_job.pop(job_id, None)
        if self.proxy.chain is not None:
            # Its own task: this handler may be cancelled (the client dropped the connection).
            task = asyncio.create_task(self._settle(job_id), name=f"sidecar-settle-{job_id}")
            self._settling.add(task)
            task.add_done_callback(self._settling.discard)

    async def _settle(self, job_id: int) -> None:
        from sidecar.chain.service import JobRefused

        assert self.proxy.chain is not None
        try:
            await self.proxy.chain.request_settlement(job_id)
            log.info("session of job %s ended: final claim and settlement requested", job_id)
        except JobRefused as exc:
            log.warning("session of job %s ended but cannot settle: %s", job_id, exc)
        except Exception:
            log.exception("session of job %s ended; requesting its settlement failed", job_id)


def _sse(event: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(event).encode() + b"\n\n"


def _engine_text(status: int, body: bytes) -> str:
    text = body[:MAX_ERROR_TEXT].decode("utf-8", "replace")
    try:
        error = json.loads(body).get("error")
        text = str(error.get("message") if isinstance(error, dict) else error)[:MAX_ERROR_TEXT]
    except (ValueError, AttributeError):
        pass
    return f"the engine answered {status}: {text}"


def _engine_error(status: int, body: bytes) -> web.Response:
    code = status if 400 <= status < 600 else 502
    return error_response(
        code, _engine_text(status, body), type="upstream_error", code="upstream_error"
    )


def _close_code(status: int) -> int:
    # 1008 (policy violation) for a job this host must not serve; 1011 when the chain is down.
    return 1011 if status >= 500 else 1008


def _checkpoint_json(claim: Claim) -> dict[str, Any]:
    from sidecar.chain.proofs import ClaimProof

    proof_hash = None
    if claim.kind is ClaimKind.PROOF and claim.payload:
        with contextlib.suppress(ValueError):
            proof_hash = "0x" + ClaimProof.from_payload(claim.payload).proof_hash.hex()
    return {
        "index": claim.seq,
        "kind": claim.kind.value,
        "tokens": claim.tokens,
        "token_range": [claim.first_token, claim.end_token],
        "proof_hash": proof_hash,
        "tx_hash": claim.tx_hash,
        "state": claim.state.value,
        "error": claim.error,
        "created_ms": claim.created_ms,
        "timestamp": claim.updated_ms,
    }
