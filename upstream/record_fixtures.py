"""Record real responses of the llama-cpp-python server into tests/fixtures/recorded/.

    python upstream/record_fixtures.py                     # start the engine on the tiny model
    python upstream/record_fixtures.py --base-url http://127.0.0.1:8000   # a running engine

Each recording is the response body exactly as the engine sent it (HTTP chunked framing removed,
nothing else touched), beside a ``NAME.json`` saying what metering must find in it, in the format
of tests/fixtures/streams/ (see the README in the output folder):

* ``NAME.sse``: a stream; ``completion_tokens`` is the engine's own ``usage.completion_tokens`` for
  the same request sent without streaming, which must equal the number of content chunks.
* ``NAME.body``: a non-stream JSON body; the expected usage is the one it reports.
* ``quirks/``: engine behaviour metering handles specially, kept out of the generic fixture tests.

Greedy requests (temperature 0) make stream and non-stream comparable token for token; the
sampled one passes a ``seed``. With the tiny model every count is also checked against
``max_tokens``. The recorder fails, writing nothing, if any of these checks fails.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import importlib.metadata
import importlib.util
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE.parent / "tests" / "fixtures" / "recorded"
MODEL_NAME = "sidecar-tiny"  # sent as the request's model, so recordings hold no temp paths
CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
MESSAGES = [
    {"role": "system", "content": "You are a terse assistant."},
    {"role": "user", "content": "Say something about metering tokens, café style. \U0001f642"},
]


@dataclass(frozen=True)
class Recording:
    name: str
    path: str
    body: dict[str, Any]
    stream: bool
    folder: str = ""
    note: str = ""
    # Expected content chunks when the engine's count and the visible chunks differ (quirks).
    content_chunks_offset: int = 0


def _chat(max_tokens: int, **extra: Any) -> dict[str, Any]:
    return {"model": MODEL_NAME, "messages": MESSAGES, "max_tokens": max_tokens, **extra}


def _completion(prompt: str, max_tokens: int, **extra: Any) -> dict[str, Any]:
    return {"model": MODEL_NAME, "prompt": prompt, "max_tokens": max_tokens, **extra}


RECORDINGS = [
    Recording("llama_cpp_python_chat_stream", CHAT, _chat(16, temperature=0), stream=True),
    Recording(
        "llama_cpp_python_chat_stream_include_usage",
        CHAT,
        _chat(16, temperature=0, stream_options={"include_usage": True}),
        stream=True,
        note="include_usage is ignored: no usage chunk, same shape as without it",
    ),
    Recording(
        "llama_cpp_python_chat_stream_long_sampled",
        CHAT,
        _chat(300, temperature=0.7, seed=7),
        stream=True,
    ),
    Recording(
        "llama_cpp_python_completions_stream",
        COMPLETIONS,
        _completion("The meter counts every token", 16, temperature=0),
        stream=True,
    ),
    Recording("llama_cpp_python_chat", CHAT, _chat(16, temperature=0), stream=False),
    Recording(
        "llama_cpp_python_completions",
        COMPLETIONS,
        _completion("The meter counts every token", 16, temperature=0),
        stream=False,
    ),
    Recording(
        "llama_cpp_python_completions_empty_prompt_stream",
        COMPLETIONS,
        _completion("", 6, temperature=0),
        stream=True,
        folder="quirks",
        note=(
            "An empty prompt starts the completion from BOS, which llama-cpp-python counts as "
            "the first completion token and streams as an empty-text chunk: usage says 6, "
            "5 chunks carry text. Counting content-bearing chunks bills one token less."
        ),
        content_chunks_offset=-1,
    ),
]


def _post(base_url: str, path: str, body: dict[str, Any]) -> tuple[str, bytes]:
    """Content type and the body bytes exactly as received."""
    url = urllib.parse.urlsplit(base_url)
    connection = http.client.HTTPConnection(url.hostname or "127.0.0.1", url.port, timeout=300)
    try:
        connection.request(
            "POST", path, body=json.dumps(body), headers={"Content-Type": "application/json"}
        )
        response = connection.getresponse()
        raw = response.read()
        if response.status != 200:
            raise RuntimeError(f"{path} answered {response.status}: {raw[:500]!r}")
        return response.getheader("Content-Type", ""), raw
    finally:
        connection.close()


def _stream_chunks(raw: bytes) -> list[dict[str, Any]]:
    if not raw.endswith(b"data: [DONE]\n\n"):
        raise RuntimeError(f"stream does not end with [DONE]: {raw[-200:]!r}")
    events = raw.split(b"\n\n")[:-1]
    return [json.loads(event.removeprefix(b"data: ")) for event in events[:-1]]


def _text(path: str, choice: dict[str, Any], stream: bool) -> str:
    if path == COMPLETIONS:
        return str(choice.get("text") or "")
    holder = choice["delta"] if stream else choice["message"]
    return str(holder.get("content") or "")


def record(base_url: str, out: Path, tiny_model: bool) -> list[Path]:
    """Record every fixture; return the written paths. Nothing is written if a check fails."""
    files: dict[Path, bytes] = {}
    engine = f"llama-cpp-python {importlib.metadata.version('llama_cpp_python')}"
    for item in RECORDINGS:
        content_type, raw = _post(base_url, item.path, {**item.body, "stream": item.stream})
        # The same request without streaming gives the engine's own count of this generation.
        reference_body = {k: v for k, v in item.body.items() if k != "stream_options"}
        _, reference_raw = _post(base_url, item.path, {**reference_body, "stream": False})
        reference = json.loads(reference_raw)
        usage = reference["usage"]
        max_tokens = item.body["max_tokens"]
        if tiny_model and usage["completion_tokens"] != max_tokens:
            raise RuntimeError(f"{item.name}: {usage} but max_tokens={max_tokens}")
        endpoint = "chat" if item.path == CHAT else "completions"
        expected: dict[str, Any] = {"endpoint": endpoint}
        if item.stream:
            chunks = _stream_chunks(raw)
            texts = [_text(item.path, chunk["choices"][0], True) for chunk in chunks]
            content_chunks = sum(1 for text in texts if text)
            want = usage["completion_tokens"] + item.content_chunks_offset
            if content_chunks != want:
                raise RuntimeError(f"{item.name}: {content_chunks} content chunks, want {want}")
            if "".join(texts) != _text(item.path, reference["choices"][0], False):
                raise RuntimeError(f"{item.name}: streamed text differs from the non-stream text")
            if any("usage" in chunk for chunk in chunks):
                raise RuntimeError(f"{item.name}: llama-cpp-python now sends usage in streams")
            expected |= {
                # What the metering core must report for this stream (tests/unit/test_usage.py).
                "completion_tokens": content_chunks,
                "events": len(chunks) + 1,  # the JSON chunks and [DONE]
                "prompt_tokens": None,
                "source": "counted",
                "usage_chunks": 0,
                "anomalies": 0,
                "content_chunks": content_chunks,
                "engine_usage_same_request_non_stream": usage,
            }
            suffix = ".sse"
        else:
            body_usage = json.loads(raw)["usage"]
            expected |= {
                "completion_tokens": body_usage["completion_tokens"],
                "prompt_tokens": body_usage["prompt_tokens"],
                "source": "reported",
            }
            suffix = ".body"
        expected["recorded"] = {
            "engine": engine,
            "model": "upstream/make_tiny_model.py" if tiny_model else "unknown",
            "path": item.path,
            "request": {**item.body, "stream": item.stream},
            "content_type": content_type,
        }
        if item.note:
            expected["note"] = item.note
        folder = out / item.folder if item.folder else out
        files[folder / (item.name + suffix)] = raw
        files[folder / (item.name + ".json")] = (json.dumps(expected, indent=2) + "\n").encode()
    for path, data in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return list(files)


def _load(name: str) -> Any:
    """Import a sibling script by path (upstream/ is scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(f"_upstream_{name}", HERE / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@contextlib.contextmanager
def tiny_engine() -> Iterator[str]:
    """The real server on the tiny model, on a free loopback port; stopped on exit."""
    serve = _load("serve")
    with tempfile.TemporaryDirectory(prefix="sidecar-record-") as tmp:
        model = _load("make_tiny_model").write_tiny_model(Path(tmp) / "tiny.gguf")
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        log_path = Path(tmp) / "server.log"
        with log_path.open("wb") as log:
            process = subprocess.Popen(
                serve.build_command(model, port=port, model_alias=MODEL_NAME),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        base_url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 60
            while True:
                with contextlib.suppress(OSError):
                    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
                    connection.request("GET", "/v1/models")
                    if connection.getresponse().status == 200:
                        break
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"engine did not start:\n{log_path.read_text()[-3000:]}")
                time.sleep(0.05)
            yield base_url
        finally:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="default: %(default)s")
    parser.add_argument(
        "--base-url",
        help="record from this running llama-cpp-python server instead of starting the tiny model "
        "(counts are then checked against its non-stream usage only)",
    )
    args = parser.parse_args(argv)
    if args.base_url:
        written = record(args.base_url, args.out, tiny_model=False)
    else:
        with tiny_engine() as base_url:
            written = record(base_url, args.out, tiny_model=True)
    for path in written:
        print(os.path.relpath(path))
    return 0


if __name__ == "__main__":
    sys.exit(main())
