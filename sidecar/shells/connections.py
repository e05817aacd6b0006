"""A bound on the client connections open at once, enforced where connections are accepted.

A request middleware would not see a client that opens sockets and never finishes a request
(a slow-loris): the bound has to hold at accept. :class:`LimitedSite` is aiohttp's TCP site
with a protocol factory in front of the server's: under the bound it hands out the server's
own handler; at the bound it answers one canned 503 (an OpenAI-shaped error) and closes.

The count is the server's own list of connections, read only when an upper estimate (the last
exact count plus the connections accepted since) reaches the bound: an accept far from the bound
costs an increment, not a walk over every open connection.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import TYPE_CHECKING

from aiohttp import web

if TYPE_CHECKING:
    from sidecar.metrics import Metrics

log = logging.getLogger("sidecar.connections")

REFUSAL_LOG_EVERY = 10.0  # seconds between two log lines about refused connections


def refusal_response(limit: int) -> bytes:
    """The whole HTTP answer to a connection over the bound."""
    body = json.dumps(
        {
            "error": {
                "message": f"this host has {limit} connections open (--max-connections); "
                "retry shortly",
                "type": "server_error",
                "param": None,
                "code": "too_many_connections",
            }
        }
    ).encode()
    head = (
        "HTTP/1.1 503 Service Unavailable\r\n"
        "Content-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n"
        "Retry-After: 1\r\n"
        "Connection: close\r\n\r\n"
    )
    return head.encode() + body


class _Refused(asyncio.Protocol):
    """A connection over the bound: the canned answer, then close (its request is not read)."""

    def __init__(self, answer: bytes) -> None:
        self._answer = answer

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        transport.write(self._answer)
        transport.close()


class ConnectionLimit:
    """The protocol factory: ``server``'s handlers up to ``limit`` connections open."""

    def __init__(self, server: web.Server, limit: int, metrics: Metrics | None = None) -> None:
        if limit <= 0:
            raise ValueError("the connection limit must be positive")
        self._server = server
        self.limit = limit
        self._metrics = metrics
        self._estimate = 0  # at least the connections open now
        self._answer = refusal_response(limit)
        self.refused = 0
        self._logged_at = -REFUSAL_LOG_EVERY

    def __call__(self) -> asyncio.BaseProtocol:
        if self._estimate >= self.limit:
            self._estimate = len(self._server.connections)
            if self._estimate >= self.limit:
                return self._refuse()
        self._estimate += 1
        return self._server()

    def _refuse(self) -> asyncio.BaseProtocol:
        self.refused += 1
        if self._metrics is not None:
            self._metrics.rejected.labels("too_many_connections").inc()
        now = time.monotonic()
        if now - self._logged_at >= REFUSAL_LOG_EVERY:
            self._logged_at = now
            log.warning(
                "refusing connections: %d open, the limit (--max-connections); %d refused so far",
                self.limit,
                self.refused,
            )
        return _Refused(self._answer)


class LimitedSite(web.BaseSite):
    """``web.TCPSite`` with at most ``limit`` client connections open at once."""

    __slots__ = ("_host", "_limit", "_metrics", "_port", "factory")

    def __init__(
        self,
        runner: web.BaseRunner,
        host: str,
        port: int,
        limit: int,
        metrics: Metrics | None = None,
    ) -> None:
        super().__init__(runner)
        self._host = host
        self._port = port
        self._limit = limit
        self._metrics = metrics
        self.factory: ConnectionLimit | None = None

    @property
    def name(self) -> str:
        return f"http://{self._host}:{self._port}"

    async def start(self) -> None:
        await super().start()
        server = self._runner.server
        assert server is not None  # the runner is set up
        self.factory = ConnectionLimit(server, self._limit, self._metrics)
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            self.factory, self._host, self._port, reuse_address=True
        )
