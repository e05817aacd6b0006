"""The ``sidecar`` command as a user runs it: ``jobs`` on a real ledger, ``serve`` as a process."""

from __future__ import annotations

import json
import subprocess
import sys

import aiohttp

from sidecar.ledger import RecordState, UsageRecord, open_ledger
from sidecar.metering import Source
from tests.support.sidecar import REPO, SidecarProcess


def sidecar_cmd(*args: str) -> subprocess.CompletedProcess[str]:
    env = {"PATH": "/usr/bin:/bin", "HOME": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", "sidecar", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=60,
    )


def record(key: str, job: int | None, completion: int, source: Source) -> UsageRecord:
    return UsageRecord(
        key=key,
        job_id=job,
        endpoint="chat",
        model="tiny",
        prompt_tokens=3,
        completion_tokens=completion,
        billable_tokens=completion,
        source=source,
        state=RecordState.FINAL,
        status=200,
        started_ms=1,
        updated_ms=2,
    )


async def test_jobs_command_reads_the_ledger(tmp_path) -> None:
    path = tmp_path / "ledger.db"
    ledger = open_ledger(f"sqlite:///{path}")
    await ledger.open()
    for rec in (
        record("a", 164, 30, Source.COUNTED),
        record("b", 164, 12, Source.REPORTED),
        record("c", 2**255, 7, Source.REPORTED),
        record("d", None, 5, Source.REPORTED),
    ):
        await ledger.write(rec)
    await ledger.close()
    url = f"sqlite:///{path}"

    table = sidecar_cmd("jobs", "--ledger", url)
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0].split()[:6] == ["job", "requests", "open", "prompt", "completion", "billable"]
    assert lines[2].split()[:6] == ["164", "2", "0", "6", "42", "42"]
    assert "counted 30, reported 12" in lines[2]
    assert lines[3].split()[0] == str(2**255)
    assert lines[4].split()[0] == "unattributed"

    one = sidecar_cmd("jobs", "164n", "--json", "--ledger", url)
    assert one.returncode == 0
    [job] = json.loads(one.stdout)
    assert job["job_id"] == "164" and job["billable_tokens_by_source"] == {
        "counted": 30,
        "reported": 12,
    }

    missing = sidecar_cmd("jobs", "9", "--ledger", url)
    assert missing.returncode == 1 and "no usage recorded for job 9" in missing.stderr
    bad = sidecar_cmd("jobs", "nine", "--ledger", url)
    assert bad.returncode == 2 and "job id" in bad.stderr
    nowhere = sidecar_cmd("jobs", "--ledger", f"sqlite:///{tmp_path / 'none.db'}")
    assert nowhere.returncode == 1 and "no ledger at" in nowhere.stderr
    assert not (tmp_path / "none.db").exists()


def test_configuration_errors_exit_2_with_a_clear_message() -> None:
    result = sidecar_cmd("serve", "--listen", "nowhere")
    assert result.returncode == 2
    assert "configuration error" in result.stderr and "HOST:PORT" in result.stderr
    assert "Traceback" not in result.stderr


async def test_admin_token_never_reaches_the_log(faulty_upstream, tmp_path) -> None:
    secret = "tok-5f1c9e0d2b"
    proc = SidecarProcess(
        faulty_upstream.url,
        tmp_path / "l.db",
        tmp_path / "s.log",
        "--admin-token",
        secret,
        "--log-level",
        "debug",
    )
    try:
        await proc.wait_ready()
        async with aiohttp.ClientSession() as client:
            async with client.get(
                proc.url + "/sidecar/jobs", headers={"Authorization": "Bearer nope"}
            ) as resp:
                assert resp.status == 401
            async with client.get(
                proc.url + "/sidecar/jobs", headers={"Authorization": f"Bearer {secret}"}
            ) as resp:
                assert resp.status == 200
    finally:
        assert proc.stop() == 0
    log = (tmp_path / "s.log").read_text()
    assert "'admin_token': '***'" in log
    assert secret not in log


def test_a_key_typed_as_an_unknown_option_is_never_echoed() -> None:
    secret = "0x" + "5e" * 32
    for args in (
        ["serve", "--host-key", secret],
        ["serve", f"--host-key={secret}"],
        ["serve", "--host-k", secret],
    ):
        result = sidecar_cmd(*args)
        assert result.returncode == 2
        assert secret not in result.stderr and secret not in result.stdout
        assert "unrecognized option" in result.stderr
