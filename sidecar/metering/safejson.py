"""``json.loads`` that refuses deep nesting before parsing it.

json's C parser recurses once per nesting level and only stops at the interpreter's recursion
limit. Some libraries raise that limit process-wide (py_ecc, which eth_account imports, sets
100000), and then a hostile document overflows the C stack: a segfault instead of an error. The
metering core parses bytes from clients and engines, so it checks depth first and raises
``RecursionError`` itself, which callers already treat as "not usable JSON".
"""

from __future__ import annotations

import json
import re
from typing import Any

MAX_NESTING = 256
# A document with at most this many opening brackets nests at most that deep, which json parses
# safely under any recursion limit; only documents with more brackets are scanned (and refused
# beyond MAX_NESTING). Ordinary bodies pay two C-level counts.
_SCAN_ABOVE = 2 * MAX_NESTING
_BYTES_TOKENS = re.compile(rb'"(?:[^"\\]|\\.)*"|[\[\]{}]')


def too_deep(doc: str | bytes) -> bool:
    """Whether ``doc`` nests deeper than MAX_NESTING (brackets inside strings do not count)."""
    if isinstance(doc, str):
        if doc.count("[") + doc.count("{") <= _SCAN_ABOVE:
            return False
        # Only candidates get here (rare): quotes, backslashes and brackets are ASCII, so the
        # UTF-8 bytes have the same structure as the text.
        doc = doc.encode("utf-8", "surrogatepass")
    elif doc.count(b"[") + doc.count(b"{") <= _SCAN_ABOVE:
        return False
    tokens = _BYTES_TOKENS.finditer(doc)
    opening, closing = (b"[", b"{"), (b"]", b"}")
    depth = 0
    for match in tokens:
        token = match.group()
        if token in opening:
            depth += 1
            if depth > MAX_NESTING:
                return True
        elif token in closing:
            depth -= 1
    return False


def loads(doc: str | bytes, **kwargs: Any) -> Any:
    """``json.loads``, but a document nested deeper than MAX_NESTING raises RecursionError."""
    if too_deep(doc):
        raise RecursionError(f"JSON nested deeper than {MAX_NESTING} levels")
    return json.loads(doc, **kwargs)
