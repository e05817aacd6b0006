"""Durable usage ledger: one interface, several backends chosen by URL."""

from sidecar.ledger.base import (
    Claim,
    ClaimConflictError,
    ClaimKind,
    ClaimState,
    JobTotals,
    Ledger,
    LedgerClosedError,
    MarketplaceIdentity,
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
    "MarketplaceIdentity",
    "RecordState",
    "UsageRecord",
    "claim_totals",
    "open_ledger",
]


POSTGRES_SCHEMES = ("postgresql://", "postgres://")


def open_ledger(url: str, *, password: str | None = None) -> Ledger:
    """The backend for a ledger URL: ``sqlite:///PATH`` or ``postgresql://USER@HOST/DB``
    (``password``: the database password, kept out of the URL). Call ``await ledger.open()``
    next."""
    if url.startswith("sqlite:///"):
        from sidecar.ledger.sqlite import SQLiteLedger

        return SQLiteLedger(url.removeprefix("sqlite:///"))
    if url.startswith(POSTGRES_SCHEMES):
        try:
            from sidecar.ledger.postgres import PostgresLedger
        except ImportError:  # the postgres extra is not installed
            raise ValueError(
                "a postgresql:// ledger needs psycopg: pip install 'sidecar[postgres]'"
            ) from None
        return PostgresLedger(url, password=password)
    raise ValueError(
        "unsupported ledger URL: expected sqlite:///PATH or postgresql://USER@HOST:PORT/DB"
    )
