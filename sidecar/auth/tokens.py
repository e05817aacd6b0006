"""HTTP job tokens: a client's signed statement "I may use job J on host H until T".

An OpenAI SDK client cannot sign each request, but it can send one string as its API key; so a
token is that string, ``Authorization: Bearer sjt1.<claims>.<signature>``:

* ``claims``: base64url (unpadded) of compact JSON ``{"chainId": int, "marketplace": "0x..",
  "host": "0x..", "job": "<decimal>", "expires": <unix seconds>}`` (``job`` a string: a uint256
  does not fit a JavaScript number);
* ``signature``: 130 hex digits, ``r || s || v`` (v 27/28), an EIP-712 signature of
  ``JobToken(address host,uint256 job,uint256 expires)`` in the domain ``{name: "sidecar job
  token", version: "1", chainId, verifyingContract: marketplace}``, so a wallet can make one
  with ``eth_signTypedData_v4`` and show its user what is signed.

The signer is recovered, never stated: a token says nothing about who made it that its signature
does not prove. Verification is offline (no RPC) and cached per token string; the claims must
name this host's chain, marketplace and address, and the job asked for, and be unexpired.
"""

from __future__ import annotations

import base64
import functools
import json
import re
import time
from dataclasses import dataclass

from eth_account import Account
from eth_account.messages import SignableMessage, encode_typed_data
from eth_utils import keccak

from sidecar.crypto import SessionCryptoError, recover_address

TOKEN_PREFIX = "sjt1."
DOMAIN_NAME = "sidecar job token"
DOMAIN_VERSION = "1"
MAX_TOKEN_CHARS = 1024  # a real one is about 330
ZERO_ADDRESS = "0x" + "00" * 20

_ADDRESS = re.compile(r"0x[0-9a-fA-F]{40}")
_TYPES = {
    "EIP712Domain": [
        {"name": "name", "type": "string"},
        {"name": "version", "type": "string"},
        {"name": "chainId", "type": "uint256"},
        {"name": "verifyingContract", "type": "address"},
    ],
    "JobToken": [
        {"name": "host", "type": "address"},
        {"name": "job", "type": "uint256"},
        {"name": "expires", "type": "uint256"},
    ],
}


class InvalidToken(ValueError):
    """A token that is malformed, forged, expired or for something else; the message says which
    (and never repeats the token)."""


@dataclass(frozen=True, slots=True)
class JobTokenClaims:
    chain_id: int
    marketplace: str  # 0x + 40 lowercase hex
    host: str  # 0x + 40 lowercase hex
    job_id: int
    expires: int  # unix seconds

    def signable(self) -> SignableMessage:
        return encode_typed_data(
            full_message={
                "types": _TYPES,
                "primaryType": "JobToken",
                "domain": {
                    "name": DOMAIN_NAME,
                    "version": DOMAIN_VERSION,
                    "chainId": self.chain_id,
                    "verifyingContract": self.marketplace,
                },
                "message": {"host": self.host, "job": self.job_id, "expires": self.expires},
            }
        )

    def digest(self) -> bytes:
        """The 32 bytes signed: keccak256(0x19 0x01 domainSeparator structHash)."""
        message = self.signable()
        return keccak(b"\x19" + message.version + message.header + message.body)

    def as_json(self) -> dict[str, object]:
        return {
            "chainId": self.chain_id,
            "marketplace": self.marketplace,
            "host": self.host,
            "job": str(self.job_id),
            "expires": self.expires,
        }


@dataclass(frozen=True, slots=True)
class VerifiedToken:
    claims: JobTokenClaims
    signer: str  # 0x + 40 lowercase hex


def make_job_token(
    private_key: str | bytes,
    *,
    chain_id: int,
    marketplace: str,
    host: str,
    job_id: int,
    expires_in: int = 3600,
    now: int | None = None,
) -> str:
    """A job token signed with ``private_key`` (the job's depositor's, or the key the job is
    bound to), valid ``expires_in`` seconds. Pass it as the OpenAI SDK's ``api_key``."""
    if expires_in <= 0:
        raise ValueError("expires_in must be positive")
    issued = int(time.time()) if now is None else now
    claims = JobTokenClaims(
        chain_id=_uint(chain_id, "chain id"),
        marketplace=_address(marketplace, "marketplace"),
        host=_address(host, "host"),
        job_id=_uint(job_id, "job id"),
        expires=issued + expires_in,
    )
    signed = Account.sign_message(claims.signable(), private_key)
    encoded = _b64encode(json.dumps(claims.as_json(), separators=(",", ":")).encode())
    return f"{TOKEN_PREFIX}{encoded}.{bytes(signed.signature).hex()}"


