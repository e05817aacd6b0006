"""The sidecar's overhead, measured side by side with a direct connection to the engine.

Run: ``.venv/bin/python bench/overhead.py`` (or ``make bench``); ``--quick`` for a shorter run,
``--help`` for the knobs. Needs Linux, ``taskset``, for the JSON phases ``wrk`` (``apt-get install
-y wrk``; without it a Python client is used and the figures say so) and, for the targets measured
against nginx, Debian's ``nginx-light`` (``/usr/sbin/nginx``; without it, or with ``--no-nginx``,
the bench runs without its nginx relay, says so, and those targets are MISS with a note).

Method:

* a FAKE upstream (bench/fake_upstream.py: pre-built bytes in llama-cpp-python's wire format) and
  the load generator share core 0; the sidecar runs alone on core 1, as a subprocess
  (``taskset -c 1 python -m sidecar serve --event-loop LOOP``, uvloop unless ``--loop asyncio``)
  with its real durable SQLite ledger in a temporary folder and metering on; every request names
  one of four jobs (``"job_id"`` in the body);
* every phase runs DIRECT (client -> fake upstream), VIA SIDECAR (client -> sidecar -> fake
  upstream) and, for scale, through a BARE aiohttp relay (bench/bare_relay.py) and through NGINX
  (bench/nginx_relay.py: nginx-light, one process - ``master_process off`` - with upstream
  keep-alive and no buffering, its config, pid, logs and temporary files in the bench's
  temporary folder), both also on core 1, in the same run, alternated (D V B N, N B V D, ...)
  over several repetitions; the figures are medians and the ratios and differences are medians of
  the per-repetition pairs (the machine is noisy);
* the relays' CPU time comes from ``/proc/PID/stat`` (utime + stime, all threads; nginx is a
  single process) around each run; per request, per chunk of the fast streams, and per chunk
  when paced (below);
* time to first chunk: per stream, from sending the request to the first SSE event; its p99 over
  the concurrent fast streams of each repetition, and the median of the per-repetition ratios
  to direct;
* the paced phase, on every target, DIRECT included (the baseline), each relay freshly restarted:
  ``--slow-streams`` (500) streams paced one token per ``--slow-interval-ms`` (100 ms); once all
  are open, the relay's memory (``VmRSS`` in ``/proc/PID/status``, open minus idle, per stream),
  then over a window of several seconds the relay's CPU per chunk (chunks arrive one per read,
  as from a real engine) and the gap between two reads of each stream: the p99 of the gaps minus
  the pacing interval is the "extra delay between two tokens"; via minus direct is the sidecar's
  share of it;
* the sidecar's RSS just after start (idle RSS) and the latency of one fsync in the ledger's
  folder (the added-latency target allows one of them over nginx's added latency);
* where a target is missed, py-spy (if installed) samples the sidecar under the same load and the
  hottest functions are printed and saved next to the figures.

The figures are printed as a table and written to bench/results/latest.json, with PASS/MISS per
target. The targets live here only, never in the unit tests.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Final

import nginx_relay
from fake_upstream import EXTRA_EVENTS, MODEL

HERE: Final = Path(__file__).resolve().parent
ROOT: Final = HERE.parent
RESULTS_DIR: Final = HERE / "results"
WRK_SCRIPT: Final = HERE / "wrk_chat.lua"
FAKE_UPSTREAM: Final = HERE / "fake_upstream.py"
BARE_RELAY: Final = HERE / "bare_relay.py"
VENV_PYTHON: Final = ROOT / ".venv" / "bin" / "python"
HOST: Final = "127.0.0.1"  # loopback only
JOBS: Final = (1, 2, 3, 4)
CHAT_PATH: Final = "/v1/chat/completions"
CLK_TCK: Final = os.sysconf("SC_CLK_TCK")

DIRECT: Final = "direct"  # client -> fake upstream
VIA: Final = "via"  # client -> sidecar -> fake upstream
BARE: Final = "bare"  # client -> bare aiohttp relay (bench/bare_relay.py) -> fake upstream
NGINX: Final = "nginx"  # client -> nginx (bench/nginx_relay.py) -> fake upstream
ALL_TARGETS: Final = (DIRECT, VIA, BARE, NGINX)
#: the prefix of each relay's comparisons with direct in the figures ("added_*", "ratio_*")
PREFIX: Final = {VIA: "", BARE: "bare_", NGINX: "nginx_"}

# For scale, measured on this machine earlier (not in this run).
REFERENCES: Final = {
    "popular Python gateway": {"added_p50_ms": 11.0, "cpu_us_per_chunk": 450},
}
NO_NGINX_NOTE: Final = (
    "needs the nginx relay, not measured in this run (--no-nginx or not installed)"
)


@dataclass(frozen=True, slots=True)
class Target:
    key: str
    label: str
    unit: str
    limit: float  # the fixed limit; with ``limit_of``, unused
    at_least: bool  # True: the figure must be >= limit; False: <= limit
    strict: bool = False  # > or < instead of >= or <=
    # A limit computed from the results of the same run (None: it could not be), and how.
    limit_of: Callable[[dict[str, Any]], float | None] | None = None
    limit_note: str = ""

    def limit_for(self, results: dict[str, Any]) -> float | None:
        return self.limit_of(results) if self.limit_of is not None else self.limit

    def met(self, value: float, limit: float | None = None) -> bool:
        bound = self.limit if limit is None else limit
        if self.at_least:
            return value > bound if self.strict else value >= bound
        return value < bound if self.strict else value <= bound

    def describe(self, limit: float | None = None) -> str:
        op = (">" if self.strict else ">=") if self.at_least else ("<" if self.strict else "<=")
        if self.limit_of is None:
            return f"{self.label} {op} {self.limit:g} {self.unit}"
        bound = "?" if limit is None or limit != limit else f"{limit:.3g}"
        return f"{self.label} {op} {bound} {self.unit} ({self.limit_note})"


def _c1_budget(results: dict[str, Any]) -> float | None:
    """nginx's added p50 at c=1 + 0.1 ms + one fsync of the ledger's disk, this run."""
    nginx_added = results["figures"]["latency_c1"].get("nginx_added_p50_ms")
    fsync_ms = results["figures"].get("fsync_ms")
    if nginx_added is None or nginx_added != nginx_added or fsync_ms is None:
        return None
    return float(nginx_added) + 0.1 + float(fsync_ms)


TARGETS: Final = (
    Target("cpu_paced_vs_nginx", "sidecar CPU per chunk, paced, / nginx's", "x", 1.5, False),
    Target(
        "cpu_fast_vs_nginx", "sidecar CPU per chunk, 64 fast streams, / nginx's", "x", 1.5, False
    ),
    Target("ttfc_p99_ratio_64", "time to first chunk p99, 64 streams, via/direct", "x", 1.3, False),
    Target(
        "gap_p99_extra_ms_paced",
        "p99 extra delay between tokens, paced, via - direct",
        "ms",
        3.0,
        False,
    ),
    Target(
        "added_p50_ms_c1_budget",
        "added latency p50 at concurrency 1",
        "ms",
        float("nan"),
        False,
        limit_of=_c1_budget,
        limit_note="nginx's added p50 + 0.1 ms + one fsync",
    ),
    Target("rps_ratio_c32", "requests/s at concurrency 32, via/direct", "x", 0.8, True),
    Target("memory_kb_per_stream", "sidecar memory per open stream", "kB", 30.0, False),
    Target("idle_rss_mb", "sidecar RSS at start, before load", "MB", 50.0, False, strict=True),
)
# Which profile explains which miss (None: no profile does; py-spy samples CPU, not memory).
PROFILE_FOR: Final[dict[str, str | None]] = {
    "cpu_paced_vs_nginx": "paced",
    "cpu_fast_vs_nginx": "streams",
    "ttfc_p99_ratio_64": "streams",
    "gap_p99_extra_ms_paced": "paced",
    "added_p50_ms_c1_budget": "json-c1",
    "rps_ratio_c32": "json-c32",
    "memory_kb_per_stream": "paced",
    "idle_rss_mb": None,
}


@dataclass(slots=True)
class Config:
    reps: int = 5
    json_seconds: int = 3
    long_stream_tokens: int = 20_000
    streams: int = 64
    stream_tokens: int = 4_000
    slow_streams: int = 500
    slow_interval_ms: int = 100
    slow_tokens: int = 120
    profile: str = "auto"  # auto (when a target is missed) | always | never
    profile_seconds: int = 12
    client: str = "auto"  # auto (wrk when installed) | wrk | python
    bare: bool = True  # also measure the bare aiohttp relay, for scale
    nginx: bool = True  # also measure nginx (when installed): the targets compare with it
    loop: str = "uvloop"  # the event loop of the sidecar and the bare relay: uvloop | asyncio
    ledger_dir: str | None = None  # where the temporary folder (the ledger) goes; None: $TMPDIR
    keep: bool = False


class BenchError(RuntimeError):
    """The benchmark could not run as designed (a process died, a phase timed out...)."""


# -- processes ---------------------------------------------------------------------------------


def pin(core: int | None, argv: Sequence[str]) -> list[str]:
    return ["taskset", "-c", str(core), *argv] if core is not None else list(argv)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


@dataclass(slots=True)
class Child:
    name: str
    proc: subprocess.Popen[bytes]
    log: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, n: int = 30) -> str:
        try:
            lines = self.log.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(lines[-n:])

    def stop(self, timeout: float = 15.0) -> None:
        if self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)


def start_child(name: str, argv: Sequence[str], workdir: Path) -> Child:
    log = workdir / f"{name}.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            list(argv), cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
    return Child(name, proc, log)


def wait_for_port(child: Child, port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not child.alive():
            raise BenchError(f"{child.name} exited early:\n{child.log_tail()}")
        try:
            with socket.create_connection((HOST, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise BenchError(f"{child.name} did not listen on port {port} within {timeout:.0f} s")


def proc_cpu_seconds(pid: int) -> float:
    """utime + stime of a process, all its threads, in seconds (resolution 1/CLK_TCK)."""
    return proc_cpu_seconds_of(Path(f"/proc/{pid}/stat"))


def thread_cpu_seconds(pid: int) -> dict[int, float]:
    """utime + stime per thread (TID) of a process, in seconds."""
    out: dict[int, float] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError, ValueError, IndexError):
            out[int(task.name)] = proc_cpu_seconds_of(task / "stat")
    return out


def proc_cpu_seconds_of(stat: Path) -> float:
    fields = stat.read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def proc_rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise BenchError(f"no VmRSS for pid {pid}")


def fs_type(path: Path) -> str:
    """The filesystem type of the mount holding ``path``, from /proc/mounts."""
    best, kind = "", "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/mounts").read_text().splitlines():
            parts = line.split()
            if len(parts) < 3:
                continue
            mount = parts[1]
            inside = str(path) == mount or str(path).startswith(mount.rstrip("/") + "/")
            if inside and len(mount) > len(best):
                best, kind = mount, parts[2]
    return kind


def fsync_latency_ms(folder: Path, n: int = 40) -> float:
    """Median time of a 100-byte write + fsync in the ledger's folder: what one commit waits."""
    path = folder / "fsync-probe"
    times: list[float] = []
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for _ in range(n):
            started = time.perf_counter()
            os.write(fd, b"x" * 100)
            os.fsync(fd)
            times.append((time.perf_counter() - started) * 1000)
    finally:
        os.close(fd)
        path.unlink(missing_ok=True)
    return statistics.median(times)


