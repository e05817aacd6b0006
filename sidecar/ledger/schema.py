"""The SQLite ledger's schema, as an ordered list of migrations.

``PRAGMA user_version`` holds how many migrations a file has had. Opening a ledger applies the
missing ones in order, in one write transaction, so a file is never left half-migrated and two
processes opening the same new file cannot both migrate it. Later features append migrations
(version 2, 3, ...); a shipped migration is never edited, because files in the field already ran it.
"""

from __future__ import annotations

import sqlite3

# Migration ``i`` (0-based) takes a file from version ``i`` to ``i + 1``. Each is a tuple of single
# statements rather than one script: ``executescript`` would commit the surrounding transaction.
MIGRATIONS: tuple[tuple[str, ...], ...] = (
    # 1: usage records, one row per metered response.
    (
        """
        CREATE TABLE usage_records (
            key               TEXT    PRIMARY KEY,
            -- A uint256 in canonical decimal (no sign, no leading zeros), NULL when unattributed.
            -- TEXT because SQLite integers are 64-bit; canonical so that ordering by
            -- (length, text) is numeric order.
            job_id            TEXT    CHECK (
                job_id IS NULL OR (
                    length(job_id) BETWEEN 1 AND 78
                    AND job_id NOT GLOB '*[^0-9]*'
                    AND (job_id = '0' OR job_id NOT GLOB '0*')
                )
            ),
            endpoint          TEXT    NOT NULL,
            model             TEXT,
            prompt_tokens     INTEGER CHECK (prompt_tokens IS NULL OR prompt_tokens >= 0),
            completion_tokens INTEGER NOT NULL CHECK (completion_tokens >= 0),
            billable_tokens   INTEGER NOT NULL CHECK (billable_tokens >= 0),
            source            TEXT    NOT NULL,
            state             TEXT    NOT NULL CHECK (state IN ('open', 'final', 'aborted')),
            status            INTEGER NOT NULL,
            started_ms        INTEGER NOT NULL,
            updated_ms        INTEGER NOT NULL
        )
        """,
        # Per-job totals and per-job record listings both select or group by job.
        "CREATE INDEX usage_records_by_job ON usage_records (job_id, started_ms)",
    ),
    # 2: the on-chain outbox: every claim and settlement, written before it is sent.
    (
        """
        CREATE TABLE claims (
            job_id      TEXT    NOT NULL CHECK (
                length(job_id) BETWEEN 1 AND 78
                AND job_id NOT GLOB '*[^0-9]*'
                AND (job_id = '0' OR job_id NOT GLOB '0*')
            ),
            seq         INTEGER NOT NULL CHECK (seq >= 1),
            kind        TEXT    NOT NULL CHECK (kind IN ('proof', 'settle')),
            tokens      INTEGER NOT NULL CHECK (tokens >= 0),
            first_token INTEGER NOT NULL CHECK (first_token >= 0),
            end_token   INTEGER NOT NULL CHECK (end_token - first_token = tokens),
            payload     BLOB    NOT NULL,
            state       TEXT    NOT NULL CHECK (
                state IN ('pending', 'sent', 'confirmed', 'failed', 'unclaimable')
            ),
            tx_hash     TEXT,
            nonce       INTEGER,
            error       TEXT,
            created_ms  INTEGER NOT NULL,
            updated_ms  INTEGER NOT NULL,
            PRIMARY KEY (job_id, seq)
        )
        """,
        "CREATE INDEX claims_unfinished ON claims (state) WHERE state IN ('pending', 'sent')",
    ),
    # 3: which client each job is bound to (--session-auth bound): the first one wins.
    (
        """
        CREATE TABLE job_bindings (
            job_id    TEXT    PRIMARY KEY CHECK (
                length(job_id) BETWEEN 1 AND 78
                AND job_id NOT GLOB '*[^0-9]*'
                AND (job_id = '0' OR job_id NOT GLOB '0*')
            ),
            address   TEXT    NOT NULL CHECK (length(address) = 42 AND address GLOB '0x*'),
            proof     TEXT    NOT NULL,
            bound_ms  INTEGER NOT NULL
        )
        """,
    ),
    # 4: each job's billable tokens so far, kept by triggers in the records' own transactions:
    # a receipt (and admission) reads one row instead of summing every record of the job.
    # (No INSERT OR IGNORE in the triggers: the outer upsert's conflict policy would override it.)
    (
        """
        CREATE TABLE job_totals (
            job_id          TEXT    PRIMARY KEY,
            billable_tokens INTEGER NOT NULL CHECK (billable_tokens >= 0)
        )
        """,
        """
        CREATE TRIGGER job_totals_on_insert AFTER INSERT ON usage_records
        WHEN NEW.job_id IS NOT NULL
        BEGIN
            INSERT INTO job_totals (job_id, billable_tokens) SELECT NEW.job_id, 0
            WHERE NOT EXISTS (SELECT 1 FROM job_totals WHERE job_id = NEW.job_id);
            UPDATE job_totals SET billable_tokens = billable_tokens + NEW.billable_tokens
            WHERE job_id = NEW.job_id;
        END
        """,
        """
        CREATE TRIGGER job_totals_on_update AFTER UPDATE OF job_id, billable_tokens
        ON usage_records
        BEGIN
            UPDATE job_totals SET billable_tokens = billable_tokens - OLD.billable_tokens
            WHERE job_id = OLD.job_id;
            INSERT INTO job_totals (job_id, billable_tokens) SELECT NEW.job_id, 0
            WHERE NEW.job_id IS NOT NULL
            AND NOT EXISTS (SELECT 1 FROM job_totals WHERE job_id = NEW.job_id);
            UPDATE job_totals SET billable_tokens = billable_tokens + NEW.billable_tokens
            WHERE job_id = NEW.job_id;
        END
        """,
        """
        INSERT INTO job_totals (job_id, billable_tokens)
        SELECT job_id, SUM(billable_tokens) FROM usage_records
        WHERE job_id IS NOT NULL GROUP BY job_id
        """,
    ),
    # 5: usage detail where the engine reports it (NULL: not reported).
    (
        "ALTER TABLE usage_records ADD COLUMN cached_tokens INTEGER"
        " CHECK (cached_tokens IS NULL OR cached_tokens >= 0)",
        "ALTER TABLE usage_records ADD COLUMN reasoning_tokens INTEGER"
        " CHECK (reasoning_tokens IS NULL OR reasoning_tokens >= 0)",
    ),
    # 6: settlements requested (by the node protocol's session end or the admin API), kept until
    # the submitter settles them: a restart, or another process, does not forget one.
    (
        """
        CREATE TABLE settle_requests (
            job_id       TEXT    PRIMARY KEY CHECK (
                length(job_id) BETWEEN 1 AND 78
                AND job_id NOT GLOB '*[^0-9]*'
                AND (job_id = '0' OR job_id NOT GLOB '0*')
            ),
            requested_ms INTEGER NOT NULL
        )
        """,
    ),
    # 7: the marketplace the ledger's job ids belong to (one row): a sidecar pointed at another
    # chain, contract or contract version refuses to start instead of mixing their jobs.
    (
        """
        CREATE TABLE ledger_marketplace (
            singleton        INTEGER PRIMARY KEY CHECK (singleton = 1),
            chain_id         INTEGER NOT NULL,
            marketplace      TEXT    NOT NULL,
            contract_version TEXT    NOT NULL,
            bound_ms         INTEGER NOT NULL
        )
        """,
    ),
    # 8: the record pieces each claim commits to (JSON [[key, tokens], ...]): what an auditor
    # recomputes its records root from, though the records grow or are reordered later.
    ("ALTER TABLE claims ADD COLUMN pieces TEXT",),
)