def is_job_token(value: str) -> bool:
    return value.startswith(TOKEN_PREFIX)


def verify_job_token(token: str) -> VerifiedToken:
    """The token's claims and its recovered signer, or :class:`InvalidToken`. Expiry and what
    the claims must name are the caller's checks (:func:`check_claims`): they change with time
    and place, while this result does not, so it is cached."""
    if len(token) > MAX_TOKEN_CHARS or not is_job_token(token):
        raise InvalidToken("not a sidecar job token (sjt1.<claims>.<signature>)")
    return _verified(token)


@functools.lru_cache(maxsize=4096)
def _verified(token: str) -> VerifiedToken:
    # Cached: each client sends one token many times, and recovery costs ~0.2 ms. Forged or
    # malformed tokens raise, and exceptions are not cached.
    body = token[len(TOKEN_PREFIX) :]
    encoded, sep, signature_hex = body.partition(".")
    if not sep or not encoded:
        raise InvalidToken("a job token is sjt1.<claims>.<signature>")
    claims = _parse_claims(encoded)
    try:
        signature = bytes.fromhex(signature_hex)
    except ValueError:
        raise InvalidToken("the token's signature is not hex") from None
    try:
        signer = recover_address(claims.digest(), signature)
    except SessionCryptoError as exc:
        raise InvalidToken(f"the token's signature does not hold: {exc}") from None
    return VerifiedToken(claims, signer)


def check_claims(
    verified: VerifiedToken,
    *,
    chain_id: int,
    marketplace: str,
    host: str,
    job_id: int,
    now: int | None = None,
) -> None:
    """The token must be for this chain, marketplace, host and job, and unexpired."""
    claims = verified.claims
    if claims.expires <= (int(time.time()) if now is None else now):
        raise InvalidToken("the job token has expired: make a new one (sidecar token)")
    if claims.chain_id != chain_id:
        raise InvalidToken(f"the job token is for chain {claims.chain_id}, not {chain_id}")
    if claims.marketplace != marketplace.lower():
        raise InvalidToken(f"the job token is for marketplace {claims.marketplace}")
    if claims.host != host.lower():
        raise InvalidToken(f"the job token is for host {claims.host}, not this host ({host})")
    if claims.job_id != job_id:
        raise InvalidToken(f"the job token is for job {claims.job_id}, not job {job_id}")


def _parse_claims(encoded: str) -> JobTokenClaims:
    try:
        obj = json.loads(_b64decode(encoded))
    except (ValueError, UnicodeDecodeError):
        raise InvalidToken("the token's claims are not base64url JSON") from None
    if type(obj) is not dict:
        raise InvalidToken("the token's claims are not a JSON object")
    try:
        job = obj["job"]
        if type(job) is not str or not job.isdigit() or len(job) > 78:
            raise InvalidToken("the token's job is not a decimal string")
        return JobTokenClaims(
            chain_id=_uint(obj["chainId"], "chainId"),
            marketplace=_address(obj["marketplace"], "marketplace"),
            host=_address(obj["host"], "host"),
            job_id=int(job),
            expires=_uint(obj["expires"], "expires"),
        )
    except KeyError as exc:
        raise InvalidToken(f"the token's claims lack {exc.args[0]!r}") from None
    except ValueError as exc:
        raise InvalidToken(str(exc)) from None


def _uint(value: object, what: str) -> int:
    if type(value) is not int or value < 0 or value >= 2**256:
        raise ValueError(f"the {what} must be a non-negative integer")
    return value


def _address(value: object, what: str) -> str:
    if type(value) is not str or not _ADDRESS.fullmatch(value):
        raise ValueError(f"the {what} must be a 0x-prefixed 20-byte hex address")
    return value.lower()


def _b64encode(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _b64decode(text: str) -> bytes:
    if not re.fullmatch(r"[A-Za-z0-9_-]*", text):
        raise ValueError("not base64url")
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
