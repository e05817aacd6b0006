"""The PostgreSQL ledger's schema, as an ordered list of migrations (the SQLite schema's twin).

The same tables and rules as sidecar/ledger/schema.py, in PostgreSQL's types: job ids are
``NUMERIC(78, 0)`` (a uint256), counts ``BIGINT``, payloads ``BYTEA``; each job's running total is
kept by a trigger in the records' own transactions, with a row lock, so replicas recording for the
same job at once still add up exactly. Tables only this backend needs: which replicas are running
(``ledger_replicas``) and what requests in flight hold of a job's deposit across replicas
(``job_holds``).

``sidecar_schema`` holds how many migrations the database has had. Opening a ledger applies the
missing ones in one transaction under a transaction-scoped advisory lock, so replicas starting
together migrate once. A shipped migration is never edited; later features append.
"""

from __future__ import annotations

import hashlib
from typing import Final

import psycopg

# Advisory lock namespaces (the first key of the two-key form): one per purpose, so a hash in one
# can never collide with another's.
LOCK_MIGRATE: Final = 0x51DE0001
LOCK_REPLICA: Final = 0x51DE0002
LOCK_SUBMITTER: Final = 0x51DE0003
LOCK_JOB_HOLDS: Final = 0x51DE0004

_JOB_ID: Final = "NUMERIC(78, 0) CHECK (job_id >= 0 AND job_id < 2::numeric ^ 256)"

MIGRATIONS: Final[tuple[tuple[str, ...], ...]] = (
    # 1: the SQLite schema's versions 1 to 6 at once, and the replicas' tables.
    (
        """
        CREATE TABLE usage_records (
            key               TEXT    PRIMARY KEY,
            job_id            NUMERIC(78, 0)
                              CHECK (job_id IS NULL OR job_id >= 0 AND job_id < 2::numeric ^ 256),
            endpoint          TEXT    NOT NULL,
            model             TEXT,
            prompt_tokens     BIGINT  CHECK (prompt_tokens IS NULL OR prompt_tokens >= 0),
            completion_tokens BIGINT  NOT NULL CHECK (completion_tokens >= 0),
            billable_tokens   BIGINT  NOT NULL CHECK (billable_tokens >= 0),
            source            TEXT    NOT NULL,
            state             TEXT    NOT NULL CHECK (state IN ('open', 'final', 'aborted')),
            status            INTEGER NOT NULL,
            started_ms        BIGINT  NOT NULL,
            updated_ms        BIGINT  NOT NULL,
            cached_tokens     BIGINT  CHECK (cached_tokens IS NULL OR cached_tokens >= 0),
            reasoning_tokens  BIGINT  CHECK (reasoning_tokens IS NULL OR reasoning_tokens >= 0),
            -- the replica that wrote the row: its OPEN rows are closed once it is gone
            replica           TEXT    NOT NULL,
            -- insertion order, for a job's records in a stable order (SQLite's rowid)
            seq               BIGINT  GENERATED ALWAYS AS IDENTITY
        )
        """,
        "CREATE INDEX usage_records_by_job ON usage_records (job_id, started_ms, seq)",
        "CREATE INDEX usage_records_open ON usage_records (replica) WHERE state = 'open'",
        f"""
        CREATE TABLE claims (
            job_id      {_JOB_ID} NOT NULL,
            seq         INTEGER NOT NULL CHECK (seq >= 1),
            kind        TEXT    NOT NULL CHECK (kind IN ('proof', 'settle')),
            tokens      BIGINT  NOT NULL CHECK (tokens >= 0),
            first_token BIGINT  NOT NULL CHECK (first_token >= 0),
            end_token   BIGINT  NOT NULL CHECK (end_token - first_token = tokens),
            payload     BYTEA   NOT NULL,
            state       TEXT    NOT NULL CHECK (
                state IN ('pending', 'sent', 'confirmed', 'failed', 'unclaimable')
            ),
            tx_hash     TEXT,
            nonce       BIGINT,
            error       TEXT,
            created_ms  BIGINT  NOT NULL,
            updated_ms  BIGINT  NOT NULL,
            PRIMARY KEY (job_id, seq)
        )
        """,
        "CREATE INDEX claims_unfinished ON claims (state) WHERE state IN ('pending', 'sent')",
        f"""
        CREATE TABLE job_bindings (
            job_id    {_JOB_ID} PRIMARY KEY,
            address   TEXT    NOT NULL CHECK (address ~ '^0x[0-9a-f]{{40}}$'),
            proof     TEXT    NOT NULL,
            bound_ms  BIGINT  NOT NULL
        )
        """,
        f"""
        CREATE TABLE job_totals (
            job_id          {_JOB_ID} PRIMARY KEY,
            billable_tokens BIGINT  NOT NULL CHECK (billable_tokens >= 0)
        )
        """,
        # INSERT ... ON CONFLICT takes the job's row lock: concurrent writers of one job
        # serialise on it, and every delta lands exactly once.
        """
        CREATE FUNCTION job_totals_follow() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            IF TG_OP = 'UPDATE' AND OLD.job_id IS NOT NULL THEN
                UPDATE job_totals SET billable_tokens = billable_tokens - OLD.billable_tokens
                WHERE job_id = OLD.job_id;
            END IF;
            IF NEW.job_id IS NOT NULL THEN
                INSERT INTO job_totals AS t (job_id, billable_tokens)
                VALUES (NEW.job_id, NEW.billable_tokens)
                ON CONFLICT (job_id)
                DO UPDATE SET billable_tokens = t.billable_tokens + EXCLUDED.billable_tokens;
            END IF;
            RETURN NULL;
        END
        $$
        """,
        """
        CREATE TRIGGER job_totals_on_insert AFTER INSERT ON usage_records
        FOR EACH ROW EXECUTE FUNCTION job_totals_follow()
        """,
        """
        CREATE TRIGGER job_totals_on_update AFTER UPDATE OF job_id, billable_tokens
        ON usage_records FOR EACH ROW EXECUTE FUNCTION job_totals_follow()
        """,
        f"""
        CREATE TABLE settle_requests (
            job_id       {_JOB_ID} PRIMARY KEY,
            requested_ms BIGINT  NOT NULL
        )
        """,
        """
        CREATE TABLE ledger_replicas (
            replica     TEXT    PRIMARY KEY,
            started_ms  BIGINT  NOT NULL
        )
        """,
        f"""
        CREATE TABLE job_holds (
            id          BIGINT  GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            job_id      {_JOB_ID} NOT NULL,
            tokens      BIGINT  NOT NULL CHECK (tokens > 0),
            replica     TEXT    NOT NULL,
            expires_ms  BIGINT  NOT NULL
        )
        """,
        "CREATE INDEX job_holds_by_job ON job_holds (job_id)",
    ),
    # 2: the marketplace the ledger's job ids belong to (one row; see the SQLite schema's 7).
    (
        """
        CREATE TABLE ledger_marketplace (
            singleton        SMALLINT PRIMARY KEY CHECK (singleton = 1),
            chain_id         NUMERIC(78, 0) NOT NULL,
            marketplace      TEXT    NOT NULL,
            contract_version TEXT    NOT NULL,
            bound_ms         BIGINT  NOT NULL
        )
        """,
    ),
    # 3: the record pieces each claim commits to (see the SQLite schema's 8).
    ("ALTER TABLE claims ADD COLUMN pieces TEXT",),
)

