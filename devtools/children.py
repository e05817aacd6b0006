"""Child processes the development tools start (anvil, the engine, the demo's sidecar).

Two rules, shared by every launcher: a child dies with the process that started it (Linux's
``PR_SET_PDEATHSIG``, so even a ``kill -9`` of the parent leaves no orphan), and stopping is
SIGTERM first (a graceful stop: anvil dumps its state, uvicorn finishes), SIGKILL if it lingers.
``start_process`` starts a child with its output in a log file, ``wait_for_http`` waits until it
answers an HTTP probe (or reports its exit or its silence with the log's tail).
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Generic, Protocol, TypeVar

_PR_SET_PDEATHSIG = 1
# Resolved before any fork: the child should do as little as possible between fork and exec.
_libc = ctypes.CDLL(None, use_errno=True) if sys.platform == "linux" else None


class ChildStartError(RuntimeError):
    """A child exited before it answered, or did not answer in time; the message carries the
    tail of its log."""


def _die_with_parent() -> None:
    # Runs in the child between fork and exec; the setting survives exec. The signal follows
    # the *thread* that forked: start children from a long-lived thread.
    if _libc is not None:
        _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


def die_with_parent() -> Callable[[], None] | None:
    """A ``preexec_fn`` for ``subprocess.Popen``, or None where the platform has no such thing."""
    return _die_with_parent if _libc is not None else None


def start_process(
    command: Sequence[str],
    log_path: Path,
    *,
    env: Mapping[str, str] | None = None,
    new_session: bool = False,
) -> subprocess.Popen[bytes]:
    """Start ``command`` with stdout and stderr appended to ``log_path``, no stdin, dying with
    this process. ``new_session``: out of the terminal's process group, so a Ctrl-C reaches only
    the parent, which then stops its children in order."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as log:
        return subprocess.Popen(
            list(command),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            preexec_fn=die_with_parent(),
            start_new_session=new_session,
            env=None if env is None else dict(env),
        )


def log_tail(log_path: Path | None, lines: int = 40) -> str:
    """The last ``lines`` lines of a child's log, or ``(no log)``."""
    if log_path is None or not log_path.exists():
        return "(no log)"
    text = log_path.read_text(encoding="utf-8", errors="replace")
    return "\n".join(text.splitlines()[-lines:])


def answers(url: str, timeout: float = 2.0) -> bool:
    """Whether a GET of ``url`` answers 200 right now."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return False


def wait_for_http(
    process: subprocess.Popen[bytes],
    url: str,
    *,
    name: str,
    log_path: Path,
    timeout: float,
    error: type[ChildStartError] = ChildStartError,
    interval: float = 0.05,
) -> None:
    """Wait until ``url`` answers 200. Raises ``error`` (with the log's tail) when ``process``
    exits first or nothing answers within ``timeout`` seconds; the caller stops the process."""
    deadline = time.monotonic() + timeout
    while True:
        code = process.poll()
        if code is not None:
            raise error(
                f"{name} exited with {code} before answering; log {log_path}:\n{log_tail(log_path)}"
            )
        if answers(url):
            return
        if time.monotonic() > deadline:
            raise error(
                f"{name} did not answer {url} within {timeout:g}s; log {log_path}:\n"
                f"{log_tail(log_path)}"
            )
        time.sleep(interval)


def stop_process(process: subprocess.Popen[bytes] | None, timeout: float = 10.0) -> None:
    """SIGTERM, wait up to ``timeout`` seconds, then SIGKILL. A process already gone is fine."""
    if process is None or process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def unbuffered_env() -> dict[str, str]:
    """This process's environment with ``PYTHONUNBUFFERED=1``: a Python child's log is current."""
    return {**os.environ, "PYTHONUNBUFFERED": "1"}


class Stoppable(Protocol):
    def stop(self, timeout: float = ...) -> None: ...


S = TypeVar("S", bound=Stoppable)


class Running(Generic[S]):
    """What a process started and has not stopped yet (devnets, engines): stopped at exit at the
    latest, when a run ends without stopping them (an interrupted fixture, an exception)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._items: set[S] = set()
        atexit.register(self.stop_all)

    def add(self, item: S) -> None:
        with self._lock:
            self._items.add(item)

    def discard(self, item: S) -> None:
        with self._lock:
            self._items.discard(item)

    def stop_all(self, timeout: float = 5.0) -> None:
        with self._lock:
            items = list(self._items)
        for item in items:
            with contextlib.suppress(Exception):
                item.stop(timeout=timeout)
