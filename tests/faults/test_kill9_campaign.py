"""kill -9 of the sidecar at random moments under mixed traffic, with claims on anvil.

One sidecar process, one ledger, one marketplace session per lane for the whole campaign. Each
trial starts the sidecar (on the ledger the previous trial's process died on), checks what the
previous trial's clients saw against the ledger and the chain once the claims caught up, then
runs seven lanes of traffic (OpenAI JSON and streams, /v1/inference JSON and SSE, plaintext and
encrypted WebSocket sessions; two lanes share a job) on the real engine and kills the process
with SIGKILL at a moment a seeded ``random.Random`` picks (FAULT_SEED). The chain is an anvil of
the campaign's own that mines a block every second, as a real chain does, so kills also land
between a claim's send and its receipt. While the sidecar is down the chain's clock moves on (the
v1 rate cap lets the backlog be claimed). At the end the sessions are settled and the books
must balance.

``FAULT_TRIALS`` trials (10 in ``make test``, 100 in ``make faults``).
"""

from __future__ import annotations

import asyncio
import random
import time

import pytest

from tests.faults import harness
from tests.faults.campaign import SEED, TALLY, TRIALS
from tests.faults.invariants import (
    Checks,
    check_chain,
    check_integrity,
    check_responses,
    read_ledger,
    wait_caught_up,
)
from tests.faults.traffic import Traffic
from tests.support.sidecar import SidecarProcess

pytestmark = pytest.mark.integration

KILL_WINDOW = (0.05, 3.0)  # seconds after the traffic starts
CATCH_UP_S = 60.0


@pytest.mark.timeout(300 + 25 * TRIALS)
async def test_kill9_campaign(llama_server, tmp_path) -> None:
    from devtools.devnet import Devnet

    with Devnet.start(log_dir=tmp_path / "anvil") as devnet:
        await campaign(llama_server, devnet, tmp_path)


async def campaign(llama_server, devnet, tmp_path) -> None:
    family = TALLY.family("kill -9")
    rng = random.Random(f"{SEED}-kill9-traffic")
    moments = random.Random(f"{SEED}-kill9-moments")  # the kill moments alone: replayable
    started = time.monotonic()
    deployment = devnet.deploy("v1", dispute_window=30)
    jobs = harness.new_jobs(devnet, deployment, 6)
    key_file = devnet.write_host_key_file(tmp_path / "host.key")
    flags = harness.chain_flags(devnet, deployment, key_file)
    ledger_path = tmp_path / "ledger.db"
    read = harness.chain_reader(devnet, deployment)
    host_key = harness.host_public_key(devnet)
    nudge = harness.time_nudge(devnet)
    devnet.rpc("evm_setAutomine", [False])
    devnet.rpc("evm_setIntervalMining", [1])
    print(f"kill -9 campaign: {TRIALS} trials, seed {SEED}, jobs {jobs}")

    def start(n: int) -> SidecarProcess:
        return SidecarProcess(
            llama_server.base_url, ledger_path, tmp_path / f"sidecar-{n}.log", *flags
        )

    proc = start(0)
    previous: tuple[list, set[str], Checks] | None = None
    all_violations = []
    try:
        for trial in range(TRIALS + 1):
            await proc.wait_ready(timeout=60)
            if previous is not None:
                seen, before, checks = previous
                ledger, onchain, took = await wait_caught_up(
                    ledger_path, read, jobs, timeout=CATCH_UP_S, nudge=nudge
                )
                responses, counters = check_responses(ledger, seen, before, streams_over=True)
                checks.extend(responses)
                checks.extend(check_chain(ledger, onchain, quiescent=True))
                for name, n in counters.items():
                    family.count(name, n)
                found = family.trial(checks)
                all_violations.extend(found)
                print(
                    f"trial {trial}: {len(seen)} requests, {checks.count} checks, "
                    f"{len(found)} violations, caught up in {took:.1f}s"
                )
                for v in found:
                    print(f"  VIOLATION {v.name}: {v.detail}")
            if trial == TRIALS:
                break
            before = set(read_ledger(ledger_path).records)
            traffic = Traffic(
                proc.url,
                harness.mixed_lanes(jobs, llama_server.model_id),
                rng,
                chain_id=devnet.chain_id,
                host_public_key=host_key,
            )
            task = asyncio.create_task(traffic.run())
            delay = moments.uniform(*KILL_WINDOW)
            await asyncio.sleep(delay)
            proc.kill9()
            traffic.stop.set()
            seen = await asyncio.wait_for(task, 60)
            proc.stop()  # closes its log
            # The ledger as the dead process left it: whole, and what was in flight.
            dead = read_ledger(ledger_path, integrity=True)
            checks = check_integrity(dead)
            if any(c.state in ("pending", "sent") for c in dead.claims):
                family.count("kills with a claim in flight")
            cut = [s for s in seen if s.stream and s.sent and not s.finished and s.tokens]
            family.count("streams cut", len(cut))
            family.count("responses finished", sum(s.finished for s in seen))
            previous = (seen, before, checks)
            print(f"trial {trial + 1}: kill -9 after {delay:.2f}s")
            harness.let_time_pass(devnet, ledger_path, deployment, jobs)
            proc = start(trial + 1)

        settled = await harness.settle_all(proc.url, ledger_path, devnet, deployment, jobs)
        all_violations.extend(family.trial(settled, trials=0))  # the settlement's checks
        for v in settled.violations:
            print(f"  VIOLATION (settlement) {v.name}: {v.detail}")
    finally:
        code = proc.stop()
        family.seconds += time.monotonic() - started
    assert code == 0, proc.log_tail()
    assert not all_violations, "\n".join(f"{v.name}: {v.detail}" for v in all_violations[:30])