SCHEMA_VERSION: Final = len(MIGRATIONS)


def lock_key(*parts: str) -> int:
    """A stable signed 32-bit key for the second half of a two-key advisory lock."""
    digest = hashlib.sha256("\0".join(parts).encode()).digest()
    return int.from_bytes(digest[:4], "big", signed=True)


class PostgresSchemaError(RuntimeError):
    """The database's schema is one this code cannot use (written by a newer sidecar)."""


async def migrate(conn: psycopg.AsyncConnection[tuple[object, ...]]) -> int:
    """Bring the database up to :data:`SCHEMA_VERSION`; return the version it had before."""
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(%s, 0)", (LOCK_MIGRATE,))
        await conn.execute("CREATE TABLE IF NOT EXISTS sidecar_schema (version INTEGER NOT NULL)")
        cursor = await conn.execute("SELECT version FROM sidecar_schema")
        row = await cursor.fetchone()
        before = 0 if row is None else int(str(row[0]))
        if before > len(MIGRATIONS):
            raise PostgresSchemaError(
                f"ledger schema version {before} is newer than this sidecar knows"
                f" ({len(MIGRATIONS)}); upgrade the sidecar"
            )
        for version in range(before, len(MIGRATIONS)):
            for statement in MIGRATIONS[version]:
                await conn.execute(statement.encode())
        if row is None:
            await conn.execute("INSERT INTO sidecar_schema VALUES (%s)", (len(MIGRATIONS),))
        else:
            await conn.execute("UPDATE sidecar_schema SET version = %s", (len(MIGRATIONS),))
    return before
