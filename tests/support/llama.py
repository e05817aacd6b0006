"""Run the real llama-cpp-python server on the tiny test model, for tests.

The tests meter a real, unchanged engine. This module writes the tiny deterministic model
(upstream/make_tiny_model.py: every request yields exactly ``max_tokens`` tokens) once per test
session, starts ``python -m llama_cpp.server`` with the same flags as upstream/serve.py on a free
loopback port, waits until it answers, and stops it again.

    with LlamaServer(log_dir) as engine:      # log_dir: where the server's log goes
        urllib.request.urlopen(engine.base_url + "/v1/models")

``LlamaServer(log_dir=None, *, model=None, host="127.0.0.1", port=None, n_ctx=2048, threads=None,
model_alias="sidecar-tiny", startup_timeout=60.0, extra_args=())``: ``model=None`` serves the tiny
model, ``port=None`` picks a free one. Attributes: ``base_url`` (``http://127.0.0.1:PORT``),
``api_url`` (``.../v1``), ``host``, ``port``, ``n_ctx``, ``model``, ``model_id``, ``process``,
``log_path``; methods ``start()``, ``stop()``, ``log_tail()``, ``post(path, body) -> bytes``.

Wiring into pytest (tests/conftest.py)::

    @pytest.fixture(scope="session")
    def llama_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LlamaServer]:
        with LlamaServer(tmp_path_factory.mktemp("llama")) as server:
            yield server

No orphans: the server is stopped by ``stop()``/``__exit__``, by an ``atexit`` hook if the test run
ends without that, and on Linux the kernel sends it SIGTERM when the process that started it dies,
even by SIGKILL (``PR_SET_PDEATHSIG``). Start it from a long-lived thread (pytest's main thread):
the signal follows the *thread* that forked it.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType, TracebackType
from typing import Any, Self

from sidecar.children import die_with_parent, stop_process

REPO_ROOT = Path(__file__).resolve().parents[2]
UPSTREAM_DIR = REPO_ROOT / "upstream"
DEFAULT_MODEL_ALIAS = "sidecar-tiny"

_lock = threading.Lock()
_tiny_model: Path | None = None
_running: set[LlamaServer] = set()


def _load_upstream(name: str) -> ModuleType:
    """Import ``upstream/<name>.py`` by path: upstream/ is scripts, not an installed package."""
    module_name = f"_sidecar_upstream_{name}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, UPSTREAM_DIR / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    return module


def llama_cpp_available() -> bool:
    """Whether this interpreter can run the engine (for ``pytest.skip`` where it cannot)."""
    return importlib.util.find_spec("llama_cpp") is not None and (
        importlib.util.find_spec("gguf") is not None
    )


def tiny_model_path() -> Path:
    """The tiny test model, written once per process into a temporary folder removed at exit."""
    global _tiny_model
    with _lock:
        if _tiny_model is None or not _tiny_model.exists():
            folder = Path(tempfile.mkdtemp(prefix="sidecar-tiny-model-"))
            atexit.register(shutil.rmtree, folder, ignore_errors=True)
            _tiny_model = _load_upstream("make_tiny_model").write_tiny_model(folder / "tiny.gguf")
        return _tiny_model


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago (the caller retries if another process takes it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


class LlamaServerError(RuntimeError):
    """The engine did not start; the message carries the tail of its log."""


class LlamaServer:
    """The real llama-cpp-python server as a subprocess, on a free loopback port."""

    def __init__(
        self,
        log_dir: Path | None = None,
        *,
        model: Path | None = None,
        host: str = "127.0.0.1",
        port: int | None = None,
        n_ctx: int = 2048,
        threads: int | None = None,
        model_alias: str | None = DEFAULT_MODEL_ALIAS,
        startup_timeout: float = 60.0,
        extra_args: Sequence[str] = (),
    ) -> None:
        self.model = model
        self.host = host
        self.port = port
        self.n_ctx = n_ctx
        self.threads = threads
        self.model_alias = model_alias
        self.log_dir = log_dir
        self.startup_timeout = startup_timeout
        self.extra_args = tuple(extra_args)
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path: Path | None = None

    # -- addresses -------------------------------------------------------------------------

    @property
    def base_url(self) -> str:
        """``http://host:port``, without ``/v1``."""
        if self.port is None:
            raise LlamaServerError("server not started")
        return f"http://{self.host}:{self.port}"

    @property
    def api_url(self) -> str:
        """``http://host:port/v1``, the OpenAI client's ``base_url``."""
        return self.base_url + "/v1"

    @property
    def model_id(self) -> str:
        """The model's name in ``/v1/models``. Responses echo the request's ``model`` field
        (any name is accepted) and report the model's file path when the request has none."""
        return self.model_alias or str(self.model)

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> Self:
        if self.process is not None:
            return self
        if self.model is None:
            self.model = tiny_model_path()
        if self.log_dir is None:
            # Without a caller's folder the log lives until exit; errors quote its tail anyway.
            self.log_dir = Path(tempfile.mkdtemp(prefix="sidecar-llama-log-"))
            atexit.register(shutil.rmtree, self.log_dir, ignore_errors=True)
        fixed_port = self.port is not None
        # A free port can be taken between the probe and the server's bind; try a few.
        for attempt in range(1 if fixed_port else 3):
            if not fixed_port:
                self.port = free_port(self.host)
            try:
                self._spawn_and_wait()
                return self
            except LlamaServerError as error:
                self.stop()
                if fixed_port or "address already in use" not in str(error) or attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def _spawn_and_wait(self) -> None:
        assert self.log_dir is not None and self.port is not None
        command = _load_upstream("serve").build_command(
            self.model,
            host=self.host,
            port=self.port,
            n_ctx=self.n_ctx,
            threads=self.threads,
            model_alias=self.model_alias,
            extra_args=self.extra_args,
        )
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.log_dir / f"llama-server-{self.port}.log"
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                preexec_fn=die_with_parent(),
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        with _lock:
            _running.add(self)
        deadline = time.monotonic() + self.startup_timeout
        while True:
            code = self.process.poll()
            if code is not None:
                raise LlamaServerError(
                    f"llama-cpp-python server exited with {code} before answering; "
                    f"log {self.log_path}:\n{self.log_tail()}"
                )
            if self._answers():
                return
            if time.monotonic() > deadline:
                raise LlamaServerError(
                    f"llama-cpp-python server did not answer /v1/models within "
                    f"{self.startup_timeout:g}s; log {self.log_path}:\n{self.log_tail()}"
                )
            time.sleep(0.05)

    def _answers(self) -> bool:
        try:
            with urllib.request.urlopen(self.base_url + "/v1/models", timeout=2) as response:
                return bool(response.status == 200)
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            return False

    def stop(self, timeout: float = 10.0) -> None:
        """Terminate (uvicorn shuts down gracefully), then kill if it lingers."""
        process, self.process = self.process, None
        with _lock:
            _running.discard(self)
        stop_process(process, timeout)

    def log_tail(self, lines: int = 40) -> str:
        if self.log_path is None or not self.log_path.exists():
            return "(no log)"
        text = self.log_path.read_text(encoding="utf-8", errors="replace")
        return "\n".join(text.splitlines()[-lines:])

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    # -- small synchronous client, for readiness checks and fixtures recording -------------

    def post(self, path: str, body: dict[str, Any], timeout: float = 120.0) -> bytes:
        """POST JSON to ``path`` (e.g. ``/v1/completions``); return the raw response body."""
        request = urllib.request.Request(
            self.base_url + path,
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return bytes(response.read())


@atexit.register
def _stop_all() -> None:
    # Last resort when a test run ends without stopping its servers (e.g. an interrupted fixture).
    with _lock:
        servers = list(_running)
    for server in servers:
        with contextlib.suppress(Exception):
            server.stop(timeout=5.0)
