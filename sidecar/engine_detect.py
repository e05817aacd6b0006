"""``--engine auto``: which engine answers, recognised from its own documented answers.

Evidence, in order (each a route the engine documents, never an internal):

* ``GET /props`` with ``default_generation_settings``: llama.cpp's ``llama-server``;
* ``GET /v1/models``, ``owned_by``: ``"me"`` llama-cpp-python, ``"llamacpp"`` llama-server,
  ``"vllm"`` vLLM, ``"sglang"`` SGLang, ``"library"`` Ollama;
* ``GET /api/version`` answering ``{"version"}``: Ollama;
* ``GET /info`` with ``model_id`` and ``max_input_tokens`` (or ``router``): TGI;
* ``GET /version`` answering ``{"version"}`` alone: vLLM.

The engine is recognised at start and again whenever it comes back after being unreachable (it
may have been swapped); the result is logged once per change and shown in ``/sidecar/health``.
An explicit ``--engine NAME`` is never second-guessed.
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass
from typing import Any

from sidecar.engine import EngineClient
from sidecar.errors import UpstreamError
from sidecar.metering.dialects import AUTO, UNKNOWN, EngineProfile, engine_profile
from sidecar.tasks import stop_task

log = logging.getLogger("sidecar.engine")

PROBE_TIMEOUT = 3.0  # seconds per probe
WATCH_INTERVAL = 10.0  # seconds between reachability checks while auto

_OWNED_BY = {
    "me": "llama-cpp-python",
    "llamacpp": "llama-server",
    "vllm": "vllm",
    "sglang": "sglang",
    "library": "ollama",
}


@dataclass(frozen=True, slots=True)
class Evidence:
    """The engine's answers to the probes (None: no JSON answer, e.g. a 404)."""

    models: Any = None
    props: Any = None
    api_version: Any = None
    info: Any = None
    version: Any = None


def recognise(evidence: Evidence) -> tuple[str, str] | None:
    """(engine name, why) from the evidence, or None when no rule matches."""
    props = evidence.props
    if type(props) is dict and type(props.get("default_generation_settings")) is dict:
        return "llama-server", "its /props has default_generation_settings"
    models = evidence.models
    data = models.get("data") if type(models) is dict else None
    if type(data) is list:
        owners = {m.get("owned_by") for m in data if type(m) is dict}
        for owner, name in _OWNED_BY.items():
            if owner in owners:
                return name, f'its /v1/models says owned_by "{owner}"'
    api_version = evidence.api_version
    if type(api_version) is dict and type(api_version.get("version")) is str:
        return "ollama", "it answers /api/version"
    info = evidence.info
    if (
        type(info) is dict
        and "model_id" in info
        and ("max_input_tokens" in info or "router" in info)
    ):
        return "tgi", "its /info names model_id and its limits"
    version = evidence.version
    if type(version) is dict and set(version) == {"version"}:
        return "vllm", "its /version answers {version} alone"
    return None


class EngineIdentity:
    """The dialect in force: the configured one, or (``auto``) the one recognised."""

    def __init__(self, configured: str) -> None:
        self.configured = configured
        self.profile: EngineProfile = UNKNOWN if configured == AUTO else engine_profile(configured)
        self.reason = "set with --engine" if configured != AUTO else "not probed yet"
        self._watch: asyncio.Task[None] | None = None

    @property
    def auto(self) -> bool:
        return self.configured == AUTO

    def as_json(self) -> dict[str, str]:
        return {"dialect": self.profile.name, "configured": self.configured, "why": self.reason}

    async def start(self, engine: EngineClient) -> None:
        """Recognise the engine now (if auto), then keep watching for it coming back."""
        if not self.auto:
            return
        reachable = await self.detect(engine)
        self._watch = asyncio.create_task(self._watch_loop(engine, reachable))

    async def stop(self) -> None:
        if self._watch is not None:
            await stop_task(self._watch)  # its probes' timeouts may swallow one cancel
            self._watch = None

    async def detect(self, engine: EngineClient) -> bool:
        """Probe and set the dialect; False when the engine does not answer at all."""
        evidence = await _probe(engine)
        if evidence is None:
            if self.reason == "not probed yet":
                self.reason = "the engine did not answer yet"
            return False
        found = recognise(evidence)
        name, why = found if found is not None else (UNKNOWN.name, "no rule matched")
        profile = engine_profile(name)
        if profile != self.profile or why != self.reason:
            if found is None:
                log.warning(
                    "engine at %s not recognised: metering with the safe dialect (usage asked "
                    "for, chunks never counted as tokens); set --engine NAME if it is one of "
                    "the known engines",
                    engine.base_url,
                )
            else:
                log.info("engine at %s recognised as %s (%s)", engine.base_url, name, why)
        self.profile, self.reason = profile, why
        return True

    async def _watch_loop(self, engine: EngineClient, reachable: bool) -> None:
        while True:
            await asyncio.sleep(WATCH_INTERVAL)
            health = await engine.health()
            if health.reachable and not reachable:
                reachable = await self.detect(engine)  # back, perhaps another engine
            else:
                reachable = health.reachable


async def _probe(engine: EngineClient) -> Evidence | None:
    models = await _get_json(engine, "/v1/models")
    if models is _UNREACHABLE:
        return None  # one warning in the log, not one per probe
    routes = ("/props", "/api/version", "/info", "/version")
    answers = await asyncio.gather(*(_get_json(engine, path) for path in routes))
    props, api_version, info, version = (None if a is _UNREACHABLE else a for a in answers)
    return Evidence(models, props, api_version, info, version)


_UNREACHABLE = object()


async def _get_json(engine: EngineClient, path: str) -> Any:
    try:
        async with asyncio.timeout(PROBE_TIMEOUT):
            reply = await engine.request("GET", path)
            async with reply:
                raw = await reply.read()
                status = reply.status
    except (UpstreamError, TimeoutError, OSError):
        return _UNREACHABLE
    except Exception:  # a broken answer is evidence of nothing
        return None
    if status != 200:
        return None
    try:
        return json.loads(raw)
    except ValueError:
        return None
