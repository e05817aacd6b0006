"""atheris over request preparation: any body is refused as documented, or sent upstream as the
client's own bytes (or its object less the job fields), the job every field and header agree on.

Input: a selector byte (bits 0-1 the endpoint, 2 inject include_usage, 3 rename the model, 4 the
Responses limit field, 5-7 which job-id headers), then the body, then the cap. Run from the
checkout: ``python fuzz/fuzz_requests.py -runs=10000 fuzz/corpus/requests``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import atheris  # type: ignore[import-untyped]

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout: fuzz.*, sidecar.*

with atheris.instrument_imports(include=["sidecar"]):
    from fuzz import inputs, oracles

HEADERS: list[str | tuple[str, str]] = ["7", ("X-Job-Id", "8"), ("X-Session-Id", "7n")]


def TestOneInput(data: bytes) -> None:
    selector, rest = inputs.head(data)
    body, numbers = inputs.tail_ints(rest, most=2)
    endpoint = oracles.ENDPOINTS[selector & 3]
    headers = [h for i, h in enumerate(HEADERS) if selector >> (5 + i) & 1]
    inject, rename = bool(selector & 4), bool(selector & 8)
    oracles.check_prepare(endpoint, body, headers, inject=inject, rename=rename)
    cap = 1 + (numbers[0] if numbers else 4096)
    default = numbers[1] + 1 if len(numbers) > 1 else None
    oracles.check_cap(body, cap, default, bool(selector & 16))


if __name__ == "__main__":
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()
