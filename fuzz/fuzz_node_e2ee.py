"""atheris over the host node's encrypted messages and the session cipher: a tampered init or
prompt box is refused with the node's codes, never opened; any sealed plaintext is read as the
node reads it; the primitives take any bytes.

Input: a selector byte (0: the SDK's init with bytes XORed into a field, 1: the same for a
prompt, 2: a plaintext sealed in an init, 3: in a prompt, 4: a JSON message, 5: the primitives
on NUL-separated bytes), then the payload. Run from the checkout: ``python
fuzz/fuzz_node_e2ee.py -runs=10000 fuzz/corpus/node_e2ee``.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import atheris  # type: ignore[import-untyped]

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout: fuzz.*, sidecar.*

with atheris.instrument_imports(include=["sidecar"]):
    from fuzz import inputs, oracles


def _tampered(base: dict[str, str], kind: str, rest: bytes) -> dict[str, Any]:
    """``base`` with the payload's bytes XORed into one field (its index and offset first)."""
    names = list(base)
    name = names[rest[0] % len(names)] if rest else names[0]
    offset = rest[1] if len(rest) > 1 else 0
    patch = rest[2:]
    value = bytearray(bytes.fromhex(base[name]))
    value += bytes(max(0, offset + len(patch) - len(value)))  # a patch past the end extends
    for i, byte in enumerate(patch):
        value[offset + i] ^= byte
    return {"type": kind, "payload": {**base, name: value.hex()}}


def TestOneInput(data: bytes) -> None:
    selector, rest = inputs.head(data)
    what = selector % 6
    if what == 0:
        oracles.check_open_init(_tampered(oracles.INIT_PAYLOAD, "encrypted_session_init", rest))
    elif what == 1:
        oracles.check_open_message(_tampered(oracles.MESSAGE_PAYLOAD, "encrypted_message", rest))
    elif what == 2:
        oracles.check_open_init(oracles.sealed_init(rest))
    elif what == 3:
        oracles.check_open_message(oracles.sealed_message(rest))
    elif what == 4:
        message = inputs.json_value(rest)
        if type(message) is dict:
            oracles.check_open_init(message)
            oracles.check_open_message(message)
    else:
        key, nonce, box, aad, point = inputs.fields(rest, 5)
        oracles.check_crypto(key, nonce, box, aad, point)
        oracles.check_reply_roundtrip([inputs.text(box)], inputs.text(aad))


if __name__ == "__main__":
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()
