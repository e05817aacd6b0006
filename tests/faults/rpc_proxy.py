"""A TCP proxy between the sidecar and anvil that fails on cue: the RPC outage's switch.

It runs its own event loop in a thread (the test's loop may block on a synchronous web3 call)
and forwards every connection to the upstream RPC while ``forward``. The outages:

* ``swallow``   requests reach the node and are answered, except a transaction's: it reaches
                the node and is mined, but its sender never hears back (the unknown outcome);
* ``blackhole`` connections are accepted and then nothing: every call hangs until its timeout;
* ``refuse``    nothing listens: connection refused at once.

Switching mode cuts every open connection, so no call made before the switch completes after it.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
from collections.abc import Coroutine
from typing import Any

MODES = ("forward", "swallow", "blackhole", "refuse")
SEND = b'"eth_sendRawTransaction"'


class RpcProxy:
    def __init__(self, upstream_host: str, upstream_port: int) -> None:
        self.upstream = (upstream_host, upstream_port)
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.mode = "forward"
        self.connections = 0  # accepted, in all
        self.swallowed_sends = 0  # transactions that reached the node, their answers dropped
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.AbstractServer | None = None
        self._open: set[asyncio.StreamWriter] = set()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> RpcProxy:
        self._thread.start()
        self._call(self._listen())
        return self

    def stop(self) -> None:
        self._call(self._close_all(listen=False))
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    def set_mode(self, mode: str) -> None:
        if mode not in MODES:
            raise ValueError(mode)
        self._call(self._switch(mode))

    def __enter__(self) -> RpcProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- on the proxy's loop ---------------------------------------------------------------

    def _call(self, coro: Coroutine[Any, Any, Any]) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(10)

    async def _listen(self) -> None:
        self._server = await asyncio.start_server(
            self._accept, "127.0.0.1", self.port, reuse_address=True
        )

    async def _switch(self, mode: str) -> None:
        self.mode = mode
        await self._close_all(listen=mode != "refuse")

    async def _close_all(self, *, listen: bool) -> None:
        for writer in list(self._open):
            transport = writer.transport
            with contextlib.suppress(Exception):
                # RST, not FIN: a cut connection, as a network failure leaves it
                sock = transport.get_extra_info("socket")
                if sock is not None:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")
                transport.abort()
        self._open.clear()
        if not listen and self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        elif listen and self._server is None:
            await self._listen()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self._open.add(writer)
        mode = self.mode
        try:
            if mode == "blackhole":
                while await reader.read(65536):
                    pass
                return
            up_reader, up_writer = await asyncio.open_connection(*self.upstream)
            self._open.add(up_writer)
            link = _Link(swallow=mode == "swallow")
            await asyncio.gather(
                self._forward(reader, up_writer, link), self._back(up_reader, writer, link)
            )
        except (ConnectionError, OSError):
            pass
        finally:
            self._open.discard(writer)
            writer.transport.abort()

    async def _forward(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, link: _Link
    ) -> None:
        try:
            while data := await reader.read(65536):
                if link.swallow and SEND in data:
                    link.dropping = True  # this request's answer (and the rest) never comes
                    self.swallowed_sends += 1
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()

    async def _back(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, link: _Link
    ) -> None:
        try:
            while data := await reader.read(65536):
                if link.dropping:
                    continue
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            if not link.dropping:
                writer.close()


class _Link:
    """One proxied connection's state."""

    __slots__ = ("dropping", "swallow")

    def __init__(self, *, swallow: bool) -> None:
        self.swallow = swallow
        self.dropping = False
