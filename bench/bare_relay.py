"""A BARE aiohttp relay, for scale: what the sidecar's own stack costs before any metering.

The same aiohttp server and client as the sidecar (sidecar/engine.py's connector settings, the same
``iter_any`` streaming relay) and nothing else: no metering, no ledger, no metrics, no header
filtering beyond what HTTP needs. bench/overhead.py runs it on the sidecar's core, next to the
sidecar, so the figures split the sidecar's overhead into "aiohttp's floor" and "what the
sidecar adds on top".

Run alone: ``python bench/bare_relay.py --upstream http://127.0.0.1:PORT --port PORT``.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys

import aiohttp
from aiohttp import web

SESSION_KEY = web.AppKey("session", aiohttp.ClientSession)
UPSTREAM_KEY = web.AppKey("upstream", str)
_NOT_FORWARDED = frozenset({"host", "content-length", "connection", "transfer-encoding"})


async def relay(request: web.Request) -> web.StreamResponse:
    session = request.app[SESSION_KEY]
    upstream_base = request.app[UPSTREAM_KEY]
    body = await request.read()
    headers = {k: v for k, v in request.headers.items() if k.lower() not in _NOT_FORWARDED}
    async with session.request(
        request.method, upstream_base + request.raw_path, data=body or None, headers=headers
    ) as upstream:
        content_type = upstream.headers.get("Content-Type", "")
        if not content_type.startswith("text/event-stream"):
            payload = await upstream.read()
            return web.Response(
                status=upstream.status, body=payload, headers={"Content-Type": content_type}
            )
        response = web.StreamResponse(status=upstream.status)
        response.content_type = "text/event-stream"
        await response.prepare(request)
        async for chunk in upstream.content.iter_any():
            await response.write(chunk)
        await response.write_eof()
        return response


async def serve(upstream: str, host: str, port: int) -> None:
    app = web.Application()
    app[UPSTREAM_KEY] = upstream.rstrip("/")

    async def session_ctx(app: web.Application):  # type: ignore[no-untyped-def]
        app[SESSION_KEY] = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=60),
            auto_decompress=False,
            timeout=aiohttp.ClientTimeout(total=None, sock_read=None, connect=10),
            skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding", "Content-Type"),
        )
        yield
        await app[SESSION_KEY].close()

    app.cleanup_ctx.append(session_ctx)
    app.router.add_route("*", "/{tail:.*}", relay)
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port, reuse_address=True).start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--upstream", required=True, help="base URL of the (fake) engine")
    parser.add_argument("--host", default="127.0.0.1", help="loopback address to listen on")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--uvloop", action="store_true", help="run on uvloop's event loop")
    args = parser.parse_args()
    if not args.host.startswith("127.") or not args.upstream.startswith("http://127."):
        parser.error("the bare relay uses loopback addresses only")
    if args.uvloop:
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    asyncio.run(serve(args.upstream, args.host, args.port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
