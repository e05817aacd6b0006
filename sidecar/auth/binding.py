"""Who may spend a job: ``--session-auth none | bound | depositor``.

A job's deposit pays for whatever this host serves under its id, so serving whoever names the
id lets anyone who learns it (ids are public on-chain) spend someone else's deposit. A client
proves who it is in one of two ways: the signature of an encrypted session's init (the address
recovered over the SDK's ``E2EEv1`` digest), or an HTTP job token (:mod:`sidecar.auth.tokens`).

* ``none``: no check (the node's own behaviour; the default without a chain).
* ``bound``: the first authenticated client to use a job binds it, durably in the ledger; from
  then on only that identity is served (the default with a chain). The depositor's own key is
  always accepted too: a stranger who binds a job first cannot lock its owner out.
* ``depositor``: only the job's depositor on-chain (for clients whose session key is the wallet's).

Under ``bound`` and ``depositor`` a request that proves no identity is refused (401) with how to
authenticate; a different identity is refused (403). Both happen before anything is generated.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from sidecar.errors import JobRefused
from sidecar.ledger import Ledger

log = logging.getLogger("sidecar.auth")

MODES = ("none", "bound", "depositor")
BEARER = "bearer "
BINDING_CACHE = 65_536
HOW_TO_AUTHENTICATE = (
    "open an encrypted session (encrypted_session_init, the marketplace SDK's default) or send "
    "Authorization: Bearer <job token> signed by the job's depositor (sidecar token --job {job})"
)


@dataclass(frozen=True, slots=True)
class Requester:
    """An identity a client has proven: ``address`` (0x + 40 lowercase hex) and how."""

    address: str
    proof: str  # "job token" or "encrypted session"


@dataclass(frozen=True, slots=True)
class TokenScope:
    """What a job token must name to be accepted here."""

    chain_id: int
    marketplace: str
    host: str


class SessionAuth:
    def __init__(
        self,
        mode: str,
        ledger: Ledger,
        scope: TokenScope,
        depositor_of: Callable[[int], str | None] | None = None,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"unknown session auth mode {mode!r}")
        if mode == "depositor" and depositor_of is None:
            raise ValueError("depositor mode needs the chain")
        self.mode = mode
        self.scope = scope
        self._ledger = ledger
        self._depositor_of = depositor_of
        self._bound: dict[int, str] = {}  # a cache of the ledger's bindings

    @property
    def enabled(self) -> bool:
        return self.mode != "none"

    def requester_from_bearer(self, authorization: str | None, job_id: int) -> Requester | None:
        """The identity an ``Authorization: Bearer <job token>`` proves for ``job_id``; None when
        the header holds no job token (it may be the engine's API key). A job token that does
        not hold is refused (401), never ignored."""
        if not self.enabled or authorization is None:
            return None
        if authorization[: len(BEARER)].lower() != BEARER:
            return None
        token = authorization[len(BEARER) :].strip()
        from sidecar.auth.tokens import InvalidToken, check_claims, is_job_token, verify_job_token

        if not is_job_token(token):
            return None
        try:
            verified = verify_job_token(token)
            check_claims(
                verified,
                chain_id=self.scope.chain_id,
                marketplace=self.scope.marketplace,
                host=self.scope.host,
                job_id=job_id,
            )
        except InvalidToken as exc:
            raise JobRefused(
                f"job token refused: {exc}",
                code="invalid_job_token",
                status=401,
                param="authorization",
            ) from None
        return Requester(verified.signer, "job token")

    async def authorize(self, job_id: int, requester: Requester | None) -> None:
        """Refuse (:class:`JobRefused`, 401/403) a requester that may not use ``job_id``;
        under ``bound``, bind an unbound job to it first."""
        if not self.enabled:
            return
        if requester is None:
            raise JobRefused(
                f"job {job_id} is served to its client only (--session-auth {self.mode}): "
                + HOW_TO_AUTHENTICATE.format(job=job_id),
                code="authentication_required",
                status=401,
                param="authorization",
            )
        depositor = self._depositor_of(job_id) if self._depositor_of is not None else None
        address = requester.address.lower()
        is_depositor = depositor is not None and address == depositor.lower()
        if self.mode == "depositor":
            if is_depositor:
                return
            raise JobRefused(
                f"job {job_id} is served to its depositor only, and {requester.proof} was "
                f"signed by {address}",
                code="not_the_depositor",
                status=403,
                param="authorization",
            )
        bound = self._bound.get(job_id)
        if bound is None:
            bound = await self._ledger.bind_job(job_id, address, requester.proof, _now_ms())
            if len(self._bound) >= BINDING_CACHE:
                self._bound.clear()  # only a cache: the ledger holds every binding
            self._bound[job_id] = bound
            if bound == address:
                log.info("job %s bound to %s (%s)", job_id, address, requester.proof)
        if bound != address and not is_depositor:  # the job's owner is never locked out
            raise JobRefused(
                f"job {job_id} is bound to another client; {requester.proof} was signed by "
                f"{address}",
                code="job_bound_to_another_client",
                status=403,
                param="authorization",
            )


def _now_ms() -> int:
    return time.time_ns() // 1_000_000