def machine() -> dict[str, Any]:
    model = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.partition(":")[2].strip()
                break
    return {
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "kernel": platform.release(),
        "python": platform.python_version(),
    }


# -- a minimal HTTP client for setup and admin calls -------------------------------------------


def _dechunk(body: bytes) -> bytes:
    out = bytearray()
    pos = 0
    for _ in range(1_000_000):
        end = body.find(b"\r\n", pos)
        if end < 0:
            break
        size = int(body[pos:end].split(b";")[0], 16)
        if size == 0:
            break
        out += body[end + 2 : end + 2 + size]
        pos = end + 2 + size + 2
    return bytes(out)


async def http_request(
    port: int, method: str, path: str, body: bytes = b"", limit_s: float = 10.0
) -> tuple[int, bytes]:
    async def exchange() -> tuple[int, bytes]:
        reader, writer = await asyncio.open_connection(HOST, port)
        try:
            writer.write(
                f"{method} {path} HTTP/1.1\r\nHost: {HOST}:{port}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
                "Connection: close\r\n\r\n".encode()
                + body
            )
            data = await reader.read()
        finally:
            writer.close()
        head, _, payload = data.partition(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        if b"transfer-encoding: chunked" in head.lower():
            payload = _dechunk(payload)
        return status, payload

    return await asyncio.wait_for(exchange(), limit_s)


def chat_body(job: int, max_tokens: int, stream: bool) -> bytes:
    return json.dumps(
        {
            "model": MODEL,
            "messages": [{"role": "user", "content": "Say hello"}],
            "max_tokens": max_tokens,
            "stream": stream,
            "job_id": job,
        }
    ).encode()


def chat_request(port: int, job: int, max_tokens: int, stream: bool, interval_ms: int = 0) -> bytes:
    body = chat_body(job, max_tokens, stream)
    extra = f"X-Fake-Interval-Ms: {interval_ms}\r\n" if interval_ms else ""
    return (
        (
            f"POST {CHAT_PATH} HTTP/1.1\r\nHost: {HOST}:{port}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n{extra}"
        ).encode()
        + b"Connection: close\r\n\r\n"
        + body
    )


# -- the stream client -------------------------------------------------------------------------


@dataclass(slots=True)
class StreamResult:
    status: int = 0
    events: int = 0  # SSE events received (role, content, finish and [DONE] chunks)
    complete: bool = False  # ended with [DONE] and the last chunk of the chunked coding
    started: float = 0.0  # the request sent
    first_event: float = 0.0  # the first SSE event received (0.0: none)
    ended: float = 0.0
    error: str | None = None

    @property
    def first_event_ms(self) -> float | None:
        return (self.first_event - self.started) * 1000 if self.first_event else None


class StreamClient(asyncio.Protocol):
    """Sends one streaming request (Connection: close), counts the SSE events that come back.

    With a ``gap_sink`` (see :meth:`SlowStreams.record_gaps`), each read that brings events
    appends the seconds since the previous such read to it: the gaps between two tokens.
    """

    def __init__(self, request: bytes, on_first_event: Callable[[], None] | None = None) -> None:
        self.request = request
        self.on_first_event = on_first_event
        self.result = StreamResult()
        self.done: asyncio.Future[StreamResult] = asyncio.get_running_loop().create_future()
        self.transport: asyncio.Transport | None = None
        self.gap_sink: list[float] | None = None
        self.last_arrival = 0.0  # of the previous read with events, while gaps are recorded
        self._head = b""
        self._carry = b""
        self._tail = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.result.started = time.perf_counter()
        transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        result = self.result
        if not result.status:
            self._head += data[:64]
            line_end = self._head.find(b"\r\n")
            if line_end >= 0:
                try:
                    result.status = int(self._head[:line_end].split(b" ", 2)[1])
                except (IndexError, ValueError):
                    result.status = -1
        before = result.events
        # An event ends with a blank line; "\n\n" is always followed by "\r\n" in the chunked
        # coding, so counting over (last byte + data) counts each event once across reads.
        result.events += (self._carry + data).count(b"\n\n")
        self._carry = data[-1:]
        self._tail = data[-64:] if len(data) >= 64 else (self._tail + data)[-64:]
        if result.events == before:
            return
        sink = self.gap_sink
        if sink is not None:
            now = time.perf_counter()
            if self.last_arrival:
                sink.append(now - self.last_arrival)
            self.last_arrival = now
        if before == 0:
            result.first_event = time.perf_counter()
            if self.on_first_event is not None:
                self.on_first_event()

    def connection_lost(self, exc: Exception | None) -> None:
        result = self.result
        result.ended = time.perf_counter()
        result.complete = (
            result.status == 200 and self._tail.endswith(b"0\r\n\r\n") and b"[DONE]" in self._tail
        )
        if exc is not None:
            result.error = f"{type(exc).__name__}: {exc}"
        if not self.done.done():
            self.done.set_result(result)

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()


async def open_stream(
    port: int,
    job: int,
    tokens: int,
    interval_ms: int = 0,
    on_first_event: Callable[[], None] | None = None,
) -> StreamClient:
    client = StreamClient(chat_request(port, job, tokens, True, interval_ms), on_first_event)
    loop = asyncio.get_running_loop()
    await asyncio.wait_for(loop.create_connection(lambda: client, HOST, port), 10.0)
    return client


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-quantile (0..1) of the values, nearest rank below; None when there are none."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))]


@dataclass(slots=True)
class StreamBatch:
    streams: int
    events: int
    seconds: float
    incomplete: int
    first_event_ms: list[float]  # per stream: request sent -> first SSE event

    @property
    def chunks_per_s(self) -> float:
        return self.events / self.seconds if self.seconds > 0 else 0.0


async def run_streams(port: int, count: int, tokens: int, limit_s: float) -> StreamBatch:
    started = time.perf_counter()
    clients = await asyncio.gather(
        *(open_stream(port, JOBS[i % len(JOBS)], tokens) for i in range(count))
    )
    try:
        results = await asyncio.wait_for(asyncio.gather(*(c.done for c in clients)), limit_s)
    except TimeoutError:
        for c in clients:
            c.abort()
        raise BenchError(f"{count} streams of {tokens} tokens took over {limit_s:.0f} s") from None
    expected = tokens + EXTRA_EVENTS
    incomplete = sum(1 for r in results if not r.complete or r.events != expected)
    ended = max(r.ended for r in results)
    firsts = [ms for r in results if (ms := r.first_event_ms) is not None]
    return StreamBatch(count, sum(r.events for r in results), ended - started, incomplete, firsts)


# -- the JSON clients: wrk, or a Python fallback ----------------------------------------------


@dataclass(slots=True)
class JsonRun:
    tool: str
    requests: int
    seconds: float
    p50_ms: float
    p99_ms: float
    errors: int

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds > 0 else 0.0


async def wrk_run(port: int, concurrency: int, seconds: int) -> JsonRun:
    argv = pin(
        0 if PINNED else None,
        [
            "wrk",
            "-t1",
            f"-c{concurrency}",
            f"-d{seconds}s",
            "--timeout",
            "5s",
            "-s",
            str(WRK_SCRIPT),
            f"http://{HOST}:{port}{CHAT_PATH}",
        ],
    )
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), seconds + 30)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise BenchError(f"wrk ran past {seconds + 30} s") from None
    for line in out.decode(errors="replace").splitlines():
        if line.startswith("WRKJSON "):
            data = json.loads(line.removeprefix("WRKJSON "))
            errors = sum(int(v) for v in data["errors"].values())
            return JsonRun(
                tool="wrk",
                requests=int(data["requests"]),
                seconds=data["duration_us"] / 1e6,
                p50_ms=data["latency_us"]["p50"] / 1000,
                p99_ms=data["latency_us"]["p99"] / 1000,
                errors=errors,
            )
    raise BenchError(f"wrk printed no figures (exit {proc.returncode}): {err.decode()[-500:]}")


