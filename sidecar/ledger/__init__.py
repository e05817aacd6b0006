"""Durable usage ledger: one interface, several backends chosen by URL."""

from sidecar.ledger.base import (
    Claim,
    ClaimConflictError,
    ClaimKind,
    ClaimState,
    JobTotals,
    Ledger,
    LedgerClosedError,
    RecordState,
    UsageRecord,
    claim_totals,
)

__all__ = [
    "Claim",
    "ClaimConflictError",
    "ClaimKind",
    "ClaimState",
    "JobTotals",
    "Ledger",
    "LedgerClosedError",
    "RecordState",
    "UsageRecord",
    "claim_totals",
    "open_ledger",
]


def open_ledger(url: str) -> Ledger:
    """The backend for a ledger URL (``sqlite:///PATH``). Call ``await ledger.open()`` next."""
    if url.startswith("sqlite:///"):
        from sidecar.ledger.sqlite import SQLiteLedger

        return SQLiteLedger(url.removeprefix("sqlite:///"))
    raise ValueError(f"unsupported ledger URL {url!r}: expected sqlite:///PATH")
