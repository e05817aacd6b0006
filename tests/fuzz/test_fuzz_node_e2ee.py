"""The host node's encrypted messages and the session cipher: a tampered init or prompt box is
refused with the node's codes, never opened and never a crash; any sealed plaintext is read as
the node reads it; what the host seals, the client opens."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fuzz import oracles
from sidecar.shells import node_e2ee
from tests.fuzz.common import fuzz_settings, json_bytes, json_values

pytestmark = pytest.mark.fuzz

INIT_FIELDS = tuple(oracles.INIT_PAYLOAD)
MESSAGE_FIELDS = tuple(oracles.MESSAGE_PAYLOAD)


@st.composite
def tampered(draw: st.DrawFn, base: dict[str, str], kind: str) -> dict[str, Any]:
    """The SDK's message with one to three of its payload fields tampered with."""
    message: dict[str, Any] = {"type": kind, "payload": copy.deepcopy(base)}
    payload = message["payload"]
    for _ in range(draw(st.integers(1, 3))):
        name = draw(st.sampled_from(tuple(base)))
        value = payload.get(name, "")
        how = draw(st.integers(0, 9))
        if how == 0:
            payload.pop(name, None)
        elif how == 1:
            payload[name] = draw(json_values)
        elif how == 2:
            payload[name] = draw(st.text("0123456789abcdefABCDEFxX ", max_size=80))
        elif how == 3:
            payload[name] = "0x" + value if type(value) is str else value
        elif type(value) is str and how <= 7:
            raw = bytearray(bytes.fromhex(value.removeprefix("0x")) if _is_hex(value) else b"")
            if how <= 5 and raw:
                at = draw(st.integers(0, len(raw) - 1))
                raw[at] ^= 1 << draw(st.integers(0, 7))  # one bit flipped
            elif how == 6:
                raw = raw[: draw(st.integers(0, len(raw)))]  # truncated
            else:
                raw += draw(st.binary(min_size=1, max_size=4))  # extended
            payload[name] = raw.hex()
        else:
            payload[name] = value.upper() if type(value) is str else value
    if draw(st.integers(0, 19)) == 0:
        message["payload"] = draw(json_values)
    return message


def _is_hex(value: str) -> bool:
    try:
        bytes.fromhex(value.removeprefix("0x"))
    except ValueError:
        return False
    return True


# What an engine's chunk may hold once parsed: any text, lone surrogates too ("\ud800").
texts = st.text(max_size=6) | st.sampled_from(["\ud800", "a\udfffb", "\x00", "\ufeff"])
plaintexts = st.one_of(
    json_bytes(),
    st.fixed_dictionaries(
        {},
        optional={
            "sessionKey": st.sampled_from(["44" * 32, "0x" + "44" * 32, "44" * 31, "zz", ""])
            | json_values,
            "jobId": st.sampled_from(["42", "42n", "x"]) | json_values,
            "modelName": json_values,
        },
    ).map(lambda obj: json.dumps(obj).encode()),
    st.binary(max_size=40),
)
prompts = st.one_of(
    json_bytes(),
    st.fixed_dictionaries(
        {},
        optional={
            "prompt": st.text(max_size=8) | json_values,
            "max_tokens": st.integers(-1, 10) | json_values,
            "temperature": st.floats(-1, 3) | json_values,
            "stream": json_values,
        },
    ).map(lambda obj: json.dumps(obj).encode()),
    st.binary(max_size=40),
)


@fuzz_settings()
@given(
    st.one_of(
        st.tuples(st.just("init"), tampered(oracles.INIT_PAYLOAD, "encrypted_session_init")),
        st.tuples(st.just("message"), tampered(oracles.MESSAGE_PAYLOAD, "encrypted_message")),
        st.tuples(st.just("sealed init"), st.tuples(plaintexts, st.sampled_from([b"", b"x"]))),
        st.tuples(st.just("sealed prompt"), st.tuples(prompts, st.sampled_from([b"message_0"]))),
        st.tuples(
            st.just("replies"),
            st.tuples(st.lists(texts, min_size=1, max_size=3), texts),
        ),
        st.tuples(
            st.just("crypto"),
            st.tuples(*(st.binary(max_size=n) for n in (34, 26, 40, 8, 66))),
        ),
    )
)
def test_any_encrypted_message(case: tuple[str, Any]) -> None:
    kind, value = case
    if kind == "init":
        oracles.check_open_init(value)
    elif kind == "message":
        oracles.check_open_message(value)
    elif kind == "sealed init":
        oracles.check_open_init(oracles.sealed_init(*value))
    elif kind == "sealed prompt":
        oracles.check_open_message(oracles.sealed_message(*value))
    elif kind == "replies":
        oracles.check_reply_roundtrip(*value)
    else:
        oracles.check_crypto(*value)


def test_the_untouched_messages_open() -> None:
    """The mutations start from messages that open: the SDK's own, from the vectors."""
    init = node_e2ee.open_init(
        oracles.HOST, {"type": "encrypted_session_init", "payload": oracles.INIT_PAYLOAD}
    )
    assert init.session_key == oracles.SESSION_KEY
    assert init.client_address == oracles.CLIENT.address
    request = node_e2ee.open_message(
        oracles.SESSION_KEY, {"type": "encrypted_message", "payload": oracles.MESSAGE_PAYLOAD}
    )
    assert request["prompt"] == "Hello"
    sealed = node_e2ee.open_init(
        oracles.HOST, oracles.sealed_init(b'{"sessionKey":"' + b"44" * 32 + b'"}')
    )
    assert sealed.client_address == oracles.CLIENT.address
