"""What every HTTP shell does with aiohttp's request: read a bounded body, cut a connection."""

from __future__ import annotations

from aiohttp import web

from sidecar.errors import RequestTooLarge


async def read_body(request: web.Request, limit: int) -> bytes:
    """The whole body, refused with :class:`RequestTooLarge` above ``limit`` bytes (declared
    or, for a chunked body, counted as it arrives)."""
    if request.content_length is not None and request.content_length > limit:
        raise RequestTooLarge(f"request body exceeds the limit of {limit} bytes")
    if not request.body_exists:
        return b""
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.content.iter_any():
        size += len(chunk)
        if size > limit:
            raise RequestTooLarge(f"request body exceeds the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def abort_client(request: web.Request) -> None:
    """Cut the client's connection so it sees a broken response, not a clean end. What was
    already written still goes out first (a close, not an abort): the tokens recorded for a cut
    stream are the ones its client can read."""
    transport = request.transport
    if transport is not None:
        transport.close()
