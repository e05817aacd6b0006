"""``sidecar ledger backup PATH``: a consistent copy of a running ledger.

SQLite: the online backup API copies the file page by page while the sidecar keeps writing; the
copy is one consistent snapshot (committed records only), written to a temporary name and renamed,
so PATH is never a half-written file. PostgreSQL: the database is the server's to back up, so the
command prints the ``pg_dump`` command to use instead of copying anything itself.
"""

from __future__ import annotations

import argparse
import os
import sqlite3
import sys
from pathlib import Path
from typing import Any

from sidecar.config import Settings, add_arguments, redact_password


def add_ledger_parser(commands: Any) -> None:
    """``sidecar ledger ...`` on the CLI's subcommands (an argparse sub-parsers action)."""
    ledger = commands.add_parser(
        "ledger",
        allow_abbrev=False,
        help="back up the ledger (the unpaid earnings' only record)",
        description="Operations on the ledger named by --ledger (the same settings as serve).",
    )
    actions = ledger.add_subparsers(dest="ledger_command", required=True)
    backup = actions.add_parser(
        "backup",
        allow_abbrev=False,
        help="write a consistent copy of a SQLite ledger to PATH, safe while serving",
    )
    backup.add_argument("path", metavar="PATH", help="the backup file to write")
    add_arguments(backup)


def run_ledger(settings: Settings, args: argparse.Namespace) -> int:
    url = settings.ledger_url
    if not url.startswith("sqlite:///"):
        print(
            "sidecar ledger backup: the PostgreSQL ledger is backed up by the server's own "
            f"tools, e.g.\n  pg_dump --format=custom --file=PATH '{redact_password(url)}'\n"
            "and restored with pg_restore into an empty database (docs/OPERATIONS.md).",
            file=sys.stderr,
        )
        return 2
    source = Path(url.removeprefix("sqlite:///")).expanduser()
    if not source.is_file():
        print(f"sidecar ledger backup: no ledger at {source}", file=sys.stderr)
        return 2
    target = Path(args.path).expanduser()
    pages = backup_sqlite(source, target)
    print(f"backed up {source} to {target} ({pages} pages)")
    return 0


def backup_sqlite(source: Path, target: Path) -> int:
    """Copy the ledger at ``source`` to ``target`` with SQLite's online backup; its page count."""
    partial = target.with_name(f".{target.name}.partial")
    partial.unlink(missing_ok=True)
    src = sqlite3.connect(f"file:{source}?mode=ro", uri=True)
    try:
        dst = sqlite3.connect(partial)
        try:
            src.backup(dst)
            pages = int(dst.execute("PRAGMA page_count").fetchone()[0])
            check = dst.execute("PRAGMA integrity_check").fetchone()[0]
            if check != "ok":
                raise sqlite3.DatabaseError(f"the copy fails its integrity check: {check}")
        finally:
            dst.close()
    finally:
        src.close()
    with open(partial, "rb") as copy:
        os.fsync(copy.fileno())
    os.replace(partial, target)
    return pages
