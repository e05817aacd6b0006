"""An RPC outage under mixed traffic: serving goes on, claims catch up, nothing is paid twice.

The sidecar reaches anvil only through :class:`~tests.faults.rpc_proxy.RpcProxy`. Mixed traffic
runs before, during and after an outage of ``FAULT_RPC_OUTAGE_S`` seconds (10 in ``make test``,
60 in ``make faults``) in three thirds: transactions reach the node but their answers are lost
(claims mined while the sidecar learns nothing), then every call hangs, then connections are
refused. During the outage a job the sidecar has never seen must be refused (503
``chain_unavailable``), never served for free; known jobs keep being served. Afterwards the
claims must catch up and every invariant hold, and the sessions settle with balanced books.
"""

from __future__ import annotations

import asyncio
import random
import time
from urllib.parse import urlparse

import aiohttp
import pytest

from tests.faults import harness
from tests.faults.campaign import RPC_OUTAGE_S, SEED, TALLY
from tests.faults.invariants import (
    Checks,
    check_chain,
    check_responses,
    read_ledger,
    wait_caught_up,
)
from tests.faults.rpc_proxy import RpcProxy
from tests.support.sidecar import SidecarProcess

pytestmark = pytest.mark.integration

WARM_S = 3.0
AFTER_S = 3.0


async def probe(url: str, job: int) -> tuple[int, str | None, int]:
    """One completion for ``job``: (status, error code, tokens served)."""
    async with aiohttp.ClientSession() as http:
        async with http.post(
            f"{url}/v1/completions",
            json={"model": "sidecar-tiny", "prompt": "x", "max_tokens": 8, "job_id": job},
            timeout=aiohttp.ClientTimeout(total=60),
        ) as resp:
            body = await resp.json()
            if resp.status == 200:
                return 200, None, int(body["usage"]["completion_tokens"])
            return resp.status, body["error"].get("code"), 0


@pytest.mark.timeout(300 + 2 * RPC_OUTAGE_S)
async def test_rpc_outage(llama_server, devnet, tmp_path) -> None:
    family = TALLY.family("rpc outage")
    started = time.monotonic()
    rng = random.Random(f"{SEED}-rpc")
    deployment = devnet.deploy("v1", dispute_window=30)
    jobs = harness.new_jobs(devnet, deployment, 6)
    [stranger_job] = harness.new_jobs(devnet, deployment, 1)  # never seen before the outage
    key_file = devnet.write_host_key_file(tmp_path / "host.key")
    ledger_path = tmp_path / "ledger.db"
    read = harness.chain_reader(devnet, deployment)
    rpc = urlparse(devnet.rpc_url)
    checks = Checks()
    with RpcProxy(rpc.hostname or "127.0.0.1", rpc.port or 8545) as proxy:
        flags = harness.chain_flags(devnet, deployment, key_file, rpc_url=proxy.url)
        proc = SidecarProcess(llama_server.base_url, ledger_path, tmp_path / "sidecar.log", *flags)
        try:
            await proc.wait_ready(timeout=60)
            lanes, traffic, task = harness.endless_traffic(
                proc.url, devnet, jobs, llama_server.model_id, rng, short=True, timeout=120
            )
            await asyncio.sleep(WARM_S)
            served_before = sum(s.finished for s in traffic_seen(lanes))
            # Chain time lets the next claims through at once: they are sent into the outage.
            harness.let_time_pass(devnet, ledger_path, deployment, jobs)
            third = RPC_OUTAGE_S / 3
            probes = []
            for mode in ("swallow", "blackhole", "refuse"):
                proxy.set_mode(mode)
                await asyncio.sleep(third / 2)
                if mode != "swallow":  # swallow answers reads: the job would be found
                    probes.append((mode, asyncio.create_task(probe(proc.url, stranger_job))))
                await asyncio.sleep(third / 2)
                devnet.increase_time(int(third) + 1)  # chain time goes on during the outage
                devnet.mine()
            served_during = sum(s.finished for s in traffic_seen(lanes)) - served_before
            proxy.set_mode("forward")
            refused = [(mode, await task) for mode, task in probes]
            await asyncio.sleep(AFTER_S)
            after = await probe(proc.url, stranger_job)
            traffic.stop.set()
            seen = await asyncio.wait_for(task, 120)

            for mode, (status, code, tokens) in refused:
                checks.check(
                    status == 503 and code == "chain_unavailable" and tokens == 0,
                    "unknown_job_served",
                    f"a job never seen, while the RPC is down ({mode}): {status} {code}, "
                    f"{tokens} tokens served",
                )
            checks.check(
                after[0] == 200,
                "claims_stalled",
                f"the job never seen, after the outage: {after}",
            )
            checks.check(
                served_during > 0,
                "serving_stopped",
                "no request of a known job was served during the outage",
            )
            family.count("responses during the outage", served_during)
            family.count("transactions whose answer was lost", proxy.swallowed_sends)

            ledger, onchain, took = await wait_caught_up(
                ledger_path,
                read,
                [*jobs, stranger_job],
                timeout=180,
                nudge=harness.time_nudge(devnet),
            )
            family.notes.append(f"claims caught up {took:.0f}s after the outage")
            responses, counters = check_responses(ledger, seen, set(), streams_over=True)
            checks.extend(responses)
            checks.extend(check_chain(ledger, onchain, quiescent=True))
            for name, n in counters.items():
                family.count(name, n)
            checks.extend(
                await harness.settle_all(
                    proc.url, ledger_path, devnet, deployment, [*jobs, stranger_job]
                )
            )
            log = (tmp_path / "sidecar.log").read_text(errors="replace")
            confirmed_from_log = log.count("was already on-chain")
            family.count("claims confirmed from their log", confirmed_from_log)
        finally:
            code = proc.stop()
            family.seconds += time.monotonic() - started
    found = family.trial(checks)
    for v in found:
        print(f"VIOLATION {v.name}: {v.detail}")
    assert code == 0, proc.log_tail()
    assert not found, "\n".join(f"{v.name}: {v.detail}" for v in found[:30])
    assert read_ledger(ledger_path).records


def traffic_seen(lanes):
    return [s for lane in lanes for s in lane.seen]
