"""A FAKE OpenAI-compatible engine for the benchmarks: answers as fast as it can.

It speaks llama-cpp-python's wire format for ``POST /v1/chat/completions`` and nothing else of
the engine (no model, no tokenizer): every answer is built from pre-built bytes, so the fake costs
as little CPU as possible on the core it shares with the load generator.

* non-stream: a small ``chat.completion`` JSON body with ``usage``, sent with Content-Length;
* stream: ``Transfer-Encoding: chunked`` with one HTTP chunk per SSE event, ``data: {json}\\n\\n``:
  a role-only first chunk, ``max_tokens`` content chunks, an empty-delta finish chunk, then
  ``data: [DONE]\\n\\n`` - as llama-cpp-python (sse-starlette, ``sep="\\n"``) sends them. Each
  event is handed to the socket with its own ``write`` (one send per token, as a real engine that
  flushes every token), in bursts of :data:`BURST` events per event-loop turn so concurrent
  streams interleave;
* slow mode: the request header ``X-Fake-Interval-Ms: N`` sends one content chunk every N ms
  (the memory test keeps many streams open this way).

``GET /v1/models`` answers a one-model list (the sidecar's health check asks for it).

Run alone: ``python bench/fake_upstream.py --port 0`` prints ``READY <port>`` once listening.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
from typing import Final

MODEL: Final = "fake-bench-model"
BURST: Final = 32  # events written per event-loop turn and stream in fast mode
MAX_HEADER_BYTES: Final = 64 * 1024
MAX_BODY_BYTES: Final = 8 * 1024 * 1024
MAX_TOKENS_LIMIT: Final = 10_000_000  # a bound on any one stream
DEFAULT_MAX_TOKENS: Final = 16
CREATED: Final = 1_700_000_000
COMPLETION_ID: Final = "chatcmpl-fake0000000000000000000000000000"


def _frame(payload: bytes) -> bytes:
    """One HTTP/1.1 chunk of the chunked transfer coding."""
    return b"%x\r\n%s\r\n" % (len(payload), payload)


def _event(obj: object) -> bytes:
    return _frame(b"data: " + json.dumps(obj).encode() + b"\n\n")


def _chunk(delta: dict[str, str], finish_reason: str | None) -> dict[str, object]:
    return {
        "id": COMPLETION_ID,
        "object": "chat.completion.chunk",
        "created": CREATED,
        "model": MODEL,
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}],
    }


ROLE_EVENT: Final = _event(_chunk({"role": "assistant"}, None))
CONTENT_EVENT: Final = _event(_chunk({"content": " token"}, None))
FINISH_EVENT: Final = _event(_chunk({}, "length"))
DONE_EVENT: Final = _frame(b"data: [DONE]\n\n")
LAST_CHUNK: Final = b"0\r\n\r\n"
#: SSE events per stream besides the content chunks: role, finish and [DONE].
EXTRA_EVENTS: Final = 3

STREAM_HEAD: Final = (
    b"HTTP/1.1 200 OK\r\n"
    b"server: fake-upstream\r\n"
    b"content-type: text/event-stream; charset=utf-8\r\n"
    b"cache-control: no-cache\r\n"
    b"x-accel-buffering: no\r\n"
    b"transfer-encoding: chunked\r\n"
)
MODELS_BODY: Final = json.dumps(
    {"object": "list", "data": [{"id": MODEL, "object": "model", "owned_by": "me"}]}
).encode()

_json_cache: dict[int, bytes] = {}


def _json_response(status: bytes, body: bytes, close: bool) -> bytes:
    return (
        b"HTTP/1.1 %s\r\nserver: fake-upstream\r\ncontent-type: application/json\r\n"
        b"content-length: %d\r\n%s\r\n%s"
        % (status, len(body), b"connection: close\r\n" if close else b"", body)
    )


def completion_body(max_tokens: int) -> bytes:
    """The non-stream answer for ``max_tokens`` tokens (cached: answers are pre-built bytes)."""
    body = _json_cache.get(max_tokens)
    if body is None:
        body = json.dumps(
            {
                "id": COMPLETION_ID,
                "object": "chat.completion",
                "created": CREATED,
                "model": MODEL,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": " token" * max_tokens},
                        "logprobs": None,
                        "finish_reason": "length",
                    }
                ],
                "usage": {
                    "prompt_tokens": 9,
                    "completion_tokens": max_tokens,
                    "total_tokens": 9 + max_tokens,
                },
            }
        ).encode()
        if len(_json_cache) < 1024:
            _json_cache[max_tokens] = body
    return body


class FakeEngine(asyncio.Protocol):
    """One client connection: HTTP/1.1 keep-alive, requests served one after another."""

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.busy = False  # a stream is being sent; later requests wait in the buffer
        self.paused = False
        self.closed = False
        self.remaining = 0
        self.interval = 0.0
        self.close_after = False
        self.scheduled = False  # a _pump is already on the loop's ready queue
        self.timer: asyncio.TimerHandle | None = None

    # -- asyncio.Protocol ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if len(self.buffer) > MAX_HEADER_BYTES + MAX_BODY_BYTES:
            self._fail(b"413 Payload Too Large")
            return
        self._serve_buffered()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.timer is not None:
            self.timer.cancel()

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        if self.busy and self.interval == 0.0:
            self._schedule()

    # -- requests --------------------------------------------------------------------------

    def _serve_buffered(self) -> None:
        while not self.busy and not self.closed:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                if len(self.buffer) > MAX_HEADER_BYTES:
                    self._fail(b"431 Request Header Fields Too Large")
                return
            head = bytes(self.buffer[:end]).decode("latin-1")
            lines = head.split("\r\n")
            parts = lines[0].split(" ")
            if len(parts) != 3:
                self._fail(b"400 Bad Request")
                return
            method, target, version = parts
            headers: dict[str, str] = {}
            for line in lines[1:]:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
            if "transfer-encoding" in headers:
                self._fail(b"501 Not Implemented")  # the sidecar and wrk send Content-Length
                return
            try:
                length = int(headers.get("content-length", "0"))
            except ValueError:
                self._fail(b"400 Bad Request")
                return
            if length > MAX_BODY_BYTES:
                self._fail(b"413 Payload Too Large")
                return
            if len(self.buffer) < end + 4 + length:
                return  # the rest of the body is still on its way
            body = bytes(self.buffer[end + 4 : end + 4 + length])
            del self.buffer[: end + 4 + length]
            close = headers.get("connection", "").lower() == "close" or version == "HTTP/1.0"
            self._answer(method, target.split("?", 1)[0], headers, body, close)

    def _answer(
        self, method: str, path: str, headers: dict[str, str], body: bytes, close: bool
    ) -> None:
        assert self.transport is not None
        if method == "GET" and path == "/v1/models":
            self._send_whole(b"200 OK", MODELS_BODY, close)
            return
        if method != "POST" or path != "/v1/chat/completions":
            self._send_whole(b"404 Not Found", b'{"detail":"Not Found"}', close)
            return
        try:
            request = json.loads(body)
            max_tokens = int(request.get("max_tokens") or DEFAULT_MAX_TOKENS)
            stream = bool(request.get("stream", False))
            interval_ms = float(headers.get("x-fake-interval-ms", "0"))
        except (ValueError, TypeError, AttributeError):
            self._send_whole(b"400 Bad Request", b'{"detail":"bad request body"}', close)
            return
        max_tokens = max(0, min(max_tokens, MAX_TOKENS_LIMIT))
        if not stream:
            self._send_whole(b"200 OK", completion_body(max_tokens), close)
            return
        self.busy = True
        self.remaining = max_tokens
        self.interval = max(0.0, interval_ms) / 1000.0
        self.close_after = close
        self.transport.write(
            STREAM_HEAD + (b"connection: close\r\n\r\n" if close else b"\r\n") + ROLE_EVENT
        )
        if self.interval:
            self.timer = self.loop.call_later(self.interval, self._tick)
        else:
            self._pump()

    def _send_whole(self, status: bytes, body: bytes, close: bool) -> None:
        assert self.transport is not None
        self.transport.write(_json_response(status, body, close))
        if close:
            self.transport.close()
            self.closed = True

    def _fail(self, status: bytes) -> None:
        self._send_whole(status, b"", True)

    # -- streams ---------------------------------------------------------------------------

    def _schedule(self) -> None:
        if not self.scheduled:
            self.scheduled = True
            self.loop.call_soon(self._scheduled_pump)

    def _scheduled_pump(self) -> None:
        self.scheduled = False
        self._pump()

    def _pump(self) -> None:
        """Fast mode: write up to BURST events, then let the other connections run."""
        if self.closed or self.paused or not self.busy or self.interval:
            return
        assert self.transport is not None
        write = self.transport.write
        n = min(BURST, self.remaining)
        for _ in range(n):
            write(CONTENT_EVENT)
        self.remaining -= n
        if self.remaining:
            self._schedule()
        else:
            self._end_stream()

    def _tick(self) -> None:
        """Slow mode: one content event per interval."""
        self.timer = None
        if self.closed:
            return
        assert self.transport is not None
        if self.remaining:
            self.transport.write(CONTENT_EVENT)
            self.remaining -= 1
        if self.remaining:
            self.timer = self.loop.call_later(self.interval, self._tick)
        else:
            self._end_stream()

    def _end_stream(self) -> None:
        assert self.transport is not None
        self.transport.write(FINISH_EVENT + DONE_EVENT + LAST_CHUNK)
        self.busy = False
        if self.close_after:
            self.transport.close()
            self.closed = True
            return
        self._serve_buffered()


async def serve(host: str, port: int, ready: bool = True) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(FakeEngine, host, port, backlog=4096, reuse_address=True)
    bound = server.sockets[0].getsockname()[1]
    if ready:
        print(f"READY {bound}", flush=True)
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with server:
        await stop.wait()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--host", default="127.0.0.1", help="loopback address to listen on")
    parser.add_argument("--port", type=int, default=0, help="port (0: any free one)")
    args = parser.parse_args()
    if not args.host.startswith("127.") and args.host != "::1":
        parser.error("the fake upstream listens on loopback addresses only")
    try:
        asyncio.run(serve(args.host, args.port))
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
