"""Which of the engine's routes a client may reach through the sidecar, and how each is metered.

The four OpenAI routes are metered (``sidecar.exchange.METERED_ROUTES``). Engines also answer
the same requests under other paths: vLLM and llama.cpp's server without the ``/v1`` prefix,
llama-cpp-python under ``/v1/engines/{model}/completions``. Those are metered as the route they
alias (the request still goes to the path the client named). Engines also have generation
routes of their own formats (llama.cpp's ``/completion``, Ollama's ``/api/generate``, TGI's
``/generate``, Anthropic-style ``/v1/messages``...) that the meter cannot read: relaying them
would let anyone who reaches the port generate for free, so they are refused unless the operator
allows them (``--relay-native-generation``, for a host that does not sell tokens). Every other
route (model lists, health, tokenizers) is relayed as is.
"""

from __future__ import annotations

import re

from sidecar.exchange import METERED_ROUTES
from sidecar.metering import Endpoint

_ALIASES: dict[str, Endpoint] = {
    "/chat/completions": Endpoint.CHAT,
    "/completions": Endpoint.COMPLETIONS,
    "/embeddings": Endpoint.EMBEDDINGS,
    "/responses": Endpoint.RESPONSES,
}
_ENGINE_COMPLETIONS = re.compile(r"/v1/engines/[^/]+/completions")

# Generation (or scoring) routes of the supported engines in formats other than OpenAI's.
NATIVE_GENERATION = frozenset(
    {
        # llama.cpp's server
        "/completion",
        "/infill",
        "/embedding",
        "/rerank",
        "/reranking",
        "/v1/rerank",
        "/v1/messages",
        "/v1/messages/count_tokens",
        "/apply-template",
        # Ollama
        "/api/generate",
        "/api/chat",
        "/api/embed",
        "/api/embeddings",
        # TGI
        "/generate",
        "/generate_stream",
        # vLLM and SGLang
        "/invocations",
        "/pooling",
        "/classify",
        "/score",
        "/v1/score",
        "/v2/rerank",
        "/v1/audio/transcriptions",
        "/v1/audio/translations",
    }
)


def metered_endpoint(path: str) -> Endpoint | None:
    """The metered route ``path`` is, or an alias of; None for every other path."""
    if path.endswith("/") and len(path) > 1:
        path = path.rstrip("/")  # an engine that serves "/v1/chat/completions/" is metered too
    endpoint = METERED_ROUTES.get(path)
    if endpoint is not None:
        return endpoint
    endpoint = _ALIASES.get(path)
    if endpoint is not None:
        return endpoint
    if _ENGINE_COMPLETIONS.fullmatch(path):
        return Endpoint.COMPLETIONS
    return None


def is_native_generation(path: str) -> bool:
    """True for an engine's own (unmeterable) generation route."""
    return path.rstrip("/") in NATIVE_GENERATION
