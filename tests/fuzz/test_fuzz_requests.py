"""Request preparation: any body is refused as documented, or sent upstream as the client's own
bytes (or its object less the job fields): the job every field and header agree on."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fuzz import oracles
from sidecar.metering import Endpoint
from sidecar.metering.jobs import JOB_BODY_FIELDS
from tests.fuzz.common import HOSTILE_JSON, fuzz_settings, json_bytes, json_values

pytestmark = pytest.mark.fuzz

jobs = st.sampled_from([7, "7", "7n", 8, "8", None, -1, "x", 1.5, True, 2**256])
request_fields = st.fixed_dictionaries(
    {},
    optional={
        "model": st.sampled_from(["m", "", None, 3]),
        "stream": st.sampled_from([True, False, None, "true", 1]),
        "stream_options": st.sampled_from([{"include_usage": True}, {"include_usage": 1}, {}, None])
        | json_values,
        "messages": st.lists(
            st.fixed_dictionaries(
                {"role": st.just("user")},
                optional={"content": st.text(max_size=8) | json_values},
            ),
            max_size=2,
        ),
        "prompt": st.text(max_size=8) | st.lists(st.text(max_size=4), max_size=2) | json_values,
        "input": st.text(max_size=8) | json_values,
        "max_tokens": st.sampled_from([1, 0, -1, 10**6, None, 1.5, "8"]),
        "max_completion_tokens": st.sampled_from([1, 0, 5000, None, "8"]),
        "max_output_tokens": st.sampled_from([1, 0, 5000, None]),
    }
    | {key: jobs for key in JOB_BODY_FIELDS},
)


@st.composite
def request_bodies(draw: st.DrawFn) -> bytes:
    """A request's JSON, sometimes with a job field twice (written plainly or escaped, as a
    client may), sometimes a hostile atom, or any JSON-ish bytes."""
    if draw(st.integers(0, 3)) == 0:
        return draw(json_bytes())
    body: dict[str, Any] = draw(request_fields)
    text = json.dumps(body, ensure_ascii=draw(st.booleans()))
    extra = []
    if draw(st.booleans()):
        key = draw(st.sampled_from(JOB_BODY_FIELDS))
        written = draw(
            st.sampled_from(
                [key, key.replace("_", "\\u005f"), "\\u00" + key.encode()[:1].hex() + key[1:]]
            )
        )
        extra.append(f'"{written}": {json.dumps(draw(jobs))}')
    if draw(st.integers(0, 4)) == 0:
        extra.append(f'"x": {draw(st.sampled_from(HOSTILE_JSON))}')
    if extra:
        inner = text[1:-1]
        parts = [*extra, inner] if draw(st.booleans()) else [inner, *extra]
        text = "{" + ", ".join(p for p in parts if p) + "}"
    encoding = draw(st.sampled_from(["utf-8"] * 6 + ["utf-16"]))
    return text.encode(encoding, "surrogatepass")


headers = st.lists(
    st.sampled_from(["7", "8", "7n", "x", ""]).flatmap(
        lambda v: st.sampled_from([v, ("X-Job-Id", v), ("X-Session-Id", v)])
    ),
    max_size=2,
)


@fuzz_settings()
@given(
    st.sampled_from(oracles.ENDPOINTS),
    request_bodies(),
    headers,
    st.booleans(),
    st.booleans(),
    st.integers(1, 2**64),
    st.none() | st.integers(1, 10_000),
    st.booleans(),
)
def test_any_request_body(
    endpoint: Endpoint,
    raw: bytes,
    header_ids: list[str | tuple[str, str]],
    inject: bool,
    rename: bool,
    cap: int,
    default: int | None,
    responses: bool,
) -> None:
    oracles.check_prepare(endpoint, raw, header_ids, inject=inject, rename=rename)
    oracles.check_cap(raw, cap, default, responses)
