"""What every fault family sets up: a marketplace on the devnet with one session per lane, the
sidecar's flags for it, the lanes of mixed traffic, and the settlement at the end."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import aiohttp

from sidecar.crypto import HostKey
from tests.faults.invariants import (
    Checks,
    Ledger,
    OnChain,
    check_chain,
    read_both,
    read_chain,
    read_ledger,
)
from tests.faults.traffic import Lane, Traffic

DEPOSIT = 10**18  # wei per session: a million tokens at the prices below
PRICE = {"v1": 10**12, "v2": 10**15}  # v2's price is per 1000 tokens
CHECKPOINT = 100  # --checkpoint-tokens (the default)
RATE_V1 = 20  # the v1 contract's claim-rate cap, tokens per second since the last proof


def let_time_pass(devnet: Any, ledger_path: Path, deployment: Any, jobs: Sequence[int]) -> int:
    """Move the chain's clock on far enough for the rate cap to allow every job's backlog
    (time passing while the fault lasted, or while the sidecar was down); the seconds added."""
    devnet.mine()  # claims still in the mempool first: their proofs restart the cap's clock
    read = chain_reader(devnet, deployment)
    left = backlog(read_ledger(ledger_path), {job: read(job) for job in jobs})
    seconds = left // RATE_V1 + 2
    devnet.increase_time(seconds)
    devnet.mine()
    return seconds


def mixed_lanes(jobs: Sequence[int], model: str, *, short: bool = False) -> list[Lane]:
    """Seven lanes on six jobs: every API, and two lanes sharing a job (requests of one job
    in flight at once, over both APIs)."""
    a, b, c, d, e, f = jobs
    top = 240 if short else 600
    return [
        Lane("openai-json", a, 16, 200, model=model),
        Lane("inference-sse", a, 64, top, model=model),
        Lane("openai-chat", b, 64, top, model=model),
        Lane("openai-stream", c, 64, top, model=model),
        Lane("inference-json", d, 16, 200, model=model),
        Lane("ws", e, 64, top, model=model),
        Lane("ws-encrypted", f, 64, top, model=model),
    ]


def endless_traffic(
    url: str,
    devnet: Any,
    jobs: Sequence[int],
    model: str,
    rng: random.Random,
    *,
    short: bool = False,
    **options: Any,
) -> tuple[list[Lane], Traffic, asyncio.Task[None]]:
    """The seven lanes against the sidecar at ``url``, each going on until told to stop."""
    lanes = mixed_lanes(jobs, model, short=short)
    for lane in lanes:
        lane.keep_going = True
    traffic = Traffic(
        url,
        lanes,
        rng,
        chain_id=devnet.chain_id,
        host_public_key=host_public_key(devnet),
        **options,
    )
    return lanes, traffic, asyncio.create_task(traffic.run())


def new_jobs(devnet: Any, deployment: Any, n: int) -> list[int]:
    price = PRICE[deployment.version]
    return [
        devnet.create_session_job(deployment, deposit=DEPOSIT, price_per_token=price)
        for _ in range(n)
    ]


def chain_flags(
    devnet: Any, deployment: Any, key_file: Path, rpc_url: str | None = None
) -> list[str]:
    """``sidecar serve`` flags for the deployment; jobs open to whoever names them (the faults
    are about metering and claims, not about who may use a job)."""
    options = {
        "rpc-url": rpc_url or devnet.rpc_url,
        "chain-id": devnet.chain_id,
        "marketplace": deployment.marketplace,
        "contract-version": deployment.version,
        "host-key-file": key_file,
        "dispute-window": deployment.dispute_window,
        "checkpoint-tokens": CHECKPOINT,
        "session-auth": "none",
    }
    return [item for k, v in options.items() for item in (f"--{k}", str(v))]


def host_public_key(devnet: Any) -> bytes:
    return HostKey(bytes.fromhex(devnet.host_key.removeprefix("0x"))).public_key


def time_nudge(devnet: Any) -> Any:
    """For ``wait_caught_up``: while claims wait on the rate cap, chain time passes."""

    def nudge(ledger: Ledger, onchain: dict[int, OnChain]) -> None:
        devnet.mine()
        devnet.increase_time(backlog(ledger, onchain) // RATE_V1 + 2)
        devnet.mine()

    return nudge


def chain_reader(devnet: Any, deployment: Any) -> Any:
    return lambda job: read_chain(devnet, deployment, job)


def backlog(ledger: Ledger, onchain: dict[int, OnChain]) -> int:
    """The most tokens any job has served (open records included: a restart closes them) and
    not claimed yet."""
    return max(
        (
            sum(r.billable for r in ledger.of_job(job)) - chain.tokens_used
            for job, chain in onchain.items()
        ),
        default=0,
    )


async def settle_all(
    url: str,
    ledger_path: Path,
    devnet: Any,
    deployment: Any,
    jobs: Sequence[int],
    *,
    timeout: float = 90.0,
) -> Checks:
    """Ask the sidecar to settle every job, let the dispute window pass on the chain, wait for
    the sessions to complete; then the books must balance."""
    # Time passes first (the dispute window, and the rate cap for what is left to claim), so
    # the worker's first look at each settlement finds it due.
    ledger = read_ledger(ledger_path)
    read = chain_reader(devnet, deployment)
    left = backlog(ledger, {job: read(job) for job in jobs})
    devnet.increase_time(deployment.dispute_window + left // RATE_V1 + 5)
    devnet.mine()
    async with aiohttp.ClientSession() as http:
        for job in jobs:
            async with http.post(f"{url}/sidecar/jobs/{job}/settle") as resp:
                assert resp.status == 202, (job, resp.status, await resp.text())
    deadline = time.monotonic() + timeout
    while True:
        ledger, onchain = read_both(ledger_path, read, jobs)
        done = all(chain.status != "Active" for chain in onchain.values()) and not any(
            c.state in ("pending", "sent") for c in ledger.claims
        )
        if done or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.25)
    return check_chain(ledger, onchain, quiescent=True, settled=True, checkpoint=CHECKPOINT)
