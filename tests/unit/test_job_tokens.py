"""HTTP job tokens (sidecar.auth.tokens): made, verified offline, refused when they do not hold."""

from __future__ import annotations

import base64
import json

import pytest
from eth_account import Account

from sidecar.auth.tokens import (
    InvalidToken,
    JobTokenClaims,
    check_claims,
    make_job_token,
    verify_job_token,
)

KEY = "0x" + "42" * 32
SIGNER = Account.from_key(KEY).address.lower()
SCOPE = {
    "chain_id": 31337,
    "marketplace": "0x" + "aa" * 20,
    "host": "0x" + "bb" * 20,
}
NOW = 1_800_000_000


def token(job: int = 7, expires_in: int = 3600, **overrides) -> str:
    return make_job_token(KEY, **{**SCOPE, **overrides}, job_id=job, expires_in=expires_in, now=NOW)


def test_a_token_names_its_scope_and_recovers_its_signer() -> None:
    made = token(job=2**255)  # a uint256 job id does not fit a JS number: a string in the claims
    verified = verify_job_token(made)
    assert verified.signer == SIGNER
    assert verified.claims == JobTokenClaims(
        31337, SCOPE["marketplace"], SCOPE["host"], 2**255, NOW + 3600
    )
    check_claims(verified, **SCOPE, job_id=2**255, now=NOW)
    claims = json.loads(base64.urlsafe_b64decode(made.split(".")[1] + "=="))
    assert claims["job"] == str(2**255) and set(claims) == {
        "chainId",
        "marketplace",
        "host",
        "job",
        "expires",
    }


def test_the_signature_is_eip712_as_a_wallet_makes_it() -> None:
    """eth_account's own EIP-712 recovery (what eth_signTypedData_v4 signs) names the signer."""
    verified = verify_job_token(token())
    signature = bytes.fromhex(token().split(".")[2])
    recovered = Account.recover_message(verified.claims.signable(), signature=signature)
    assert recovered.lower() == SIGNER


@pytest.mark.parametrize(
    ("check", "message"),
    [
        ({"now": NOW + 3600}, "expired"),
        ({"chain_id": 1}, "chain"),
        ({"marketplace": "0x" + "cc" * 20}, "marketplace"),
        ({"host": "0x" + "dd" * 20}, "host"),
        ({"job_id": 8}, "job 7, not job 8"),
    ],
)
def test_a_token_for_something_else_is_refused(check: dict, message: str) -> None:
    verified = verify_job_token(token())
    with pytest.raises(InvalidToken, match=message):
        check_claims(verified, **{**SCOPE, "job_id": 7, "now": NOW, **check})


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "Bearer x",
        "sjt1.",
        "sjt1.e30",
        "sjt1.!!!.00",
        "sjt1." + base64.urlsafe_b64encode(b"[1]").decode() + ".00",
        "sjt1." + base64.urlsafe_b64encode(b'{"job":"1"}').decode() + ".00",
        token()[:-2],  # 64.5 bytes of signature
        token()[:-2] + "07",  # a recovery id that is none
        "sjt1." + "A" * 2000,
    ],
)
def test_malformed_tokens_are_refused_without_echoing_them(bad: str) -> None:
    with pytest.raises(InvalidToken) as info:
        verify_job_token(bad)
    assert len(bad) < 8 or bad not in str(info.value)


def test_changed_claims_recover_someone_else() -> None:
    made = token()
    _, claims, signature = made.split(".")
    obj = json.loads(base64.urlsafe_b64decode(claims + "=="))
    obj["expires"] += 10**6
    changed = base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()
    assert verify_job_token(f"sjt1.{changed}.{signature}").signer != SIGNER
