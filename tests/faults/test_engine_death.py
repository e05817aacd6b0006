"""The engine dies mid-stream: what was relayed is recorded, the client sees a broken stream.

Two ways to die:

* on cue, with the fake engine (FaultyUpstream ``fault:die-after-N``: N chunks, then the TCP
  connection is cut) over the three streaming APIs (OpenAI chat, /v1/inference SSE, the
  WebSocket session), N around the progress step (0, 1, 63, 64, 65, ...): the ABORTED record
  holds exactly the N tokens relayed, committed before the client's connection is cut;
* for real: the llama-cpp-python server is killed with SIGKILL at random moments under mixed
  traffic with claims on anvil, and started again. Requests meanwhile fail clearly (502), the
  streams it cut are recorded within the progress bound, and every invariant holds.
"""

from __future__ import annotations

import asyncio
import json
import random
import time

import aiohttp
import pytest

from tests.faults import harness
from tests.faults.campaign import SEED, TALLY
from tests.faults.invariants import (
    Checks,
    Seen,
    check_chain,
    check_responses,
    read_ledger,
    wait_caught_up,
)
from tests.support.sidecar import SidecarProcess

pytestmark = pytest.mark.integration

DIE_AFTER = (0, 1, 10, 63, 64, 65, 127, 128, 300)
ENGINE_DEATHS = 3


async def cut_openai(http: aiohttp.ClientSession, url: str, job: int, n: int) -> Seen:
    seen = Seen("die", "openai-chat", job, True, 0, sent=True)
    from sidecar.metering import Endpoint, StreamMeter

    meter = StreamMeter(Endpoint.CHAT)
    body = {
        "model": f"fault:die-after-{n}",
        "stream": True,
        "job_id": job,
        "messages": [{"role": "user", "content": "x"}],
    }
    try:
        async with http.post(url + "/v1/chat/completions", json=body) as resp:
            seen.status = resp.status
            seen.key = resp.headers.get("X-Sidecar-Request-Id")
            async for chunk in resp.content.iter_any():
                meter.feed(chunk)
                seen.tokens = meter.usage().completion_tokens
                seen.finished = meter.done
    except aiohttp.ClientError as exc:
        seen.error = type(exc).__name__
    return seen


async def cut_inference(http: aiohttp.ClientSession, url: str, job: int, n: int) -> Seen:
    seen = Seen("die", "inference-sse", job, True, 0, sent=True)
    body = {
        "model": f"fault:die-after-{n}",
        "prompt": "x",
        "conversation_context": [{"role": "user", "content": "hello"}],  # a chat, for the fake
        "max_tokens": 1000,
        "stream": True,
        "jobId": job,
    }
    try:
        async with http.post(url + "/v1/inference", json=body) as resp:
            seen.status = resp.status
            seen.key = resp.headers.get("X-Sidecar-Request-Id")
            buffer = b""
            async for chunk in resp.content.iter_any():
                buffer += chunk
                while b"\n\n" in buffer:
                    event, buffer = buffer.split(b"\n\n", 1)
                    obj = json.loads(event.removeprefix(b"data: "))
                    seen.tokens += obj["tokens"]
                    seen.finished = obj["finish_reason"] is not None
    except aiohttp.ClientError as exc:
        seen.error = type(exc).__name__
    return seen


async def cut_ws(http: aiohttp.ClientSession, url: str, job: int, n: int) -> Seen:
    seen = Seen("die", "ws", job, True, 0, sent=True)
    async with http.ws_connect(url.replace("http", "ws", 1) + "/v1/ws") as ws:
        assert (await ws.receive_json(timeout=30))["type"] == "connected"
        await ws.send_json({"type": "session_init", "jobId": str(job), "session_id": str(job)})
        assert (await ws.receive_json(timeout=30))["type"] == "session_init_ack"
        request = {
            "prompt": "x",
            "model": f"fault:die-after-{n}",
            "max_tokens": 1000,
            "conversation_context": [{"role": "user", "content": "hello"}],
        }
        await ws.send_json({"type": "prompt", "jobId": str(job), "request": request})
        while True:
            message = await ws.receive_json(timeout=30)
            if message["type"] == "stream_chunk":
                seen.tokens += message["tokens"]
            elif message["type"] == "error":
                seen.error = message.get("code")
            elif message["type"] == "stream_end":
                seen.finished = message["reason"] == "complete"
                if seen.finished:
                    seen.key = message.get("request_id")
                break
        # The session ends without its close frame: a job of this test only, nothing to settle.
    return seen


