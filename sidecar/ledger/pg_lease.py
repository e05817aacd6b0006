"""The submitter lease on PostgreSQL (sidecar/ledger/lease.py tells what the lease is for)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import psycopg

from sidecar.ledger.lease import SubmitterLease
from sidecar.ledger.pg_schema import LOCK_SUBMITTER, lock_key

log = logging.getLogger(__name__)

_Conn = psycopg.AsyncConnection[tuple[Any, ...]]


class PostgresLease(SubmitterLease):
    """The submitter lease as a session advisory lock on a connection of its own.

    The server drops the lock when that connection ends: at once when the holder's process dies
    on a live machine, and through TCP keepalives (set to a fraction of ``takeover_s``) when the
    machine or the network is gone. The holder pings its connection before every send, so a
    holder cut off from the database stops sending before a successor can start.
    """

    def __init__(
        self, connect: Callable[[], Awaitable[_Conn]], name: str, takeover_s: float
    ) -> None:
        super().__init__(name, poll_interval=max(0.2, takeover_s / 5))
        self._connect = connect
        self._takeover_s = takeover_s
        self._key = lock_key("submitter", name)
        self._conn: _Conn | None = None
        self._held = False

    async def try_acquire(self) -> bool:
        try:
            if self._conn is None or self._conn.closed or self._conn.broken:
                self._conn = await self._connect()
                await self._tune_keepalives(self._conn)
            cursor = await self._conn.execute(
                "SELECT pg_try_advisory_lock(%s, %s)", (LOCK_SUBMITTER, self._key)
            )
            row = await cursor.fetchone()
        except psycopg.Error as exc:
            log.warning("submitter lease: the ledger does not answer: %s", type(exc).__name__)
            await self._drop()
            return False
        self._held = bool(row is not None and row[0])
        return self._held

    async def _tune_keepalives(self, conn: _Conn) -> None:
        idle = max(1, int(self._takeover_s // 3))
        interval = max(1, int(self._takeover_s // 6))
        for name, value in (
            ("tcp_keepalives_idle", idle),
            ("tcp_keepalives_interval", interval),
            ("tcp_keepalives_count", 2),
            ("tcp_user_timeout", int(self._takeover_s * 1000 // 2)),
        ):
            await conn.execute("SELECT set_config(%s, %s, false)", (name, str(value)))

    async def still_held(self) -> bool:
        conn = self._conn
        if not self._held or conn is None or conn.closed or conn.broken:
            return False
        try:
            await asyncio.wait_for(conn.execute("SELECT 1"), timeout=self.poll_interval)
        except (psycopg.Error, TimeoutError):
            await self._drop()
            return False
        return True

    async def release(self) -> None:
        conn = self._conn
        if conn is not None and not conn.closed and not conn.broken:
            try:
                await conn.execute("SELECT pg_advisory_unlock(%s, %s)", (LOCK_SUBMITTER, self._key))
            except psycopg.Error:
                pass  # closing the connection below drops it all the same
        await self._drop()

    async def _drop(self) -> None:
        self._held = False
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                await conn.close()
            except psycopg.Error:
                pass
