"""The operator's view on the proxy's own port: health, per-job totals, Prometheus metrics.

``/sidecar/*`` needs ``Authorization: Bearer <admin token>`` when a token is configured;
``/metrics`` stays open for the scraper, as is usual for Prometheus endpoints.
"""

from __future__ import annotations

import asyncio
import hmac
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from sidecar import __version__
from sidecar.engine import EngineClient
from sidecar.engine_detect import EngineIdentity
from sidecar.errors import JobRefused, error_response, to_response
from sidecar.ledger import Ledger, claim_totals
from sidecar.metering.jobs import InvalidJobId, parse_job_id
from sidecar.metrics import Metrics

if TYPE_CHECKING:  # web3 is loaded only when a chain is configured
    from sidecar.chain.service import ChainService

READY_TIMEOUT = 3.0  # seconds the ledger has to answer a readiness probe

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class Admin:
    def __init__(
        self,
        ledger: Ledger,
        metrics: Metrics,
        engine: EngineClient,
        admin_token: str | None,
        chain: ChainService | None = None,
        identity: EngineIdentity | None = None,
    ) -> None:
        self.identity = identity
        self.chain = chain
        self.ledger = ledger
        self.metrics = metrics
        self.engine = engine
        self._token = admin_token.encode() if admin_token else None
        self.draining = False  # set when the process is stopping: not ready for new work

    def routes(self) -> list[web.RouteDef]:
        return [
            # Probes for orchestrators and balancers: open, and they reveal nothing but state.
            web.get("/sidecar/live", self.live),
            web.get("/sidecar/ready", self.ready),
            web.get("/sidecar/health", self._guarded(self.health)),
            web.get("/sidecar/jobs", self._guarded(self.jobs)),
            web.get("/sidecar/jobs/{job_id}", self._guarded(self.job)),
            web.post("/sidecar/jobs/{job_id}/settle", self._guarded(self.settle)),
            web.get("/metrics", self.prometheus),
            # /sidecar/* is the sidecar's own: an unknown path there is never relayed.
            web.route("*", "/sidecar/{tail:.*}", self._guarded(self.not_found)),
        ]

    def _guarded(self, handler: Handler) -> Handler:
        """The handler behind the admin token, when one is set (no per-request middleware:
        the proxied routes must not pay for the admin routes' guard)."""
        if self._token is None:
            return handler
        token = self._token

        async def guarded(request: web.Request) -> web.StreamResponse:
            supplied = request.headers.get("Authorization", "")
            scheme, _, given = supplied.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), token):
                return error_response(
                    401,
                    "admin routes need 'Authorization: Bearer <admin token>'",
                    type="authentication_error",
                    code="invalid_admin_token",
                    headers={"WWW-Authenticate": 'Bearer realm="sidecar"'},
                )
            return await handler(request)

        return guarded

    async def live(self, request: web.Request) -> web.Response:
        """The process runs and its event loop answers."""
        return web.json_response({"status": "live"})

    async def ready(self, request: web.Request) -> web.Response:
        """200 when this replica can serve: the ledger answers, the engine answers, and the
        chain was checked at start (a sidecar that failed that check never starts serving);
        503 with the failing part otherwise, and while stopping."""
        checks: dict[str, object] = {}
        try:
            await asyncio.wait_for(self.ledger.job_tokens(0), timeout=READY_TIMEOUT)
            checks["ledger"] = "ok"
        except Exception as exc:  # any failure to answer: not ready
            checks["ledger"] = f"unavailable ({type(exc).__name__})"
        engine = await self.engine.health()
        checks["engine"] = "ok" if engine.healthy else "unreachable"
        if self.chain is not None:
            checks["chain"] = "checked"
            checks["submitter"] = self.chain.submitting
        ready = checks["ledger"] == "ok" and engine.healthy and not self.draining
        body = {"status": "ready" if ready else "stopping" if self.draining else "not_ready"}
        return web.json_response({**body, "checks": checks}, status=200 if ready else 503)

    async def health(self, request: web.Request) -> web.Response:
        engine = await self.engine.health()
        upstream: dict[str, object] = {"url": self.engine.base_url, "reachable": engine.reachable}
        if engine.status is not None:
            upstream["status"] = engine.status
        if engine.error is not None:
            upstream["error"] = engine.error
        upstream["models"] = list(engine.models)
        upstream["latency_ms"] = engine.latency_ms
        if self.identity is not None:
            upstream["engine"] = self.identity.as_json()  # the dialect in force, and why
        body: dict[str, object] = {"version": __version__, "upstream": upstream}
        healthy = engine.healthy
        if self.chain is not None:
            chain = await self.chain.health()
            body["chain"] = chain
            healthy = healthy and bool(chain["reachable"])
        try:
            bound = await self.ledger.marketplace()
        except Exception:  # the ledger's own health is the readiness probe's; say unknown here
            body["ledger"] = {"marketplace": "unknown"}
        else:
            # The marketplace whose jobs the ledger holds (None: never started with a chain).
            body["ledger"] = {"marketplace": None if bound is None else bound.as_json()}
        body["status"] = "ok" if healthy else "degraded"
        return web.json_response(body)

    async def jobs(self, request: web.Request) -> web.Response:
        totals = await self.ledger.jobs()
        return web.json_response({"jobs": [t.as_json() for t in totals]})

    async def job(self, request: web.Request) -> web.Response:
        raw = request.match_info["job_id"]
        if raw == "unattributed":
            job_id = None
        else:
            try:
                job_id = parse_job_id(raw)
            except InvalidJobId as exc:
                return error_response(400, str(exc), code="invalid_job_id", param="job_id")
        totals = await self.ledger.job(job_id)
        if totals is None:
            return error_response(404, f"no usage recorded for job {raw}", code="unknown_job")
        body = totals.as_json()
        if job_id is not None:
            claims = await self.ledger.claims(job_id)
            body.update(claim_totals(claims))
            body["claims"] = [c.as_json() for c in claims]
            view = self.chain.view(job_id) if self.chain is not None else None
            body["onchain"] = (
                None
                if view is None
                else {
                    "host": view.host,
                    "requester": view.requester,
                    "deposit_wei": str(view.deposit),
                    "price_per_token_wei": str(view.price_per_token),
                    "tokens_used": view.tokens_used,
                    "status": view.status.name.lower(),
                }
            )
        return web.json_response(body)

    async def settle(self, request: web.Request) -> web.Response:
        if self.chain is None:
            return error_response(
                409, "no chain is configured (--rpc-url): nothing to settle", code="no_chain"
            )
        try:
            job_id = parse_job_id(request.match_info["job_id"])
        except InvalidJobId as exc:
            return error_response(400, str(exc), code="invalid_job_id", param="job_id")
        try:
            await self.chain.request_settlement(job_id)
        except JobRefused as exc:
            return to_response(exc)
        return web.json_response(
            {
                "job_id": str(job_id),
                "settlement": "requested: the last claim is mined first, "
                "then completeSessionJob once the dispute window has passed",
            },
            status=202,
        )

    async def not_found(self, request: web.Request) -> web.Response:
        return error_response(
            404,
            f"no admin route {request.method} {request.path}; see /sidecar/health, "
            "/sidecar/jobs, /sidecar/jobs/{job_id}",
            code="unknown_route",
        )

    async def prometheus(self, request: web.Request) -> web.Response:
        return web.Response(
            body=await self.metrics.scrape(), headers={"Content-Type": CONTENT_TYPE_LATEST}
        )
