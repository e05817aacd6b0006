"""Value types shared by the metering core, the shells and the ledger.

Everything here is plain data: no I/O, no clock. Token counts are ``int``.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class Source(StrEnum):
    """Where a token count came from, from most to least trustworthy."""

    REPORTED = "reported"  # the engine's own ``usage`` object
    COUNTED = "counted"  # counted from the streamed chunks (one token per content chunk)
    TOKENIZED = "tokenized"  # the engine's own tokenizer over the generated text (exact)
    ESTIMATED = "estimated"  # a tokenizer estimate over the text, the last resort


class Endpoint(StrEnum):
    """The OpenAI routes whose responses are metered."""

    CHAT = "chat"  # /v1/chat/completions
    COMPLETIONS = "completions"  # /v1/completions
    EMBEDDINGS = "embeddings"  # /v1/embeddings
    RESPONSES = "responses"  # /v1/responses (usage: input_tokens, output_tokens)


@dataclass(frozen=True, slots=True)
class Usage:
    """The token usage of one response.

    ``prompt_tokens`` is ``None`` when nothing told us (a counted stream without usage).
    """

    prompt_tokens: int | None
    completion_tokens: int
    source: Source
    # Detail where the engine reports it (None: not reported): prompt tokens served from the
    # engine's cache, and generated tokens spent reasoning. Never billed differently here.
    cached_tokens: int | None = None
    reasoning_tokens: int | None = None

    @property
    def total_tokens(self) -> int:
        return (self.prompt_tokens or 0) + self.completion_tokens