class _KeepAliveClient(asyncio.Protocol):
    """One keep-alive connection sending requests back to back until a deadline."""

    def __init__(self, requests: Sequence[bytes], deadline: float, latencies: list[float]) -> None:
        self.requests = requests
        self.deadline = deadline
        self.latencies = latencies
        self.errors = 0
        self.sent = 0
        self.sent_at = 0.0
        self.buffer = bytearray()
        self.transport: asyncio.Transport | None = None
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self._send()

    def _send(self) -> None:
        assert self.transport is not None
        self.sent_at = time.perf_counter()
        self.transport.write(self.requests[self.sent % len(self.requests)])
        self.sent += 1

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0:
            return
        head = bytes(self.buffer[:end]).lower()
        at = head.find(b"content-length:")
        length = int(head[at + 15 :].split(b"\r\n", 1)[0]) if at >= 0 else 0
        if len(self.buffer) < end + 4 + length:
            return
        now = time.perf_counter()
        self.latencies.append(now - self.sent_at)
        if not head.startswith(b"http/1.1 200"):
            self.errors += 1
        del self.buffer[: end + 4 + length]
        if now < self.deadline and self.sent < 10_000_000:
            self._send()
        else:
            self.transport.close()  # type: ignore[union-attr]

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_result(None)


async def python_json_run(port: int, concurrency: int, seconds: int) -> JsonRun:
    requests = [
        f"POST {CHAT_PATH} HTTP/1.1\r\nHost: {HOST}:{port}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n".encode()
        + body
        for body in (chat_body(job, 16, False) for job in JOBS)
    ]
    latencies: list[float] = []
    loop = asyncio.get_running_loop()
    started = time.perf_counter()
    clients = [_KeepAliveClient(requests, started + seconds, latencies) for _ in range(concurrency)]
    for c in clients:
        await loop.create_connection(lambda c=c: c, HOST, port)  # type: ignore[misc]
    await asyncio.wait_for(asyncio.gather(*(c.done for c in clients)), seconds + 30)
    elapsed = time.perf_counter() - started
    latencies.sort()
    n = len(latencies)
    return JsonRun(
        tool="python",
        requests=n,
        seconds=elapsed,
        p50_ms=latencies[n // 2] * 1000 if n else 0.0,
        p99_ms=latencies[min(n - 1, int(n * 0.99))] * 1000 if n else 0.0,
        errors=sum(c.errors for c in clients),
    )


# -- metrics of the sidecar --------------------------------------------------------------------


def prometheus_sums(text: str) -> dict[str, float]:
    """Each metric name's value summed over its labels."""
    sums: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name_part, _, value = line.rpartition(" ")
        name = name_part.split("{", 1)[0]
        with contextlib.suppress(ValueError):
            sums[name] = sums.get(name, 0.0) + float(value)
    return sums


# -- the processes under test ------------------------------------------------------------------

PINNED = True  # set in main(): False on a machine with one core or without taskset


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


@dataclass(slots=True)
class Cluster:
    """The fake upstream (core 0), the sidecar, the bare relay and nginx (core 1), as subprocesses.

    ``event_loop_flag``: whether this sidecar has ``serve --event-loop`` (else it runs on its
    default loop, asyncio, and ``loop`` must be asyncio).
    """

    workdir: Path
    log: Callable[[str], None]
    python: str
    loop: str
    event_loop_flag: bool = True
    nginx_binary: str | None = None
    children: dict[str, Child] = field(default_factory=dict)
    ports: dict[str, int] = field(default_factory=dict)
    sidecar_starts: int = 0
    nginx_starts: int = 0

    @property
    def ledger_url(self) -> str:
        return f"sqlite:///{self.workdir / 'ledger.db'}"

    def start(self, bare: bool, nginx: bool) -> None:
        port = free_port()
        child = start_child(
            "fake-upstream",
            pin(0 if PINNED else None, [self.python, str(FAKE_UPSTREAM), "--port", str(port)]),
            self.workdir,
        )
        self.children[DIRECT], self.ports[DIRECT] = child, port
        wait_for_port(child, port)
        self.start_sidecar()
        if bare:
            self.start_bare()
        if nginx:
            self.start_nginx()
        self.log(
            "pids: "
            + ", ".join(
                f"{name} {c.pid} on :{self.ports[name]}" for name, c in self.children.items()
            )
        )

    def start_bare(self) -> None:
        port = free_port()
        argv = [self.python, str(BARE_RELAY), "--upstream", f"http://{HOST}:{self.ports[DIRECT]}"]
        argv += ["--port", str(port), *(["--uvloop"] if self.loop == "uvloop" else [])]
        child = start_child("bare-relay", pin(1 if PINNED else None, argv), self.workdir)
        self.children[BARE], self.ports[BARE] = child, port
        wait_for_port(child, port)

    def start_nginx(self) -> None:
        """nginx (bench/nginx_relay.py's config), one process, everything in the workdir."""
        if self.nginx_binary is None:
            raise BenchError("nginx is not installed")
        self.nginx_starts += 1
        port = free_port()
        conf = nginx_relay.write_config(self.workdir, HOST, port, self.ports[DIRECT])
        argv = nginx_relay.argv(self.nginx_binary, self.workdir, conf)
        child = start_child(
            f"nginx-{self.nginx_starts}", pin(1 if PINNED else None, argv), self.workdir
        )
        self.children[NGINX], self.ports[NGINX] = child, port
        try:
            wait_for_port(child, port)
        except BenchError as exc:
            errors = self.workdir / "nginx-error.log"
            tail = errors.read_text(errors="replace")[-2000:] if errors.exists() else ""
            raise BenchError(f"{exc}\n{errors.name}:\n{tail}") from None

    def start_sidecar(self) -> None:
        """The sidecar as deployed: ``python -m sidecar serve`` with a durable SQLite ledger."""
        self.sidecar_starts += 1
        port = free_port()
        loop_args = ["--event-loop", self.loop] if self.event_loop_flag else []
        argv = [
            self.python,
            "-m",
            "sidecar",
            "serve",
            *loop_args,
            "--upstream",
            f"http://{HOST}:{self.ports[DIRECT]}",
            "--listen",
            f"{HOST}:{port}",
            "--ledger",
            self.ledger_url,
            # The memory phase opens 1,000 streams over four jobs: above the default bounds
            # (32 streams a job, 1,024 connections), which this bench does not measure.
            "--max-streams-per-job",
            "100000",
            "--max-connections",
            "100000",
        ]
        child = start_child(
            f"sidecar-{self.sidecar_starts}", pin(1 if PINNED else None, argv), self.workdir
        )
        self.children[VIA], self.ports[VIA] = child, port
        wait_for_port(child, port)

    def restart(self, target: str) -> None:
        if target == DIRECT:
            raise BenchError("the fake upstream is not restarted: every relay points at it")
        self.children[target].stop()
        if target == VIA:
            self.start_sidecar()
        elif target == BARE:
            self.start_bare()
        else:
            self.start_nginx()
        self.log(f"{target} restarted: pid {self.pid(target)} on :{self.ports[target]}")

    def pid(self, target: str) -> int:
        return self.children[target].pid

    def check_alive(self) -> None:
        for child in self.children.values():
            if not child.alive():
                raise BenchError(f"{child.name} died:\n{child.log_tail()}")

    def stop(self) -> None:
        for child in reversed(list(self.children.values())):
            child.stop()


async def wait_healthy(cluster: Cluster, limit_s: float = 30.0) -> None:
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError, TimeoutError, ValueError, IndexError):
            status, _ = await http_request(cluster.ports[VIA], "GET", "/sidecar/health", limit_s=3)
            if status == 200:
                return
        cluster.check_alive()
        await asyncio.sleep(0.2)
    raise BenchError(f"the sidecar is not healthy:\n{cluster.children[VIA].log_tail()}")


# -- the phases --------------------------------------------------------------------------------


