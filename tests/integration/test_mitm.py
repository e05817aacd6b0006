"""The metering core inside the real mitmdump, in front of the real llama-cpp-python server:
reverse and forward proxy, the OpenAI SDK streaming through it, counts in the ledger, the first
byte before the end, and a kill -9 of mitmdump losing nothing of a finished response."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from openai import OpenAI

from tests.support.llama import free_port

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
MITMDUMP = REPO / ".venv-mitm" / "bin" / "mitmdump"
ADDON = REPO / "sidecar" / "shells" / "mitm_addon.py"


def rows(ledger: Path) -> list[tuple]:
    conn = sqlite3.connect(ledger)
    try:
        return conn.execute(
            "SELECT job_id, endpoint, completion_tokens, source, state FROM usage_records"
            " ORDER BY started_ms, rowid"
        ).fetchall()
    finally:
        conn.close()


class Mitmdump:
    def __init__(self, engine_url: str, ledger: Path, log: Path, *mode: str) -> None:
        self.port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("SIDECAR_")}
        env.update(SIDECAR_LEDGER=f"sqlite:///{ledger}", SIDECAR_UPSTREAM=engine_url)
        self.log = log
        self.proc = subprocess.Popen(
            [str(MITMDUMP), "-s", str(ADDON), *mode, "-p", str(self.port)],
            env=env,
            stdout=open(log, "wb"),
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 30
        while b"sidecar metering in mitmproxy" not in log.read_bytes():
            assert self.proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(15)


@pytest.fixture
def mitm(llama_server, tmp_path: Path) -> Iterator:
    started: list[Mitmdump] = []

    def start(*mode: str) -> Mitmdump:
        proxy = Mitmdump(llama_server.base_url, tmp_path / "ledger.db", tmp_path / "m.log", *mode)
        started.append(proxy)
        return proxy

    yield start
    for proxy in started:
        proxy.stop(signal.SIGKILL)


def test_reverse_proxy_streams_unbuffered_and_records_before_the_end(
    llama_server, mitm, tmp_path: Path
) -> None:
    ledger = tmp_path / "ledger.db"
    proxy = mitm("--mode", f"reverse:{llama_server.base_url}")
    client = OpenAI(base_url=f"http://127.0.0.1:{proxy.port}/v1", api_key="x", max_retries=0)
    answer = client.completions.create(
        model=llama_server.model_id, prompt="hi", max_tokens=6, extra_body={"job_id": 91}
    )
    assert answer.usage is not None and answer.usage.completion_tokens == 6
    stream = client.chat.completions.create(
        model=llama_server.model_id,
        messages=[{"role": "user", "content": "Tell me a long story."}],
        max_tokens=300,
        stream=True,
        extra_body={"job_id": 91},
    )
    chunks = 0
    for piece in stream:
        if piece.choices and piece.choices[0].delta.content:
            chunks += 1
            if chunks == 1:
                # The first token is here while the stream runs: nothing final recorded yet.
                assert [r for r in rows(ledger) if r[1] == "chat"] == []
    assert chunks == 300
    assert rows(ledger) == [
        ("91", "completions", 6, "reported", "final"),
        ("91", "chat", 300, "counted", "final"),
    ]
    # kill -9 after the answers: nothing of them is lost (committed before their last byte).
    proxy.stop(signal.SIGKILL)
    assert [r[4] for r in rows(ledger)] == ["final", "final"]


def test_forward_proxy_for_clients_that_only_set_a_proxy(
    llama_server, mitm, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    proxy = mitm()  # mitmproxy's regular mode: the client only sets HTTP_PROXY
    monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{proxy.port}")
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    client = OpenAI(base_url=llama_server.base_url + "/v1", api_key="x", max_retries=0)
    stream = client.completions.create(
        model=llama_server.model_id,
        prompt="Once upon a time",
        max_tokens=12,
        stream=True,
        extra_body={"job_id": 92},
        extra_headers={"X-Job-Id": "92"},
    )
    assert sum(1 for c in stream if c.choices and c.choices[0].text) == 12
    assert rows(tmp_path / "ledger.db") == [("92", "completions", 12, "counted", "final")]
