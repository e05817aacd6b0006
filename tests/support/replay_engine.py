"""ReplayEngine: a FAKE engine that replays the recorded formats of engines that cannot run here.

vLLM, SGLang, Ollama and TGI need GPUs or binaries this machine does not have, so their stream
formats are written from their sources (tests/fixtures/engines/README.md) and served by this
stand-in, so the real sidecar can be tested against them end to end:

* ``GET /v1/models`` (and ``/info`` for TGI) answers as the engine does, so ``--engine auto``
  recognises it;
* ``POST /v1/chat/completions`` streams the fixture the request's ``model`` names
  (``replay:NAME``), in seeded random pieces, as a real TCP peer would;
* ``POST /tokenize`` answers as the engine's tokenizer for a fixture's text (its
  ``tokenizer_count``), or 503 while ``tokenize_down`` is set.
"""

from __future__ import annotations

import asyncio
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "engines"
OWNED_BY = {"vllm": "vllm", "sglang": "sglang", "ollama": "library", "tgi": "tgi"}


@dataclass
class ReplayEngine:
    family: str
    seed: int = 0
    tokenize_down: bool = False
    requests: list[dict[str, Any]] = field(default_factory=list)
    url: str = ""
    _runner: web.AppRunner | None = None

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/v1/models", self._models)
        app.router.add_get("/info", self._info)
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_post("/tokenize", self._tokenize)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}"

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _models(self, request: web.Request) -> web.Response:
        model = {"id": "m", "object": "model", "created": 0, "owned_by": OWNED_BY[self.family]}
        return web.json_response({"object": "list", "data": [model]})

    async def _info(self, request: web.Request) -> web.Response:
        if self.family != "tgi":
            raise web.HTTPNotFound()
        info = {"model_id": "m", "max_input_tokens": 4095, "router": "text-generation-router"}
        return web.json_response(info)

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.requests.append(body)
        name = str(body.get("model", "")).removeprefix("replay:")
        raw = (FIXTURES / f"{name}.sse").read_bytes()
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        rng = random.Random(self.seed)
        at = 0
        while at < len(raw):
            size = rng.randint(1, 64)
            await response.write(raw[at : at + size])
            at += size
            await asyncio.sleep(0)
        await response.write_eof()
        return response

    async def _tokenize(self, request: web.Request) -> web.Response:
        if self.tokenize_down:
            return web.json_response({"error": "tokenizer unavailable"}, status=503)
        body = await request.json()
        text = body.get("prompt", body.get("inputs", body.get("content")))
        for expected in FIXTURES.glob("*.json"):
            facts = json.loads(expected.read_text())
            if facts.get("text") == text:
                n = facts["tokenizer_count"]
                if self.family == "tgi":  # TGI answers the tokens themselves
                    return web.json_response([{"id": i, "text": "t"} for i in range(n)])
                return web.json_response({"count": n, "max_model_len": 4096, "tokens": [0] * n})
        return web.json_response({"count": 0, "tokens": []})
