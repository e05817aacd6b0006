"""Which event loop runs the sidecar: uvloop where it is installed, the standard library's else.

uvloop's transports write, read and wake futures in C, which is most of what relaying a chunk
costs once the framework is out of the hot path (docs/BENCHMARKS.md, issue 12). It is a pinned
dependency on Linux and macOS; elsewhere (or with ``--event-loop asyncio``) the sidecar runs on
asyncio's own loop, unchanged.
"""

from __future__ import annotations

import asyncio
import importlib.util
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from sidecar.config import ConfigError

T = TypeVar("T")


class EventLoopUnavailable(ConfigError):
    """``--event-loop uvloop`` on a machine without uvloop."""


def uvloop_installed() -> bool:
    return importlib.util.find_spec("uvloop") is not None


def resolve(choice: str) -> str:
    """``auto`` -> ``uvloop`` or ``asyncio``; an explicit uvloop that is missing is an error."""
    if choice == "auto":
        return "uvloop" if uvloop_installed() else "asyncio"
    if choice == "uvloop" and not uvloop_installed():
        raise EventLoopUnavailable(
            "--event-loop uvloop: uvloop is not installed (pip install uvloop), "
            "or use --event-loop asyncio"
        )
    return choice


def loop_factory(name: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """The factory for :class:`asyncio.Runner`; None: asyncio's default loop."""
    if name != "uvloop":
        return None
    import uvloop

    return uvloop.new_event_loop


def run(main: Coroutine[Any, Any, T], name: str) -> T:
    """``asyncio.run(main)`` on the loop ``name`` (a resolved choice)."""
    with asyncio.Runner(loop_factory=loop_factory(name)) as runner:
        return runner.run(main)
