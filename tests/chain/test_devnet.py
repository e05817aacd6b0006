"""The devnet helper itself: anvil's lifecycle, accounts and keys, state kept across a restart,
no orphan after the parent is killed, the compile script's selectors, and
`python -m devtools.devnet`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import web3
from eth_account import Account
from eth_utils import function_signature_to_4byte_selector

from devtools.devchain import DEVCHAIN_DIR, ETHER, DevnetError, anvil_available, load_artifact
from devtools.devnet import Devnet

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(
        not anvil_available(), reason="devchain not installed: run `npm ci` in devchain/"
    ),
]

REPO = Path(__file__).resolve().parents[2]


def _rpc(url: str, method: str, params: list[Any] | None = None) -> Any:
    body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": method, "params": params or []})
    request = urllib.request.Request(
        url, data=body.encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=5) as response:
        return json.loads(response.read())["result"]


def _answers(url: str) -> bool:
    try:
        _rpc(url, "eth_chainId")
        return True
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return False


def _process_gone(pid: int) -> bool:
    """Exited (a zombie awaiting its reaper counts as exited)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return True
    return state == "Z"


def _wait(predicate: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


def test_accounts_are_anvils_funded_dev_accounts(devnet: Devnet) -> None:
    accounts = devnet.w3.eth.accounts
    roles = [devnet.deployer, devnet.requester, devnet.host_account, devnet.stranger]
    assert [account.address for account in roles] == accounts[:4]
    for account in roles:
        assert Account.from_key(account.key).address == account.address
        assert devnet.balance(account.address) > 9_000 * ETHER
    assert devnet.w3.eth.chain_id == devnet.chain_id == 31337
    assert devnet.host_key not in repr(devnet.host_account)


def test_host_key_file_holds_the_hex_key_for_the_owner_only(devnet: Devnet, tmp_path: Path) -> None:
    path = devnet.write_host_key_file(tmp_path / "keys" / "host.key")
    text = path.read_text(encoding="ascii").strip()
    assert text.startswith("0x") and len(text) == 66
    assert Account.from_key(text).address == devnet.host_account.address
    assert path.stat().st_mode & 0o777 == 0o600


def test_time_controls_move_the_chain_clock(devnet: Devnet) -> None:
    before = devnet.latest_timestamp()
    devnet.increase_time(3600)
    devnet.mine()
    assert devnet.latest_timestamp() >= before + 3600
    target = devnet.latest_timestamp() + 100
    devnet.set_next_block_timestamp(target)
    devnet.mine()
    assert devnet.latest_timestamp() == target
    snapshot = devnet.snapshot()
    devnet.mine(3)
    block = devnet.w3.eth.block_number
    devnet.revert_to(snapshot)
    assert devnet.w3.eth.block_number == block - 3


def test_state_is_kept_across_a_stop_and_a_new_start(tmp_path: Path) -> None:
    state = tmp_path / "chain-state.json"
    with Devnet.start(state_path=state, log_dir=tmp_path / "log1") as chain:
        deployment = chain.deploy("v1", dispute_window=60)
        job_id = chain.create_session_job(deployment)
        market = chain.marketplace(deployment)
        last = chain.session_job(deployment, job_id)["lastProofTime"]
        chain.set_next_block_timestamp(last + 5)
        chain.transact(
            market.functions.submitProofOfWork(job_id, 100, b"\1" * 64), chain.host_account
        )
        # The clock runs ahead of the wall clock; a restart must not take it back.
        chain.increase_time(3600)
        chain.mine()
        job_before = chain.session_job(deployment, job_id)
        block = chain.w3.eth.block_number
        latest = chain.latest_timestamp()
        first_port = chain.port
    assert state.exists()
    assert not _answers(f"http://127.0.0.1:{first_port}")

    with Devnet.start(state_path=state, log_dir=tmp_path / "log2") as chain:
        assert chain.session_job(deployment, job_id) == job_before
        assert chain.w3.eth.block_number == block
        chain.mine()
        assert chain.latest_timestamp() > latest
        market = chain.marketplace(deployment)
        # The session goes on: a claim (its rate cap counts from the last proof) and settlement.
        chain.transact(
            market.functions.submitProofOfWork(job_id, 100, b"\2" * 64), chain.host_account
        )
        chain.transact(market.functions.completeSessionJob(job_id, "cid"), chain.host_account)
        job = chain.session_job(deployment, job_id)
        assert (job["tokensUsed"], job["statusName"]) == (200, "Completed")
        assert chain.host_earnings(deployment) == job["withdrawnByHost"] > 0


def test_restart_keeps_the_port_and_the_chain(tmp_path: Path) -> None:
    with Devnet.start(state_path=tmp_path / "state.json", log_dir=tmp_path) as chain:
        deployment = chain.deploy("v2")
        job_id = chain.create_session_job(deployment)
        port, url = chain.port, chain.rpc_url
        pid = chain.process.pid if chain.process else None
        chain.restart()
        assert (chain.port, chain.rpc_url) == (port, url)
        assert chain.process is not None and chain.process.pid != pid
        assert chain.session_job(deployment, job_id)["host"] == chain.host_account.address


def test_a_killed_anvil_restarts_from_its_last_saved_state(tmp_path: Path) -> None:
    """SIGKILL saves nothing: a restart continues from the state of the last graceful stop."""
    state = tmp_path / "state.json"
    with Devnet.start(state_path=state, log_dir=tmp_path) as chain:
        deployment = chain.deploy("v1")
        saved_job = chain.create_session_job(deployment)
        chain.restart()  # a graceful stop saves the state
        lost_job = chain.create_session_job(deployment)
        chain.kill()
        assert not chain.running
        chain.restart()
        assert chain.session_job(deployment, saved_job)["host"] == chain.host_account.address
        assert chain.session_job(deployment, lost_job)["host"] == "0x" + "00" * 20


def test_restart_without_a_state_file_is_refused(tmp_path: Path) -> None:
    with Devnet.start(log_dir=tmp_path) as chain, pytest.raises(DevnetError, match="state_path"):
        chain.restart()


def test_a_taken_port_is_reported_with_anvils_log(devnet: Devnet, tmp_path: Path) -> None:
    with pytest.raises(DevnetError, match="anvil exited"):
        Devnet.start(devnet.port, log_dir=tmp_path)


def test_anvil_dies_with_the_process_that_started_it(tmp_path: Path) -> None:
    child_code = textwrap.dedent(
        f"""
        import time
        from pathlib import Path
        from devtools.devnet import Devnet
        chain = Devnet.start(log_dir=Path({str(tmp_path)!r}))
        print(chain.process.pid, chain.rpc_url, flush=True)
        time.sleep(120)
        """
    )
    child = subprocess.Popen(
        [sys.executable, "-c", child_code], cwd=REPO, stdout=subprocess.PIPE, text=True
    )
    try:
        assert child.stdout is not None
        pid_text, url = child.stdout.readline().split()
        anvil_pid = int(pid_text)
        assert _answers(url)
        child.kill()  # SIGKILL: no atexit, no cleanup code runs in the child
        child.wait(timeout=10)
        assert _wait(lambda: _process_gone(anvil_pid), 10), "anvil outlived its parent"
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()


def test_compile_script_prints_the_selectors() -> None:
    result = subprocess.run(
        ["node", "compile.js", "--json"],
        cwd=DEVCHAIN_DIR,
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    selectors = json.loads(result.stdout)
    assert selectors["JobMarketplaceV1"] == {
        "signature": "submitProofOfWork(uint256,uint256,bytes)",
        "selector": "0xc8c664ee",
    }
    assert selectors["JobMarketplaceV2"] == {
        "signature": "submitProofOfWork(uint256,uint256,bytes32,string,string)",
        "selector": "0x7c5cb561",
    }
    # solc agrees with the hash of the signature, and the artifacts hold what deploys need.
    for entry in selectors.values():
        hashed = function_signature_to_4byte_selector(entry["signature"])
        assert "0x" + hashed.hex() == entry["selector"]
    artifact = load_artifact("JobMarketplaceV1")
    assert artifact["bytecode"].startswith("0x6") and artifact["abi"]


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_devnet_command_prints_a_ready_chain_and_stops_on_ctrl_c(
    tmp_path: Path, version: str
) -> None:
    command = [
        sys.executable,
        "-m",
        "devtools.devnet",
        "--contract-version",
        version,
        "--json",
    ]
    process = subprocess.Popen(
        command,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "TMPDIR": str(tmp_path)},
    )
    watchdog = threading.Timer(60, process.kill)
    watchdog.start()
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        assert line, process.stderr.read() if process.stderr else ""
        info = json.loads(line)
        url = info["rpc_url"]
        assert int(_rpc(url, "eth_chainId"), 16) == info["chain_id"] == 31337
        assert info["contract_version"] == version
        key_file = Path(info["host_key_file"])
        key = key_file.read_text().strip()
        assert Account.from_key(key).address == info["host"]

        w3 = web3.Web3(web3.Web3.HTTPProvider(url))
        name = {"v1": "JobMarketplaceV1", "v2": "JobMarketplaceV2"}[version]
        market = w3.eth.contract(address=info["marketplace"], abi=load_artifact(name)["abi"])
        job = market.functions.sessionJobs(info["job_id"]).call()
        assert job[2] == info["host"]  # id, requester/depositor, host, ...
        assert w3.eth.get_code(info["host_earnings"]) != b""

        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=15) == 0
        assert not key_file.exists()  # the temporary key file goes with the chain
        assert not _answers(url)
    finally:
        watchdog.cancel()
        if process.poll() is None:
            process.kill()
            process.wait()
