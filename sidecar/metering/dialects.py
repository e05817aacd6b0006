"""What the sidecar must know about each engine, and nothing else: one small record per engine.

Metering never reads an engine's internals. Engines differ only in what their documented OpenAI
answers carry, and each record says it:

* ``inject_include_usage``: the engine reports usage in a stream only when the request asks with
  ``stream_options.include_usage`` (the sidecar then asks, and removes the extra usage chunk from
  the stream of a client that did not ask itself); llama-cpp-python ignores the option;
* ``usage_in``: where a stream's usage lives: ``final-chunk`` (one usage object, on the last
  chunk), ``every-chunk`` (cumulative usage on each chunk: the last one wins), or ``none``;
* ``chunk_is_token``: each content chunk is one generated token, so counting chunks is exact
  where the engine reports no usage (llama-cpp-python, llama-server); engines that may batch
  several tokens in a chunk (vLLM, SGLang, TGI, Ollama) are never counted by chunk;
* ``tokenize``: the engine's own tokenize route (``POST``) and the field its text goes in, exact
  for the model the engine runs; ``window``: where it says its context window.

``auto`` (the default) is resolved from the engine's own answers (:mod:`sidecar.engine_detect`).
An engine that is not recognised gets :data:`UNKNOWN`: ask for usage, never count chunks.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class TokenizeRoute:
    path: str  # POST
    text_field: str  # the field the text goes in; the answer is {"count"}, {"tokens"} or a list


@dataclass(frozen=True, slots=True)
class WindowRoute:
    path: str  # GET
    keys: tuple[tuple[str | int, ...], ...]  # paths into the JSON answer, the first found wins


@dataclass(frozen=True, slots=True)
class EngineProfile:
    name: str
    inject_include_usage: bool
    usage_in: str = "final-chunk"  # "final-chunk", "every-chunk" or "none"
    chunk_is_token: bool = False
    tokenize: TokenizeRoute | None = None
    window: WindowRoute | None = None


ENGINES: dict[str, EngineProfile] = {
    profile.name: profile
    for profile in (
        # No usage in streams; one content chunk per token (FACTS.md §2); /extras/tokenize/count.
        EngineProfile(
            "llama-cpp-python",
            inject_include_usage=False,
            usage_in="none",
            chunk_is_token=True,
            tokenize=TokenizeRoute("/extras/tokenize/count", "input"),
        ),
        # llama.cpp's server: usage on the last chunk when asked (timings too), a token a chunk.
        EngineProfile(
            "llama-server",
            inject_include_usage=True,
            chunk_is_token=True,
            tokenize=TokenizeRoute("/tokenize", "content"),
            window=WindowRoute("/props", (("default_generation_settings", "n_ctx"), ("n_ctx",))),
        ),
        EngineProfile(
            "vllm",
            inject_include_usage=True,
            tokenize=TokenizeRoute("/tokenize", "prompt"),
            window=WindowRoute("/v1/models", (("data", 0, "max_model_len"),)),
        ),
        # SGLang can also report usage on every chunk (continuous_usage_stats): the last wins.
        EngineProfile("sglang", inject_include_usage=True, usage_in="every-chunk"),
        EngineProfile("ollama", inject_include_usage=True),
        EngineProfile(
            "tgi",
            inject_include_usage=True,
            tokenize=TokenizeRoute("/tokenize", "inputs"),
            window=WindowRoute("/info", (("max_input_tokens",), ("max_input_length",))),
        ),
    )
}
# An engine not recognised: ask for usage (harmless where ignored), never count chunks.
UNKNOWN = EngineProfile("unknown", inject_include_usage=True)
AUTO = "auto"
ENGINE_NAMES = (AUTO, *ENGINES)


def engine_profile(name: str) -> EngineProfile:
    if name == UNKNOWN.name:
        return UNKNOWN
    try:
        return ENGINES[name]
    except KeyError:
        raise ValueError(f"unknown engine {name!r}; known: {', '.join(ENGINES)}") from None
