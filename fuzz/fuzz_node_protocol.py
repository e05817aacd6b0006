"""atheris over the host node's plaintext messages: any frame is a request the engine can be sent,
or the node's error (BadRequest, InvalidJobId); any engine error text is read without a crash.

Input: a selector byte (even: the payload is a socket frame or HTTP body; odd: an engine's error
text), then the payload. Run from the checkout: ``python fuzz/fuzz_node_protocol.py -runs=10000
fuzz/corpus/node_protocol``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import atheris  # type: ignore[import-untyped]

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout: fuzz.*, sidecar.*

with atheris.instrument_imports(include=["sidecar"]):
    from fuzz import inputs, oracles


def TestOneInput(data: bytes) -> None:
    selector, rest = inputs.head(data)
    if selector & 1:
        oracles.check_engine_error(inputs.text(rest))
    else:
        oracles.check_node_message(inputs.json_value(rest))


if __name__ == "__main__":
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()