@dataclass(slots=True)
class SlowStreams:
    """Many slow streams held open through one port (the memory test, the paced profile)."""

    clients: list[StreamClient]
    opened_s: float  # time until every stream had its first event (or the ramp limit)
    opened: int

    def open_now(self) -> int:
        return sum(1 for c in self.clients if not c.done.done())

    def events(self) -> int:
        return sum(c.result.events for c in self.clients)

    def record_gaps(self, sink: list[float] | None) -> None:
        """From now on, append every stream's gaps between two reads to ``sink`` (None: stop)."""
        for c in self.clients:
            c.last_arrival = 0.0
            c.gap_sink = sink

    def first_started(self) -> float:
        return min((c.result.started for c in self.clients if c.result.started), default=0.0)

    async def finish(self, limit_s: float) -> list[StreamResult]:
        try:
            return await asyncio.wait_for(asyncio.gather(*(c.done for c in self.clients)), limit_s)
        except TimeoutError:
            for c in self.clients:
                c.abort()
            raise BenchError(f"slow streams did not end within {limit_s:.0f} s") from None


async def open_slow_streams(port: int, count: int, tokens: int, interval_ms: int) -> SlowStreams:
    opened = 0
    all_open = asyncio.Event()

    def on_open() -> None:
        nonlocal opened
        opened += 1
        if opened >= count:
            all_open.set()

    clients: list[StreamClient] = []
    started = time.perf_counter()
    # In batches of 100: the sidecar listens with aiohttp's default backlog (128).
    for first in range(0, count, 100):
        clients += await asyncio.gather(
            *(
                open_stream(port, JOBS[i % len(JOBS)], tokens, interval_ms, on_open)
                for i in range(first, min(first + 100, count))
            )
        )
        await asyncio.sleep(0.02)
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(all_open.wait(), 30.0)
    return SlowStreams(clients, time.perf_counter() - started, opened)


