"""The serve command's event loop choice: uvloop where installed, asyncio else, a clear error."""

from __future__ import annotations

import asyncio

import pytest

from sidecar import event_loop
from sidecar.config import ConfigError


def test_auto_takes_uvloop_where_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(event_loop, "uvloop_installed", lambda: True)
    assert event_loop.resolve("auto") == "uvloop"
    monkeypatch.setattr(event_loop, "uvloop_installed", lambda: False)
    assert event_loop.resolve("auto") == "asyncio"


def test_an_explicit_uvloop_that_is_missing_is_a_configuration_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(event_loop, "uvloop_installed", lambda: False)
    with pytest.raises(ConfigError, match="--event-loop asyncio"):
        event_loop.resolve("uvloop")
    assert event_loop.resolve("asyncio") == "asyncio"


@pytest.mark.parametrize("name", ["asyncio", "uvloop"])
def test_run_runs_the_coroutine_on_the_chosen_loop(name: str) -> None:
    if name == "uvloop":
        pytest.importorskip("uvloop")

    async def which() -> str:
        return type(asyncio.get_running_loop()).__module__

    module = event_loop.run(which(), name)
    assert module.startswith("uvloop") == (name == "uvloop")
