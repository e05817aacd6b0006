"""One error root for everything the sidecar refuses or cannot do, and its two client shapes.

Every refusal is a :class:`SidecarError` carrying ``status`` (HTTP), ``code`` (a stable,
machine-readable string), ``message`` (for a person; never a secret) and ``param`` (the field at
fault, if any). A shell never maps exceptions by hand: the OpenAI routes and the node's HTTP
routes answer :func:`error_response` (``{"error": {"message", "type", "param", "code"}}``), the
WebSocket sends :meth:`SidecarError.socket_message` (``{"type": "error", "code", "message"}``).

Nothing here imports web3: the chain's errors live here so that shells can catch them without
loading the chain.
"""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web


class SidecarError(Exception):
    """A request the sidecar will not or cannot serve, shaped for the client."""

    # Class defaults; an instance may refine its status and code.
    status: int = 400
    code: str = "invalid_request"
    type: str = "invalid_request_error"

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        status: int | None = None,
        param: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        if status is not None:
            self.status = status
        self.param = param

    def openai_body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

    def socket_message(self) -> dict[str, Any]:
        return {"type": "error", "code": self.code, "message": self.message}


class BadRequest(SidecarError):
    """The client sent something that cannot be served (400 unless said otherwise)."""


class JobRefused(SidecarError):
    """This job must not be served here: unknown, inactive, another host's, spent (402/403),
    or not checkable while the chain is down (503)."""

    status = 402
    code = "job_refused"

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        status: int | None = None,
        param: str | None = "job_id",
    ) -> None:
        super().__init__(message, code=code, status=status, param=param)


class UpstreamError(SidecarError):
    """The engine could not be reached, timed out, broke off, or refused the request."""

    status = 502
    code = "upstream_error"
    type = "upstream_error"


class UpstreamBroke(UpstreamError):
    """The engine's answer ended abnormally after it began (reset, closed, stalled)."""

    code = "upstream_broken_response"


class LedgerUnavailable(SidecarError):
    """A usage record could not be committed: the response must not be delivered."""

    status = 503
    code = "ledger_unavailable"
    type = "server_error"

    def __init__(self, message: str | None = None) -> None:
        super().__init__(
            message
            or "the sidecar could not record this response's usage durably, so it was not "
            "delivered; retry later"
        )


class ChainCheckError(SidecarError):
    """A start-up check of the chain or the contract failed: the sidecar refuses to start."""

    status = 503
    code = "chain_check_failed"
    type = "server_error"


class LedgerMarketplaceMismatchError(ChainCheckError):
    """The ledger holds the jobs of another marketplace (chain, contract or version)."""

    check = "ledger_marketplace"


class RequestTooLarge(SidecarError):
    status = 413
    code = "request_too_large"


def error_response(
    status: int,
    message: str,
    *,
    type: str = "invalid_request_error",
    code: str | None = None,
    param: str | None = None,
    headers: dict[str, str] | None = None,
) -> web.Response:
    """An OpenAI-shaped error answer: ``{"error": {"message", "type", "param", "code"}}``."""
    body = {"error": {"message": message, "type": type, "param": param, "code": code}}
    return web.Response(
        status=status,
        body=json.dumps(body).encode(),
        content_type="application/json",
        headers=headers,
    )


def to_response(error: SidecarError, headers: dict[str, str] | None = None) -> web.Response:
    """The OpenAI-shaped answer for ``error``."""
    return web.Response(
        status=error.status,
        body=json.dumps(error.openai_body()).encode(),
        content_type="application/json",
        headers=headers,
    )
