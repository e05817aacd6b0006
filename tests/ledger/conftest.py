"""The ledger suite runs against every backend: each test that takes ``ledger`` (or
``ledger_store``) runs once on SQLite and once on a real PostgreSQL 15."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from sidecar.ledger import Ledger
from sidecar.ledger.sqlite import SQLiteLedger

LedgerStore = Callable[[], Ledger]


@pytest.fixture(params=["sqlite", "postgresql"])
def ledger_store(request: pytest.FixtureRequest, tmp_path: Path) -> LedgerStore:
    """Makes new (unopened) ledgers on one store: reopening, or a second process's view."""
    if request.param == "sqlite":
        path = tmp_path / "nested" / "folder" / "ledger.db"
        return lambda: SQLiteLedger(path)
    from sidecar.ledger.postgres import PostgresLedger

    url = request.getfixturevalue("postgres").new_database()
    return lambda: PostgresLedger(url)


@pytest.fixture
async def ledger(ledger_store: LedgerStore) -> AsyncIterator[Ledger]:
    ledger = ledger_store()
    await ledger.open()
    yield ledger
    await ledger.close()