SCHEMA_VERSION = len(MIGRATIONS)


class SchemaError(RuntimeError):
    """The file's schema is one this code cannot use (e.g. written by a newer sidecar)."""


def user_version(conn: sqlite3.Connection) -> int:
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    return int(version)


def migrate(
    conn: sqlite3.Connection,
    migrations: tuple[tuple[str, ...], ...] = MIGRATIONS,
) -> int:
    """Bring the file up to ``len(migrations)``; return the version it had before.

    ``conn`` must be in autocommit mode (``isolation_level=None``): the transaction is ours.
    """
    # IMMEDIATE takes the write lock before reading the version, so a concurrent opener waits
    # (busy timeout) and then sees the migrated version instead of migrating a second time.
    conn.execute("BEGIN IMMEDIATE")
    try:
        before = user_version(conn)
        if before > len(migrations):
            raise SchemaError(
                f"ledger schema version {before} is newer than this sidecar knows"
                f" ({len(migrations)}); upgrade the sidecar"
            )
        for version in range(before, len(migrations)):
            for statement in migrations[version]:
                conn.execute(statement)
            # user_version lives in the file header and is transactional, so it commits or
            # rolls back together with the migration's statements.
            conn.execute(f"PRAGMA user_version = {version + 1:d}")
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    return before