@dataclass(slots=True)
class Bench:
    config: Config
    cluster: Cluster
    use_wrk: bool
    log: Callable[[str], None]
    problems: list[str] = field(default_factory=list)

    @property
    def targets(self) -> tuple[str, ...]:
        """direct, via, then the relays for scale that run (bare, nginx), in that order."""
        return tuple(t for t in ALL_TARGETS if t in self.cluster.ports)

    @property
    def sidecar_pid(self) -> int:
        return self.cluster.pid(VIA)

    def port(self, target: str) -> int:
        return self.cluster.ports[target]

    async def json_run(self, target: str, concurrency: int, seconds: int) -> JsonRun:
        if self.use_wrk:
            return await wrk_run(self.port(target), concurrency, seconds)
        return await python_json_run(self.port(target), concurrency, seconds)

    async def side_by_side(
        self, name: str, run_one: Callable[[str], Awaitable[dict[str, Any]]]
    ) -> list[dict[str, Any]]:
        """Run one phase on every target, alternated (ABBA) over the repetitions."""
        runs: list[dict[str, Any]] = []
        for rep in range(self.config.reps):
            order = self.targets if rep % 2 == 0 else tuple(reversed(self.targets))
            for target in order:
                self.cluster.check_alive()
                pid = None if target == DIRECT else self.cluster.pid(target)
                upstream_pid = self.cluster.pid(DIRECT)
                cpu_before = proc_cpu_seconds(pid) if pid else 0.0
                upstream_before = proc_cpu_seconds(upstream_pid)
                figures = await run_one(target)
                cpu = proc_cpu_seconds(pid) - cpu_before if pid else None
                upstream_cpu = proc_cpu_seconds(upstream_pid) - upstream_before
                runs.append(
                    {
                        "rep": rep,
                        "target": target,
                        "relay_cpu_s": cpu,
                        "upstream_cpu_s": upstream_cpu,
                        **figures,
                    }
                )
                self.log(f"  {name} rep {rep + 1}/{self.config.reps} {target:6s} {figures}")
        return runs

    async def warm_up(self, targets: Sequence[str]) -> None:
        for target in targets:
            port = self.port(target)
            for job in JOBS:
                status, body = await http_request(
                    port, "POST", CHAT_PATH, chat_body(job, 16, False)
                )
                if status != 200 or b'"usage"' not in body:
                    raise BenchError(
                        f"{target}: a chat completion failed ({status}): {body[:300]!r}"
                    )
            batch = await run_streams(port, 8, 200, limit_s=60)
            if batch.incomplete:
                raise BenchError(f"{target}: {batch.incomplete} of 8 warm-up streams broke")
            if target != DIRECT:
                await self.json_run(target, 32, 1)

    async def latency(self) -> dict[str, Any]:
        return await self._json_phase("latency c=1", 1)

    async def throughput(self) -> dict[str, Any]:
        return await self._json_phase("requests c=32", 32)

    async def _json_phase(self, name: str, concurrency: int) -> dict[str, Any]:
        secs = self.config.json_seconds

        async def one(target: str) -> dict[str, Any]:
            run = await self.json_run(target, concurrency, secs)
            if run.errors:
                self.problems.append(f"{name} {target}: {run.errors} errors")
            return {
                "requests": run.requests,
                "rps": round(run.rps, 1),
                "p50_ms": run.p50_ms,
                "p99_ms": run.p99_ms,
                "errors": run.errors,
            }

        before = await self._metrics()
        runs = await self.side_by_side(name, one)
        after = await self._metrics()
        summary = self._pairs(runs, ("p50_ms", "p99_ms", "rps"))
        summary["concurrency"] = concurrency
        summary["sidecar_cpu_us_per_request"] = self._cpu_per(runs, "requests", VIA)
        summary["bare_cpu_us_per_request"] = self._cpu_per(runs, "requests", BARE)
        summary["nginx_cpu_us_per_request"] = self._cpu_per(runs, "requests", NGINX)
        # The fake upstream is a raw asyncio.Protocol server: what such a shell costs here.
        summary["fake_upstream_cpu_us_per_request"] = self._cpu_per(
            runs, "requests", DIRECT, "upstream_cpu_s"
        )
        summary["sidecar_means_ms"] = _histogram_means(before, after)
        summary["runs"] = runs
        return summary

    async def streams(self, count: int, tokens: int, label: str) -> dict[str, Any]:
        async def one(target: str) -> dict[str, Any]:
            batch = await run_streams(self.port(target), count, tokens, limit_s=120)
            if batch.incomplete:
                self.problems.append(f"{label} {target}: {batch.incomplete} streams incomplete")
            if len(batch.first_event_ms) < count:
                self.problems.append(
                    f"{label} {target}: {count - len(batch.first_event_ms)} streams had no event"
                )
            return {
                "events": batch.events,
                "seconds": round(batch.seconds, 4),
                "chunks_per_s": round(batch.chunks_per_s, 1),
                "incomplete": batch.incomplete,
                "ttfc_p50_ms": percentile(batch.first_event_ms, 0.5),
                "ttfc_p99_ms": percentile(batch.first_event_ms, 0.99),
            }

        runs = await self.side_by_side(label, one)
        summary = self._pairs(runs, ("chunks_per_s", "ttfc_p50_ms", "ttfc_p99_ms"))
        summary["streams"] = count
        summary["tokens_per_stream"] = tokens
        summary["sidecar_cpu_us_per_chunk"] = self._cpu_per(runs, "events", VIA)
        summary["bare_cpu_us_per_chunk"] = self._cpu_per(runs, "events", BARE)
        summary["nginx_cpu_us_per_chunk"] = self._cpu_per(runs, "events", NGINX)
        summary["fake_upstream_cpu_us_per_chunk"] = self._cpu_per(
            runs, "events", DIRECT, "upstream_cpu_s"
        )
        summary["runs"] = runs
        return summary

    async def memory(self, target: str) -> dict[str, Any]:
        """RSS with N slow streams open minus idle RSS; the CPU per chunk and the gaps, paced.

        On direct, the process measured is the fake upstream (its RSS and CPU, for the record);
        its gaps are the baseline of the relays'.
        """
        cfg = self.config
        pid = self.cluster.pid(target)
        idle_samples = []
        for _ in range(5):
            idle_samples.append(proc_rss_kb(pid))
            await asyncio.sleep(0.1)
        slow = await open_slow_streams(
            self.port(target), cfg.slow_streams, cfg.slow_tokens, cfg.slow_interval_ms
        )
        await asyncio.sleep(1.0)
        open_samples = []
        for _ in range(5):
            open_samples.append(proc_rss_kb(pid))
            await asyncio.sleep(0.2)
        measured = min(slow.open_now(), slow.opened)
        # Paced relay: one chunk per read, as from a real engine. The window lasts as long as
        # every stream stays open (the first opened ends first), 1 s to spare, 3 to 8 s.
        stream_s = cfg.slow_tokens * cfg.slow_interval_ms / 1000
        left_s = slow.first_started() + stream_s - time.perf_counter()
        window_goal = max(3.0, min(8.0, left_s - 1.0))
        gaps: list[float] = []
        slow.record_gaps(gaps)
        cpu_before, events_before = proc_cpu_seconds(pid), slow.events()
        window_started = time.perf_counter()
        await asyncio.sleep(window_goal)
        window_s = time.perf_counter() - window_started
        paced_cpu = proc_cpu_seconds(pid) - cpu_before
        paced_events = slow.events() - events_before
        slow.record_gaps(None)
        open_after_window = slow.open_now()
        interval_ms = cfg.slow_interval_ms
        extra_ms = [g * 1000 - interval_ms for g in gaps]
        results = await slow.finish(cfg.slow_tokens * cfg.slow_interval_ms / 1000 + 60)
        expected = cfg.slow_tokens + EXTRA_EVENTS
        incomplete = sum(1 for r in results if not r.complete or r.events != expected)
        if measured < cfg.slow_streams:
            self.problems.append(
                f"memory {target}: only {measured} of {cfg.slow_streams} streams open"
            )
        if open_after_window < cfg.slow_streams:
            self.problems.append(
                f"memory {target}: only {open_after_window} streams open after the CPU window"
            )
        if incomplete:
            self.problems.append(f"memory {target}: {incomplete} slow streams ended incomplete")
        idle, opened = int(median(idle_samples)), int(median(open_samples))
        return {
            "streams": cfg.slow_streams,
            "streams_open_at_sample": measured,
            "interval_ms": cfg.slow_interval_ms,
            "ramp_s": round(slow.opened_s, 2),
            "idle_rss_kb": idle,
            "open_rss_kb": opened,
            "kb_per_stream": (opened - idle) / max(1, measured),
            "incomplete": incomplete,
            "paced_events": paced_events,
            "paced_window_s": round(window_s, 2),
            "paced_cpu_s": paced_cpu,
            "paced_cpu_us_per_chunk": paced_cpu / paced_events * 1e6 if paced_events else None,
            "paced_core_share": paced_cpu / window_s,
            "gaps": len(gaps),
            "gap_p50_extra_ms": percentile(extra_ms, 0.5),
            "gap_p99_extra_ms": percentile(extra_ms, 0.99),
            "gap_max_extra_ms": max(extra_ms) if extra_ms else None,
        }

    async def ledger_totals(self) -> list[Any]:
        status, body = await http_request(self.port(VIA), "GET", "/sidecar/jobs")
        if status != 200:
            self.problems.append(f"/sidecar/jobs answered {status}")
            return []
        jobs: list[Any] = json.loads(body).get("jobs", [])
        return jobs

    async def _metrics(self) -> dict[str, float]:
        status, body = await http_request(self.port(VIA), "GET", "/metrics")
        return prometheus_sums(body.decode()) if status == 200 else {}

    def _pairs(self, runs: list[dict[str, Any]], keys: Sequence[str]) -> dict[str, Any]:
        """Medians per target; medians of the per-repetition differences and ratios to direct.

        ``added_*``/``ratio_*`` compare the sidecar with direct, ``bare_added_*``/``bare_ratio_*``
        the bare aiohttp relay with direct, ``nginx_added_*``/``nginx_ratio_*`` nginx with direct.
        Runs where a figure is None (e.g. no time to first chunk) are left out of its pairs.
        """
        out: dict[str, Any] = {}
        by_rep: dict[int, dict[str, dict[str, Any]]] = {}
        for run in runs:
            by_rep.setdefault(run["rep"], {})[run["target"]] = run
        for key in keys:
            for target in self.targets:
                out[f"{target}_{key}"] = median(
                    [r[key] for r in runs if r["target"] == target and r[key] is not None]
                )
            for target, prefix in PREFIX.items():
                if target not in self.targets:
                    continue
                pairs = [
                    (p[DIRECT][key], p[target][key])
                    for p in by_rep.values()
                    if target in p and p[DIRECT][key] is not None and p[target][key] is not None
                ]
                out[f"{prefix}added_{key}"] = median([v - d for d, v in pairs])
                out[f"{prefix}ratio_{key}"] = median([v / d for d, v in pairs if d])
        return out

    @staticmethod
    def _cpu_per(
        runs: list[dict[str, Any]], unit_key: str, target: str, cpu_key: str = "relay_cpu_s"
    ) -> float | None:
        mine = [r for r in runs if r["target"] == target]
        units = sum(r[unit_key] for r in mine)
        cpu = sum(r[cpu_key] for r in mine)
        return cpu / units * 1e6 if units else None

    # -- profiles ----------------------------------------------------------------------------

    async def profile(self, kind: str, seconds: int) -> dict[str, Any] | None:
        """Sample the sidecar with py-spy while it serves one kind of load."""
        pyspy = shutil.which("py-spy", path=str(VENV_PYTHON.parent)) or shutil.which("py-spy")
        if pyspy is None:
            self.problems.append(f"profile {kind} skipped: py-spy is not installed")
            return None
        RESULTS_DIR.mkdir(parents=True, exist_ok=True)
        out = RESULTS_DIR / f"profile-{kind}.folded"
        out.unlink(missing_ok=True)
        pid = self.sidecar_pid
        argv = [pyspy, "record", "--pid", str(pid), "--duration", str(seconds), "--rate", "250"]
        argv += ["--format", "raw", "--threads", "--nonblocking", "--output", str(out)]
        proc = await asyncio.create_subprocess_exec(
            *pin(0 if PINNED else None, argv),
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        await asyncio.sleep(1.0)  # let it attach
        cpu_before, threads_before = proc_cpu_seconds(pid), thread_cpu_seconds(pid)
        load_started = time.perf_counter()
        units = await self._profile_load(kind, load_started + seconds - 2)
        load_s = time.perf_counter() - load_started
        cpu = proc_cpu_seconds(pid) - cpu_before
        threads_after = thread_cpu_seconds(pid)
        try:
            _, err = await asyncio.wait_for(proc.communicate(), seconds + 30)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            self.problems.append(f"profile {kind}: py-spy did not finish")
            return None
        if proc.returncode != 0 or not out.exists():
            self.problems.append(f"profile {kind}: py-spy failed: {err.decode()[-300:]}")
            return None
        text = out.read_text()
        summary = summarize_folded(text)
        names = {int(m[1]): m[2] for m in re.finditer(r"^thread \((\d+)\): ([^;]*);", text, re.M)}
        summary["cpu_by_thread"] = [
            {
                "thread": names.get(tid, f"tid {tid}"),
                "core_share": round((threads_after[tid] - used) / load_s, 3),
                "cpu_us_per_unit": round((threads_after[tid] - used) / units * 1e6, 1)
                if units
                else None,
            }
            for tid, used in threads_before.items()
            if tid in threads_after and threads_after[tid] - used > 0
        ]
        summary["file"] = str(out.relative_to(ROOT))
        summary["load"] = PROFILE_LOADS[kind].format(cfg=self.config)
        summary["sidecar_core_share"] = round(cpu / load_s, 3) if load_s else None
        summary["units"] = units
        summary["sidecar_cpu_us_per_unit"] = round(cpu / units * 1e6, 1) if units else None
        return summary

    async def _profile_load(self, kind: str, deadline: float) -> int:
        """Load for a profile, until the deadline; returns requests or chunks relayed."""
        cfg = self.config
        units = 0
        if kind == "paced":
            tokens = int((deadline - time.perf_counter()) * 1000 / cfg.slow_interval_ms) + 10
            slow = await open_slow_streams(
                self.port(VIA), cfg.slow_streams, tokens, cfg.slow_interval_ms
            )
            await slow.finish(tokens * cfg.slow_interval_ms / 1000 + 60)
            return slow.events()
        for _ in range(1000):
            left = deadline - time.perf_counter()
            if left < 1:
                break
            if kind.startswith("json"):
                run = await self.json_run(VIA, 1 if kind == "json-c1" else 32, max(1, int(left)))
                units += run.requests
            else:
                batch = await run_streams(self.port(VIA), cfg.streams, 1000, limit_s=60)
                units += batch.events
        return units


PROFILE_LOADS: Final = {
    "json-c1": "non-stream JSON requests at concurrency 1 (wrk)",
    "json-c32": "non-stream JSON requests at concurrency 32 (wrk)",
    "streams": "{cfg.streams} concurrent fast streams of 1000 chunks, back to back",
    "paced": "{cfg.slow_streams} streams, one chunk every {cfg.slow_interval_ms} ms each",
}


def _histogram_means(before: dict[str, float], after: dict[str, float]) -> dict[str, float | None]:
    means: dict[str, float | None] = {}
    for name in ("sidecar_ledger_write_seconds", "sidecar_upstream_latency_seconds"):
        count = after.get(f"{name}_count", 0.0) - before.get(f"{name}_count", 0.0)
        total = after.get(f"{name}_sum", 0.0) - before.get(f"{name}_sum", 0.0)
        key = name.removeprefix("sidecar_").removesuffix("_seconds")
        means[key] = total / count * 1000 if count else None
    return means


def _area(frame: str) -> str:
    path = frame[frame.rfind("(") + 1 :]
    for marker, area in (
        ("sidecar/metering", "sidecar.metering"),
        ("sidecar/ledger", "sidecar.ledger"),
        ("sidecar/exchange", "sidecar.exchange"),
        ("sidecar/shells", "sidecar.shells"),
        ("sidecar/engine", "sidecar.engine"),
        ("sidecar/metrics", "sidecar.metrics"),
        ("sidecar/", "sidecar (other)"),
        ("prometheus_client", "prometheus_client"),
        ("aiohttp/", "aiohttp"),
        ("multidict", "multidict/yarl"),
        ("yarl/", "multidict/yarl"),
        ("asyncio/", "asyncio"),
        ("selectors", "asyncio"),
        ("sqlite3", "sqlite3"),
        ("json/", "json"),
        ("threading", "threading/queue"),
        ("queue.py", "threading/queue"),
        ("logging/", "logging"),
        ("uuid", "uuid"),
        ("enum", "enum"),
        ("dataclasses", "dataclasses"),
    ):
        if marker in path:
            return area
    return "other"


def _function(frame: str) -> str:
    """'name (path/file.py:123)' -> 'name (path/file.py)': the lines of one function merged."""
    name, sep, where = frame.rpartition(" (")
    if not sep:
        return frame
    where = where.rstrip(")")
    file, _, line = where.rpartition(":")
    return f"{name} ({file if line.isdigit() else where})"


def summarize_folded(text: str, top: int = 12) -> dict[str, Any]:
    """Where the samples of py-spy's raw output fall: per thread, function, line and area.

    py-spy counts a thread blocked in a system call (fsync, a queue, sometimes epoll) as busy, so
    these are shares of samples, not of CPU; ``cpu_by_thread`` (from /proc) has the CPU.
    Samples whose innermost frame is the event loop's ``select`` are the loop waiting for I/O:
    they are counted apart (``waiting_in_select``) and left out of the per-function shares.
    """
    per_thread: dict[str, dict[str, Counter[str]]] = {}
    totals: Counter[str] = Counter()
    for line in text.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = stack.split(";")
        meta = [f for f in frames if f.startswith(("thread ", "process "))]
        code = [f for f in frames if not f.startswith(("thread ", "process "))]
        if not code:
            continue
        thread = meta[-1].partition(": ")[2] if meta else "?"
        if not thread.isprintable() or len(thread) > 64:
            # py-spy sometimes reads a thread's name from memory being rewritten: garbage.
            thread = "(unnamed)"
        t = per_thread.setdefault(
            thread, {k: Counter() for k in ("self", "line", "area", "inclusive", "wait")}
        )
        totals[thread] += count
        leaf = code[-1]
        if leaf.startswith("EpollSelector.select "):
            t["wait"]["select"] += count
            continue
        t["self"][_function(leaf)] += count
        t["line"][leaf] += count
        t["area"][_area(leaf)] += count
        for fn in {_function(f) for f in code}:
            t["inclusive"][fn] += count

    def pct(counter: Counter[str], n: int, of: int) -> list[list[Any]]:
        return [[name, round(100 * c / max(1, of), 1)] for name, c in counter.most_common(n)]

    all_samples = sum(totals.values())
    threads: dict[str, Any] = {}
    for name, t in sorted(per_thread.items(), key=lambda kv: -totals[kv[0]]):
        busy = totals[name] - t["wait"]["select"]
        threads[name] = {
            "samples": totals[name],
            "share_of_samples": round(100 * totals[name] / max(1, all_samples), 1),
            "waiting_in_select_pct": round(100 * t["wait"]["select"] / max(1, totals[name]), 1),
            # shares of the thread's samples outside select
            "self_pct_by_area": pct(t["area"], 12, busy),
            "self_pct": pct(t["self"], top, busy),
            "self_pct_by_line": pct(t["line"], 8, busy),
            "inclusive_pct": pct(t["inclusive"], top + 13, busy),
        }
    return {"samples": all_samples, "threads": threads}


# -- report ------------------------------------------------------------------------------------


def _fmt(value: float | None, digits: int = 3) -> str:
    if value is None or value != value:  # None or NaN
        return "-"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.{digits}g}"


