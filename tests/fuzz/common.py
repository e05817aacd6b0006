"""The fuzz campaign's budget and the strategies its tests share.

``FUZZ_EXAMPLES`` (default 10,000: what ``make test`` runs) is the number of inputs each target's
hypothesis test tries; ``make fuzz`` sets it higher. Strategies are kept small, so that 10,000
inputs of every target fit in a few minutes, and are mixed with the hostile atoms a parser must
survive: numbers past int()'s 4300 digits, nesting past MAX_NESTING, NaN, lone surrogates, BOMs,
invalid UTF-8, escaped key names.
"""

from __future__ import annotations

import json
import os
from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from sidecar.metering.safejson import MAX_NESTING

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "10000"))


def fuzz_settings(examples: int | None = None) -> settings:
    """Hypothesis settings of a fuzz test: ``FUZZ_EXAMPLES`` inputs unless told, no deadline."""
    return settings(
        max_examples=EXAMPLES if examples is None else examples,
        deadline=None,
        suppress_health_check=[
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
            HealthCheck.filter_too_much,
        ],
    )


# Pieces of JSON text that parsers and their callers get wrong.
HOSTILE_JSON = (
    "1" * 4301,  # int() refuses more than 4300 digits (ValueError, not JSONDecodeError)
    "-" + "9" * 5000,
    "1e999",  # a float that is infinite
    "NaN",
    "-Infinity",
    "[" * (MAX_NESTING + 1) + "]" * (MAX_NESTING + 1),
    "[" * 3000,
    '{"a":' * 300 + "1" + "}" * 300,
    '"\\ud800"',  # a lone surrogate
    '"\\udfff\\ud800"',
    '"\\u0000"',
    '"\ufeff"',
    "\ufeff{}",
    '"job\\u005fid"',  # a job field's name, escaped
    '"\\u006aobId"',
    '"session\\u005Fid"',
    "0.1e-99999",
    "-0",
    "1.0",
    "true",
    "null",
    '""',
    '"164n"',
    '"' + "9" * 80 + '"',
    str(2**256),
    str(2**256 - 1),
    "{}",
    "[]",
)
HOSTILE_BYTES = (b"\xff", b"\xc3", b"\xe4\xb8", b"\x80", b"\xef\xbb\xbf", b"\x00", b"\r", b"\r\n")

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.sampled_from([0, 1, -1, 2**53 + 1, 2**256 - 1, 2**256, 10**80])
    | st.floats(allow_nan=False, allow_infinity=False, width=64)
    | st.text(max_size=12)
    | st.sampled_from(["", "164", "164n", "0x10", "n", " 1", "١٢", "²", "1.0", "-1", "[DONE]"])
)
json_values: st.SearchStrategy[Any] = st.recursive(
    json_scalars,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)


@st.composite
def json_text(draw: st.DrawFn, value: st.SearchStrategy[Any] = json_values) -> str:
    """JSON text of a drawn value, in either spacing, sometimes with a hostile atom spliced in
    (as a value, or anywhere) or truncated."""
    obj = draw(value)
    spaced = draw(st.booleans())
    text = json.dumps(
        obj,
        ensure_ascii=draw(st.booleans()),
        separators=(", ", ": ") if spaced else (",", ":"),
    )
    how = draw(st.integers(0, 9))
    if how == 0:
        # A hostile atom as the value of one more key (or as the whole document).
        atom = draw(st.sampled_from(HOSTILE_JSON))
        key = draw(st.sampled_from(["a", "job_id", "usage", "prompt", "max_tokens", "chain_id"]))
        text = f'{{"{key}":{atom},{text[1:]}' if text.startswith("{") and text != "{}" else atom
    elif how == 1:
        at = draw(st.integers(0, len(text)))
        text = text[:at] + draw(st.sampled_from(HOSTILE_JSON)) + text[at:]
    elif how == 2:
        text = text[: draw(st.integers(0, len(text)))]
    return text


@st.composite
def json_bytes(draw: st.DrawFn, value: st.SearchStrategy[Any] = json_values) -> bytes:
    """UTF-8 (sometimes another encoding json.loads detects) of json_text, sometimes with
    invalid bytes; or any bytes."""
    if draw(st.integers(0, 9)) == 0:
        return draw(st.binary(max_size=64))
    text = draw(json_text(value))
    encoding = draw(st.sampled_from(["utf-8"] * 12 + ["utf-16", "utf-16-le", "utf-32"]))
    raw = text.encode(encoding, "surrogatepass")
    if draw(st.integers(0, 9)) == 0:
        at = draw(st.integers(0, len(raw)))
        raw = raw[:at] + draw(st.sampled_from(HOSTILE_BYTES)) + raw[at:]
    return raw


cuts = st.lists(st.integers(0, 10_000), max_size=8)
