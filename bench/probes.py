"""Issue 11's probes: what hostile input and a busy host cost, each measured in one run.

Run: ``.venv/bin/python bench/probes.py`` (``--quick`` for smaller sizes, ``--only NAME``).

* ``endless-line``: a FAKE engine (in this process) streams one SSE line of ``--line-mib`` MiB
  (then a normal chunk and ``[DONE]``) through the real sidecar (a subprocess, SQLite ledger);
  the sidecar's peak memory (``VmHWM``) before and after, and the bytes the client got.
* ``scrape``: ``--jobs`` small requests, each of its own job, through the sidecar; then the
  ``/metrics`` scrape's size and time, and the latency of a small request with and without a
  scraper hammering ``/metrics`` at the same time, beside the same request sent DIRECT to the
  fake engine in the same run.
* ``hot-path``: the SSE decoder and the stream meter on a recorded-shape token stream, the code
  before the bounds (from git) and now, alternated over repetitions (medians of ns per event).

The figures are printed and written to bench/results/probes.json; docs/BENCHMARKS.md records
them. Targets (issue 11): endless line <= 64 MiB growth; a small request during scrapes after
20,000 jobs <= 50 ms; a scrape < 200 kB. The targets live here, never in the unit tests.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import aiohttp
from aiohttp import web

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results" / "probes.json"
BEFORE_BOUNDS = "c3a00d2^"  # the commit before the SSE bound
CHAT = "/v1/chat/completions"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def chunk(content: str) -> bytes:
    choice = {"index": 0, "delta": {"content": content}, "logprobs": None, "finish_reason": None}
    obj = {
        "id": "chatcmpl-probe",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "probe",
        "choices": [choice],
    }
    return b"data: " + json.dumps(obj).encode() + b"\n\n"


ANSWER = json.dumps(
    {
        "id": "x",
        "object": "chat.completion",
        "model": "probe",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}}],
        "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4},
    }
).encode()


class FakeEngine:
    """A FAKE engine for the probes: a small JSON answer, or a stream with one long line."""

    def __init__(self, line_mib: int) -> None:
        self.line_mib = line_mib
        self.runner: web.AppRunner | None = None
        self.url = ""

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post(CHAT, self.chat)
        app.router.add_get("/v1/models", self.models)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        port = free_port()
        await web.TCPSite(self.runner, "127.0.0.1", port).start()
        self.url = f"http://127.0.0.1:{port}"

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": "probe", "object": "model"}]})

    async def chat(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        if not body.get("stream"):
            return web.Response(body=ANSWER, content_type="application/json")
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(chunk("a"))
        await response.write(b'data: {"padding": "')
        piece = b"x" * 65536
        for _ in range(16 * self.line_mib):
            await response.write(piece)
        await response.write(b'"}\n\n' + chunk("b") + b"data: [DONE]\n\n")
        await response.write_eof()
        return response


class Sidecar:
    def __init__(self, upstream: str, folder: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {k: v for k, v in os.environ.items() if not k.startswith("SIDECAR_")}
        self.log = open(folder / "sidecar.log", "ab")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "sidecar",
                "serve",
                "--upstream",
                upstream,
                "--ledger",
                f"sqlite:///{folder / 'ledger.db'}",
                "--listen",
                f"127.0.0.1:{self.port}",
                "--log-level",
                "warning",
            ],
            cwd=ROOT,
            env=env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )

    async def ready(self, http: aiohttp.ClientSession) -> None:
        for _ in range(400):
            try:
                async with http.get(self.url + "/sidecar/live") as resp:
                    if resp.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.05)
        raise RuntimeError("the sidecar did not start")

    def peak_kib(self) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
        raise RuntimeError("no VmHWM")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)
        self.log.close()


async def probe_endless_line(line_mib: int) -> dict[str, Any]:
    engine = FakeEngine(line_mib)
    await engine.start()
    with tempfile.TemporaryDirectory() as folder:
        sidecar = Sidecar(engine.url, Path(folder))
        try:
            async with aiohttp.ClientSession() as http:
                await sidecar.ready(http)
                async with http.post(sidecar.url + CHAT, json={"model": "probe"}) as resp:
                    await resp.read()
                before = sidecar.peak_kib()
                received = 0
                started = time.perf_counter()
                body = {"model": "probe", "stream": True, "job_id": 1}
                async with http.post(sidecar.url + CHAT, json=body) as resp:
                    async for piece in resp.content.iter_any():
                        received += len(piece)
                seconds = time.perf_counter() - started
                after = sidecar.peak_kib()
                async with http.get(sidecar.url + "/sidecar/jobs/1") as resp:
                    job = await resp.json()
        finally:
            sidecar.stop()
            await engine.stop()
    return {
        "line_mib": line_mib,
        "peak_before_mib": round(before / 1024, 1),
        "peak_after_mib": round(after / 1024, 1),
        "growth_mib": round((after - before) / 1024, 1),
        "bytes_relayed": received,
        "relay_mib_per_s": round(received / 2**20 / seconds, 1),
        "billable_tokens": job["billable_tokens"],
        "target_growth_mib": 64,
        "pass": (after - before) / 1024 <= 64,
    }


async def _latencies(http: aiohttp.ClientSession, url: str, n: int, job: int | None) -> list[float]:
    out = []
    body: dict[str, Any] = {"model": "probe"}
    if job is not None:
        body["job_id"] = job
    for _ in range(n):
        started = time.perf_counter()
        async with http.post(url + CHAT, json=body) as resp:
            await resp.read()
        out.append((time.perf_counter() - started) * 1000)
    return out


async def probe_scrape(jobs: int, samples: int) -> dict[str, Any]:
    engine = FakeEngine(0)
    await engine.start()
    with tempfile.TemporaryDirectory() as folder:
        sidecar = Sidecar(engine.url, Path(folder))
        try:
            connector = aiohttp.TCPConnector(limit=64)
            async with aiohttp.ClientSession(connector=connector) as http:
                await sidecar.ready(http)
                queue = iter(range(1, jobs + 1))

                async def serve_jobs() -> None:
                    for job in queue:
                        body = {"model": "probe", "job_id": job}
                        async with http.post(sidecar.url + CHAT, json=body) as resp:
                            assert resp.status == 200
                            await resp.read()

                started = time.perf_counter()
                await asyncio.gather(*(serve_jobs() for _ in range(32)))
                fill_s = time.perf_counter() - started
                scrape_ms, size = [], 0
                for _ in range(10):
                    t = time.perf_counter()
                    async with http.get(sidecar.url + "/metrics") as resp:
                        size = len(await resp.read())
                    scrape_ms.append((time.perf_counter() - t) * 1000)
                quiet = await _latencies(http, sidecar.url, samples, 7)
                direct = await _latencies(http, engine.url, samples, None)
                stop = asyncio.Event()
                scrapes = 0

                async def scraper() -> None:
                    nonlocal scrapes
                    while not stop.is_set():
                        async with http.get(sidecar.url + "/metrics") as resp:
                            await resp.read()
                        scrapes += 1

                hammer = [asyncio.create_task(scraper()) for _ in range(2)]
                busy = await _latencies(http, sidecar.url, samples, 7)
                stop.set()
                await asyncio.gather(*hammer)
        finally:
            sidecar.stop()
            await engine.stop()

    def summary(values: list[float]) -> dict[str, float]:
        ordered = sorted(values)
        return {
            "p50_ms": round(statistics.median(ordered), 2),
            "p99_ms": round(ordered[int(len(ordered) * 0.99) - 1], 2),
            "max_ms": round(ordered[-1], 2),
        }

    busy_summary = summary(busy)
    return {
        "jobs": jobs,
        "fill_requests_per_s": round(jobs / fill_s),
        "scrape_bytes": size,
        "scrape_ms_median": round(statistics.median(scrape_ms), 2),
        "small_request_direct": summary(direct),
        "small_request_via_sidecar": summary(quiet),
        "small_request_during_scrapes": busy_summary,
        "scrapes_during_sample": scrapes,
        "targets": {"scrape_bytes": "< 200000", "during_scrapes_max_ms": "<= 50"},
        "pass": size < 200_000 and busy_summary["max_ms"] <= 50,
    }


def _module_at(revision: str, path: str, name: str) -> ModuleType:
    source = subprocess.run(
        ["git", "show", f"{revision}:{path}"], cwd=ROOT, check=True, capture_output=True
    ).stdout
    folder = Path(tempfile.mkdtemp())
    file = folder / f"{name}.py"
    file.write_bytes(source)
    spec = importlib.util.spec_from_file_location(name, file)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def probe_hot_path(tokens: int, repetitions: int) -> dict[str, Any]:
    sys.path.insert(0, str(ROOT))
    from sidecar.metering import Endpoint, StreamMeter
    from sidecar.metering import sse as sse_now

    sse_before = _module_at(BEFORE_BOUNDS, "sidecar/metering/sse.py", "sse_before_bounds")
    reads = [chunk(f"tok{i % 97}") for i in range(tokens)] + [b"data: [DONE]\n\n"]

    def decode(decoder_class: Any) -> float:
        decoder = decoder_class()
        started = time.perf_counter_ns()
        for read in reads:
            decoder.feed(read)
        return (time.perf_counter_ns() - started) / len(reads)

    def meter(decoder_class: Any) -> float:
        import sidecar.metering.usage as usage

        saved = usage.SSEDecoder
        usage.SSEDecoder = decoder_class
        try:
            m = StreamMeter(Endpoint.CHAT)
        finally:
            usage.SSEDecoder = saved
        started = time.perf_counter_ns()
        for read in reads:
            m.feed(read)
        return (time.perf_counter_ns() - started) / len(reads)

    def old_meter_decoder(*_args: Any) -> Any:
        return sse_before.SSEDecoder()  # the meter passes the bound; the old decoder has none

    figures: dict[str, list[float]] = {
        k: [] for k in ("dec_before", "dec_now", "m_before", "m_now")
    }
    for i in range(repetitions):
        order = [
            ("dec_before", lambda: decode(sse_before.SSEDecoder)),
            ("dec_now", lambda: decode(sse_now.SSEDecoder)),
        ]
        order += [
            ("m_before", lambda: meter(old_meter_decoder)),
            ("m_now", lambda: meter(sse_now.SSEDecoder)),
        ]
        if i % 2:
            order.reverse()
        for key, run in order:
            figures[key].append(run())
    med = {k: statistics.median(v) for k, v in figures.items()}
    return {
        "tokens_per_stream": tokens,
        "repetitions": repetitions,
        "decoder_ns_per_event_before": round(med["dec_before"], 1),
        "decoder_ns_per_event_now": round(med["dec_now"], 1),
        "decoder_ratio_now_to_before": round(med["dec_now"] / med["dec_before"], 3),
        "meter_ns_per_event_before": round(med["m_before"], 1),
        "meter_ns_per_event_now": round(med["m_now"], 1),
        "meter_ratio_now_to_before": round(med["m_now"] / med["m_before"], 3),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="smaller sizes")
    parser.add_argument("--only", choices=("endless-line", "scrape", "hot-path"))
    parser.add_argument("--line-mib", type=int, default=256)
    parser.add_argument("--jobs", type=int, default=20_000)
    args = parser.parse_args()
    line_mib = 64 if args.quick else args.line_mib
    jobs = 2_000 if args.quick else args.jobs
    results: dict[str, Any] = {"when": time.strftime("%Y-%m-%d %H:%M:%S"), "quick": args.quick}
    if args.only in (None, "hot-path"):
        results["hot_path"] = probe_hot_path(2_000, 5 if args.quick else 21)
        print(json.dumps(results["hot_path"], indent=2))
    if args.only in (None, "endless-line"):
        results["endless_line"] = asyncio.run(probe_endless_line(line_mib))
        print(json.dumps(results["endless_line"], indent=2))
    if args.only in (None, "scrape"):
        results["scrape"] = asyncio.run(probe_scrape(jobs, 200 if args.quick else 500))
        print(json.dumps(results["scrape"], indent=2))
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
