"""The submitter lease: at most one process sends a host key's transactions at a time.

Several replicas share one ledger, and each could claim the same jobs with the same key: nonce
collisions, and claims raced against each other. So a replica sends transactions only while it
holds the lease named after the host key; the others keep serving and metering, and one of them
takes the lease over when its holder dies. Each backend has its own kind: a lock file for SQLite
(processes of one machine), a PostgreSQL advisory lock held on a dedicated connection (replicas
anywhere), released by the server when the holder's connection ends.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
from abc import ABC, abstractmethod
from pathlib import Path


class SubmitterLease(ABC):
    """One named lease. ``poll_interval`` is how often a waiting replica asks again, so a dead
    holder is replaced within about the takeover time it was made with."""

    def __init__(self, name: str, poll_interval: float) -> None:
        self.name = name
        self.poll_interval = poll_interval

    @abstractmethod
    async def try_acquire(self) -> bool:
        """Take the lease if nobody holds it; True when this process holds it now."""

    @abstractmethod
    async def still_held(self) -> bool:
        """A fresh check that the lease is still this process's (asked before every send)."""

    @abstractmethod
    async def release(self) -> None:
        """Give the lease up (a clean shutdown): another replica may take it at once."""

    async def acquire(self) -> None:
        """Wait until this process holds the lease."""
        while not await self.try_acquire():  # noqa: ASYNC110 - polling another process's lock
            await asyncio.sleep(self.poll_interval)


class FileLease(SubmitterLease):
    """A lease as an exclusive ``flock`` on a file beside the SQLite ledger: the kernel releases
    it when the holder exits, however it exits."""

    def __init__(self, path: Path, name: str, poll_interval: float) -> None:
        super().__init__(name, poll_interval)
        self.path = path
        self._fd: int | None = None

    async def try_acquire(self) -> bool:
        if self._fd is not None:
            return True
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        self._fd = fd
        return True

    async def still_held(self) -> bool:
        return self._fd is not None

    async def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)  # closing the descriptor drops the lock
