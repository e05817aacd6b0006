"""Child processes the sidecar's tools start (anvil, the engine in tests and the demo).

Two rules, shared by every launcher: a child dies with the process that started it (Linux's
``PR_SET_PDEATHSIG``, so even a ``kill -9`` of the parent leaves no orphan), and stopping is
SIGTERM first (a graceful stop: anvil dumps its state, uvicorn finishes), SIGKILL if it lingers.
"""

from __future__ import annotations

import ctypes
import signal
import subprocess
import sys
from collections.abc import Callable

_PR_SET_PDEATHSIG = 1
# Resolved before any fork: the child should do as little as possible between fork and exec.
_libc = ctypes.CDLL(None, use_errno=True) if sys.platform == "linux" else None


def _die_with_parent() -> None:
    # Runs in the child between fork and exec; the setting survives exec. The signal follows
    # the *thread* that forked: start children from a long-lived thread.
    if _libc is not None:
        _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


def die_with_parent() -> Callable[[], None] | None:
    """A ``preexec_fn`` for ``subprocess.Popen``, or None where the platform has no such thing."""
    return _die_with_parent if _libc is not None else None


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
