"""Start the unchanged upstream engine: llama-cpp-python's OpenAI-compatible server.

The sidecar never modifies the engine; this launcher only fixes the flags the metering relies on
and picks sensible defaults for the machine it runs on.

    python upstream/serve.py                          # tiny test model, CPU, 127.0.0.1:8000
    python upstream/serve.py --model m.gguf --port 8080 --gpu
    python upstream/serve.py --model m.gguf -- --chat_format chatml   # extra server flags

Options (each also read from the environment variable in brackets; flags win):

--model PATH          GGUF file to serve [UPSTREAM_MODEL]. Without it the tiny deterministic test
                      model (upstream/make_tiny_model.py) is written to ``--tiny-model-path`` first
                      (only if missing) and served.
--tiny-model-path P   where the tiny model is cached [UPSTREAM_TINY_MODEL],
                      default ``var/models/tiny.gguf`` under the repository (git-ignored).
--host HOST           bind address [UPSTREAM_HOST], default 127.0.0.1: only the sidecar should
                      reach the engine, since the engine's own port is unmetered.
--port N              [UPSTREAM_PORT], default 8000.
--n-ctx N             context window [UPSTREAM_N_CTX], default 2048 (enough for every test; raise it
                      for real models, the KV cache grows with it).
--threads N           CPU threads for generation [UPSTREAM_THREADS], default: half the cores
                      (llama-cpp-python's own default: one per physical core on hyperthreaded
                      machines, and it leaves room for the sidecar; on the tiny model one thread
                      ran 630 tokens/s against 480 with two). Prompt processing uses all cores.
--gpu                 offload every layer to the GPU (``--n_gpu_layers -1``) [UPSTREAM_GPU=1].
                      Needs llama-cpp-python built with CUDA (see upstream/README.md).
--n-gpu-layers N      offload only N layers [UPSTREAM_N_GPU_LAYERS]; overrides --gpu.
--model-alias NAME    the ``model`` name the engine reports [UPSTREAM_MODEL_ALIAS]; by default
                      llama-cpp-python reports the model path.
--dry-run             print the command instead of running it.
-- ARGS...            anything after ``--`` is passed to ``llama_cpp.server`` unchanged.

Always passed: ``--interrupt_requests False``. With the server's default (True) a new request
aborts the stream already running, which would cut metered streams short whenever two clients
overlap (FACTS.md §2).

The process is replaced by the server (``exec``), so signals from a supervisor (systemd, compose)
reach the engine directly and nothing is left behind.

``build_command`` is the engine's argv, defined here only: devtools/engine.py (the checkout's one
launcher, used by the demo and the tests) loads this file by path and builds its argv with it,
and writes the tiny model with ``ensure_tiny_model``. This file must keep working alone: the engine
image (upstream/Dockerfile) copies only it and runs it with nothing but llama-cpp-python, so it
imports the standard library only (make_tiny_model.py lazily, when no --model is given).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_TINY_MODEL = REPO_ROOT / "var" / "models" / "tiny.gguf"
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
DEFAULT_N_CTX = 2048


def build_command(
    model: Path | str,
    *,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    n_ctx: int = DEFAULT_N_CTX,
    threads: int | None = None,
    n_gpu_layers: int = 0,
    model_alias: str | None = None,
    extra_args: Sequence[str] = (),
    python: str = sys.executable,
) -> list[str]:
    """Return the argv that starts llama-cpp-python's server with the flags metering relies on."""
    cores = os.cpu_count() or 1
    threads = threads if threads is not None else max(1, cores // 2)
    command = [
        python,
        "-m",
        "llama_cpp.server",
        "--model",
        str(model),
        "--host",
        host,
        "--port",
        str(port),
        "--n_ctx",
        str(n_ctx),
        "--n_threads",
        str(threads),
        # Prompt processing is batched and compute-bound: every core keeps time to first token low.
        "--n_threads_batch",
        str(cores),
        "--n_gpu_layers",
        str(n_gpu_layers),
        "--interrupt_requests",
        "False",
    ]
    if model_alias:
        command += ["--model_alias", model_alias]
    return command + list(extra_args)


def ensure_tiny_model(path: Path = DEFAULT_TINY_MODEL) -> Path:
    """Write the tiny test model to ``path`` unless it is already there."""
    if not path.exists():
        # Loaded lazily and by path: serving a real model must not need numpy/gguf, and
        # upstream/ is a folder of scripts, not an installed package.
        spec = importlib.util.spec_from_file_location(
            "_upstream_make_tiny_model", Path(__file__).resolve().parent / "make_tiny_model.py"
        )
        assert spec is not None and spec.loader is not None
        maker = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(maker)
        # Written beside and renamed, so a concurrent reader never sees half a file.
        partial = path.with_name(path.name + f".{os.getpid()}.partial")
        maker.write_tiny_model(partial)
        partial.replace(path)
    return path


def _env_int(name: str, default: int | None) -> int | None:
    value = os.environ.get(name)
    return int(value) if value not in (None, "") else default


def parse_args(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    argv = list(argv)
    extra: list[str] = []
    if "--" in argv:
        split = argv.index("--")
        argv, extra = argv[:split], argv[split + 1 :]
    parser = argparse.ArgumentParser(
        description="Start llama-cpp-python's OpenAI-compatible server for the sidecar.",
        epilog="Run `pydoc upstream/serve.py` or read its docstring for details.",
    )
    env = os.environ.get
    parser.add_argument("--model", type=Path, default=env("UPSTREAM_MODEL") or None)
    parser.add_argument(
        "--tiny-model-path", type=Path, default=Path(env("UPSTREAM_TINY_MODEL", DEFAULT_TINY_MODEL))
    )
    parser.add_argument("--host", default=env("UPSTREAM_HOST", DEFAULT_HOST))
    parser.add_argument("--port", type=int, default=_env_int("UPSTREAM_PORT", DEFAULT_PORT))
    parser.add_argument("--n-ctx", type=int, default=_env_int("UPSTREAM_N_CTX", DEFAULT_N_CTX))
    parser.add_argument("--threads", type=int, default=_env_int("UPSTREAM_THREADS", None))
    parser.add_argument(
        "--gpu", action="store_true", default=env("UPSTREAM_GPU", "") in ("1", "true", "yes")
    )
    parser.add_argument("--n-gpu-layers", type=int, default=_env_int("UPSTREAM_N_GPU_LAYERS", None))
    parser.add_argument("--model-alias", default=env("UPSTREAM_MODEL_ALIAS") or None)
    parser.add_argument("--dry-run", action="store_true")
    return parser.parse_args(argv), extra


def main(argv: Sequence[str] | None = None) -> int:
    args, extra = parse_args(sys.argv[1:] if argv is None else argv)
    if args.n_gpu_layers is not None:
        n_gpu_layers = args.n_gpu_layers
    else:
        n_gpu_layers = -1 if args.gpu else 0
    if args.model is not None:
        model = args.model
    elif args.dry_run:
        model = args.tiny_model_path
    else:
        model = ensure_tiny_model(args.tiny_model_path)
    command = build_command(
        model,
        host=args.host,
        port=args.port,
        n_ctx=args.n_ctx,
        threads=args.threads,
        n_gpu_layers=n_gpu_layers,
        model_alias=args.model_alias,
        extra_args=extra,
    )
    if args.dry_run:
        print(shlex.join(command))
        return 0
    sys.stdout.flush()
    os.execv(command[0], command)
    return 0  # not reached; keeps the type checker and readers happy


if __name__ == "__main__":
    sys.exit(main())
