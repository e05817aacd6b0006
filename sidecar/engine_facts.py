"""What the marketplace protocol reports that a stream may not carry: a prompt's token count (the
engine's own tokenizer) and the engine's context window.

Each engine exposes these (where it does) at its own documented route; its dialect
(:mod:`sidecar.metering.dialects`) says which, and nothing here depends on an engine's
internals. A count the engine cannot give is None, and the caller says 0 or omits it, as the
node does. The operator's ``--context-window`` wins over
what the engine says (some engines, llama-cpp-python among them, do not say).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any

import aiohttp

from sidecar.engine import EngineClient
from sidecar.engine_detect import EngineIdentity
from sidecar.errors import UpstreamError

log = logging.getLogger("sidecar.engine")

FACT_TIMEOUT = 5.0  # seconds for one tokenize or context-window request
WINDOW_RETRY = 60.0  # seconds before asking again an engine that did not say its window


def token_count(answer: Any) -> int | None:
    """The count in a tokenize answer of any of the shapes above."""
    if type(answer) is dict:
        count = answer.get("count")
        if type(count) is int and count >= 0:
            return count
        answer = answer.get("tokens")
    return len(answer) if type(answer) is list else None


def dig(answer: Any, keys: tuple[str | int, ...]) -> int | None:
    for key in keys:
        if type(key) is int and type(answer) is list and len(answer) > key:
            answer = answer[key]
        elif type(key) is str and type(answer) is dict:
            answer = answer.get(key)
        else:
            return None
    return answer if type(answer) is int and answer > 0 else None


class EngineFacts:
    def __init__(
        self, engine: EngineClient, identity: EngineIdentity, context_window: int = 0
    ) -> None:
        self._engine = engine
        self._identity = identity  # the dialect in force says which routes to ask
        self._configured_window = context_window or None
        self._window: tuple[float, str, int | None] | None = None

    async def count_tokens(self, text: str, model: str | None) -> int | None:
        """The engine's count of ``text``'s tokens, or None when it cannot give one."""
        tokenizer = self._identity.profile.tokenize
        if tokenizer is None:
            return None
        body: dict[str, Any] = {tokenizer.text_field: text}
        if model is not None:
            body["model"] = model
        return token_count(await self._ask("POST", tokenizer.path, json.dumps(body).encode()))

    async def context_window(self) -> int | None:
        """The context window in tokens: the operator's setting, else the engine's own."""
        if self._configured_window is not None:
            return self._configured_window
        profile = self._identity.profile
        source = profile.window
        if source is None:
            return None
        cached = self._window
        fresh = cached is not None and cached[1] == profile.name
        if cached is not None and fresh and (cached[2] is not None or time.monotonic() < cached[0]):
            return cached[2]
        answer = await self._ask("GET", source.path)
        window = next((n for keys in source.keys if (n := dig(answer, keys)) is not None), None)
        self._window = (time.monotonic() + WINDOW_RETRY, profile.name, window)
        return window

    async def _ask(self, method: str, path: str, body: bytes = b"") -> Any:
        headers = {"Content-Type": "application/json"} if body else None
        try:
            async with asyncio.timeout(FACT_TIMEOUT):
                reply = await self._engine.request(method, path, body, headers)
                async with reply:
                    if reply.status != 200:
                        return None
                    raw = await reply.read()
        except (UpstreamError, TimeoutError, aiohttp.ClientError, OSError) as exc:
            log.debug("engine %s %s gave no answer: %s", method, path, exc)
            return None
        try:
            return json.loads(raw)
        except ValueError:
            return None
