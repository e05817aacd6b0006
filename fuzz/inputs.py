"""Reading an atheris input (plain bytes) as a target's arguments.

The layouts keep the payload readable in a corpus file: a selector byte first where a harness
has modes, the payload itself, and the numbers (read cuts) at the end, so that a seed is the
payload with a byte or two around it (``fuzz/corpus/<target>/``).
"""

from __future__ import annotations

import json
from typing import Any

from sidecar.metering import safejson


def head(data: bytes) -> tuple[int, bytes]:
    """The selector byte (0 for an empty input) and the rest."""
    return (data[0], data[1:]) if data else (0, b"")


def tail_ints(data: bytes, most: int = 8) -> tuple[bytes, list[int]]:
    """Split off the input's tail: its last byte says how many 2-byte integers precede it."""
    if not data:
        return data, []
    body = data[:-1]
    count = min(data[-1] % (most + 1), len(body) // 2)
    cut = len(body) - 2 * count
    ints = [int.from_bytes(body[i : i + 2], "big") for i in range(cut, len(body), 2)]
    return body[:cut], ints


def text(data: bytes) -> str:
    """The bytes as text, lone surrogates included (as a JSON escape can make them)."""
    return data.decode("utf-8", "surrogateescape")


def json_value(data: bytes) -> Any:
    """The JSON value the bytes hold, or else the bytes as text."""
    try:
        return safejson.loads(data)
    except (ValueError, RecursionError):
        return text(data)


def fields(data: bytes, count: int) -> list[bytes]:
    """The bytes cut at NUL into at most ``count`` pieces (missing ones empty)."""
    pieces = data.split(b"\x00", count - 1)
    return pieces + [b""] * (count - len(pieces))


def dumps(value: Any) -> bytes:
    return json.dumps(value).encode()
