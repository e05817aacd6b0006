"""What requests in flight hold of their jobs' deposits: so N concurrent requests of one job can
never be served past what its deposit still covers.

Admission asks the chain how many tokens the job's deposit still covers (``left``: the deposit's
tokens minus what the ledger has metered), takes away what the requests in flight already hold,
and grants a new request at most the rest, lowering its ``max_tokens`` to the grant. The grant is
released once the request's record is committed: its tokens are then in the ledger, and ``left``
counts them. Pure and single-threaded (the event loop's): no I/O, no lock. With a ledger that
several replicas share, the holds live in the ledger instead (``Ledger.hold``), so each replica
sees the others'; a :class:`Hold` then drops its row when released.

The count is conservative while a stream runs: its progress records are already metered while its
whole grant is still held. Under ``--bill total`` the grant bounds generated tokens only (prompt
tokens are billed but not held).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


class Reservations:
    """Tokens held per job by requests in flight."""

    __slots__ = ("_held",)

    def __init__(self) -> None:
        self._held: dict[int, int] = {}

    def held(self, job_id: int) -> int:
        return self._held.get(job_id, 0)

    def grant(self, job_id: int, left: int, want: int) -> Hold:
        """Hold up to ``want`` tokens of the ``left`` the deposit covers (what others hold comes
        off first). A hold of 0 tokens means nothing is left to grant."""
        if want < 0:
            raise ValueError("a request cannot want fewer than 0 tokens")
        tokens = max(0, min(want, left - self.held(job_id)))
        if tokens:
            self._held[job_id] = self.held(job_id) + tokens
        return Hold(self, job_id, tokens)

    def release(self, job_id: int, tokens: int) -> None:
        rest = self.held(job_id) - tokens
        if rest < 0:
            raise ValueError(f"job {job_id} releases more than it holds")
        if rest:
            self._held[job_id] = rest
        else:
            self._held.pop(job_id, None)


@dataclass(slots=True, eq=False)  # compared by identity: each hold is one request's
class Hold:
    """One request's share of its job's deposit; released once (later calls do nothing)."""

    reservations: Reservations | None
    job_id: int | None
    tokens: int
    released: bool = False
    # A hold kept in a shared ledger (several replicas): how to drop it there.
    on_release: Callable[[], None] | None = None

    def release(self) -> None:
        if not self.released:
            self.released = True
            if self.reservations is not None and self.job_id is not None and self.tokens:
                self.reservations.release(self.job_id, self.tokens)
            if self.on_release is not None:
                self.on_release()


NO_HOLD = Hold(None, None, 0, released=True)
