"""Wires the shells, the ledger and the metrics into one aiohttp application; start/stop order.

Start: ledger (schema migrated) -> engine connection pool -> listening socket.
Stop: stop accepting -> let in-flight responses finish (their records are written) -> close the
engine pool -> flush and close the ledger.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from aiohttp import web

from sidecar.auth import SessionAuth, TokenScope
from sidecar.config import Settings, redact_password
from sidecar.engine import EngineClient
from sidecar.engine_detect import EngineIdentity
from sidecar.engine_facts import EngineFacts
from sidecar.exchange import Exchange
from sidecar.ledger import Ledger, open_ledger
from sidecar.malloc import tune_for_relaying
from sidecar.metrics import Metrics
from sidecar.models import ModelNames
from sidecar.shells.admin import Admin
from sidecar.shells.connections import LimitedSite
from sidecar.shells.node_http import NodeHttp
from sidecar.shells.node_ws import NodeWebSocket
from sidecar.shells.openai_proxy import OpenAIProxy

if TYPE_CHECKING:  # loaded only when a chain or a host key is configured
    from sidecar.chain.service import ChainService
    from sidecar.crypto import HostKey

log = logging.getLogger("sidecar")

ZERO_ADDRESS = "0x" + "00" * 20

LEDGER_KEY = web.AppKey("ledger", Ledger)
EXCHANGE_KEY = web.AppKey("exchange", Exchange)
METRICS_KEY = web.AppKey("metrics", Metrics)

ADMIN_KEY = web.AppKey("admin", Admin)
_WHO_IS_SERVED = {
    "none": "whoever names them (--session-auth none)",
    "bound": "their first authenticated client (--session-auth bound)",
    "depositor": "their depositors only (--session-auth depositor)",
}


def build_app(settings: Settings, ledger: Ledger | None = None) -> web.Application:
    """The sidecar as an aiohttp app. The ledger is opened on startup and closed on cleanup."""
    ledger = ledger or open_ledger(settings.ledger_url, password=settings.read_ledger_password())
    metrics = Metrics()
    chain = None
    if settings.rpc_url:
        from sidecar.chain.service import ChainService  # web3 only when a chain is configured

        chain = ChainService(settings, ledger, metrics)
    engine = EngineClient(
        settings.upstream,
        metrics,
        connect_timeout=settings.upstream_connect_timeout,
        first_byte_timeout=settings.upstream_first_byte_timeout,
        idle_timeout=settings.upstream_idle_timeout,
    )
    host_key = None
    if settings.host_key is not None or settings.host_key_file is not None:
        # The session cipher's libraries (about 23 MB resident) only for a host with a key.
        from sidecar.crypto import HostKey

        host_key = HostKey(bytes.fromhex(settings.read_host_key()[2:]))
    auth = session_auth(settings, ledger, chain, host_key)
    model_names = ModelNames(settings.model_names)
    identity = EngineIdentity(settings.engine)
    facts = EngineFacts(engine, identity, settings.context_window)
    exchange = Exchange(
        settings, ledger, metrics, engine, chain, auth, identity, count_text=facts.count_tokens
    )
    node_http = NodeHttp(
        exchange,
        engine,
        ledger,
        chain_id=settings.chain_id,
        max_body_bytes=settings.max_body_bytes,
        model_names=model_names,
        facts=facts,
        host_key=host_key,
    )
    node_ws = NodeWebSocket(
        exchange,
        node_http,
        ledger,
        chain,
        max_message_bytes=settings.ws_max_message_bytes,
        messages_per_second=settings.ws_messages_per_second,
        message_burst=2 * settings.ws_messages_per_second,
        host_key=host_key,  # encrypted sessions open to this key
    )
    proxy = OpenAIProxy(
        exchange,
        engine,
        settings.max_body_bytes,
        model_names,
        relay_native_generation=settings.relay_native_generation,
    )
    admin = Admin(ledger, metrics, engine, settings.read_admin_token(), chain, identity)
    # The shells read bodies themselves (with their own limit and an OpenAI-shaped 413).
    app = web.Application(client_max_size=settings.max_body_bytes)
    app[LEDGER_KEY] = ledger
    app[EXCHANGE_KEY] = exchange
    app[METRICS_KEY] = metrics
    app[ADMIN_KEY] = admin
    app.add_routes(admin.routes())
    # The host node's own API (/v1/inference, /v1/ws, ...): before the proxy's catch-all.
    app.add_routes(node_http.routes())
    app.add_routes(node_ws.routes())
    app.router.add_route("*", "/{tail:.*}", proxy.handle)

    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        await ledger.open()
        interrupted = await ledger.close_interrupted(time.time_ns() // 1_000_000)
        if interrupted:
            log.warning(
                "%d stream(s) were cut off by an earlier stop; their last persisted counts stand",
                interrupted,
            )
        try:
            if chain is not None:
                await chain.start()  # refuses to start on a wrong chain, address or version
            await engine.start()
            await identity.start(engine)  # auto: which engine answers (again when it comes back)
            yield
        finally:
            await identity.stop()
            await engine.close()
            if chain is not None:
                await chain.stop()
            await ledger.close()

    app.cleanup_ctx.append(lifecycle)
    return app


def session_auth(
    settings: Settings, ledger: Ledger, chain: ChainService | None, host_key: HostKey | None
) -> SessionAuth | None:
    """``--session-auth``: None when anyone naming a job may use it."""
    mode = settings.session_auth_mode
    if mode == "none":
        return None
    scope = TokenScope(
        chain_id=settings.chain_id or 0,
        marketplace=(settings.marketplace or ZERO_ADDRESS).lower(),
        host=host_key.address if host_key is not None else ZERO_ADDRESS,
    )
    depositor_of = None
    if chain is not None:
        service = chain

        def depositor_of(job_id: int) -> str | None:
            view = service.view(job_id)  # read by the admission that comes first
            return None if view is None or not view.exists else view.requester

    return SessionAuth(mode, ledger, scope, depositor_of)


def make_runner(app: web.Application, shutdown_grace: float = 30.0) -> web.AppRunner:
    # handler_cancellation: a client that leaves cancels its handler, which closes the engine
    # request so the engine stops generating tokens nobody will read. shutdown_timeout: on stop,
    # responses in flight may run this long; then their handlers are cancelled, and a cancelled
    # stream still records what it relayed (its final record is submitted on the way out, and
    # the ledger's close commits it).
    return web.AppRunner(
        app, handler_cancellation=True, access_log=None, shutdown_timeout=shutdown_grace
    )


async def serve(settings: Settings) -> None:
    """Run until SIGINT or SIGTERM, then stop gracefully."""
    tune_for_relaying()  # before the first socket read: see sidecar/malloc.py
    app = build_app(settings)
    runner = make_runner(app, float(settings.shutdown_grace))
    await runner.setup()
    host, port = settings.listen_host_port
    site = LimitedSite(runner, host, port, settings.max_connections, app[METRICS_KEY])
    await site.start()
    log.info(
        "sidecar listening on http://%s:%d, relaying to %s (engine %s), ledger %s, "
        "jobs served to %s",
        host,
        port,
        settings.upstream,
        settings.engine,
        redact_password(settings.ledger_url),
        _WHO_IS_SERVED[settings.session_auth_mode],
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
        app[ADMIN_KEY].draining = True  # /sidecar/ready answers 503: the balancer moves on
        log.info(
            "stopping: no new connections; in-flight responses may finish (up to %d s)",
            settings.shutdown_grace,
        )
    finally:
        await runner.cleanup()
        log.info("stopped")
