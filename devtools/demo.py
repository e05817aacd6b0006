"""The end-to-end demo behind ``make demo``: chain, engine, sidecar, OpenAI SDK client, per-job
table, claims and settlement.

    python -m devtools.demo --model var/tiny.gguf [--workdir DIR]

Everything it starts, it stops, even on Ctrl-C or failure: the engine through devtools/engine.py
(the launcher the tests use too), the sidecar through devtools/children.py.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import sys
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from devtools.children import start_process, stop_process, wait_for_http
from devtools.demo_market import (
    MARKET_MODEL,
    chain_flags,
    encrypted_session,
    job_tokens,
    refused_strangers,
    register_host,
)
from devtools.devchain import Deployment
from devtools.devnet import Devnet
from devtools.engine import Engine, free_port
from sidecar.jobs_table import format_jobs_table
from sidecar.ledger import JobTotals

if TYPE_CHECKING:  # the SDK is imported when the demo runs: without it, a message says so
    from openai import OpenAI
    from openai.types.chat import ChatCompletionMessageParam


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
    sidecar_port = free_port()
    sidecar_url = f"http://127.0.0.1:{sidecar_port}"
    # No model alias: the engine lists the model's path. new_session: a Ctrl-C reaches the demo
    # only, which stops the sidecar and then the engine, in that order.
    engine = Engine(
        folder,
        model=model,
        model_alias=None,
        startup_timeout=120,
        log_name="engine.log",
        new_session=True,
    )

    print(f"demo folder: {folder}")
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
        try:
            engine.start()
            print(f"2. engine: llama-cpp-python server on {model} at {engine.base_url}")
            print(f"3. sidecar: {sidecar_url} -> {engine.base_url}, ledger {ledger}")
            command = _sidecar_command(engine, sidecar_port, ledger, chain, deployment, key_file)
            sidecar = start_process(command, folder / "sidecar.log", new_session=True)
            try:
                wait_for_http(
                    sidecar,
                    sidecar_url + "/sidecar/health",
                    name="the sidecar",
                    log_path=folder / "sidecar.log",
                    timeout=30,
                )
                print("4. the host publishes itself in the marketplace (sidecar host register):")
                _, public_key = register_host(chain, deployment, key_file, sidecar_url)
                print("5. a client proves it is the job's (--session-auth bound, the default):")
                requester_key = folder / "requester.key"
                requester_key.write_text(chain.requester.key)
                tokens = job_tokens(chain, sidecar_url, jobs, requester_key)
                clients = {
                    str(job): OpenAI(base_url=sidecar_url + "/v1", api_key=tokens[job])
                    for job in jobs
                }
                clients["unattributed"] = OpenAI(base_url=sidecar_url + "/v1", api_key="none")
                seen: dict[str, _Seen] = {}
                print("6. requests through the sidecar with the OpenAI SDK (job token as api_key):")
                _send_requests(clients, seen, jobs)
                print("   strangers, once the jobs are in use (bound to the depositor's key):")
                stranger = job_token_for(chain, deployment, jobs[0], chain.stranger.key)
                refused = refused_strangers(sidecar_url, jobs[0], stranger)
                print("   the marketplace SDK's default session (encrypted, /v1/ws):")
                asyncio.run(
                    encrypted_session(
                        chain,
                        sidecar_url,
                        jobs[1],
                        public_key,
                        seen.setdefault(str(jobs[1]), _Seen()),
                    )
                )
                print("7. claims (submitProofOfWork) as the sidecar sends them:")
                views = _settle_all(sidecar_url, jobs)
                with urllib.request.urlopen(sidecar_url + "/sidecar/jobs", timeout=10) as resp:
                    listed = json.loads(resp.read())["jobs"]
            finally:
                stop_process(sidecar, 30)
            print("8. sidecar stopped; the ledger says (`sidecar jobs`):\n")
        finally:
            engine.stop(timeout=30)
        totals = [_totals_from_json(j) for j in listed]
        print(format_jobs_table(totals))
        print()
        ok = _compare(totals, seen) and refused
        ok &= _show_settlement(chain, deployment, jobs, views)
    if not workdir:
        shutil.rmtree(folder, ignore_errors=True)
    return 0 if ok else 1


def _sidecar_command(
    engine: Engine,
    port: int,
    ledger: Path,
    chain: Devnet,
    deployment: Deployment,
    key_file: Path,
) -> list[str]:
    """``sidecar serve`` in front of the engine, claiming on the devnet's v1 double, the model
    under its marketplace name, jobs bound to their clients (the default with a chain)."""
    return [
        sys.executable,
        "-m",
        "sidecar",
        "serve",
        "--upstream",
        engine.base_url,
        "--model",
        f"{MARKET_MODEL}={engine.model_id}",
        "--context-window",
        str(engine.n_ctx),
        "--listen",
        f"127.0.0.1:{port}",
        "--ledger",
        f"sqlite:///{ledger}",
        *chain_flags(chain, deployment, key_file),
        "--contract-version",
        "v1",
        "--dispute-window",
        "30",
    ]


def job_token_for(chain: Devnet, deployment: Deployment, job: int, key: str) -> str:
    from sidecar.auth.tokens import make_job_token

    return make_job_token(
        key,
        chain_id=chain.chain_id,
        marketplace=deployment.marketplace,
        host=chain.host_account.address,
        job_id=job,
    )


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
    chain: Devnet, deployment: Deployment, jobs: tuple[int, int], views: dict[int, dict[str, Any]]
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


def _send_requests(
    clients: dict[str, OpenAI], seen: dict[str, _Seen], jobs: tuple[int, int]
) -> None:
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
        got, source = _one_request(clients[job], route, stream, max_tokens, naming)
        tally.completion_tokens += got
        shown = json.dumps(naming) if naming else "no job"
        kind = "stream" if stream else "json  "
        print(
            f"   {route:<11} {kind} {shown:<24} max_tokens={max_tokens:<3} -> {got} tokens "
            f"({source})"
        )


def _one_request(
    client: OpenAI, route: str, stream: bool, max_tokens: int, naming: dict[str, object]
) -> tuple[int, str]:
    """One request; its completion tokens as the client sees them, and where that count is from:
    the engine's usage for a JSON answer, the content chunks received for a stream."""
    if route == "chat":
        messages: list[ChatCompletionMessageParam] = [
            {"role": "user", "content": "Tell me a story."}
        ]
        if stream:
            chunks = client.chat.completions.create(
                model=MARKET_MODEL,
                messages=messages,
                max_tokens=max_tokens,
                extra_body=naming,
                stream=True,
            )
            received = sum(1 for c in chunks if c.choices and c.choices[0].delta.content)
            return received, "chunks received"
        answer = client.chat.completions.create(
            model=MARKET_MODEL, messages=messages, max_tokens=max_tokens, extra_body=naming
        )
        return (answer.usage.completion_tokens if answer.usage else 0), "engine usage"
    prompt = "Once upon a time"
    if stream:
        pieces = client.completions.create(
            model=MARKET_MODEL, prompt=prompt, max_tokens=max_tokens, extra_body=naming, stream=True
        )
        return sum(1 for c in pieces if c.choices and c.choices[0].text), "chunks received"
    completion = client.completions.create(
        model=MARKET_MODEL, prompt=prompt, max_tokens=max_tokens, extra_body=naming
    )
    return (completion.usage.completion_tokens if completion.usage else 0), "engine usage"


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m devtools.demo",
        description="Start a local chain, the engine on a GGUF model and the sidecar in front of "
        "it, send streamed and non-streamed requests for two jobs with the OpenAI SDK, print what "
        "was metered, claimed and settled, and stop everything.",
    )
    parser.add_argument(
        "--model",
        default=os.environ.get("SIDECAR_DEMO_MODEL", "var/tiny.gguf"),
        help="path of a GGUF model for the engine (default: $SIDECAR_DEMO_MODEL or "
        "var/tiny.gguf, which `make demo` writes)",
    )
    parser.add_argument(
        "--workdir",
        default=None,
        help="folder for the demo's ledger and logs (default: a temporary one)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_demo(model=args.model, workdir=args.workdir)


if __name__ == "__main__":
    raise SystemExit(main())
