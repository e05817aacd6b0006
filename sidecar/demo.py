"""The end-to-end demo behind ``make demo``: engine, sidecar, OpenAI SDK client, per-job table.

Everything it starts, it stops, even on Ctrl-C or failure.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
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
from typing import Any

from sidecar.children import die_with_parent, stop_process
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
        proc = subprocess.Popen(
            cmd,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # Ctrl-C reaches the demo, which stops them in order
            preexec_fn=die_with_parent(),
        )
        try:
            yield proc
        finally:
            stop_process(proc, 30)


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
    from sidecar.devnet import Devnet

    with Devnet.start(log_dir=folder) as chain:
        deployment = chain.deploy("v1", dispute_window=30)
        jobs = (chain.create_session_job(deployment), chain.create_session_job(deployment))
        key_file = chain.write_host_key_file(folder / "host.key")
        first = chain.session_job(deployment, jobs[0])
        print(
            f"1. chain: anvil at {chain.rpc_url}, JobMarketplace v1 double at "
            f"{deployment.marketplace}"
        )
        print(
            f"   the requester opened session jobs {jobs[0]} and {jobs[1]} for this host: "
            f"deposit {first['deposit']} wei each, {first['pricePerToken']} wei per token"
        )
        chain.increase_time(60)  # the claim-rate cap counts seconds since the session began
        chain.mine()
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
            "--rpc-url",
            chain.rpc_url,
            "--chain-id",
            str(chain.chain_id),
            "--marketplace",
            deployment.marketplace,
            "--contract-version",
            "v1",
            "--host-key-file",
            str(key_file),
            "--dispute-window",
            "30",
        ]
        print(f"2. engine: llama-cpp-python server on {model} at {engine_url}")
        with _process(engine_cmd, folder / "engine.log") as engine:
            _wait_http(engine_url + "/v1/models", engine, folder / "engine.log", 120)
            print(f"3. sidecar: {sidecar_url} -> {engine_url}, ledger {ledger}")
            with _process(sidecar_cmd, folder / "sidecar.log") as sidecar:
                _wait_http(sidecar_url + "/sidecar/health", sidecar, folder / "sidecar.log", 30)
                client = OpenAI(base_url=sidecar_url + "/v1", api_key="none", max_retries=0)
                seen: dict[str, _Seen] = {}
                print("4. requests through the sidecar with the OpenAI SDK:")
                _send_requests(client, seen, jobs)
                print("   a marketplace client's WebSocket session (the host node API, /v1/ws):")
                asyncio.run(
                    _ws_session(sidecar_url, jobs[1], seen.setdefault(str(jobs[1]), _Seen()))
                )
                print("5. claims (submitProofOfWork) as the sidecar sends them:")
                views = _settle_all(sidecar_url, jobs)
                with urllib.request.urlopen(sidecar_url + "/sidecar/jobs", timeout=10) as resp:
                    listed = json.loads(resp.read())["jobs"]
            print("6. sidecar stopped; the ledger says (`sidecar jobs`):\n")
        totals = [_totals_from_json(j) for j in listed]
        print(format_jobs_table(totals))
        print()
        ok = _compare(totals, seen)
        ok &= _show_settlement(chain, deployment, jobs, views)
    if not workdir:
        shutil.rmtree(folder, ignore_errors=True)
    return 0 if ok else 1


def _get_json(url: str, method: str = "GET") -> dict[str, Any]:
    request = urllib.request.Request(url, method=method, data=b"" if method == "POST" else None)
    with urllib.request.urlopen(request, timeout=10) as resp:
        result: dict[str, Any] = json.loads(resp.read())
        return result


def _settle_all(sidecar_url: str, jobs: tuple[int, int]) -> dict[int, dict[str, Any]]:
    """Show each claim as it lands; once every job's claimable tokens are claimed, ask for
    settlement and wait for it."""
    shown: set[tuple[int, int]] = set()
    views: dict[int, dict[str, Any]] = {}

    def quiet(view: dict[str, Any]) -> bool:  # nothing in flight, nothing claimable left
        in_flight = any(c["state"] in ("pending", "sent") for c in view["claims"])
        return not in_flight and view["billable_tokens"] - view["tokens_claimed"] < 100

    def settled(view: dict[str, Any]) -> bool:
        return any(c["kind"] == "settle" and c["state"] == "confirmed" for c in view["claims"])

    asked = False
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        for job in jobs:
            views[job] = _get_json(f"{sidecar_url}/sidecar/jobs/{job}")
            for claim in views[job]["claims"]:
                if claim["state"] in ("confirmed", "unclaimable") and (job, claim["seq"]) not in (
                    shown
                ):
                    shown.add((job, claim["seq"]))
                    print("   " + _describe_claim(job, claim))
        if asked and all(settled(views[j]) for j in jobs):
            return views
        if not asked and all(quiet(views[j]) for j in jobs):
            print("   settling both sessions (POST /sidecar/jobs/{id}/settle):")
            for job in jobs:
                _get_json(f"{sidecar_url}/sidecar/jobs/{job}/settle", method="POST")
            asked = True
        time.sleep(0.2)
    raise TimeoutError("the claims and settlements did not complete within 90 s")


def _describe_claim(job: int, claim: dict[str, Any]) -> str:
    if claim["kind"] == "settle":
        return f"job {job}: completeSessionJob mined in {claim['tx_hash']}"
    if claim["state"] == "unclaimable":
        return (
            f"job {job}: {claim['tokens']} tokens left under the contract's 100-token "
            "minimum: recorded as unclaimable"
        )
    return (
        f"job {job}: claim #{claim['seq']} of {claim['tokens']} tokens, ProofSubmitted in "
        f"{claim['tx_hash']}"
    )


def _show_settlement(
    chain: Any, deployment: Any, jobs: tuple[int, int], views: dict[int, dict[str, Any]]
) -> bool:
    ok = True
    print("on-chain after settlement:")
    for job in jobs:
        onchain = chain.session_job(deployment, job)
        confirmed = views[job]["tokens_confirmed"]
        price = int(onchain["pricePerToken"])
        gross = int(onchain["tokensUsed"]) * price
        refund = int(onchain["deposit"]) - gross
        match = int(onchain["tokensUsed"]) == confirmed and onchain["statusName"] == "Completed"
        ok &= match
        print(
            f"   job {job}: {onchain['statusName']}, tokensUsed {onchain['tokensUsed']} = "
            f"ledger confirmed {confirmed} ({'match' if match else 'MISMATCH'}); "
            f"host earns {gross - gross * 250 // 10_000} wei after the 2.5% fee, "
            f"requester refunded {refund} wei"
        )
    print(f"   host earnings credited in HostEarnings: {chain.host_earnings(deployment)} wei")
    return ok


def _send_requests(client: object, seen: dict[str, _Seen], jobs: tuple[int, int]) -> None:
    from openai import OpenAI

    assert isinstance(client, OpenAI)
    a, b = str(jobs[0]), str(jobs[1])
    plan: list[tuple[str, dict[str, object], str, bool, int]] = [
        # (job as the client names it, how it names it, route, stream, max_tokens)
        (a, {"session_id": f"{a}n"}, "chat", False, 60),
        (a, {"session_id": f"{a}n"}, "chat", True, 72),
        (a, {"job_id": int(a)}, "completions", True, 16),
        (b, {"jobId": b}, "completions", False, 120),
        (b, {"job_id": b}, "chat", True, 48),
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


async def _ws_session(sidecar_url: str, job: int, tally: _Seen) -> None:
    """init, three streamed prompts, session_end: as the marketplace SDK does it."""
    import aiohttp

    ws_url = sidecar_url.replace("http://", "ws://") + "/v1/ws"
    async with aiohttp.ClientSession() as http, http.ws_connect(ws_url) as ws:
        await ws.send_json(
            {"type": "session_init", "session_id": f"demo-{job}", "jobId": f"{job}n"}
        )
        ack = await ws.receive_json()
        print(f"   session_init -> {ack['type']}, tokens so far {ack.get('tokens_used')}")
        for max_tokens in (40, 50, 60):
            request = {"prompt": "Once upon a time", "max_tokens": max_tokens, "stream": True}
            await ws.send_json({"type": "prompt", "jobId": f"{job}n", "request": request})
            chunks = 0
            while (message := await ws.receive_json())["type"] == "stream_chunk":
                chunks += message["tokens"]
            tally.requests += 1
            tally.completion_tokens += chunks
            print(
                f"   prompt max_tokens={max_tokens:<3} -> {chunks} stream_chunk tokens, "
                f"{message['type']} tokens_used={message.get('tokens_used')}, "
                f"session total {message.get('session_tokens')}"
            )
        await ws.send_json({"type": "session_end"})
        await ws.receive_json()


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