def ratio(num: float | None, den: float | None) -> float | None:
    """num / den, or None where either is missing (None, NaN) or den is not positive."""
    if num is None or den is None or num != num or den != den or den <= 0:
        return None
    return num / den


#: the targets that compare with nginx (their value or limit needs its figures)
NEEDS_NGINX: Final = frozenset(
    {"cpu_paced_vs_nginx", "cpu_fast_vs_nginx", "added_p50_ms_c1_budget"}
)


def target_values(results: dict[str, Any]) -> dict[str, float | None]:
    f = results["figures"]
    return {
        "cpu_paced_vs_nginx": f["cpu_us_per_chunk"]["paced_vs_nginx"],
        "cpu_fast_vs_nginx": f["cpu_us_per_chunk"]["streams_64_vs_nginx"],
        "ttfc_p99_ratio_64": f["streams_64"].get("ratio_ttfc_p99_ms"),
        "gap_p99_extra_ms_paced": f["paced"].get("added_gap_p99_extra_ms"),
        "added_p50_ms_c1_budget": f["latency_c1"].get("added_p50_ms"),
        "rps_ratio_c32": f["requests_c32"].get("ratio_rps"),
        "memory_kb_per_stream": f["memory"]["kb_per_stream"],
        "idle_rss_mb": f["idle_rss_mb"],
    }


def check_targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    values = target_values(results)
    nginx_measured = bool(results.get("nginx", {}).get("measured"))
    checks = []
    for t in TARGETS:
        value = values[t.key]
        limit = t.limit_for(results)
        known = value is not None and value == value and limit is not None and limit == limit
        ok = known and t.met(float(value), limit)  # type: ignore[arg-type]
        note = None
        if not known:
            note = (
                NO_NGINX_NOTE
                if t.key in NEEDS_NGINX and not nginx_measured
                else "no figure: see the problems"
            )
        checks.append(
            {
                "key": t.key,
                "target": t.describe(limit),
                "value": value,
                "limit": limit,
                "unit": t.unit,
                "result": "PASS" if ok else "MISS",
                "note": note,
            }
        )
    return checks


COLUMNS: Final = (
    "direct",
    "via sidecar",
    "vs direct",
    "bare relay",
    "vs direct",
    "nginx",
    "vs direct",
)


def _row(label: str, phase: dict[str, Any], key: str, kind: str) -> str:
    """One table row: direct, via, via vs direct, bare, bare vs direct, nginx, nginx vs direct."""
    compare = "added" if kind == "diff" else "ratio"
    cells = [
        _fmt(phase.get(f"direct_{key}")),
        _fmt(phase.get(f"via_{key}")),
        _fmt(phase.get(f"{compare}_{key}")),
        _fmt(phase.get(f"bare_{key}")),
        _fmt(phase.get(f"bare_{compare}_{key}")),
        _fmt(phase.get(f"nginx_{key}")),
        _fmt(phase.get(f"nginx_{compare}_{key}")),
    ]
    return f"{label:36s}" + "".join(f"{c:>12s}" for c in cells)


def _cpu_row(label: str, sidecar: float | None, bare: float | None, nginx: float | None) -> str:
    """One row of the CPU table: sidecar, bare relay, nginx, sidecar / nginx."""
    cells = [_fmt(sidecar), _fmt(bare), _fmt(nginx), _fmt(ratio(sidecar, nginx))]
    return f"{label:36s}" + "".join(f"{c:>12s}" for c in cells)


