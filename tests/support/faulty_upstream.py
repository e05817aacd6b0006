"""FaultyUpstream: a FAKE engine that misbehaves on cue, for fault-injection tests only.

The real llama-cpp-python server cannot be made to die mid-stream, send malformed SSE or stall
on demand, so this stand-in speaks its wire format (chat chunks, ``data: [DONE]``) and fails in
the way the request's ``model`` names:

* ``fault:die-after-N``   streams N content chunks, then cuts the TCP connection;
* ``fault:malformed``     mixes invalid JSON events and a bare field line into a valid stream;
* ``fault:no-done``       a valid stream that ends without ``data: [DONE]``;
* ``fault:slow``          one chunk every 20 ms until the client goes away (records that);
* ``fault:no-usage``      a non-stream answer without a ``usage`` object;
* ``fault:not-json``      a 200 answer whose body is not JSON.
* ``fault:hang``          never answers (no headers) until the client goes away;
* ``fault:stall-after-N`` streams N content chunks, then sends nothing, connection open;
* ``fault:long-line-M``   a chunk, then one event of M MiB (one line), then a chunk and [DONE].
Everything else answers a normal stream/non-stream of ``max_tokens`` chunks; a stream request with
``stream_options.include_usage`` also gets the usage-only chunk (``choices: []``) that vLLM,
llama.cpp's server and OpenAI send before ``[DONE]``, which llama-cpp-python never sends.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field

from aiohttp import web


def chat_chunk(content: str | None, *, role: bool = False, finish: str | None = None) -> bytes:
    delta: dict[str, str] = {}
    if role:
        delta["role"] = "assistant"
    if content is not None:
        delta["content"] = content
    body = {
        "id": "chatcmpl-fake",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "fake",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }
    return b"data: " + json.dumps(body).encode() + b"\n\n"


DONE = b"data: [DONE]\n\n"


@dataclass
class FaultyUpstream:
    cancelled_streams: int = 0
    finished_streams: int = 0
    requests: list[dict] = field(default_factory=list)
    models_status: int = 200  # on cue: /v1/models answers this status (an error body unless 200)
    _runner: web.AppRunner | None = None
    url: str = ""

    async def start(self) -> str:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_post("/chat/completions", self._chat)  # the alias vLLM also serves
        app.router.add_get("/v1/models", self._models)
        self._runner = web.AppRunner(app, handler_cancellation=True)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}"
        return self.url

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _models(self, request: web.Request) -> web.Response:
        if self.models_status != 200:
            error = {"error": {"message": "no model list here"}}
            return web.json_response(error, status=self.models_status)
        # llama-cpp-python's list, as its server writes it (so --engine auto takes it for one).
        model = {"id": "fake", "object": "model", "owned_by": "me", "permissions": []}
        return web.json_response({"object": "list", "data": [model]})

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.requests.append(body)
        model = str(body.get("model", ""))
        n = int(body.get("max_tokens") or 16)
        if model == "fault:hang":
            await asyncio.sleep(3600)
        if not body.get("stream"):
            if model == "fault:not-json":
                return web.Response(body=b"<html>oops</html>", content_type="application/json")
            answer = {
                "id": "x",
                "object": "chat.completion",
                "model": "fake",
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": "tok " * n},
                        "finish_reason": "length",
                    }
                ],
            }
            if model != "fault:no-usage":
                answer["usage"] = {
                    "prompt_tokens": 5,
                    "completion_tokens": n,
                    "total_tokens": 5 + n,
                }
            return web.json_response(answer)

        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(chat_chunk(None, role=True))
        if model.startswith("fault:die-after-"):
            for _ in range(int(model.rsplit("-", 1)[1])):
                await response.write(chat_chunk("tok"))
            await asyncio.sleep(0.05)
            assert request.transport is not None
            request.transport.abort()
            return response
        if model.startswith("fault:stall-after-"):
            for _ in range(int(model.rsplit("-", 1)[1])):
                await response.write(chat_chunk("tok"))
            await asyncio.sleep(3600)
        if model.startswith("fault:long-line-"):
            await response.write(chat_chunk("tok"))
            await response.write(b'data: {"padding": "')
            piece = b"x" * 65536
            for _ in range(16 * int(model.rsplit("-", 1)[1])):
                await response.write(piece)
            await response.write(b'"}\n\n')
            await response.write(chat_chunk("tok"))
            await response.write(DONE)
            await response.write_eof()
            return response
        if model == "fault:slow":
            try:
                while True:
                    await response.write(chat_chunk("tok"))
                    await asyncio.sleep(0.02)
            except (asyncio.CancelledError, ConnectionError):
                self.cancelled_streams += 1
                raise
        if model == "fault:malformed":
            await response.write(chat_chunk("a"))
            await response.write(b"data: {not json\n\n")
            await response.write(b"garbage line without colon\n\n")
            await response.write(chat_chunk("b"))
            await response.write(b'data: {"choices": "not a list"}\n\n')
            await response.write(chat_chunk("c"))
            await response.write(chat_chunk("", finish="length"))
            await response.write(DONE)
            await response.write_eof()
            return response
        for _ in range(n):
            await response.write(chat_chunk("tok"))
        await response.write(chat_chunk("", finish="length"))
        if (body.get("stream_options") or {}).get("include_usage"):
            usage = {"prompt_tokens": 5, "completion_tokens": n, "total_tokens": 5 + n}
            last = {
                "id": "chatcmpl-fake",
                "object": "chat.completion.chunk",
                "created": 1,
                "model": "fake",
                "choices": [],
                "usage": usage,
            }
            await response.write(b"data: " + json.dumps(last).encode() + b"\n\n")
        if model != "fault:no-done":
            await response.write(DONE)
        await response.write_eof()
        self.finished_streams += 1
        return response
