"""atheris over the SSE decoder: any split of any bytes gives the events of the whole read.

Input: the stream's bytes, then the read cuts (``inputs.tail_ints``). Run from the checkout:
``python fuzz/fuzz_sse.py -runs=10000 fuzz/corpus/sse``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import atheris  # type: ignore[import-untyped]

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout: fuzz.*, sidecar.*

with atheris.instrument_imports(include=["sidecar"]):
    from fuzz import inputs, oracles


def TestOneInput(data: bytes) -> None:
    raw, cuts = inputs.tail_ints(data)
    oracles.check_sse(raw, cuts)


if __name__ == "__main__":
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()
