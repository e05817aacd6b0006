"""The metering core inside mitmproxy: the same exchange, ledger, attribution and admission as
``sidecar serve``, for hosts that prefer mitmproxy as their front.

    mitmdump -s sidecar/shells/mitm_addon.py --mode reverse:http://127.0.0.1:8000 -p 8080
    mitmdump -s sidecar/shells/mitm_addon.py -p 8080          # a forward proxy (HTTP_PROXY)

Settings are ``sidecar serve``'s: the ``SIDECAR_*`` environment and the TOML file
(``--set sidecar_config=FILE``, or ``SIDECAR_CONFIG``). ``--upstream`` is the engine the
sidecar asks for its tokenizer; requests go where mitmproxy sends them.

* ``request`` (async): a metered route (chat, completions, embeddings, responses) is prepared
  as the proxy prepares it (job fields out, ``include_usage`` asked for where the dialect needs
  it, the model name mapped), then admitted (the chain, who asks, the deposit's reservation);
  a refusal answers at once with the OpenAI-shaped error and nothing reaches the engine.
* ``responseheaders``: an event stream is relayed unbuffered (``flow.response.stream``, a
  callable that feeds the meter); its final record is committed, durably, before the bytes
  holding its end are passed on (mitmproxy calls the callable synchronously, so the commit is
  :meth:`~sidecar.ledger.Ledger.write_blocking`).
* ``response`` (async): a JSON answer's usage is recorded and committed before mitmproxy
  delivers it; ``error``: a stream the engine or the client broke off is recorded as aborted.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from mitmproxy import ctx, http

from sidecar.calls import Call
from sidecar.config import Settings, load_settings, redact_password
from sidecar.engine import EngineClient
from sidecar.engine_detect import EngineIdentity
from sidecar.engine_facts import EngineFacts
from sidecar.errors import BadRequest, SidecarError
from sidecar.exchange import Exchange
from sidecar.ledger import Ledger, RecordState, open_ledger
from sidecar.metering import (
    InvalidJobId,
    InvalidRequestBody,
    Source,
    StreamMeter,
    Usage,
    prepare_request,
)
from sidecar.metering.usage import usage_from_body
from sidecar.metrics import Metrics
from sidecar.models import ModelNames
from sidecar.shells.headers import JOB_HEADERS, JOB_TOKEN_BEARER
from sidecar.shells.route_policy import is_native_generation, metered_endpoint

log = logging.getLogger("sidecar.mitm")

_CALL = "sidecar_call"
_STREAM = "sidecar_stream"


class _StreamRelay:
    """``flow.response.stream``: every chunk through the meter and on at once; the final
    record committed before the chunk that ends the stream (or the end) is handed back."""

    def __init__(self, exchange: Exchange, call: Call, meter: StreamMeter, status: int) -> None:
        self.exchange, self.call, self.meter, self.status = exchange, call, meter, status
        self.committed = False

    def __call__(self, data: bytes) -> bytes:
        meter = self.meter
        if data:
            out = meter.feed(data)
            if meter.done and not self.committed:
                self._commit()
            return out
        tail = meter.finish()  # b"": the engine's response ended
        if not self.committed:
            self._commit()
        return tail

    def _commit(self) -> None:
        record = self.exchange.record(self.call, self.meter.usage(), RecordState.FINAL, self.status)
        self.exchange.ledger.write_blocking(record)
        self.committed = True
        self.call.hold.release()
        self.exchange.committed(record)  # metrics and the chain's notice

    def abandon(self) -> None:
        """The stream broke off before its end: what was relayed is recorded as aborted."""
        if not self.committed:
            self.committed = True
            usage = self.meter.usage()
            record = self.exchange.record(self.call, usage, RecordState.ABORTED, self.status)
            self.exchange.submit_unawaited(record)
            self.call.hold.release()


class SidecarAddon:
    def __init__(self) -> None:
        self.settings: Settings | None = None
        self.ledger: Ledger | None = None
        self.engine: EngineClient | None = None
        self.identity: EngineIdentity | None = None
        self.exchange: Exchange | None = None
        self.chain: Any = None  # sidecar.chain.service.ChainService, with a chain
        self.engine_model: Any = None
        self.relay_native_generation = False

    def load(self, loader: Any) -> None:
        loader.add_option(
            "sidecar_config", str, "", "TOML file of sidecar settings (as sidecar serve --config)"
        )

    async def running(self) -> None:
        flags = {"config": ctx.options.sidecar_config} if ctx.options.sidecar_config else {}
        settings = load_settings(flags)
        self.settings = settings
        self.relay_native_generation = settings.relay_native_generation
        ledger = open_ledger(settings.ledger_url, password=settings.read_ledger_password())
        await ledger.open()
        metrics = Metrics()
        engine = EngineClient(
            settings.upstream,
            metrics,
            connect_timeout=settings.upstream_connect_timeout,
            first_byte_timeout=settings.upstream_first_byte_timeout,
            idle_timeout=settings.upstream_idle_timeout,
        )
        await engine.start()
        identity = EngineIdentity(settings.engine)
        await identity.start(engine)
        facts = EngineFacts(engine, identity, settings.context_window)
        chain = None
        if settings.rpc_url:
            from sidecar.chain.service import ChainService

            chain = ChainService(settings, ledger, metrics)
            await chain.start()
            self.chain = chain
        auth = None
        if settings.session_auth_mode != "none":
            from sidecar.app import session_auth

            auth = session_auth(settings, ledger, chain, None)
        self.exchange = Exchange(
            settings, ledger, metrics, engine, chain, auth, identity, count_text=facts.count_tokens
        )
        names = ModelNames(settings.model_names)
        self.engine_model = names.engine_model if names.configured else None
        self.ledger, self.engine, self.identity = ledger, engine, identity
        log.info("sidecar metering in mitmproxy: ledger %s", redact_password(settings.ledger_url))

    async def done(self) -> None:
        if self.identity is not None:
            await self.identity.stop()
        if self.chain is not None:
            await self.chain.stop()
        if self.engine is not None:
            await self.engine.close()
        if self.ledger is not None:
            await self.ledger.close()

    # -- requests --------------------------------------------------------------------------

    async def request(self, flow: http.HTTPFlow) -> None:
        exchange = self.exchange
        path = flow.request.path.split("?", 1)[0]
        endpoint = metered_endpoint(path) if flow.request.method == "POST" else None
        if exchange is None:
            return
        if endpoint is None:
            if is_native_generation(path) and not self.relay_native_generation:
                exchange.metrics.rejected.labels("unmetered_route").inc()
                refusal = BadRequest(
                    f"{path} is the engine's own generation route, which this host does not "
                    "meter and so does not serve; use the OpenAI routes",
                    code="unmetered_route",
                    status=403,
                )
                flow.response = http.Response.make(
                    refusal.status,
                    json.dumps(refusal.openai_body()).encode(),
                    {"Content-Type": "application/json"},
                )
            return
        try:
            header_jobs = [(n, v) for n in JOB_HEADERS for v in flow.request.headers.get_all(n)]
            try:
                prepared = prepare_request(
                    endpoint,
                    flow.request.raw_content or b"",
                    header_jobs,
                    inject_include_usage=exchange.inject_include_usage,
                    engine_model=self.engine_model,
                )
            except InvalidJobId as exc:
                raise BadRequest(str(exc), code="invalid_job_id", param="job_id") from None
            except InvalidRequestBody as exc:
                raise BadRequest(str(exc), code="invalid_request_body") from None
            exchange.check_job_named(prepared.job_id, "name the job with job_id or X-Job-Id")
            requester = None
            authorization = flow.request.headers.get("authorization")
            if prepared.job_id is not None:
                requester = exchange.requester_from_bearer(authorization, prepared.job_id)
            admission = await exchange.admit(
                endpoint, prepared.job_id, prepared.body, requester, stream=prepared.stream
            )
        except SidecarError as exc:
            flow.response = http.Response.make(
                exc.status,
                json.dumps(exc.openai_body()).encode(),
                {"Content-Type": "application/json"},
            )
            return
        for name in JOB_HEADERS:
            flow.request.headers.pop(name, None)
        if authorization and authorization[: len(JOB_TOKEN_BEARER)].lower() == JOB_TOKEN_BEARER:
            flow.request.headers.pop("authorization", None)  # the sidecar's, not the engine's
        flow.request.headers.pop("accept-encoding", None)  # the meter reads the answer
        if admission.body is not flow.request.raw_content:
            flow.request.content = admission.body
        flow.metadata[_CALL] = exchange.start(endpoint, prepared.job_id, prepared.model, admission)
        flow.metadata["sidecar_strip"] = prepared.strip_usage_chunk

    # -- responses -------------------------------------------------------------------------

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        call: Call | None = flow.metadata.get(_CALL)
        response = flow.response
        if call is None or response is None or self.exchange is None:
            return
        if not response.headers.get("content-type", "").startswith("text/event-stream"):
            return  # read whole: the response hook meters it
        collect = not self.exchange.identity.profile.chunk_is_token
        meter = StreamMeter(
            call.endpoint,
            strip_usage_chunk=bool(flow.metadata.get("sidecar_strip")),
            collect_text=collect,
            max_event_bytes=self.exchange.max_event_bytes,
        )
        relay = _StreamRelay(self.exchange, call, meter, response.status_code)
        flow.metadata[_STREAM] = relay
        response.stream = relay

    async def response(self, flow: http.HTTPFlow) -> None:
        call: Call | None = flow.metadata.get(_CALL)
        exchange = self.exchange
        if call is None or exchange is None or _STREAM in flow.metadata or flow.response is None:
            return
        status = flow.response.status_code
        usage = (
            usage_from_body(call.endpoint, flow.response.content or b"") if status < 300 else None
        )
        if usage is None:  # an error answer, or nothing readable: zero tokens, never "reported"
            usage = Usage(None, 0, Source.ESTIMATED)
        record = exchange.record(call, usage, RecordState.FINAL, status)
        try:
            await exchange.commit(record)  # before mitmproxy delivers the answer
        finally:
            call.hold.release()
        for name, value in (await exchange.receipt(call, usage)).items():
            flow.response.headers[name] = value
        flow.response.headers["X-Sidecar-Request-Id"] = call.key

    def error(self, flow: http.HTTPFlow) -> None:
        relay: _StreamRelay | None = flow.metadata.get(_STREAM)
        if relay is not None:
            relay.abandon()
        elif (call := flow.metadata.get(_CALL)) is not None:
            call.hold.release()


addons = [SidecarAddon()]
