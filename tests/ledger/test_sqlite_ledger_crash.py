"""A kill -9 in the middle of a write stream loses nothing that was reported durable."""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path

from sidecar.ledger import RecordState
from sidecar.ledger.sqlite import SQLiteLedger

CHILD = Path(__file__).with_name("ledger_crash_child.py")
REPO = Path(__file__).resolve().parents[2]
KILL_AFTER_FINAL = 400  # durable final records to see before pulling the plug
HANG_GUARD_S = 120  # only to end a broken child; no timing is asserted


def run_child_until_killed(path: Path) -> list[str]:
    """Start the child, SIGKILL it mid-stream, return every complete line it printed."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    }
    child = subprocess.Popen(
        [sys.executable, str(CHILD), str(path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    guard = threading.Timer(HANG_GUARD_S, child.kill)
    guard.start()
    try:
        assert child.stdout is not None
        lines: list[str] = []
        finals = 0
        while finals < KILL_AFTER_FINAL:
            line = child.stdout.readline()
            if not line:
                _, err = child.communicate()
                raise AssertionError(f"child ended early (rc {child.returncode}): {err}")
            lines.append(line)
            finals += line.startswith("final ")
        # The writer is mid-stream here: 16 workers keep it busy with batches.
        os.kill(child.pid, signal.SIGKILL)
        rest, _ = child.communicate()
        lines.extend(rest.splitlines(keepends=True))
    finally:
        guard.cancel()
    assert child.returncode == -signal.SIGKILL
    # A line cut off by the kill has no newline: it was never a complete promise.
    return [line.rstrip("\n") for line in lines if line.endswith("\n") and line != "ready\n"]


def test_kill_9_mid_stream_keeps_every_record_reported_durable(tmp_path: Path) -> None:
    path = tmp_path / "ledger.db"
    printed = run_child_until_killed(path)
    final_keys = {line.split()[1] for line in printed if line.startswith("final ")}
    open_keys = {line.split()[1] for line in printed if line.startswith("open ")}
    assert len(final_keys) >= KILL_AFTER_FINAL

    # Re-open exactly as a restarted sidecar would (recovers the WAL), then check the file.
    async def reopen() -> dict[str, RecordState]:
        ledger = SQLiteLedger(path)
        await ledger.open()
        try:
            states: dict[str, RecordState] = {}
            for totals in await ledger.jobs():
                for record in await ledger.records(totals.job_id):
                    states[record.key] = record.state
            return states
        finally:
            await ledger.close()

    states = asyncio.run(reopen())
    conn = sqlite3.connect(path)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    finally:
        conn.close()
    missing_final = sorted(k for k in final_keys if states.get(k) is not RecordState.FINAL)
    missing_open = sorted(k for k in open_keys if k not in states)
    assert not missing_final, missing_final[:10]
    assert not missing_open, missing_open[:10]
