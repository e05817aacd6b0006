"""An incremental Server-Sent Events decoder: bytes in, events out (sans-IO).

It follows the WHATWG HTML "event stream" interpretation rules:
https://html.spec.whatwg.org/multipage/server-sent-events.html#event-stream-interpretation

- lines end in LF, CR or CRLF, and a CRLF may be split across two reads;
- one leading UTF-8 byte order mark is skipped;
- ``:`` starts a comment; ``field: value`` drops one space after the colon; a line with no
  colon is a field with an empty value; unknown fields are ignored;
- ``data`` lines are joined with ``"\\n"``; ``event`` sets the type (default ``"message"``);
  ``id`` sets the last event id unless it contains NUL (the id persists across events);
  ``retry`` is taken only when it is all ASCII digits;
- a blank line dispatches the event; a block with no ``data`` line dispatches nothing;
- at end of input a block without its blank line is discarded (reported by :meth:`close`).

One bound is the decoder's own: a block (an event with its lines, comments included) longer
than ``max_event_bytes`` is skipped, not dispatched, and counted in ``oversized``; the decoder
then holds at most that many bytes plus one read, however long the line or event an upstream
sends. (A line is part of a block, so this bounds lines too.) Only reads that leave a block
open pay for the check: one subtraction.

Lines are split as bytes: LF, CR and ``:`` are ASCII and never occur inside a multi-byte UTF-8
sequence, so a read may end anywhere (even inside a character) and only whole lines are
decoded (invalid UTF-8 becomes U+FFFD, as the spec's decoder does).

Speed matters more here than anywhere else in the sidecar: this runs on every relayed chunk.
The common read (no CR, no pending partial line) is handled with ``bytes.find`` and a handful
of slices; CR line ends take a slower general path.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

__all__ = ["DEFAULT_MAX_EVENT_BYTES", "DONE", "SSEDecoder", "SSEEvent", "Truncated"]

DONE = "[DONE]"  # the OpenAI end-of-stream sentinel, sent as the data of a last event
DEFAULT_MAX_EVENT_BYTES = 1024 * 1024
_PLACEHOLDER = b"-"  # stands for the dropped start of an oversized line: an unknown field

_BOM = b"\xef\xbb\xbf"
_CR = 0x0D
_LF = 0x0A
_MAX_RETRY_DIGITS = 18  # about 31 million years of milliseconds


@dataclass(slots=True)
class SSEEvent:
    """One dispatched event. Treat it as read-only.

    ``raw_start``/``raw_end`` are absolute byte offsets in the stream (a leading BOM counts) of
    the block that produced the event: from just after the previous blank line through the
    blank line that dispatched it, so comment lines inside the block are included. They let a
    caller cut an event out of the byte stream. When a CRLF that ends the block is split
    across two reads, ``raw_end`` stops after the CR (the event is dispatched at the CR, as
    the spec requires). They are not part of equality: the same stream split differently
    gives equal events.
    """

    data: str
    event: str = "message"
    id: str = ""
    raw_start: int = field(default=0, compare=False)
    raw_end: int = field(default=0, compare=False)


@dataclass(frozen=True, slots=True)
class Truncated:
    """The end of input came inside a block. Per the spec the block is discarded.

    ``event`` is what the block would have dispatched had a blank line followed (``None``:
    it held no ``data`` line, e.g. a lone comment). Reported so the caller can log it.
    """

    raw_start: int
    raw_bytes: int
    event: SSEEvent | None


class SSEDecoder:
    """Feed it the bytes of an event stream in any pieces; it returns the events dispatched.

    ``done`` becomes true once an event whose data is exactly ``[DONE]`` was dispatched.
    ``retry`` is the last valid ``retry`` value (milliseconds) or ``None``.
    ``oversized`` counts the blocks skipped for being longer than ``max_event_bytes``;
    ``on_oversized``, if given, is called once for each, when it crosses the bound.
    """

    __slots__ = (
        "_block_start",
        "_closed",
        "_cr",
        "_data",
        "_event",
        "_fast_max",
        "_fed",
        "_head",
        "_idle",
        "_max",
        "_on_oversized",
        "_parts",
        "_skipping",
        "done",
        "last_event_id",
        "oversized",
        "retry",
    )

    def __init__(
        self,
        max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES,
        on_oversized: Callable[[int], None] | None = None,
    ) -> None:
        if max_event_bytes <= 0:
            raise ValueError("max_event_bytes must be positive")
        self._max = max_event_bytes
        self._fast_max = max_event_bytes + 1  # a whole "data: ...\n\n" read: block + blank line
        self._on_oversized = on_oversized
        self._skipping = False  # the open block crossed the bound: drop it at its blank line
        self.oversized = 0
        self._parts: list[bytes] = []  # pieces of the current, not yet terminated, line
        self._data: list[bytes] = []  # values of the data lines of the current block
        self._event = b""  # the event type buffer
        self._cr = False  # the last read ended with a CR line end: skip a LF that follows
        self._head: bytes | None = b""  # bytes held while a leading BOM is undecided
        self._fed = 0  # total bytes fed
        self._block_start = 0  # where the current block began (absolute offset)
        self._closed = False
        # Nothing pending at all (no partial line, no open block, no BOM or CR decision):
        # the state in which nearly every read arrives.
        self._idle = False
        self.done = False
        self.last_event_id = ""
        self.retry: int | None = None

    @property
    def fed(self) -> int:
        """Total bytes fed so far."""
        return self._fed

    @property
    def block_start(self) -> int:
        """Absolute offset just past the last complete block: all bytes before it are final."""
        return self._block_start

    @property
    def skipping(self) -> bool:
        """True while the open block is over the bound (its bytes are final: it is skipped)."""
        return self._skipping

    @property
    def pending_cr(self) -> bool:
        """True when the input so far ends with a CR line end (a LF next would belong to it)."""
        return self._cr

    def feed(self, data: bytes) -> list[SSEEvent]:
        """Consume the next bytes of the stream; return the events they complete, in order."""
        if self._idle:
            # Fastest path: the read is exactly one "data: ...\n\n" event, LF only.
            n = len(data)
            if (
                data.startswith(b"data: ")
                and n <= self._fast_max
                and data.find(b"\n", 6) == n - 2
                and data[n - 1] == _LF
                and _CR not in data  # int in bytes is a bare memchr: much cheaper than b"\r"
            ):
                text = data[6 : n - 2].decode("utf-8", "replace")
                # The block began where the last one ended: lines that left no state behind
                # (a comment, an unknown field) may have come before this read.
                start = self._block_start
                self._fed = self._block_start = end = self._fed + n
                if text == DONE:
                    self.done = True
                return [SSEEvent(text, "message", self.last_event_id, start, end)]
        elif self._closed:
            raise RuntimeError("SSEDecoder.feed() called after close()")
        events: list[SSEEvent] = []
        if data:
            self._feed(data, events)
            if self._fed - self._block_start > self._max:
                self._overflow()
            self._idle = not (
                self._parts
                or self._data
                or self._event
                or self._cr
                or self._skipping
                or self._head is not None
                # Lines that left no state (a comment) still began the block: its size is
                # then more than one read's, which only the general path measures.
                or self._block_start != self._fed
            )
        return events

    def _feed(self, data: bytes, events: list[SSEEvent]) -> None:
        """The general case: any read, in any state (except closed)."""
        base = self._fed  # absolute offset of data[0]
        self._fed = base + len(data)
        pos = 0
        if self._head is not None:
            # Still at the start of the stream: a BOM may arrive split across reads.
            head = self._head + data
            if len(head) < 3 and _BOM.startswith(head):
                self._head = head
                return
            self._head = None
            data, base = head, 0
            pos = 3 if head.startswith(_BOM) else 0
            if pos == len(data):
                return
        if self._cr:
            self._cr = False
            if data[pos] == _LF:
                # The second half of a CRLF whose CR ended the previous read. If that CR
                # ended a blank line, this LF belongs to the block it closed.
                if self._block_start == base + pos:
                    self._block_start += 1
                pos += 1
                if pos == len(data):
                    return
        if _CR in data:  # bytes before pos are a BOM or a LF, never a CR
            self._feed_general(data, pos, base, events)
            return

        # Fast path: LF line ends only.
        parts = self._parts
        if parts:
            nl = data.find(b"\n", pos)
            if nl < 0:
                parts.append(data[pos:] if pos else data)
                return
            parts.append(data[pos:nl])
            line = b"".join(parts)
            parts.clear()
            if line:
                self._field(line)
            else:
                self._dispatch(base + nl + 1, events, 1)
            pos = nl + 1
        find = data.find
        nl = find(b"\n", pos)
        while nl >= 0:
            if nl == pos:
                self._dispatch(base + nl + 1, events, 1)
            elif data.startswith(b"data: ", pos):
                # The line of nearly every event from every engine.
                self._data.append(data[pos + 6 : nl])
            else:
                self._field(data[pos:nl])
            pos = nl + 1
            nl = find(b"\n", pos)
        if pos < len(data):
            parts.append(data[pos:] if pos else data)

    def _overflow(self) -> None:
        """The open block is longer than the bound: forget what it holds, skip the rest of it."""
        if not self._skipping:
            self._skipping = True
            self.oversized += 1
            if self._on_oversized is not None:
                self._on_oversized(self._fed - self._block_start)
        self._data = []
        self._event = b""
        if self._parts:
            # The line is not over yet; what ends it must still be seen as a non-blank line.
            self._parts = [_PLACEHOLDER]

    def close(self) -> Truncated | None:
        """End of input. Returns what a block cut short held, or ``None`` if none was open.

        Per the spec nothing is dispatched at end of input: a block without its blank line
        is discarded. The returned value exists so the caller can report it.
        """
        if self._closed:
            raise RuntimeError("SSEDecoder.close() called twice")
        self._closed = True
        self._idle = False
        held = self._fed - self._block_start
        if held <= 0:
            return None
        if self._parts:
            # Parse the cut-off last line as if it had ended, to show what was lost.
            line = b"".join(self._parts)
            self._parts.clear()
            if line:
                self._field(line)
        lost: list[SSEEvent] = []
        done = self.done
        self._dispatch(self._fed, lost, 0)
        self.done = done  # an undispatched [DONE] does not count
        return Truncated(self._fed - held, held, lost[0] if lost else None)

    def _feed_general(self, data: bytes, pos: int, base: int, events: list[SSEEvent]) -> None:
        """Split ``data[pos:]`` into lines ending in LF, CR or CRLF."""
        n = len(data)
        parts = self._parts
        cr = data.find(b"\r", pos)
        lf = data.find(b"\n", pos)
        while cr >= 0 or lf >= 0:
            if lf >= 0 and (cr < 0 or lf < cr):
                stop = lf
                after = lf + 1
            else:
                stop = cr
                after = cr + 1
                if after == n:
                    # A CR as the last byte: the line is complete, but a LF may follow.
                    self._cr = True
                elif data[after] == _LF:
                    after += 1
            piece = data[pos:stop]
            if parts:
                parts.append(piece)
                piece = b"".join(parts)
                parts.clear()
            if piece:
                self._field(piece)
            else:
                self._dispatch(base + after, events, after - stop)
            pos = after
            if cr >= 0 and cr < pos:
                cr = data.find(b"\r", pos)
            if lf >= 0 and lf < pos:
                lf = data.find(b"\n", pos)
        if pos < n:
            parts.append(data[pos:])

    def _field(self, line: bytes) -> None:
        """Apply one non-blank line to the block being built."""
        colon = line.find(b":")
        if colon == 0:
            return  # a comment
        if colon < 0:
            name, value = line, b""
        else:
            name = line[:colon]
            value = line[colon + 2 :] if line[colon + 1 : colon + 2] == b" " else line[colon + 1 :]
        if name == b"data":
            self._data.append(value)
        elif name == b"event":
            self._event = value
        elif name == b"id":
            if b"\x00" not in value:
                self.last_event_id = value.decode("utf-8", "replace")
        elif name == b"retry":
            # bytes.isdigit is ASCII-only, as the spec wants. Absurdly long values are
            # ignored: int() refuses over 4300 digits, and an upstream must not crash us.
            if value.isdigit() and len(value) <= _MAX_RETRY_DIGITS:
                self.retry = int(value)

    def _dispatch(self, end: int, events: list[SSEEvent], blank: int) -> None:
        """A blank line of ``blank`` bytes ending at ``end``: dispatch the block's event, if it
        has data. The bound applies to the block less its blank line, which makes the outcome
        the same however the reads split a CRLF."""
        start = self._block_start
        self._block_start = end
        data = self._data
        if not data:
            self._event = b""
            self._skipping = False
            return
        if self._skipping or end - start - blank > self._max:
            if not self._skipping:  # a whole oversized block within one read
                self.oversized += 1
                if self._on_oversized is not None:
                    self._on_oversized(end - start - blank)
            self._skipping = False
            self._data = []
            self._event = b""
            return
        self._data = []
        raw = data[0] if len(data) == 1 else b"\n".join(data)
        text = raw.decode("utf-8", "replace")
        etype = self._event
        if etype:
            self._event = b""
            event = etype.decode("utf-8", "replace")
        else:
            event = "message"
        if text == DONE:
            self.done = True
        events.append(SSEEvent(text, event, self.last_event_id, start, end))
