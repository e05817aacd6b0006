"""Job attribution: which marketplace job a request is metered to.

A job id is a ``uint256`` on chain. Clients name it in the request body (``job_id``, ``jobId``,
``session_id``, ``sessionId``) or in a header (``X-Job-Id``, ``X-Session-Id``). Web clients
often hold it as a JavaScript BigInt, whose string form ends in ``n`` ("164n"), so that form
is accepted too. A float is refused even when integral: a JSON number past 2**53 has already
lost digits by the time it is a float, so a float id cannot be trusted to name the right job.
"""

from __future__ import annotations

from collections.abc import Iterable

__all__ = [
    "JOB_BODY_FIELDS",
    "JOB_HEADERS",
    "MAX_JOB_ID",
    "InvalidJobId",
    "parse_job_id",
    "resolve_job_id",
]

JOB_BODY_FIELDS = ("job_id", "jobId", "session_id", "sessionId")
JOB_HEADERS = ("X-Job-Id", "X-Session-Id")
MAX_JOB_ID = 2**256 - 1
_MAX_DIGITS = 80  # uint256 has at most 78 digits; a little room for leading zeros

_ACCEPTED = (
    "a job id must be a non-negative integer below 2**256: a JSON integer, a decimal string "
    'such as "164", or a JavaScript BigInt string such as "164n"'
)


class InvalidJobId(ValueError):
    """A job id that is malformed, out of range, or contradicted by another one."""


def parse_job_id(value: object, *, where: str = "job id") -> int:
    """Parse one job id. ``where`` names its source in the error message."""
    if isinstance(value, bool):
        raise InvalidJobId(f"{where} is a boolean ({value!r}); {_ACCEPTED}")
    if isinstance(value, int):
        if value < 0:
            raise InvalidJobId(f"{where} is negative ({_short_int(value)}); {_ACCEPTED}")
        if value > MAX_JOB_ID:
            raise InvalidJobId(
                f"{where} does not fit uint256 ({value.bit_length()} bits); {_ACCEPTED}"
            )
        return value
    if isinstance(value, float):
        raise InvalidJobId(
            f"{where} is a floating-point number ({_quote(repr(value))}), which cannot carry a "
            f"uint256 exactly; send it as a string; {_ACCEPTED}"
        )
    if isinstance(value, str):
        digits = value[:-1] if value.endswith("n") else value
        if not digits:
            raise InvalidJobId(f"{where} is {_quote(value)}, which has no digits; {_ACCEPTED}")
        # str.isdigit alone would accept other scripts' digits ("١٢"); ids are ASCII.
        if not (digits.isascii() and digits.isdigit()):
            raise InvalidJobId(f"{where} is {_quote(value)}, not a number; {_ACCEPTED}")
        if len(digits) > _MAX_DIGITS:
            raise InvalidJobId(
                f"{where} has {len(digits)} digits, more than any uint256; {_ACCEPTED}"
            )
        number = int(digits)
        if number > MAX_JOB_ID:
            raise InvalidJobId(f"{where} {_quote(value)} does not fit uint256; {_ACCEPTED}")
        return number
    raise InvalidJobId(f"{where} is a {_type_name(value)}; {_ACCEPTED}")


def resolve_job_id(named: Iterable[tuple[str, object]]) -> int | None:
    """The one job that every ``(source, value)`` pair names, or ``None`` if there are none.

    Each value is parsed with :func:`parse_job_id`; a ``None`` value (JSON ``null``) counts as
    absent. Two sources naming different jobs raise :class:`InvalidJobId`.
    """
    job: int | None = None
    first = ""
    for where, value in named:
        if value is None:
            continue
        parsed = parse_job_id(value, where=where)
        if job is None:
            job, first = parsed, where
        elif parsed != job:
            raise InvalidJobId(
                f"conflicting job ids: {first} says {job} but {where} says {parsed}; "
                "name the job once, or the same job everywhere"
            )
    return job


def _quote(text: str, limit: int = 40) -> str:
    """repr() of a possibly hostile string, cut short: safe to put in a message or a log."""
    if len(text) > limit:
        return repr(text[:limit]) + f"... ({len(text)} characters)"
    return repr(text)


def _short_int(value: int) -> str:
    # str() of a huge int is slow and refused past 4300 digits: describe it instead.
    if value.bit_length() > 128:
        return f"an integer of {value.bit_length()} bits"
    return str(value)


def _type_name(value: object) -> str:
    names = {type(None): "null", dict: "JSON object", list: "JSON array"}
    return names.get(type(value), type(value).__name__)
