"""The end-to-end demo behind ``make demo``: engine, sidecar, OpenAI SDK client, per-job table.

Everything it starts, it stops, even on Ctrl-C or failure.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from sidecar.cli import format_jobs_table
from sidecar.ledger import JobTotals


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_http(url: str, proc: subprocess.Popen[bytes], log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[:3]} exited early; its log:\n{_tail(log)}")
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.1)
    raise TimeoutError(f"{url} did not answer within {timeout:.0f} s; log:\n{_tail(log)}")


def _tail(path: Path, size: int = 2000) -> str:
    try:
        return path.read_text(errors="replace")[-size:]
    except OSError:
        return "(no log)"


@contextlib.contextmanager
def _process(cmd: list[str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    with open(log, "ab") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            yield proc
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(10)


@dataclass
class _Seen:
    """What the client itself saw per job: the engine's own usage, or the chunks it received."""

    requests: int = 0
    completion_tokens: int = 0
    notes: list[str] = field(default_factory=list)


def run_demo(model: str, workdir: str | None = None) -> int:
    try:
        from openai import OpenAI
    except ImportError:
        print("the demo needs the OpenAI SDK: pip install 'sidecar[dev]'", file=sys.stderr)
        return 2
    if not Path(model).is_file():
        print(f"no model at {model}: run `make demo` (it builds one)", file=sys.stderr)
        return 2
    folder = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="sidecar-demo-"))
    folder.mkdir(parents=True, exist_ok=True)
    ledger = folder / "ledger.db"
    engine_port, sidecar_port = _free_port(), _free_port()
    engine_url = f"http://127.0.0.1:{engine_port}"
    sidecar_url = f"http://127.0.0.1:{sidecar_port}"
    env_python = sys.executable

    print(f"demo folder: {folder}")
    print(f"1. engine: llama-cpp-python server on {model} at {engine_url}")
    engine_cmd = [
        env_python,
        "-m",
        "llama_cpp.server",
        "--model",
        model,
        "--host",
        "127.0.0.1",
        "--port",
        str(engine_port),
        "--n_ctx",
        "2048",
        "--interrupt_requests",
        "False",
    ]
    sidecar_cmd = [
        env_python,
        "-m",
        "sidecar",
        "serve",
        "--upstream",
        engine_url,
        "--listen",
        f"127.0.0.1:{sidecar_port}",
        "--ledger",
        f"sqlite:///{ledger}",
    ]
    with _process(engine_cmd, folder / "engine.log") as engine:
        _wait_http(engine_url + "/v1/models", engine, folder / "engine.log", 120)
        print(f"2. sidecar: {sidecar_url} -> {engine_url}, ledger {ledger}")
        with _process(sidecar_cmd, folder / "sidecar.log") as sidecar:
            _wait_http(sidecar_url + "/sidecar/health", sidecar, folder / "sidecar.log", 30)
            client = OpenAI(base_url=sidecar_url + "/v1", api_key="none", max_retries=0)
            seen: dict[str, _Seen] = {}
            print("3. requests through the sidecar with the OpenAI SDK:")
            _send_requests(client, seen)
            with urllib.request.urlopen(sidecar_url + "/sidecar/jobs", timeout=10) as resp:
                jobs = json.loads(resp.read())["jobs"]
        print("4. sidecar stopped; the ledger says (`sidecar jobs`):\n")
    totals = [_totals_from_json(j) for j in jobs]
    print(format_jobs_table(totals))
    print()
    ok = _compare(totals, seen)
    if not workdir:
        shutil.rmtree(folder, ignore_errors=True)
    return 0 if ok else 1


def _send_requests(client: object, seen: dict[str, _Seen]) -> None:
    from openai import OpenAI

    assert isinstance(client, OpenAI)
    plan: list[tuple[str, dict[str, object], str, bool, int]] = [
        # (job as the client names it, how it names it, route, stream, max_tokens)
        ("164", {"session_id": "164n"}, "chat", False, 24),
        ("164", {"session_id": "164n"}, "chat", True, 32),
        ("164", {"job_id": 164}, "completions", True, 16),
        ("165", {"jobId": "165"}, "completions", False, 20),
        ("165", {"job_id": "165"}, "chat", True, 48),
        ("unattributed", {}, "chat", False, 8),
    ]
    for job, naming, route, stream, max_tokens in plan:
        tally = seen.setdefault(job, _Seen())
        tally.requests += 1
        if route == "chat":
            kwargs: dict[str, object] = {
                "model": "tiny",
                "max_tokens": max_tokens,
                "extra_body": naming,
                "messages": [{"role": "user", "content": "Tell me a story."}],
            }
            if stream:
                got = sum(
                    1
                    for c in client.chat.completions.create(stream=True, **kwargs)
                    if c.choices and c.choices[0].delta.content
                )
                source = "chunks received"
            else:
                answer = client.chat.completions.create(**kwargs)
                got = answer.usage.completion_tokens if answer.usage else 0
                source = "engine usage"
        else:
            kwargs = {
                "model": "tiny",
                "prompt": "Once upon a time",
                "max_tokens": max_tokens,
                "extra_body": naming,
            }
            if stream:
                got = sum(
                    1
                    for c in client.completions.create(stream=True, **kwargs)
                    if c.choices and c.choices[0].text
                )
                source = "chunks received"
            else:
                answer = client.completions.create(**kwargs)
                got = answer.usage.completion_tokens if answer.usage else 0
                source = "engine usage"
        tally.completion_tokens += got
        shown = json.dumps(naming) if naming else "no job"
        kind = "stream" if stream else "json  "
        print(
            f"   {route:<11} {kind} {shown:<24} max_tokens={max_tokens:<3} -> {got} tokens "
            f"({source})"
        )


def _totals_from_json(j: dict[str, object]) -> JobTotals:
    return JobTotals(
        job_id=None if j["job_id"] is None else int(str(j["job_id"])),
        requests=int(str(j["requests"])),
        prompt_tokens=int(str(j["prompt_tokens"])),
        completion_tokens=int(str(j["completion_tokens"])),
        billable_tokens=int(str(j["billable_tokens"])),
        billable_by_source=dict(j["billable_tokens_by_source"]),  # type: ignore[call-overload]
        open_requests=int(str(j["open_requests"])),
    )


def _compare(totals: list[JobTotals], seen: dict[str, _Seen]) -> bool:
    by_job = {("unattributed" if t.job_id is None else str(t.job_id)): t for t in totals}
    ok = True
    print("metered vs what the client saw (engine usage for JSON answers, chunks for streams):")
    for job, tally in seen.items():
        metered = by_job.get(job)
        got = metered.completion_tokens if metered else 0
        match = (
            metered is not None
            and got == tally.completion_tokens
            and (metered.requests == tally.requests)
        )
        ok &= match
        print(
            f"   job {job:<13} metered {got:>4}  client saw {tally.completion_tokens:>4}  "
            f"{'match' if match else 'MISMATCH'}"
        )
    print("\nall counts match" if ok else "\nSOME COUNTS DIFFER")
    return ok


if __name__ == "__main__":
    raise SystemExit(run_demo(os.environ.get("SIDECAR_DEMO_MODEL", "var/tiny.gguf")))
