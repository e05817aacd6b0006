"""HTTP job tokens: any string is refused with InvalidToken, or verifies to the claims its
signer signed; a tampered depositor's token never verifies as the depositor's other claims."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fuzz import oracles
from sidecar.auth.tokens import MAX_TOKEN_CHARS, TOKEN_PREFIX
from tests.fuzz.common import fuzz_settings, json_text, json_values

pytestmark = pytest.mark.fuzz

CLAIMS, SIGNATURE = oracles.VALID_TOKEN[len(TOKEN_PREFIX) :].split(".")
B64URL = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"


def b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


@st.composite
def mutated(draw: st.DrawFn) -> str:
    """The depositor's valid token with a few characters changed, cut or added."""
    token = list(oracles.VALID_TOKEN)
    for _ in range(draw(st.integers(1, 3))):
        at = draw(st.integers(0, len(token)))
        how = draw(st.integers(0, 3))
        if how == 0 and at < len(token):
            token[at] = draw(st.sampled_from(B64URL + ".=+/ 0fF"))
        elif how == 1:
            token.insert(at, draw(st.sampled_from(B64URL + ".=")))
        elif how == 2 and at < len(token):
            del token[at]
        else:
            token = token[:at]
    return "".join(token)


claims_values = st.fixed_dictionaries(
    {},
    optional={
        "chainId": st.sampled_from([31337, 0, -1, 2**256, "31337", True]) | json_values,
        "marketplace": st.sampled_from(["0x" + "aa" * 20, "0x" + "AA" * 20, "0x12"]) | json_values,
        "host": st.sampled_from(["0x" + "bb" * 20, "0x" + "g" * 40]) | json_values,
        "job": st.sampled_from(["164", "0", "٣", "²", "9" * 79, "-1", ""]) | json_values,
        "expires": st.sampled_from([oracles.TOKEN_NOW + 3600, 0, 2**256]) | json_values,
    },
)


@st.composite
def made_up(draw: st.DrawFn) -> str:
    """A token of made-up claims (or any JSON-ish text), with the depositor's signature of
    other claims, a made-up signature, or none."""
    if draw(st.booleans()):
        claims = draw(claims_values)
        raw = json.dumps(claims).encode()
    else:
        raw = draw(json_text()).encode("utf-8", "surrogatepass")
    signature = draw(
        st.sampled_from([SIGNATURE, SIGNATURE.upper(), SIGNATURE[:-2] + "1b", ""])
        | st.binary(max_size=66).map(bytes.hex)
        | st.text("0123456789abcdefx ", max_size=132)
    )
    return f"{TOKEN_PREFIX}{b64(raw)}.{signature}"


tokens = st.one_of(
    mutated(),
    made_up(),
    st.text(max_size=40).map(lambda text: TOKEN_PREFIX + text),
    st.text(max_size=40),
    st.just(TOKEN_PREFIX + "[" * (MAX_TOKEN_CHARS - 10)),
    st.integers(0, 600).map(lambda n: f"{TOKEN_PREFIX}{b64(b'[' * n)}.{SIGNATURE}"),
)


@fuzz_settings()
@given(tokens)
def test_any_token(token: Any) -> None:
    oracles.check_token(token)


def test_the_untouched_token_verifies() -> None:
    verified = oracles.check_token(oracles.VALID_TOKEN)
    assert verified is not None and verified.signer == oracles.TOKEN_SIGNER
    assert verified.claims.job_id == oracles.TOKEN_JOB
