"""Shared fixtures: the real llama-cpp-python server, the sidecar, the fault-injecting fake."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.faulty_upstream import FaultyUpstream
from tests.support.sidecar import RunningSidecar, start_sidecar


@pytest.fixture(scope="session")
def llama_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """One real llama-cpp-python server on the tiny model for the whole test session."""
    from tests.support.llama import LlamaServer

    with LlamaServer(tmp_path_factory.mktemp("llama")) as server:
        yield server


@pytest.fixture(scope="session")
def llama_cpp_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """llama.cpp's own llama-server on the same tiny model: the second real engine."""
    from devtools.engine import LlamaCppServer

    with LlamaCppServer(tmp_path_factory.mktemp("llama-cpp")) as server:
        yield server


@pytest.fixture(scope="session", params=["llama-cpp-python", "llama-server"])
def any_engine(request: pytest.FixtureRequest) -> Any:
    """Each real engine in turn (the tests that take it run against both)."""
    name = "llama_server" if request.param == "llama-cpp-python" else "llama_cpp_server"
    return request.getfixturevalue(name)


@pytest.fixture
async def faulty_upstream() -> AsyncIterator[FaultyUpstream]:
    upstream = FaultyUpstream()
    await upstream.start()
    yield upstream
    await upstream.stop()


SidecarFactory = Callable[..., Awaitable[RunningSidecar]]


@pytest.fixture
async def sidecar_factory(tmp_path: Path) -> AsyncIterator[SidecarFactory]:
    """Start sidecars in this test's event loop; each is stopped at teardown."""
    started: list[RunningSidecar] = []

    async def start(
        upstream: str, *, ledger_path: Path | None = None, **options: Any
    ) -> RunningSidecar:
        path = ledger_path or tmp_path / f"ledger-{len(started)}.db"
        running = await start_sidecar(upstream, path, **options)
        started.append(running)
        return running

    yield start
    for running in reversed(started):
        await running.stop()


@pytest.fixture(scope="session")
def devnet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """One real anvil for the session (tests deploy their own contracts on it)."""
    from devtools.devnet import Devnet

    with Devnet.start(log_dir=tmp_path_factory.mktemp("anvil")) as chain:
        yield chain


@pytest.fixture(scope="session")
def postgres(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """One real PostgreSQL 15 server for the session (a database per test: ``new_database``)."""
    from tests.support.postgres import PostgresServer

    with PostgresServer(tmp_path_factory.mktemp("postgres")) as server:
        yield server
