"""The ledger's disk fills up under mixed traffic, then space returns.

The ledger lives on a small tmpfs of the test's own (``mount -t tmpfs``; the test is skipped,
saying why, where mounting is not permitted). After a warm-up the free space is taken by a
filler file; traffic goes on for a while on the full disk, then the filler is deleted and
traffic goes on again. The rule under test is the durability rule: nothing is served
unrecorded. A JSON answer whose record cannot be committed must be refused (503
``ledger_unavailable``), a stream must be cut within the progress bound of what was recorded;
when space returns, requests are served and recorded again, and the claims catch up on anvil.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import random
import subprocess
import time
from pathlib import Path

import pytest

from tests.faults import harness
from tests.faults.campaign import SEED, TALLY
from tests.faults.invariants import (
    Checks,
    check_chain,
    check_integrity,
    check_responses,
    read_ledger,
    wait_caught_up,
)
from tests.support.sidecar import SidecarProcess

pytestmark = pytest.mark.integration

FS_SIZE = "8m"
WARM_S = 2.0
FULL_S = 4.0
RECOVERED_S = 3.0


@contextlib.contextmanager
def small_filesystem(path: Path):
    path.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={FS_SIZE}", "tmpfs", str(path)],
        capture_output=True,
        text=True,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs for the ledger: {mounted.stderr.strip()}")
    try:
        yield path
    finally:
        if subprocess.run(["umount", str(path)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(path)], capture_output=True)


def fill(path: Path) -> int:
    """Take every free byte of the filesystem; the bytes written."""
    written = 0
    with open(path, "wb", buffering=0) as filler:
        for block in (1 << 20, 1 << 12, 1):
            chunk = b"\0" * block
            while True:
                try:
                    written += filler.write(chunk)
                except OSError as exc:
                    if exc.errno != errno.ENOSPC:
                        raise
                    break
    return written


@pytest.mark.timeout(300)
async def test_disk_full(llama_server, devnet, tmp_path) -> None:
    family = TALLY.family("disk full")
    started = time.monotonic()
    rng = random.Random(f"{SEED}-disk")
    deployment = devnet.deploy("v1", dispute_window=30)
    jobs = harness.new_jobs(devnet, deployment, 6)
    key_file = devnet.write_host_key_file(tmp_path / "host.key")
    read = harness.chain_reader(devnet, deployment)
    checks = Checks()
    with small_filesystem(tmp_path / "fs") as fs:
        ledger_path = fs / "ledger.db"
        filler = fs / "filler"
        proc = SidecarProcess(
            llama_server.base_url,
            ledger_path,
            tmp_path / "sidecar.log",
            *harness.chain_flags(devnet, deployment, key_file),
        )
        try:
            await proc.wait_ready(timeout=60)
            lanes, traffic, task = harness.endless_traffic(
                proc.url, devnet, jobs, llama_server.model_id, rng
            )
            await asyncio.sleep(WARM_S)

            def mark() -> set[int]:
                return {id(s) for lane in lanes for s in lane.seen}

            warm = mark()
            family.notes.append(f"filler took {fill(filler)} bytes")
            await asyncio.sleep(FULL_S)
            full = mark() - warm
            os.unlink(filler)
            await asyncio.sleep(RECOVERED_S)
            recovered = mark() - full - warm
            traffic.stop.set()
            seen = await asyncio.wait_for(task, 120)
            checks.check(
                proc.proc.poll() is None,
                "sidecar_died",
                f"the sidecar exited on the full disk: {proc.log_tail()}",
            )

            during = [s for s in seen if id(s) in full]
            refused = [s for s in during if s.sent and not s.finished]
            family.count("requests while full", len(during))
            family.count("served while full", sum(s.finished for s in during))
            family.count("refused or cut while full", len(refused))
            for s in refused:
                clear = s.code == "ledger_unavailable" or (s.stream and s.status == 200)
                checks.check(
                    clear,
                    "unclear_refusal",
                    f"on the full disk: {s} (status {s.status}, code {s.code})",
                )
            after = [s for s in seen if id(s) in recovered]
            checks.check(
                sum(s.finished for s in after) >= 3,
                "no_recovery",
                f"space returned, but {sum(s.finished for s in after)} of {len(after)} requests "
                "were served",
            )

            ledger, onchain, took = await wait_caught_up(
                ledger_path, read, jobs, timeout=120, nudge=harness.time_nudge(devnet)
            )
            family.notes.append(f"claims caught up {took:.0f}s after the filler went")
            checks.extend(check_integrity(read_ledger(ledger_path, integrity=True)))
            responses, counters = check_responses(ledger, seen, set(), streams_over=True)
            checks.extend(responses)
            checks.extend(check_chain(ledger, onchain, quiescent=True))
            checks.extend(await harness.settle_all(proc.url, ledger_path, devnet, deployment, jobs))
            for name, n in counters.items():
                family.count(name, n)
        finally:
            code = proc.stop()
            family.seconds += time.monotonic() - started
    found = family.trial(checks)
    for v in found:
        print(f"VIOLATION {v.name}: {v.detail}")
    assert refused, "the full disk refused nothing: the test did not reach the fault"
    assert code == 0, proc.log_tail()
    assert not found, "\n".join(f"{v.name}: {v.detail}" for v in found[:30])
