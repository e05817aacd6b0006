"""The fault campaign's table: printed at the end of the session, written to var/faults/."""

from __future__ import annotations

from typing import Any

from tests.faults.campaign import TALLY


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if TALLY.empty:
        return
    path = TALLY.write()
    terminalreporter.section("fault campaign")
    terminalreporter.write_line(TALLY.table())
    terminalreporter.write_line("")
    terminalreporter.write_line(f"written to {path}")
