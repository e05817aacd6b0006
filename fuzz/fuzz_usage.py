"""atheris over usage extraction: whole answers, usage objects and metered streams, never an
exception.

Input: a selector byte (bits 0-1 the endpoint, 2-3 what: a body, a stream, a stripped stream, a
usage value; bit 4 collect the text), the payload, then the read cuts. Run from the checkout:
``python fuzz/fuzz_usage.py -runs=10000 fuzz/corpus/usage``.
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
    endpoint = oracles.ENDPOINTS[selector & 3]
    what = (selector >> 2) & 3
    payload, cuts = inputs.tail_ints(rest)
    if what == 0:
        oracles.check_usage_body(endpoint, payload)
    elif what == 3:
        oracles.check_read_usage(endpoint, inputs.json_value(payload))
    else:
        collect = bool(selector & 16)
        oracles.check_stream(endpoint, payload, cuts, strip=what == 2, collect=collect)


if __name__ == "__main__":
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()