async def test_engine_dies_on_cue(faulty_upstream, sidecar_factory, tmp_path) -> None:
    family = TALLY.family("engine death")
    started = time.monotonic()
    models = tuple(f"die-{n}=fault:die-after-{n}" for n in DIE_AFTER)
    ledger_path = tmp_path / "cue.db"
    sidecar = await sidecar_factory(faulty_upstream.url, ledger_path=ledger_path, model=models)
    found = []
    job = 5000
    async with aiohttp.ClientSession() as http:
        for n in DIE_AFTER:
            for route, cut in (
                ("openai", cut_openai),
                ("inference", cut_inference),
                ("ws", cut_ws),
            ):
                job += 1
                before = set(read_ledger(ledger_path).records)
                seen = await cut(http, sidecar.url, job, n)
                # No wait: the ABORTED record is committed before the client sees the cut.
                ledger = read_ledger(ledger_path)
                checks = Checks()
                checks.check(
                    not seen.finished,
                    "broken_stream_ended_clean",
                    f"{route} die-after-{n}: the client saw a clean end ({seen})",
                )
                checks.check(
                    seen.tokens == n,
                    "relay_short",
                    f"{route} die-after-{n}: the client got {seen.tokens} of {n} chunks",
                )
                responses, _ = check_responses(
                    ledger, [seen], before, streams_over=True, exact_cut=True
                )
                checks.extend(responses)
                records = [r for r in ledger.of_job(job) if r.key not in before]
                checks.check(
                    len(records) == 1 and records[0].state == "aborted",
                    "open_stream_lost",
                    f"{route} die-after-{n}: records {records}",
                )
                found += family.trial(checks)
    family.seconds += time.monotonic() - started
    assert not found, "\n".join(f"{v.name}: {v.detail}" for v in found)


@pytest.mark.timeout(300)
async def test_engine_killed_under_traffic(devnet, tmp_path) -> None:
    from devtools.engine import Engine

    family = TALLY.family("engine death")
    started = time.monotonic()
    rng = random.Random(f"{SEED}-engine")
    moments = random.Random(f"{SEED}-engine-moments")
    deployment = devnet.deploy("v1", dispute_window=30)
    jobs = harness.new_jobs(devnet, deployment, 6)
    key_file = devnet.write_host_key_file(tmp_path / "host.key")
    ledger_path = tmp_path / "ledger.db"
    read = harness.chain_reader(devnet, deployment)
    engine = Engine(tmp_path / "engine").start()
    proc = SidecarProcess(
        engine.base_url,
        ledger_path,
        tmp_path / "sidecar.log",
        *harness.chain_flags(devnet, deployment, key_file),
    )
    found = []
    try:
        await proc.wait_ready(timeout=60)
        lanes, traffic, task = harness.endless_traffic(proc.url, devnet, jobs, engine.model_id, rng)
        refused_while_down = []
        for _ in range(ENGINE_DEATHS):
            await asyncio.sleep(moments.uniform(0.5, 3.0))
            assert engine.process is not None
            engine.process.kill()  # SIGKILL: the engine dies mid-generation
            engine.process.wait()
            family.count("engine deaths")
            await asyncio.sleep(0.5)
            mark = {id(s) for lane in lanes for s in lane.seen}
            await asyncio.sleep(0.5)
            refused_while_down += [
                s for lane in lanes for s in lane.seen if id(s) not in mark and s.status
            ]
            engine.stop()
            engine.start()  # the same port: the sidecar's engine comes back
        await asyncio.sleep(2.0)
        traffic.stop.set()
        seen = await asyncio.wait_for(task, 120)

        checks = Checks()
        for s in refused_while_down:
            checks.check(
                s.status in (502, 503, 504) and s.tokens == 0,
                "served_without_engine",
                f"while the engine was down: {s} (status {s.status})",
            )
        served_after = [s for s in seen if s.finished][-5:]
        checks.check(
            len(served_after) == 5, "no_recovery", "nothing served after the engine came back"
        )
        family.count(
            "cut by the engine", sum(1 for s in seen if s.stream and s.tokens and not s.finished)
        )
        ledger, onchain, _ = await wait_caught_up(
            ledger_path, read, jobs, timeout=120, nudge=harness.time_nudge(devnet)
        )
        responses, counters = check_responses(ledger, seen, set(), streams_over=True)
        checks.extend(responses)
        checks.extend(check_chain(ledger, onchain, quiescent=True))
        checks.extend(await harness.settle_all(proc.url, ledger_path, devnet, deployment, jobs))
        for name, n in counters.items():
            family.count(name, n)
        found = family.trial(checks, trials=ENGINE_DEATHS)
    finally:
        code = proc.stop()
        engine.stop()
        family.seconds += time.monotonic() - started
    for v in found:
        print(f"VIOLATION {v.name}: {v.detail}")
    assert code == 0, proc.log_tail()
    assert not found, "\n".join(f"{v.name}: {v.detail}" for v in found[:30])
