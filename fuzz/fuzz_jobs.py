"""atheris over job-id parsing: any value is a uint256 job its canonical forms name, or
InvalidJobId.

Input: a selector byte (0: the payload as text, 1: as a signed integer, 2: as JSON, 3:
NUL-separated JSON values, resolved together), then the payload. Run from the checkout: ``python
fuzz/fuzz_jobs.py -runs=10000 fuzz/corpus/jobs``.
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
    what = selector & 3
    if what == 0:
        oracles.check_job_id(inputs.text(rest))
    elif what == 1:
        oracles.check_job_id(int.from_bytes(rest, "big", signed=True))
    elif what == 2:
        oracles.check_job_id(inputs.json_value(rest))
    else:
        values = [inputs.json_value(piece) for piece in rest.split(b"\x00")[:4]]
        oracles.check_resolve([(f"source {i}", value) for i, value in enumerate(values)])


if __name__ == "__main__":
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()
