"""The host node's HTTP routes (fabstir-llm-node), over the one metering core.

``POST /v1/inference`` becomes one OpenAI request through :mod:`sidecar.exchange`: the same
admission, metering, ledger and chain service as the OpenAI routes, so a job used over both is
counted once. ``/v1/models`` is both APIs' route; ``/health``, ``/v1/version`` and
``/v1/checkpoints/{session_id}`` answer as the node does (the last with the node's 404: this host
keeps no conversation checkpoints on S5).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from aiohttp import web

from sidecar import __version__
from sidecar.auth import Requester
from sidecar.engine import EngineClient, EngineHealth
from sidecar.engine_facts import EngineFacts
from sidecar.errors import BadRequest, SidecarError, UpstreamError, to_response
from sidecar.exchange import Exchange, MeteredAnswer, engine_error_message
from sidecar.ledger import Ledger
from sidecar.metered_stream import MeteredStream
from sidecar.metering import Endpoint, InvalidJobId, resolve_job_id, safejson
from sidecar.metering.jobs import JOB_BODY_FIELDS
from sidecar.models import ModelNames
from sidecar.shells.headers import call_headers
from sidecar.shells.http import abort_client, read_body
from sidecar.shells.node_protocol import (
    InferenceParams,
    TokenLimitExceeded,
    answer_fields,
    check_chain,
    chunk_text,
    parse_inference,
    to_openai,
    token_limit_of,
)

if TYPE_CHECKING:  # the cipher's libraries load only on a host with a key (app.py)
    from sidecar.crypto import HostKey

log = logging.getLogger("sidecar.node")

JOB_HINT = "name the job with jobId or session_id"


class NodeHttp:
    def __init__(
        self,
        exchange: Exchange,
        engine: EngineClient,
        ledger: Ledger,
        *,
        chain_id: int | None,
        max_body_bytes: int,
        model_names: ModelNames,
        facts: EngineFacts,
        host_key: HostKey | None = None,
    ) -> None:
        self.exchange = exchange
        self.facts = facts
        self.model_names = model_names
        self.host_key = host_key
        self.engine = engine
        self.ledger = ledger
        self.chain_id = chain_id
        self.max_body_bytes = max_body_bytes

    async def measure(self, params: InferenceParams) -> Measured:
        """The prompt's tokens by the engine's tokenizer and the context window, where the
        engine (or the operator) can say; :class:`TokenLimitExceeded` for a prompt that does
        not fit, before anything is generated."""
        window = await self.facts.context_window()
        text = "\n".join([*(content for _, content in params.context), params.prompt])
        prompt_tokens = await self.facts.count_tokens(text, params.model)
        if window is not None and prompt_tokens is not None and prompt_tokens >= window:
            raise TokenLimitExceeded(prompt_tokens, window)
        return Measured(prompt_tokens, window)

    def routes(self) -> list[web.RouteDef]:
        return [
            web.post("/v1/inference", self.inference),
            web.get("/v1/models", self.models),
            web.get("/health", self.health),
            web.get("/v1/health", self.health),  # what the SDK probes
            web.post("/v1/auth/challenge", self.auth_challenge),
            web.get("/v1/version", self.version),
            web.get("/v1/checkpoints/{session_id}", self.checkpoints),
        ]

    async def check(self, params: InferenceParams, job_id: int | None) -> InferenceParams:
        """What needs state: the job requirement, this host's chain, the model's name. Returns
        the request with the engine's model in place of the marketplace's name for it."""
        self.exchange.check_job_named(job_id, JOB_HINT)
        check_chain(params, chain_id=self.chain_id)
        if params.model is None:
            return params
        listed = () if self.model_names.configured else await self.engine.models()
        engine_model = self.model_names.engine_model(params.model, listed)
        return params if engine_model == params.model else replace(params, model=engine_model)

    # -- POST /v1/inference ----------------------------------------------------------------

    async def inference(self, request: web.Request) -> web.StreamResponse:
        try:
            obj = await self._read_json(request)
            params = parse_inference(obj)
            try:
                job_id = resolve_job_id((f"body field {k!r}", obj.get(k)) for k in JOB_BODY_FIELDS)
            except InvalidJobId as exc:
                raise BadRequest(str(exc), code="invalid_job_id", param="job_id") from None
            served = await self.check(params, job_id)  # the engine's model: what is sent
            requester = None
            if job_id is not None:
                authorization = request.headers.get("Authorization")
                requester = self.exchange.requester_from_bearer(authorization, job_id)
            measured = await self.measure(served)
            endpoint, body = to_openai(served)
            if not params.stream:
                return await self._answer(params, endpoint, body, job_id, requester, measured)
            try:
                stream = await self.exchange.call_stream(endpoint, body, job_id, requester)
            except UpstreamError as exc:
                raise engine_refusal(exc) from None
        except SidecarError as exc:
            return to_response(exc)
        return await self._stream(request, stream)

    async def _read_json(self, request: web.Request) -> dict[str, Any]:
        raw = await read_body(request, self.max_body_bytes)
        try:
            obj = safejson.loads(raw)
        except (ValueError, RecursionError) as exc:
            raise BadRequest(f"request body is not valid JSON ({type(exc).__name__})") from None
        if type(obj) is not dict:
            raise BadRequest("request body must be a JSON object")
        return obj

    async def call(
        self,
        endpoint: Endpoint,
        body: dict[str, Any],
        job_id: int | None,
        requester: Requester | None,
    ) -> tuple[MeteredAnswer, dict[str, Any]]:
        """One metered non-stream call, and the engine's JSON answer; an engine that answered
        with an error (or not with a JSON object) is an :class:`UpstreamError`."""
        answer = await self.exchange.call_json(endpoint, body, job_id, requester)
        try:
            reply = json.loads(answer.body)
        except ValueError:
            reply = None
        if answer.status >= 300 or type(reply) is not dict:
            status = answer.status if 400 <= answer.status < 600 else 502
            error = UpstreamError(engine_error_message(answer.status, answer.body), status=status)
            raise engine_refusal(error)
        return answer, reply

    async def _answer(
        self,
        params: InferenceParams,
        endpoint: Endpoint,
        body: dict[str, Any],
        job_id: int | None,
        requester: Requester | None,
        measured: Measured,
    ) -> web.Response:
        answer, reply = await self.call(endpoint, body, job_id, requester)
        out: dict[str, Any] = {
            "model": params.model or reply.get("model"),
            **answer_fields(reply, answer.usage, params.request_id or answer.key, measured),
        }
        if params.chain_id is not None or self.chain_id is not None:
            out["chain_id"] = params.chain_id or self.chain_id
        headers = {
            **call_headers(answer.key, answer.max_tokens),
            **await self.exchange.receipt(answer.call, answer.usage),
        }
        return web.json_response(out, headers=headers)

    async def _stream(self, request: web.Request, stream: MeteredStream) -> web.StreamResponse:
        headers = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        headers.update(call_headers(stream.key, stream.max_tokens))
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
        except (SidecarError, ConnectionError) as exc:
            # The engine broke off or the ledger refused the record (the client must not see a
            # clean end), or the client left (the stream recorded what it got).
            log.info("node API stream of request %s ended early: %s", stream.key, exc)
            abort_client(request)
        finally:
            await stream.aclose()  # records a stream that never started, releases the engine
        return response

    # -- GET routes -------------------------------------------------------------------------

    async def models(self, request: web.Request) -> web.StreamResponse:
        """The engine's OpenAI list, with the node API's ``models`` (and ``chain_id``) added.

        One body serves both kinds of client: OpenAI SDKs read ``data`` and ignore the rest;
        marketplace clients read ``models``. With ``--model``, the names given are the list."""
        if self.model_names.configured:
            names = self.model_names.names
            listed: dict[str, Any] = {
                "object": "list",
                "data": [{"id": n, "object": "model", "owned_by": "sidecar"} for n in names],
                "models": [{"id": n, "name": n} for n in names],
            }
            if self.chain_id is not None:
                listed["chain_id"] = self.chain_id
            return web.json_response(listed)
        try:
            upstream = await self.engine.request("GET", request.path_qs)
            async with upstream:
                raw = await upstream.read()
        except UpstreamError as exc:
            return to_response(exc)
        try:
            body = json.loads(raw) if upstream.status == 200 else None
        except ValueError:
            body = None
        if type(body) is not dict or type(body.get("data")) is not list:
            return web.Response(
                status=upstream.status, body=raw, content_type=upstream.content_type
            )
        body["models"] = [
            {"id": m["id"], "name": m["id"]}
            for m in body["data"]
            if type(m) is dict and type(m.get("id")) is str
        ]
        if self.chain_id is not None:
            body["chain_id"] = self.chain_id
        return web.json_response(body)

    async def health(self, request: web.Request) -> web.Response:
        """The node's ``/health``, and ``/v1/health`` where the SDK looks: ``status`` and
        ``issues`` (read by its session checks), ``healthy`` and ``chain_id`` (its client's)."""
        engine = await self.engine.health()
        issues = [] if engine.healthy else [_engine_issue(engine)]
        body: dict[str, Any] = {
            "status": "healthy" if engine.healthy else "degraded",
            "healthy": engine.healthy,
            "version": __version__,
            "engine": {"url": self.engine.base_url, "models": list(engine.models)},
            "chain": self.chain_id is not None and self.exchange.chain is not None,
        }
        if issues:
            body["issues"] = issues
        body["session_auth"] = self._session_auth()
        if self.chain_id is not None:
            body["chain_id"] = self.chain_id
        return web.json_response(body, status=200 if engine.healthy else 503)

    def _session_auth(self) -> dict[str, Any]:
        """Who may use a job here, and what a job token must name (``sidecar token --sidecar``
        reads it)."""
        auth = self.exchange.auth
        if auth is None:
            return {"mode": "none"}
        return {
            "mode": auth.mode,
            "chain_id": auth.scope.chain_id,
            "marketplace": auth.scope.marketplace,
            "host": auth.scope.host,
            "token_scheme": "sjt1 (EIP-712 JobToken, docs/PROTOCOL.md)",
        }

    async def auth_challenge(self, request: web.Request) -> web.Response:
        """The SDK's way to learn the host's public key when its registration does not publish
        one: the host signs SHA-256 of the 32 challenge bytes (low-S, compact, with the
        recovery id), and the SDK recovers the key and checks it is the host's address."""
        if self.host_key is None:
            return to_response(
                SidecarError(
                    "this host has no key configured (--host-key-file)",
                    code="no_host_key",
                    status=404,
                )
            )
        try:
            obj = await self._read_json(request)
            raw = obj.get("challenge")
            challenge = bytes.fromhex(raw.removeprefix("0x")) if type(raw) is str else b""
        except ValueError:
            challenge = b""
        except SidecarError as exc:
            return to_response(exc)
        if len(challenge) != 32:
            return to_response(BadRequest("challenge must be 32 bytes of hex", param="challenge"))
        signature, recid = self.host_key.sign_digest(hashlib.sha256(challenge).digest())
        return web.json_response({"signature": signature.hex(), "recid": recid})

    async def version(self, request: web.Request) -> web.Response:
        chains = [self.chain_id] if self.chain_id is not None else []
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
        """The node's signed index of conversation checkpoints, whose deltas live on S5. This
        host stores no conversation (it meters and relays), so it has none to recover: the
        node's 404, which the SDK reads as "no checkpoints" and recovers nothing. (An index
        whose entries name no S5 delta would fail the SDK's recovery instead.) The claims
        themselves, with their proof hashes and transactions: ``/sidecar/jobs/{id}``."""
        session_id = request.match_info["session_id"]
        return web.json_response(
            {"error": f"No checkpoints found for session {session_id[:100]}"}, status=404
        )


@dataclass(frozen=True, slots=True)
class Measured:
    """A prompt's measure before it runs (None where the engine cannot say)."""

    prompt_tokens: int | None
    context_window: int | None


def engine_refusal(error: UpstreamError) -> SidecarError:
    """An engine error as the node reports it: a prompt over the window is
    ``TOKEN_LIMIT_EXCEEDED`` with its numbers; anything else stays as it is."""
    return token_limit_of(error.message) or error


def _engine_issue(engine: EngineHealth) -> str:
    if not engine.reachable:
        return f"the engine does not answer ({engine.error or 'no answer'})"
    return f"the engine's /v1/models answered {engine.status} without a model list"


def _sse(event: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(event).encode() + b"\n\n"
