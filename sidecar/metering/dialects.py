"""What the sidecar must know about each engine's usage reporting, and nothing else.

Metering never reads an engine's internals: engines only differ in whether they report usage in a
stream on their own (llama-cpp-python never does, so its chunks are counted) or only when the
request asks for it with ``stream_options.include_usage`` (then the sidecar asks, and removes the
extra usage chunk from the client's stream when the client did not ask itself).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class EngineProfile:
    name: str
    inject_include_usage: bool


ENGINES: dict[str, EngineProfile] = {
    profile.name: profile
    for profile in (
        # Ignores include_usage; one content chunk per token (FACTS.md §2).
        EngineProfile("llama-cpp-python", inject_include_usage=False),
        EngineProfile("llama-server", inject_include_usage=True),
        EngineProfile("vllm", inject_include_usage=True),
        EngineProfile("ollama", inject_include_usage=True),
        EngineProfile("sglang", inject_include_usage=True),
        EngineProfile("tgi", inject_include_usage=True),
    )
}
ENGINE_NAMES = tuple(ENGINES)


def engine_profile(name: str) -> EngineProfile:
    try:
        return ENGINES[name]
    except KeyError:
        raise ValueError(f"unknown engine {name!r}; known: {', '.join(ENGINES)}") from None
