"""Job tokens for tests: what a marketplace client sends as its API key (sidecar.auth.tokens)."""

from __future__ import annotations

from typing import Any

from sidecar.auth.tokens import make_job_token


def job_token(
    devnet: Any, deployment: Any, job: int, signer: Any = None, expires_in: int = 3600
) -> str:
    """A token for ``job`` on ``deployment`` for the dev host, signed by ``signer`` (default:
    the requester, who deposited for the dev jobs)."""
    return make_job_token(
        (signer or devnet.requester).key,
        chain_id=devnet.chain_id,
        marketplace=deployment.marketplace,
        host=devnet.host_account.address,
        job_id=job,
        expires_in=expires_in,
    )
