"""The checkout's one engine launcher: llama-cpp-python's server, unchanged, as a child process.

The demo, the tests (tests/support/llama.py) and anyone in a checkout start the engine here. The
argv is not built here: it comes from ``build_command`` in upstream/serve.py, its one definition
(the flags metering relies on, ``--interrupt_requests False`` always), which must stay a
standalone script because the engine image copies it alone. This module loads it by path, starts
the server, waits until ``/v1/models`` answers, and stops it again.

    with Engine(log_dir) as engine:           # log_dir: where the server's log goes
        urllib.request.urlopen(engine.base_url + "/v1/models")

``Engine(log_dir=None, *, model=None, host="127.0.0.1", port=None, n_ctx=2048, threads=None,
model_alias="sidecar-tiny", startup_timeout=60.0, extra_args=(), log_name=None,
new_session=False)``: ``model=None`` serves the tiny deterministic test model (written once per
process by upstream/serve.py's ``ensure_tiny_model``), ``port=None`` picks a free one,
``log_name`` names the log file in ``log_dir`` (default ``llama-server-PORT.log``),
``new_session=True`` keeps a terminal's Ctrl-C away from the engine (the caller stops it).
Attributes: ``base_url`` (``http://127.0.0.1:PORT``), ``api_url`` (``.../v1``), ``host``,
``port``, ``n_ctx``, ``model``, ``model_id``, ``process``, ``log_path``; methods ``start()``,
``stop()``, ``log_tail()``, ``post(path, body) -> bytes``.

No orphans: the server is stopped by ``stop()``/``__exit__``, by an ``atexit`` hook if the run ends
without that, and on Linux the kernel sends it SIGTERM when the thread that started it dies, even
by SIGKILL (devtools/children.py). Start it from a long-lived thread.
"""

from __future__ import annotations

import atexit
import importlib.util
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType, TracebackType
from typing import Any, Self

from devtools.children import (
    ChildStartError,
    Running,
    log_tail,
    start_process,
    stop_process,
    unbuffered_env,
    wait_for_http,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
UPSTREAM_DIR = REPO_ROOT / "upstream"
DEFAULT_MODEL_ALIAS = "sidecar-tiny"

_lock = threading.Lock()
_tiny_model: Path | None = None
_running: Running[Engine] = Running()


def load_upstream(name: str) -> ModuleType:
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


def build_command(model: Path | str, **options: Any) -> list[str]:
    """The engine's argv: upstream/serve.py's ``build_command`` (its options, its defaults)."""
    command: list[str] = load_upstream("serve").build_command(model, **options)
    return command


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
            _tiny_model = Path(load_upstream("serve").ensure_tiny_model(folder / "tiny.gguf"))
        return _tiny_model


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago (the caller retries if another process takes it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


class EngineError(ChildStartError):
    """The engine did not start; the message carries the tail of its log."""


class Engine:
    """The real llama-cpp-python server as a subprocess, on a free loopback port."""

    def __init__(
        self,
        log_dir: Path | None = None,
        *,
        model: Path | str | None = None,
        host: str = "127.0.0.1",
        port: int | None = None,
        n_ctx: int = 2048,
        threads: int | None = None,
        model_alias: str | None = DEFAULT_MODEL_ALIAS,
        startup_timeout: float = 60.0,
        extra_args: Sequence[str] = (),
        log_name: str | None = None,
        new_session: bool = False,
    ) -> None:
        self.model = Path(model) if model is not None else None
        self.host = host
        self.port = port
        self.n_ctx = n_ctx
        self.threads = threads
        self.model_alias = model_alias
        self.log_dir = log_dir
        self.log_name = log_name
        self.startup_timeout = startup_timeout
        self.extra_args = tuple(extra_args)
        self.new_session = new_session
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path: Path | None = None

    # -- addresses -------------------------------------------------------------------------

    @property
    def base_url(self) -> str:
        """``http://host:port``, without ``/v1``."""
        if self.port is None:
            raise EngineError("server not started")
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
            except EngineError as error:
                self.stop()
                if fixed_port or "address already in use" not in str(error) or attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def _spawn_and_wait(self) -> None:
        assert self.log_dir is not None and self.port is not None and self.model is not None
        command = build_command(
            self.model,
            host=self.host,
            port=self.port,
            n_ctx=self.n_ctx,
            threads=self.threads,
            model_alias=self.model_alias,
            extra_args=self.extra_args,
        )
        self.log_path = self.log_dir / (self.log_name or f"llama-server-{self.port}.log")
        self.process = start_process(
            command, self.log_path, env=unbuffered_env(), new_session=self.new_session
        )
        _running.add(self)
        wait_for_http(
            self.process,
            self.base_url + "/v1/models",
            name="llama-cpp-python server",
            log_path=self.log_path,
            timeout=self.startup_timeout,
            error=EngineError,
        )

    def stop(self, timeout: float = 10.0) -> None:
        """Terminate (uvicorn shuts down gracefully), then kill if it lingers."""
        process, self.process = self.process, None
        _running.discard(self)
        stop_process(process, timeout)

    def log_tail(self, lines: int = 40) -> str:
        return log_tail(self.log_path, lines)

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


LLAMA_SERVER_BINARY = REPO_ROOT / "var" / "llama.cpp" / "build" / "bin" / "llama-server"


class LlamaCppServer(Engine):
    """llama.cpp's own ``llama-server`` (the second real engine), built by
    ``upstream/build_llama_server.py`` from the same llama.cpp as llama-cpp-python; same
    interface as :class:`Engine`. One slot (``-np 1``), so ``n_ctx`` is each request's window."""

    def _spawn_and_wait(self) -> None:
        assert self.log_dir is not None and self.port is not None and self.model is not None
        if not LLAMA_SERVER_BINARY.exists():
            raise EngineError(
                f"{LLAMA_SERVER_BINARY} is not built: run `make test` or "
                "`python upstream/build_llama_server.py var/llama.cpp`"
            )
        command = [
            str(LLAMA_SERVER_BINARY),
            "--model",
            str(self.model),
            "--host",
            self.host,
            "--port",
            str(self.port),
            "--ctx-size",
            str(self.n_ctx),
            "--parallel",
            "1",
            "--threads",
            str(self.threads or 1),
            "--no-webui",
            *(("--alias", self.model_alias) if self.model_alias else ()),
            *self.extra_args,
        ]
        self.log_path = self.log_dir / (self.log_name or f"llama-cpp-server-{self.port}.log")
        self.process = start_process(command, self.log_path, new_session=self.new_session)
        _running.add(self)
        wait_for_http(
            self.process,
            self.base_url + "/health",  # 503 while the model loads, 200 once it serves
            name="llama-server",
            log_path=self.log_path,
            timeout=self.startup_timeout,
            error=EngineError,
        )