def render(results: dict[str, Any]) -> str:
    f = results["figures"]
    lat, rq = f["latency_c1"], f["requests_c32"]
    one, many, paced = f["long_stream"], f["streams_64"], f["paced"]
    mem = f["memory"]
    mem_of = {t: f.get(f"memory_{t}") or {} for t in (BARE, NGINX)}
    mem_of[VIA] = mem
    m, cfg = results["machine"], results["config"]
    rss0 = f["rss_at_start_kb"]

    def share(target: str) -> float | None:
        value = mem_of[target].get("paced_core_share")
        return None if value is None else 100 * value

    nginx = results.get("nginx") or {}
    lines = [
        f"sidecar overhead - {results['date']} - {m['cpus']} CPUs ({m['cpu_model']}), "
        f"kernel {m['kernel']}, Python {m['python']}",
        f"{cfg['reps']} repetitions per phase, alternated; medians; JSON load: "
        f"{results['json_client']}; {results['pinning']}; sidecar and bare relay on the "
        f"{cfg['loop']} loop; nginx: {nginx.get('version') or nginx.get('note') or '-'}",
        "",
        f"{'':36s}" + "".join(f"{c:>12s}" for c in COLUMNS),
        _row("latency c=1 p50 (ms), added", lat, "p50_ms", "diff"),
        _row("latency c=1 p99 (ms), added", lat, "p99_ms", "diff"),
        _row("requests/s c=32, ratio", rq, "rps", "ratio"),
        _row(f"chunks/s 1 x {one['tokens_per_stream']}, ratio", one, "chunks_per_s", "ratio"),
        _row(
            f"chunks/s {many['streams']} x {many['tokens_per_stream']}, ratio",
            many,
            "chunks_per_s",
            "ratio",
        ),
        _row(f"first chunk p99, {many['streams']} streams (ms)", many, "ttfc_p99_ms", "ratio"),
        _row(f"first chunk p50, {many['streams']} streams (ms)", many, "ttfc_p50_ms", "ratio"),
        _row(f"extra gap p99, {paced['streams']} paced (ms)", paced, "gap_p99_extra_ms", "diff"),
        _row(f"extra gap p50, {paced['streams']} paced (ms)", paced, "gap_p50_extra_ms", "diff"),
        f"  (paced: one token every {paced['interval_ms']} ms per stream; extra gap = the time "
        "between two reads of a stream minus that; 'vs direct' columns: via - direct)",
        "",
        f"{'relay CPU (us)':36s}"
        + "".join(f"{c:>12s}" for c in ("sidecar", "bare relay", "nginx", "sidecar/ngx")),
        _cpu_row(
            f"  per chunk, {many['streams']} fast streams",
            many["sidecar_cpu_us_per_chunk"],
            many["bare_cpu_us_per_chunk"],
            many["nginx_cpu_us_per_chunk"],
        ),
        _cpu_row(
            "  per chunk, 1 long stream",
            one["sidecar_cpu_us_per_chunk"],
            one["bare_cpu_us_per_chunk"],
            one["nginx_cpu_us_per_chunk"],
        ),
        _cpu_row(
            "  per chunk, paced (1 per read)",
            *(mem_of[t].get("paced_cpu_us_per_chunk") for t in (VIA, BARE, NGINX)),
        ),
        _cpu_row(
            "  per JSON request, c=1",
            lat["sidecar_cpu_us_per_request"],
            lat["bare_cpu_us_per_request"],
            lat["nginx_cpu_us_per_request"],
        ),
        _cpu_row(
            "  per JSON request, c=32",
            rq["sidecar_cpu_us_per_request"],
            rq["bare_cpu_us_per_request"],
            rq["nginx_cpu_us_per_request"],
        ),
        _cpu_row("  core busy, paced streams (%)", share(VIA), share(BARE), share(NGINX)),
        _cpu_row(
            "memory per open stream (kB)",
            *(mem_of[t].get("kb_per_stream") for t in (VIA, BARE, NGINX)),
        ),
        f"  (the fake upstream, a raw asyncio.Protocol server on core 0: "
        f"{_fmt(rq['fake_upstream_cpu_us_per_request'])} us per JSON request, "
        f"{_fmt(many['fake_upstream_cpu_us_per_chunk'])} us per chunk sent)",
        f"  sidecar: {mem['streams_open_at_sample']} slow streams open, RSS "
        f"{mem['idle_rss_kb']:,} -> {mem['open_rss_kb']:,} kB; RSS just after start: sidecar "
        f"{rss0.get(VIA, 0):,} kB ({_fmt(f['idle_rss_mb'])} MB), bare relay "
        f"{_fmt(rss0.get(BARE))} kB, nginx {_fmt(rss0.get(NGINX))} kB",
        f"ledger commit at c=1, mean: {_fmt(lat['sidecar_means_ms'].get('ledger_write'))} ms "
        f"(one fsync in the ledger's folder: {_fmt(f['fsync_ms'])} ms, "
        f"{results['ledger']['fs']})",
        "",
        "targets:",
    ]
    for check in results["targets"]:
        note = f"  ({check['note']})" if check.get("note") else ""
        value = f"{_fmt(check['value'])} {check['unit']}"
        lines.append(f"  {check['result']:4s} {value:>10s}  {check['target']}{note}")
    gateway = REFERENCES["popular Python gateway"]
    lines.append(
        f"for scale (measured earlier, not in this run): the most used Python gateway adds "
        f"~{gateway['added_p50_ms']:g} ms and ~{gateway['cpu_us_per_chunk']} us CPU/chunk here"
    )
    if results["problems"]:
        lines += ["", "problems:", *(f"  - {p}" for p in results["problems"])]
    for kind, prof in (results.get("profiles") or {}).items():
        if not prof:
            continue
        lines += [
            "",
            f"profile {kind} ({prof['load']}): {prof['samples']} samples, {prof['file']}",
            f"  sidecar CPU: {_fmt(100 * (prof['sidecar_core_share'] or 0))}% of its core, "
            f"{_fmt(prof['sidecar_cpu_us_per_unit'])} us per unit; by thread: "
            + ", ".join(
                f"{t['thread']} {_fmt(100 * t['core_share'])}% ({_fmt(t['cpu_us_per_unit'])} us)"
                for t in prof["cpu_by_thread"]
            ),
        ]
        for name, t in prof["threads"].items():
            lines += [
                f"  thread {name}: {t['share_of_samples']}% of samples, "
                f"{t['waiting_in_select_pct']}% of them waiting in select; of the rest:",
                "    by area: " + ", ".join(f"{a} {p}%" for a, p in t["self_pct_by_area"][:8]),
                *(
                    f"    {p:5.1f}%  {fn}"
                    for fn, p in t["self_pct"][: 10 if name == "MainThread" else 3]
                ),
            ]
    return "\n".join(lines)


# -- main --------------------------------------------------------------------------------------


