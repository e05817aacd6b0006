"""Run the real llama-cpp-python server on the tiny test model, for tests.

The tests meter a real, unchanged engine. They start it with the checkout's one engine launcher,
devtools/engine.py (the demo uses it too; the argv is upstream/serve.py's ``build_command``):
it writes the tiny deterministic model (upstream/make_tiny_model.py: every request yields exactly
``max_tokens`` tokens) once per test session, starts ``python -m llama_cpp.server`` on a free
loopback port, waits until it answers, and stops it again. This module gives it the tests' names.

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

from devtools.engine import DEFAULT_MODEL_ALIAS, free_port, llama_cpp_available, tiny_model_path
from devtools.engine import Engine as LlamaServer
from devtools.engine import EngineError as LlamaServerError

__all__ = [
    "DEFAULT_MODEL_ALIAS",
    "LlamaServer",
    "LlamaServerError",
    "free_port",
    "llama_cpp_available",
    "tiny_model_path",
]
