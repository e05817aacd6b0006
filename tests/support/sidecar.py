"""Start the real sidecar app in-process (for most tests) or as a process (for kill -9 tests)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from sidecar.app import LEDGER_KEY, METRICS_KEY, build_app, make_runner
from sidecar.config import load_settings
from sidecar.ledger import Ledger
from sidecar.shells.connections import LimitedSite
from tests.support.llama import free_port

REPO = Path(__file__).resolve().parents[2]


@dataclass
class RunningSidecar:
    url: str
    runner: web.AppRunner
    ledger: Ledger

    async def stop(self) -> None:
        await self.runner.cleanup()


async def start_sidecar(upstream: str, ledger_path: Path, **options: Any) -> RunningSidecar:
    """The whole app (same wiring as ``sidecar serve``) on a free loopback port."""
    port = free_port()
    flags = {
        "upstream": upstream,
        "ledger": f"sqlite:///{ledger_path}",
        "listen": f"127.0.0.1:{port}",
        **options,
    }
    settings = load_settings(flags, environ={})
    app = build_app(settings)
    runner = make_runner(app)
    await runner.setup()
    site = LimitedSite(runner, "127.0.0.1", port, settings.max_connections, app[METRICS_KEY])
    await site.start()
    return RunningSidecar(url=f"http://127.0.0.1:{port}", runner=runner, ledger=app[LEDGER_KEY])


class SidecarProcess:
    """``python -m sidecar serve`` as a child process, for crash and signal tests."""

    def __init__(self, upstream: str, ledger_path: Path | str, log_path: Path, *extra: str) -> None:
        """``ledger_path``: a SQLite file, or a postgresql:// URL."""
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        cmd = [
            sys.executable,
            "-m",
            "sidecar",
            "serve",
            "--upstream",
            upstream,
            "--ledger",
            ledger_path if isinstance(ledger_path, str) else f"sqlite:///{ledger_path}",
            "--listen",
            f"127.0.0.1:{self.port}",
            *extra,
        ]
        env = {k: v for k, v in os.environ.items() if not k.startswith("SIDECAR_")}
        self._log = open(log_path, "ab")
        self.proc = subprocess.Popen(
            cmd, stdout=self._log, stderr=subprocess.STDOUT, cwd=REPO, env=env
        )

    async def wait_ready(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        async with aiohttp.ClientSession() as session:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"sidecar exited early: {self.log_tail()}")
                try:
                    async with session.get(self.url + "/sidecar/health") as resp:
                        if resp.status in (200, 401):  # 401: up, behind an admin token
                            return
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.05)
        raise TimeoutError(f"sidecar not ready in {timeout}s: {self.log_tail()}")

    def log_tail(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-3000:]
        except OSError:
            return ""

    def kill9(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(40)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()
        return self.proc.returncode