def sidecar_has_event_loop_flag(python: str) -> bool:
    """Whether this checkout's ``sidecar serve`` takes ``--event-loop``."""
    try:
        done = subprocess.run(
            [python, "-m", "sidecar", "serve", "--help"],
            cwd=ROOT,
            capture_output=True,
            timeout=60,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return b"--event-loop" in done.stdout


def nginx_version(binary: str) -> str | None:
    with contextlib.suppress(OSError, subprocess.TimeoutExpired):
        done = subprocess.run([binary, "-v"], capture_output=True, timeout=10, check=False)
        text = (done.stderr or done.stdout).decode(errors="replace").strip()
        return text.removeprefix("nginx version: ") or None
    return None


def paced_summary(memory: dict[str, dict[str, Any]], cfg: Config) -> dict[str, Any]:
    """The paced phase per target, with each relay's difference to direct (one run each)."""
    out: dict[str, Any] = {"streams": cfg.slow_streams, "interval_ms": cfg.slow_interval_ms}
    for key in ("gap_p50_extra_ms", "gap_p99_extra_ms", "gap_max_extra_ms"):
        for target, figures in memory.items():
            out[f"{target}_{key}"] = figures.get(key)
        direct = memory.get(DIRECT, {}).get(key)
        for target, prefix in PREFIX.items():
            value = memory.get(target, {}).get(key)
            out[f"{prefix}added_{key}"] = (
                value - direct if value is not None and direct is not None else None
            )
    for target, figures in memory.items():
        out[f"{target}_gaps"] = figures.get("gaps")
    return out


async def run(cfg: Config, workdir: Path, log: Callable[[str], None]) -> dict[str, Any]:
    use_wrk = cfg.client == "wrk" or (cfg.client == "auto" and shutil.which("wrk") is not None)
    if cfg.client == "wrk" and shutil.which("wrk") is None:
        raise BenchError("wrk is not installed: apt-get install -y wrk")
    started = dt.datetime.now(dt.UTC)
    fsync_ms = fsync_latency_ms(workdir)
    python = str(VENV_PYTHON if VENV_PYTHON.exists() else Path(sys.executable))
    loop_flag = sidecar_has_event_loop_flag(python)
    if not loop_flag:
        if cfg.loop != "asyncio":
            raise BenchError(
                f"--loop {cfg.loop}: this sidecar has no `serve --event-loop` (use --loop asyncio)"
            )
        log("note: this sidecar has no `serve --event-loop`: it runs on its default loop")
    nginx_info: dict[str, Any] = {"measured": False, "binary": None, "version": None}
    if not cfg.nginx:
        nginx_info["note"] = "skipped (--no-nginx)"
    else:
        binary = nginx_relay.nginx_binary()
        if binary is None:
            nginx_info["note"] = "not installed"
            log(
                "warning: nginx is not installed (apt-get install -y nginx-light): running "
                "without the nginx relay; the targets compared with nginx will be MISS"
            )
        else:
            nginx_info.update(measured=True, binary=binary, version=nginx_version(binary))
    cluster = Cluster(
        workdir, log, python, cfg.loop, event_loop_flag=loop_flag, nginx_binary=nginx_info["binary"]
    )
    try:
        cluster.start(bare=cfg.bare, nginx=nginx_info["measured"])
        await wait_healthy(cluster)
        rss_at_start = {t: proc_rss_kb(cluster.pid(t)) for t in cluster.children}
        bench = Bench(cfg, cluster, use_wrk, log)
        log("warm-up")
        await bench.warm_up(bench.targets)
        client = "wrk" if use_wrk else "python client"
        log(f"latency at concurrency 1 ({client})")
        latency = await bench.latency()
        log(f"requests/s at concurrency 32 ({client})")
        throughput = await bench.throughput()
        log(f"one stream of {cfg.long_stream_tokens} chunks")
        long_stream = await bench.streams(1, cfg.long_stream_tokens, "1 stream")
        log(f"{cfg.streams} concurrent streams of {cfg.stream_tokens} chunks")
        many = await bench.streams(cfg.streams, cfg.stream_tokens, f"{cfg.streams} streams")
        ledger_jobs = await bench.ledger_totals()
        # The paced phase on every target, direct first (the baseline of the gaps). Each relay
        # is restarted first: no pool of idle engine connections, no garbage of the phases above
        # in its idle RSS (the sidecar reopens the same ledger file); direct is not (the relays
        # point at it).
        memory: dict[str, Any] = {}
        for target in bench.targets:
            if target != DIRECT:
                cluster.restart(target)
                if target == VIA:
                    await wait_healthy(cluster)
                await bench.warm_up((target,))
            log(
                f"paced, {target}: {cfg.slow_streams} slow streams "
                f"(one chunk every {cfg.slow_interval_ms} ms)"
            )
            memory[target] = await bench.memory(target)
            log(f"  {memory[target]}")

        def heavy_cpu(target: str) -> float | None:
            runs = [r for r in long_stream["runs"] + many["runs"] if r["target"] == target]
            events = sum(r["events"] for r in runs)
            return sum(r["relay_cpu_s"] for r in runs) / events * 1e6 if events else None

        def paced_cpu(target: str) -> float | None:
            value = memory.get(target, {}).get("paced_cpu_us_per_chunk")
            return float(value) if value is not None else None

        results: dict[str, Any] = {
            "date": started.strftime("%Y-%m-%d %H:%M UTC"),
            "machine": machine(),
            "pinning": "fake upstream + load generator on core 0, sidecar (and bare relay, "
            "nginx) on core 1"
            if PINNED
            else "unpinned (fewer than 2 cores or no taskset)",
            "json_client": "wrk -t1"
            if use_wrk
            else "python asyncio client (may be the bottleneck)",
            "config": {**asdict(cfg), "sidecar_event_loop_flag": loop_flag},
            "nginx": nginx_info,
            "ledger": {"fs": fs_type(workdir), "fsync_p50_ms": fsync_ms, "jobs": ledger_jobs},
            "figures": {
                "latency_c1": latency,
                "requests_c32": throughput,
                "long_stream": long_stream,
                "streams_64": many,
                "paced": paced_summary(memory, cfg),
                "cpu_us_per_chunk": {
                    "stream_heavy": heavy_cpu(VIA),
                    "long_stream": long_stream["sidecar_cpu_us_per_chunk"],
                    "streams_64": many["sidecar_cpu_us_per_chunk"],
                    "paced": paced_cpu(VIA),
                    "bare_stream_heavy": heavy_cpu(BARE),
                    "bare_paced": paced_cpu(BARE),
                    "nginx_stream_heavy": heavy_cpu(NGINX),
                    "nginx_streams_64": many["nginx_cpu_us_per_chunk"],
                    "nginx_paced": paced_cpu(NGINX),
                    "paced_vs_nginx": ratio(paced_cpu(VIA), paced_cpu(NGINX)),
                    "streams_64_vs_nginx": ratio(
                        many["sidecar_cpu_us_per_chunk"], many["nginx_cpu_us_per_chunk"]
                    ),
                },
                "memory": memory[VIA],
                "memory_bare": memory.get(BARE),
                "memory_nginx": memory.get(NGINX),
                "memory_direct": memory.get(DIRECT),  # the fake upstream's; the gaps' baseline
                "rss_at_start_kb": rss_at_start,
                "idle_rss_mb": rss_at_start[VIA] / 1024,
                "fsync_ms": fsync_ms,
            },
            "references": REFERENCES,
            "problems": bench.problems,
        }
        results["targets"] = check_targets(results)
        missed = [c["key"] for c in results["targets"] if c["result"] == "MISS"]
        kinds: list[str] = []
        if cfg.profile == "always":
            kinds = list(PROFILE_LOADS)
        elif cfg.profile == "auto":
            kinds = [k for k in PROFILE_LOADS if k in {PROFILE_FOR.get(m) for m in missed}]
        profiles: dict[str, Any] = {}
        for kind in kinds:
            log(f"profiling the sidecar: {kind} ({cfg.profile_seconds} s)")
            profiles[kind] = await bench.profile(kind, cfg.profile_seconds)
            if profiles[kind]:
                log(f"  {profiles[kind]['cpu_by_thread']}")
        results["profiles"] = profiles
        results["sidecar_log_tail"] = cluster.children[VIA].log_tail(10)
        return results
    finally:
        cluster.stop()


def parse_args(argv: Sequence[str] | None) -> tuple[Config, Path, bool, bool]:
    p = argparse.ArgumentParser(
        description="Side-by-side overhead benchmark: client -> fake upstream vs client -> "
        "sidecar -> fake upstream (and a bare aiohttp relay and nginx, for scale)."
    )
    d = Config()
    p.add_argument("--quick", action="store_true", help="3 repetitions, shorter phases")
    p.add_argument("--reps", type=int, default=d.reps, help="repetitions per phase")
    p.add_argument("--json-seconds", type=int, default=d.json_seconds, help="seconds per wrk run")
    p.add_argument("--long-stream-tokens", type=int, default=d.long_stream_tokens)
    p.add_argument("--streams", type=int, default=d.streams, help="concurrent streams")
    p.add_argument("--stream-tokens", type=int, default=d.stream_tokens, help="chunks per stream")
    p.add_argument(
        "--slow-streams",
        type=int,
        default=d.slow_streams,
        help="paced streams open at once (memory per stream, paced CPU and gaps)",
    )
    p.add_argument("--slow-interval-ms", type=int, default=d.slow_interval_ms)
    p.add_argument("--slow-tokens", type=int, default=d.slow_tokens)
    p.add_argument(
        "--profile",
        choices=("auto", "always", "never"),
        default=d.profile,
        help="py-spy the sidecar: auto = for the missed targets",
    )
    p.add_argument("--profile-seconds", type=int, default=d.profile_seconds)
    p.add_argument("--client", choices=("auto", "wrk", "python"), default=d.client)
    p.add_argument("--no-bare", action="store_true", help="skip the bare aiohttp relay")
    p.add_argument(
        "--no-nginx",
        action="store_true",
        help="skip the nginx relay (the targets compared with nginx are then MISS)",
    )
    p.add_argument(
        "--loop",
        choices=("uvloop", "asyncio"),
        default=None,
        help=f"event loop of the sidecar (serve --event-loop) and the bare relay (default: "
        f"{d.loop}, or asyncio with a warning when uvloop is not installed; the fake upstream "
        "and the load generator are unchanged)",
    )
    p.add_argument("--keep", action="store_true", help="keep the temporary folder (ledger, logs)")
    p.add_argument("--fail-on-miss", action="store_true", help="exit 1 when a target is missed")
    p.add_argument(
        "--output", type=Path, default=RESULTS_DIR / "latest.json", help="where to write JSON"
    )
    p.add_argument(
        "--ledger-dir",
        default=None,
        help="folder for the temporary ledger (default: the system's temp folder); an experiment: "
        "/dev/shm (tmpfs) makes fsync free, to see what the durable commit costs",
    )
    a = p.parse_args(argv)
    cfg = Config(
        reps=max(1, min(a.reps, 50)),
        json_seconds=max(1, min(a.json_seconds, 60)),
        long_stream_tokens=max(1, min(a.long_stream_tokens, 1_000_000)),
        streams=max(1, min(a.streams, 512)),
        stream_tokens=max(1, min(a.stream_tokens, 100_000)),
        slow_streams=max(1, min(a.slow_streams, 5_000)),
        slow_interval_ms=max(10, min(a.slow_interval_ms, 1_000)),
        slow_tokens=max(60, min(a.slow_tokens, 1_000)),
        profile=a.profile,
        profile_seconds=max(5, min(a.profile_seconds, 120)),
        client=a.client,
        bare=not a.no_bare,
        nginx=not a.no_nginx,
        loop=a.loop or d.loop,
        ledger_dir=a.ledger_dir,
        keep=a.keep,
    )
    if a.quick:
        cfg.reps = min(cfg.reps, 3)
        cfg.json_seconds = min(cfg.json_seconds, 2)
        cfg.stream_tokens = min(cfg.stream_tokens, 2_000)
        cfg.profile_seconds = min(cfg.profile_seconds, 8)
    return cfg, a.output, a.fail_on_miss, a.loop is not None


def main(argv: Sequence[str] | None = None) -> int:
    global PINNED
    cfg, output, fail_on_miss, loop_asked = parse_args(argv)
    if not sys.platform.startswith("linux"):
        print("bench/overhead.py needs Linux (/proc, taskset)", file=sys.stderr)
        return 2
    if cfg.loop == "uvloop":
        python = str(VENV_PYTHON if VENV_PYTHON.exists() else Path(sys.executable))
        check = subprocess.run([python, "-c", "import uvloop"], capture_output=True, timeout=30)
        if check.returncode != 0:
            if loop_asked:
                print("--loop uvloop: uvloop is not installed (.venv/bin/pip install uvloop)")
                return 2
            print(
                "warning: uvloop is not installed: the sidecar and the bare relay run on asyncio",
                file=sys.stderr,
            )
            cfg.loop = "asyncio"
    PINNED = (os.cpu_count() or 1) >= 2 and shutil.which("taskset") is not None
    if PINNED:
        os.sched_setaffinity(0, {0})  # this process is the stream load generator: core 0
    else:
        print("warning: fewer than 2 cores or no taskset: running unpinned", file=sys.stderr)

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    workdir = Path(tempfile.mkdtemp(prefix="sidecar-bench-", dir=cfg.ledger_dir))
    try:
        results = asyncio.run(run(cfg, workdir, log))
    except BenchError as exc:
        print(f"benchmark failed: {exc}", file=sys.stderr)
        return 2
    finally:
        if cfg.keep:
            print(f"kept {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(results, indent=2) + "\n")
    print(render(results))
    print(f"\nwrote {output}")
    missed = any(c["result"] == "MISS" for c in results["targets"])
    return 1 if (missed and fail_on_miss) else 0


if __name__ == "__main__":
    sys.exit(main())
