"""Request preparation: job fields out, include_usage in when needed, bytes untouched otherwise."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sidecar.metering.jobs import InvalidJobId
from sidecar.metering.requests import InvalidRequestBody, prepare_request
from sidecar.metering.types import Endpoint

MESSAGES = [{"role": "user", "content": "Héllo 世界"}]


def raw(obj: Any) -> bytes:
    return json.dumps(obj).encode()


def test_untouched_body_is_the_same_object() -> None:
    body = raw({"model": "m", "messages": MESSAGES, "stream": True})
    prepared = prepare_request(Endpoint.CHAT, body, [], inject_include_usage=False)
    assert prepared.body is body
    assert not prepared.modified
    assert prepared.job_id is None
    assert prepared.stream and prepared.model == "m"
    assert not prepared.client_wants_usage and not prepared.strip_usage_chunk


@pytest.mark.parametrize("field", ["job_id", "jobId", "session_id", "sessionId"])
def test_job_fields_are_read_and_removed(field: str) -> None:
    body = raw({"model": "m", field: "164n", "messages": MESSAGES})
    prepared = prepare_request(Endpoint.CHAT, body, [], inject_include_usage=False)
    assert prepared.job_id == 164
    assert prepared.modified
    assert json.loads(prepared.body) == {"model": "m", "messages": MESSAGES}


def test_reencoded_body_is_compact_utf8() -> None:
    body = raw({"job_id": 1, "model": "m", "messages": MESSAGES, "temperature": 0.7})
    prepared = prepare_request(Endpoint.CHAT, body, [], inject_include_usage=False)
    assert (
        prepared.body
        == (
            '{"model":"m","messages":[{"role":"user","content":"Héllo 世界"}],"temperature":0.7}'
        ).encode()
    )


def test_big_integers_survive_reencoding() -> None:
    body = b'{"job_id": 1, "seed": 123456789012345678901234567890, "n": 1}'
    prepared = prepare_request(Endpoint.COMPLETIONS, body, [], inject_include_usage=False)
    assert prepared.body == b'{"seed":123456789012345678901234567890,"n":1}'


def test_lone_surrogates_are_kept_escaped() -> None:
    body = b'{"job_id": 1, "prompt": "a\\ud800b"}'
    prepared = prepare_request(Endpoint.COMPLETIONS, body, [], inject_include_usage=False)
    assert json.loads(prepared.body) == {"prompt": "a\ud800b"}


def test_number_too_large_for_a_float_is_refused_when_reencoding() -> None:
    body = b'{"job_id": 1, "temperature": 1e400}'
    with pytest.raises(InvalidRequestBody, match="out of range"):
        prepare_request(Endpoint.CHAT, body, [], inject_include_usage=False)


def test_header_job_ids() -> None:
    body = raw({"model": "m"})
    prepared = prepare_request(Endpoint.CHAT, body, ["42"], inject_include_usage=False)
    assert prepared.job_id == 42 and prepared.body is body
    prepared = prepare_request(
        Endpoint.CHAT, body, [("X-Session-Id", "42n")], inject_include_usage=False
    )
    assert prepared.job_id == 42


def test_body_and_header_must_agree() -> None:
    body = raw({"job_id": "7", "model": "m"})
    assert prepare_request(Endpoint.CHAT, body, ["7"], inject_include_usage=False).job_id == 7
    with pytest.raises(InvalidJobId, match=r"conflicting job ids: header X-Job-Id says 8"):
        prepare_request(Endpoint.CHAT, body, [("X-Job-Id", "8")], inject_include_usage=False)


def test_two_body_fields_must_agree() -> None:
    body = raw({"job_id": 7, "sessionId": "8"})
    with pytest.raises(InvalidJobId, match="conflicting"):
        prepare_request(Endpoint.CHAT, body, [], inject_include_usage=False)


def test_duplicate_json_keys_must_agree() -> None:
    # json.loads keeps the last duplicate; the first must not silently name another job.
    body = b'{"job_id": 7, "model": "m", "job_id": 8}'
    with pytest.raises(InvalidJobId, match="conflicting"):
        prepare_request(Endpoint.CHAT, body, [], inject_include_usage=False)
    body = b'{"job_id": 7, "model": "m", "job_id": "7n"}'
    assert prepare_request(Endpoint.CHAT, body, [], inject_include_usage=False).job_id == 7


def test_job_field_names_inside_strings_are_not_duplicates() -> None:
    body = raw({"job_id": 3, "messages": [{"role": "user", "content": 'say "job_id"'}]})
    assert prepare_request(Endpoint.CHAT, body, [], inject_include_usage=False).job_id == 3


def test_nested_job_fields_are_not_job_ids() -> None:
    body = raw({"metadata": {"job_id": 9}, "model": "m"})
    prepared = prepare_request(Endpoint.CHAT, body, [], inject_include_usage=False)
    assert prepared.job_id is None and prepared.body is body
    # Twice in the bytes, once at the top: only the top-level one names the job.
    body = raw({"job_id": 3, "metadata": {"job_id": 9}})
    prepared = prepare_request(Endpoint.CHAT, body, [], inject_include_usage=False)
    assert prepared.job_id == 3
    assert json.loads(prepared.body) == {"metadata": {"job_id": 9}}


def test_null_job_field_is_absent_but_removed() -> None:
    prepared = prepare_request(
        Endpoint.CHAT, raw({"job_id": None, "model": "m"}), [], inject_include_usage=False
    )
    assert prepared.job_id is None
    assert json.loads(prepared.body) == {"model": "m"}


def test_bad_job_id_in_body() -> None:
    with pytest.raises(InvalidJobId, match="body field 'jobId' is a floating-point number"):
        prepare_request(Endpoint.CHAT, raw({"jobId": 1.5}), [], inject_include_usage=False)


# -- include_usage ---------------------------------------------------------------------------


def test_injects_include_usage_and_asks_for_stripping() -> None:
    body = raw({"model": "m", "messages": MESSAGES, "stream": True})
    prepared = prepare_request(Endpoint.CHAT, body, [], inject_include_usage=True)
    assert prepared.strip_usage_chunk and prepared.modified
    assert json.loads(prepared.body)["stream_options"] == {"include_usage": True}


def test_keeps_other_stream_options() -> None:
    body = raw({"stream": True, "stream_options": {"continuous_usage_stats": True}})
    prepared = prepare_request(Endpoint.COMPLETIONS, body, [], inject_include_usage=True)
    assert json.loads(prepared.body)["stream_options"] == {
        "continuous_usage_stats": True,
        "include_usage": True,
    }


@pytest.mark.parametrize("options", [{"include_usage": False}, None, "yes", []])
def test_client_that_did_not_ask_gets_it_stripped(options: object) -> None:
    body = raw({"stream": True, "stream_options": options})
    prepared = prepare_request(Endpoint.CHAT, body, [], inject_include_usage=True)
    assert prepared.strip_usage_chunk and not prepared.client_wants_usage
    assert json.loads(prepared.body)["stream_options"] == {"include_usage": True}


def test_client_that_asked_keeps_its_body_and_its_usage_chunk() -> None:
    body = raw({"stream": True, "stream_options": {"include_usage": True}})
    prepared = prepare_request(Endpoint.CHAT, body, [], inject_include_usage=True)
    assert prepared.client_wants_usage and not prepared.strip_usage_chunk
    assert prepared.body is body


@pytest.mark.parametrize("stream", [False, None, "true", 1])
def test_no_injection_without_a_stream(stream: object) -> None:
    body = raw({"stream": stream})
    prepared = prepare_request(Endpoint.CHAT, body, [], inject_include_usage=True)
    assert not prepared.stream and not prepared.strip_usage_chunk and prepared.body is body


def test_no_injection_for_embeddings_or_when_off() -> None:
    body = raw({"stream": True, "input": "x"})
    assert prepare_request(Endpoint.EMBEDDINGS, body, [], inject_include_usage=True).body is body
    assert prepare_request(Endpoint.CHAT, body, [], inject_include_usage=False).body is body


def test_model_must_be_a_string() -> None:
    prepared = prepare_request(Endpoint.CHAT, raw({"model": 5}), [], inject_include_usage=False)
    assert prepared.model is None


# -- bodies that cannot be metered -----------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "says"),
    [
        (b"", "not valid JSON: Expecting value at line 1 column 1"),
        (b"{", "not valid JSON"),
        (b"\xff{}", "not UTF-8"),
        (b"[]", "must be a JSON object, got an array"),
        (b"null", "must be a JSON object, got null"),
        (b"true", "must be a JSON object, got a boolean"),
        (b'"x"', "must be a JSON object, got a string"),
        (b"3", "must be a JSON object, got a number"),
        (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
    ],
)
def test_invalid_bodies(body: bytes, says: str) -> None:
    with pytest.raises(InvalidRequestBody) as caught:
        prepare_request(Endpoint.CHAT, body, [], inject_include_usage=False)
    assert says in str(caught.value)
    assert issubclass(InvalidRequestBody, ValueError)


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=5),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=10,
)


@given(st.dictionaries(st.text(max_size=8), _JSON, max_size=5), st.integers(0, 2**256 - 1))
def test_removing_the_job_keeps_everything_else(obj: dict[str, Any], job: int) -> None:
    for key in ("job_id", "jobId", "session_id", "sessionId"):
        obj.pop(key, None)
    prepared = prepare_request(
        Endpoint.CHAT, raw({**obj, "session_id": str(job)}), [], inject_include_usage=False
    )
    assert prepared.job_id == job
    assert json.loads(prepared.body) == obj


def test_deep_nesting_is_refused_even_with_a_raised_recursion_limit() -> None:
    """eth_account (via py_ecc) raises the recursion limit to 100000; json's C parser would then
    overflow the C stack on a hostile body instead of raising RecursionError."""
    import sys

    from sidecar.metering.safejson import MAX_NESTING

    before = sys.getrecursionlimit()
    sys.setrecursionlimit(100_000)
    try:
        with pytest.raises(InvalidRequestBody, match="nested too deeply"):
            prepare_request(
                Endpoint.CHAT, b"[" * 100_000 + b"]" * 100_000, inject_include_usage=False
            )
    finally:
        sys.setrecursionlimit(before)
    # Brackets inside strings do not count; ordinary wide arrays are fine.
    wide = (
        b'{"input": ['
        + b",".join(b"[1, 2]" for _ in range(5000))
        + b'], "s": "'
        + (b"[" * (MAX_NESTING + 10))
        + b'"}'
    )
    assert prepare_request(Endpoint.EMBEDDINGS, wide, inject_include_usage=False).job_id is None
