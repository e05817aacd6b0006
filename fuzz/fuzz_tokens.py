"""atheris over HTTP job tokens: any string is refused with InvalidToken, or verifies to the claims
its signer signed; a tampered depositor's token never verifies as the depositor's other claims.

Input: a selector byte (0: the payload is the token, 1: bytes XORed into the depositor's valid
token at an offset, 2: the payload as the claims, with the depositor's signature), then the
payload. Run from the checkout: ``python fuzz/fuzz_tokens.py -runs=10000 fuzz/corpus/tokens``.
"""

from __future__ import annotations

import base64
import sys
from pathlib import Path

import atheris  # type: ignore[import-untyped]

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout: fuzz.*, sidecar.*

with atheris.instrument_imports(include=["sidecar"]):
    from fuzz import inputs, oracles


def TestOneInput(data: bytes) -> None:
    selector, rest = inputs.head(data)
    what = selector % 3
    if what == 0:
        oracles.check_token(inputs.text(rest))
    elif what == 1:
        token = bytearray(oracles.VALID_TOKEN.encode())
        offset = rest[0] if rest else 0
        for i, byte in enumerate(rest[1:]):
            if offset + i < len(token):
                token[offset + i] ^= byte & 0x7F
        oracles.check_token(token.decode("ascii"))
    else:
        claims = base64.urlsafe_b64encode(rest).rstrip(b"=").decode()
        signature = oracles.VALID_TOKEN.rpartition(".")[2]
        oracles.check_token(f"sjt1.{claims}.{signature}")


if __name__ == "__main__":
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()
