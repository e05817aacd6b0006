"""The local chain for the demo and the tests: anvil, the JobMarketplace test doubles, accounts.

Everything runs offline from what ``npm ci`` put in ``devchain/node_modules`` (the anvil binary
and solc-js); nothing is downloaded at run time.

    with Devnet.start() as chain:                      # anvil on a free loopback port
        market = chain.deploy("v1", rate_per_second=20, dispute_window=30)
        job_id = chain.create_session_job(market)      # the requester pays the deposit
        chain.increase_time(10)                        # instead of sleeping
        chain.session_job(market, job_id)["tokensUsed"]

``Devnet.start(port=None, *, state_path=None, ...)`` starts anvil with instant mining and the
default test mnemonic; with ``state_path`` anvil loads that file if it exists and writes the
chain's state back on ``stop()``, so ``restart()`` (or a new ``Devnet.start`` on the same path)
continues the same chain. Accounts (anvil's first four, each holding 10000 ETH): ``deployer``
(owns the contracts), ``requester`` (creates and pays session jobs), ``host`` (serves them and
claims; its key is ``host_key``, written by ``write_host_key_file`` for ``--host-key-file``) and
``stranger`` (neither: for the tests' authorization checks).

No orphans: ``stop()``/``__exit__`` end anvil, an ``atexit`` hook stops what is left, and on
Linux the kernel sends anvil SIGTERM when the thread that started it dies, even by SIGKILL
(``PR_SET_PDEATHSIG``).

Contract builds, accounts, the doubles' default rules and ``Deployment`` are in
devtools/devchain.py.

``main(argv)`` is the ``python -m devtools.devnet`` command, run from the repository root (where
``python -m sidecar devnet`` reaches it too): start, deploy, create one session job, print what a
sidecar needs to use it, and run until Ctrl-C.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import web3
from web3.logs import DISCARD

from devtools.children import Running, die_with_parent, stop_process
from devtools.devchain import (
    DEFAULT_CHAIN_ID,
    DEFAULT_DEPOSIT,
    DEFAULT_DISPUTE_WINDOW,
    DEFAULT_MAX_DURATION,
    DEFAULT_MNEMONIC,
    DEFAULT_MODEL_ID,
    DEFAULT_PRICE_PER_TOKEN,
    DEFAULT_PROOF_INTERVAL,
    DEFAULT_PROOF_TIMEOUT_WINDOW,
    DEFAULT_RATE_PER_SECOND,
    DEVCHAIN_DIR,
    FEE_BASIS_POINTS,
    MARKETPLACE_CONTRACT,
    PROOF_SYSTEM_CONTRACT,
    SESSION_STATUS,
    VERSIONS,
    Deployment,
    DevAccount,
    DevnetError,
    RegistryDeployment,
    Version,
    anvil_path,
    dev_accounts,
    load_artifact,
)

# -- the process ---------------------------------------------------------------------------


_LISTENING = re.compile(rb"Listening on ([0-9.]+):(\d+)")
_running: Running[Devnet] = Running()


class Devnet:
    """anvil as a subprocess, with the marketplace doubles' deploy and session helpers.

    Make one with ``Devnet.start(...)``; the constructor does not start anything.
    """

    def __init__(
        self,
        *,
        port: int | None = None,
        host: str = "127.0.0.1",
        state_path: Path | None = None,
        chain_id: int = DEFAULT_CHAIN_ID,
        log_dir: Path | None = None,
        startup_timeout: float = 10.0,
        extra_args: Sequence[str] = (),
    ) -> None:
        self.host = host
        self.port = port
        self.state_path = Path(state_path) if state_path is not None else None
        self.chain_id = chain_id
        self.startup_timeout = startup_timeout
        self.extra_args = tuple(extra_args)
        self.process: subprocess.Popen[bytes] | None = None
        self._own_log_dir = log_dir is None
        self.log_dir = log_dir
        self.log_path: Path | None = None
        self._w3: web3.Web3 | None = None
        accounts = dev_accounts()
        self.deployer = accounts["deployer"]
        self.requester = accounts["requester"]
        self.host_account = accounts["host"]
        self.stranger = accounts["stranger"]

    # -- lifecycle -------------------------------------------------------------------------

    @classmethod
    def start(
        cls,
        port: int | None = None,
        *,
        state_path: Path | None = None,
        host: str = "127.0.0.1",
        chain_id: int = DEFAULT_CHAIN_ID,
        log_dir: Path | None = None,
        startup_timeout: float = 10.0,
        extra_args: Sequence[str] = (),
    ) -> Devnet:
        """Start anvil (``port=None``: a free one, chosen by anvil itself, so no race)."""
        devnet = cls(
            port=port,
            host=host,
            state_path=state_path,
            chain_id=chain_id,
            log_dir=log_dir,
            startup_timeout=startup_timeout,
            extra_args=extra_args,
        )
        return devnet.launch()

    @property
    def rpc_url(self) -> str:
        if self.port is None:
            raise DevnetError("devnet not started")
        return f"http://{self.host}:{self.port}"

    @property
    def w3(self) -> web3.Web3:
        """A web3 client on the devnet (kept across ``restart()``: the URL does not change)."""
        if self._w3 is None:
            self._w3 = web3.Web3(
                web3.Web3.HTTPProvider(self.rpc_url, request_kwargs={"timeout": 30})
            )
        return self._w3

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def _command(self, port: int) -> list[str]:
        binary = anvil_path()
        if not binary.exists():
            raise DevnetError(f"anvil is not installed at {binary}: run `npm ci` in {DEVCHAIN_DIR}")
        command = [
            str(binary),
            "--host",
            self.host,
            "--port",
            str(port),
            "--chain-id",
            str(self.chain_id),
            "--mnemonic",
            DEFAULT_MNEMONIC,
            "--accounts",
            "10",
            # The Cancun EVM the contracts are compiled for (and that Base runs).
            "--hardfork",
            "cancun",
        ]
        if self.state_path is not None:
            # Loads the file when it exists, dumps the state on a graceful exit (stop()).
            command += ["--state", str(self.state_path)]
        return command + list(self.extra_args)

    def launch(self) -> Self:
        """Start anvil for this devnet (``Devnet.start`` does it for you); waits until it
        answers. A devnet already running is left as it is."""
        if self.process is not None:
            return self
        self._spawn()
        return self

    def _spawn(self) -> None:
        if self.log_dir is None:
            self.log_dir = Path(tempfile.mkdtemp(prefix="sidecar-devnet-"))
        self.log_dir.mkdir(parents=True, exist_ok=True)
        if self.state_path is not None:
            self.state_path.parent.mkdir(parents=True, exist_ok=True)
        self.log_path = self.log_dir / "anvil.log"
        command = self._command(self.port if self.port is not None else 0)
        with self.log_path.open("ab") as log:
            start_offset = log.tell()
            self.process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                preexec_fn=die_with_parent(),
            )
        _running.add(self)
        try:
            self._wait_until_ready(start_offset)
            self._keep_time_monotonic()
        except BaseException:
            self._terminate()
            raise

    def _keep_time_monotonic(self) -> None:
        # anvil's --state keeps the blocks but not the offset that evm_increaseTime added to
        # the clock: after a restart the next block would be older than the last one, and the
        # contracts' `block.timestamp - lastProofTime` would underflow. Continue from the last
        # block's time instead, as a real chain would.
        latest = int(self.rpc("eth_getBlockByNumber", ["latest", False])["timestamp"], 16)
        if latest >= int(time.time()):
            self.rpc("evm_setTime", [latest + 1])

    def _wait_until_ready(self, log_offset: int) -> None:
        assert self.process is not None and self.log_path is not None
        deadline = time.monotonic() + self.startup_timeout
        while True:
            code = self.process.poll()
            if code is not None:
                raise DevnetError(
                    f"anvil exited with {code} before answering; log {self.log_path}:\n"
                    f"{self.log_tail()}"
                )
            # Wait for this process's own "Listening on" line even when the port was given:
            # another process already on that port would answer the RPC probe too.
            with self.log_path.open("rb") as log:
                log.seek(log_offset)
                found = _LISTENING.search(log.read())
            if found:
                self.port = int(found.group(2))
                if self._answers():
                    return
            if time.monotonic() > deadline:
                raise DevnetError(
                    f"anvil did not answer within {self.startup_timeout:g}s; "
                    f"log {self.log_path}:\n{self.log_tail()}"
                )
            time.sleep(0.02)

    def _answers(self) -> bool:
        body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "eth_chainId", "params": []})
        request = urllib.request.Request(
            self.rpc_url, data=body.encode(), headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(request, timeout=2) as response:
                return "result" in json.loads(response.read())
        except (urllib.error.URLError, ConnectionError, TimeoutError, ValueError):
            return False

    def stop(self, timeout: float = 10.0) -> None:
        """Stop anvil gracefully (SIGTERM), so a ``state_path`` gets the chain's state."""
        self._terminate(timeout)
        if self._own_log_dir and self.log_dir is not None:
            shutil.rmtree(self.log_dir, ignore_errors=True)
            self.log_dir = None

    def _terminate(self, timeout: float = 10.0) -> None:
        process, self.process = self.process, None
        _running.discard(self)
        stop_process(process, timeout)

    def restart(self) -> Self:
        """Stop and start again on the same port and state file: the same chain continues
        (deployments, sessions, balances, time) when there is a ``state_path``."""
        if self.state_path is None:
            raise DevnetError("restart() keeps the chain only with a state_path")
        self._terminate()
        self._spawn()
        return self

    def kill(self) -> None:
        """SIGKILL anvil (a crash): no state is dumped; ``restart()`` resumes from the last dump."""
        if self.process is not None:
            self.process.kill()
            self.process.wait()
        self._terminate()

    def log_tail(self, lines: int = 40) -> str:
        if self.log_path is None or not self.log_path.exists():
            return "(no log)"
        text = self.log_path.read_text(encoding="utf-8", errors="replace")
        return "\n".join(text.splitlines()[-lines:])

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    # -- accounts ---------------------------------------------------------------------------

    @property
    def host_key(self) -> str:
        """The host's private key as 0x-hex (anvil's public test key #2)."""
        return self.host_account.key

    def write_host_key_file(self, path: Path) -> Path:
        """Write the host key for ``--host-key-file``: hex, owner-readable only."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="ascii") as file:
            file.write(self.host_key + "\n")
        return path

    def balance(self, address: str) -> int:
        return int(self.w3.eth.get_balance(web3.Web3.to_checksum_address(address)))

    # -- time -------------------------------------------------------------------------------

    def rpc(self, method: str, params: Sequence[Any] = ()) -> Any:
        """One raw JSON-RPC call (anvil_*, evm_* ...); raises DevnetError on an RPC error."""
        response = self.w3.provider.make_request(method, list(params))  # type: ignore[arg-type]
        if "error" in response:
            raise DevnetError(f"{method} failed: {response['error']}")
        return response.get("result")

    def latest_timestamp(self) -> int:
        return int(self.w3.eth.get_block("latest")["timestamp"])

    def increase_time(self, seconds: int) -> None:
        """Move the chain's clock forward; the next block (``mine()`` or a transaction) has it."""
        self.rpc("evm_increaseTime", [int(seconds)])

    def set_next_block_timestamp(self, timestamp: int) -> None:
        """The exact timestamp of the next block: boundary tests without wall-clock drift."""
        self.rpc("evm_setNextBlockTimestamp", [int(timestamp)])

    def mine(self, blocks: int = 1) -> None:
        for _ in range(blocks):
            self.rpc("evm_mine")

    def snapshot(self) -> str:
        return str(self.rpc("evm_snapshot"))

    def revert_to(self, snapshot_id: str) -> None:
        if not self.rpc("evm_revert", [snapshot_id]):
            raise DevnetError(f"snapshot {snapshot_id} not found")

    # -- contracts --------------------------------------------------------------------------

    def contract(self, name: str, address: str) -> Any:
        """A web3 contract object for a devchain build at ``address``."""
        artifact = load_artifact(name)
        return self.w3.eth.contract(
            address=web3.Web3.to_checksum_address(address), abi=artifact["abi"]
        )

    def marketplace(self, deployment: Deployment) -> Any:
        return self.contract(MARKETPLACE_CONTRACT[deployment.version], deployment.marketplace)

    def earnings_contract(self, deployment: Deployment) -> Any:
        return self.contract("HostEarnings", deployment.host_earnings)

    def proof_system(self, deployment: Deployment) -> Any:
        if deployment.proof_system is None:
            raise DevnetError("this deployment has no proof system")
        return self.contract(PROOF_SYSTEM_CONTRACT[deployment.version], deployment.proof_system)

    def transact(
        self,
        call: Any,
        sender: DevAccount | str,
        *,
        value: int = 0,
        gas: int | None = None,
        check: bool = True,
    ) -> Any:
        """Send ``call`` (a bound contract function) from an anvil account; return the receipt.

        Without ``gas``, gas is estimated first against the *pending* block, so a revert raises
        web3's ContractLogicError (``execution reverted: <reason>``) before anything is sent.
        (Estimating against "latest", web3's default, runs with the last block's timestamp and
        misjudges time rules such as the claim-rate cap.) With a fixed ``gas`` nothing is
        estimated and a revert is mined with status 0: ``check=False`` returns that receipt,
        ``revert_reason`` explains it."""
        address = sender.address if isinstance(sender, DevAccount) else sender
        transaction: dict[str, Any] = {
            "from": web3.Web3.to_checksum_address(address),
            "value": value,
        }
        if gas is None:
            estimate = int(call.estimate_gas(transaction, block_identifier="pending"))
            # A margin for what can change between the estimate and the block.
            gas = estimate + estimate // 5
        transaction["gas"] = gas
        tx_hash = call.transact(transaction)
        receipt = self.w3.eth.wait_for_transaction_receipt(tx_hash, timeout=30, poll_latency=0.01)
        if check and receipt["status"] != 1:
            reason = self.revert_reason(tx_hash)
            raise DevnetError(f"transaction {tx_hash.hex()} reverted: {reason}")
        return receipt

    def revert_reason(self, tx_hash: Any) -> str | None:
        """Why a mined transaction failed: replayed as ``eth_call`` at its block (a reverted
        transaction changes no contract state, so that block's state is the one it saw)."""
        from web3.exceptions import ContractLogicError, Web3RPCError

        tx = self.w3.eth.get_transaction(tx_hash)
        receipt = self.w3.eth.get_transaction_receipt(tx_hash)
        if receipt["status"] == 1:
            return None
        call = {"from": tx["from"], "to": tx["to"], "data": tx["input"], "value": tx["value"]}
        try:
            self.w3.eth.call(call, block_identifier=receipt["blockNumber"])  # type: ignore[arg-type]
        except ContractLogicError as error:
            return str(error.message)
        except Web3RPCError as error:
            return str(error)
        # It succeeds when replayed: it ran out of the gas it was given.
        return "out of gas"

    def deploy_contract(self, name: str, *args: Any, sender: DevAccount | None = None) -> Any:
        """Deploy a devchain build; return its contract object (``.address``)."""
        artifact = load_artifact(name)
        factory = self.w3.eth.contract(abi=artifact["abi"], bytecode=artifact["bytecode"])
        receipt = self.transact(factory.constructor(*args), sender or self.deployer)
        return self.contract(name, receipt["contractAddress"])

    def deploy(
        self,
        version: Version,
        *,
        rate_per_second: int | None = None,
        dispute_window: int = DEFAULT_DISPUTE_WINDOW,
        fee_basis_points: int = FEE_BASIS_POINTS,
        with_proof_system: bool = True,
        authorize_proof_system: bool = True,
        model_id: bytes = DEFAULT_MODEL_ID,
    ) -> Deployment:
        """Deploy HostEarnings, the proof system and the marketplace double of ``version``,
        wired together as on the public network.

        ``rate_per_second``: the claim-rate cap (default: the public contract's, 20 for v1,
        2000 for v2). ``dispute_window``: seconds (v1: after the start; v2: after the last
        proof). ``fee_basis_points``: v2 only (v1's fee is the fixed 250). The test switches
        ``with_proof_system`` and ``authorize_proof_system`` leave the proof system unset or
        unauthorized, to reach those reverts."""
        if version not in VERSIONS:
            raise ValueError(f"version must be one of {VERSIONS}, not {version!r}")
        rate = DEFAULT_RATE_PER_SECOND[version] if rate_per_second is None else rate_per_second
        earnings = self.deploy_contract("HostEarnings")
        if version == "v1":
            if fee_basis_points != FEE_BASIS_POINTS:
                raise ValueError("the v1 double's fee is fixed at 250 basis points")
            market = self.deploy_contract(
                MARKETPLACE_CONTRACT[version], earnings.address, rate, dispute_window
            )
        else:
            market = self.deploy_contract(
                MARKETPLACE_CONTRACT[version],
                earnings.address,
                fee_basis_points,
                dispute_window,
                rate,
            )
        block_number = int(self.w3.eth.block_number)
        self.transact(earnings.functions.setAuthorizedCaller(market.address, True), self.deployer)
        proof_address: str | None = None
        if with_proof_system:
            proofs = self.deploy_contract(PROOF_SYSTEM_CONTRACT[version])
            proof_address = str(proofs.address)
            if version == "v2" and authorize_proof_system:
                self.transact(
                    proofs.functions.setAuthorizedCaller(market.address, True), self.deployer
                )
            self.transact(market.functions.setProofSystem(proofs.address), self.deployer)
        model_hex: str | None = None
        if version == "v2":
            self.transact(market.functions.setModelApproved(model_id, True), self.deployer)
            model_hex = "0x" + bytes(model_id).hex()
        return Deployment(
            version=version,
            chain_id=self.chain_id,
            marketplace=str(market.address),
            host_earnings=str(earnings.address),
            proof_system=proof_address,
            rate_per_second=rate,
            dispute_window=dispute_window,
            fee_basis_points=fee_basis_points,
            block_number=block_number,
            model_id=model_hex,
        )

    def deploy_registry(
        self, model_ids: Sequence[bytes], *, stake_for: Sequence[DevAccount] = ()
    ) -> RegistryDeployment:
        """Deploy the NodeRegistry double with its FAB stake token, a ModelRegistry approving
        ``model_ids``, and a USDC-like stable token; mint twice the minimum stake to each of
        ``stake_for`` (default: the host account)."""
        fab = self.deploy_contract("StakeToken", "Fabstir Token", "FAB", 18)
        usdc = self.deploy_contract("StakeToken", "USD Coin", "USDC", 6)
        models = self.deploy_contract("ModelRegistry")
        for model_id in model_ids:
            self.transact(models.functions.setModelApproved(model_id, True), self.deployer)
        registry = self.deploy_contract("NodeRegistry", fab.address, models.address)
        stake = 2 * int(registry.functions.MIN_STAKE().call())
        for account in stake_for or (self.host_account,):
            self.transact(fab.functions.mint(account.address, stake), self.deployer)
        return RegistryDeployment(
            chain_id=self.chain_id,
            node_registry=str(registry.address),
            stake_token=str(fab.address),
            model_registry=str(models.address),
            stable_token=str(usdc.address),
            model_ids=tuple("0x" + bytes(m).hex() for m in model_ids),
        )

    # -- sessions ---------------------------------------------------------------------------

    def create_session_job(
        self,
        deployment: Deployment,
        *,
        deposit: int = DEFAULT_DEPOSIT,
        price_per_token: int | None = None,
        max_duration: int = DEFAULT_MAX_DURATION,
        proof_interval: int | None = None,
        proof_timeout_window: int = DEFAULT_PROOF_TIMEOUT_WINDOW,
        model_id: bytes | None = None,
        host: DevAccount | str | None = None,
        requester: DevAccount | str | None = None,
    ) -> int:
        """Create a session job paid by ``requester`` (default: the requester account) for
        ``host`` (default: the host account); return its job id (from ``SessionJobCreated``).

        v1 calls ``createSessionJob``; v2 ``createSessionJobForModel`` (``model_id`` defaults
        to the deployment's approved model; ``proof_timeout_window`` is v2 only)."""
        version = deployment.version
        market = self.marketplace(deployment)
        price = DEFAULT_PRICE_PER_TOKEN[version] if price_per_token is None else price_per_token
        interval = DEFAULT_PROOF_INTERVAL[version] if proof_interval is None else proof_interval
        host_address = host.address if isinstance(host, DevAccount) else host
        host_address = web3.Web3.to_checksum_address(host_address or self.host_account.address)
        if version == "v1":
            call = market.functions.createSessionJob(host_address, price, max_duration, interval)
        else:
            model = model_id if model_id is not None else bytes.fromhex(deployment.model_id[2:])  # type: ignore[index]
            call = market.functions.createSessionJobForModel(
                host_address, model, price, max_duration, interval, proof_timeout_window
            )
        receipt = self.transact(call, requester or self.requester, value=deposit)
        # DISCARD: v2 also logs SessionJobCreatedForModel in the same receipt.
        events = market.events.SessionJobCreated().process_receipt(receipt, errors=DISCARD)
        return int(events[0]["args"]["jobId"])

    def session_job(self, deployment: Deployment, job_id: int) -> dict[str, Any]:
        """``sessionJobs(job_id)`` as a dict keyed by the public getter's field names, plus
        ``statusName``. A job that does not exist reads as zeros with status 0 (Active), as on
        the public contracts: check ``host``, not the status."""
        market = self.marketplace(deployment)
        values = market.functions.sessionJobs(job_id).call()
        getter = next(
            item
            for item in market.abi
            if item.get("type") == "function" and item.get("name") == "sessionJobs"
        )
        names = [output["name"] for output in getter["outputs"]]
        job = dict(zip(names, values, strict=True))
        job["statusName"] = SESSION_STATUS[deployment.version][job["status"]]
        return job

    def host_earnings(self, deployment: Deployment, host: str | None = None) -> int:
        """The host's credited, not yet withdrawn earnings (wei) in HostEarnings."""
        address = web3.Web3.to_checksum_address(host or self.host_account.address)
        earnings = self.earnings_contract(deployment)
        zero = "0x" + "00" * 20
        return int(earnings.functions.getBalance(address, zero).call())


# -- the `python -m devtools.devnet` command ------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m devtools.devnet",
        description=(
            "Start a local chain (anvil), deploy the JobMarketplace test double, create one "
            "session job, print what a sidecar needs to claim it, and run until Ctrl-C."
        ),
    )
    parser.add_argument("--contract-version", choices=VERSIONS, default="v1")
    parser.add_argument("--port", type=int, default=None, help="RPC port (default: a free one)")
    parser.add_argument(
        "--host",
        default="127.0.0.1",
        help="address anvil listens on (0.0.0.0 in a container: compose's dev profile)",
    )
    parser.add_argument(
        "--state",
        type=Path,
        default=None,
        help="load the chain from this file if it exists and save it there on exit",
    )
    parser.add_argument(
        "--rate-per-second",
        type=int,
        default=None,
        help="claim-rate cap, tokens per second (default: the public contract's: v1 20, v2 2000)",
    )
    parser.add_argument("--dispute-window", type=int, default=DEFAULT_DISPUTE_WINDOW)
    parser.add_argument("--deposit", type=int, default=DEFAULT_DEPOSIT, help="wei")
    parser.add_argument(
        "--price-per-token",
        type=int,
        default=None,
        help="wei per token (v2: per 1000 tokens); default gives a 10000-token budget",
    )
    parser.add_argument(
        "--host-key-file",
        type=Path,
        default=None,
        help="where to write the host's key (default: a temporary file removed on exit)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    version: Version = args.contract_version
    key_dir: Path | None = None
    # SIGTERM ends the run like Ctrl-C, so anvil is stopped (and --state saved) either way.
    previous = signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    try:
        with Devnet.start(args.port, state_path=args.state, host=args.host) as chain:
            deployment = chain.deploy(
                version, rate_per_second=args.rate_per_second, dispute_window=args.dispute_window
            )
            job_id = chain.create_session_job(
                deployment, deposit=args.deposit, price_per_token=args.price_per_token
            )
            key_file = args.host_key_file
            if key_file is None:
                key_dir = Path(tempfile.mkdtemp(prefix="sidecar-devnet-key-"))
                key_file = key_dir / "host.key"
            chain.write_host_key_file(key_file)
            info = {
                "rpc_url": chain.rpc_url,
                "chain_id": chain.chain_id,
                "contract_version": version,
                "marketplace": deployment.marketplace,
                "host_earnings": deployment.host_earnings,
                "proof_system": deployment.proof_system,
                "requester": chain.requester.address,
                "host": chain.host_account.address,
                "host_key_file": str(key_file),
                "job_id": job_id,
                "dispute_window": deployment.dispute_window,
                "rate_per_second": deployment.rate_per_second,
                "model_id": deployment.model_id,
            }
            if args.json:
                print(json.dumps(info), flush=True)
            else:
                for name, value in info.items():
                    if value is not None:
                        print(f"{name:<17} {value}")
                print("devnet running; Ctrl-C to stop", flush=True)
            while chain.running:
                time.sleep(0.5)
            print(f"anvil exited unexpectedly; log:\n{chain.log_tail()}", file=sys.stderr)
            return 1
    except KeyboardInterrupt:
        return 0
    except DevnetError as error:
        print(f"devnet: {error}", file=sys.stderr)
        return 1
    finally:
        signal.signal(signal.SIGTERM, previous)
        if key_dir is not None:
            shutil.rmtree(key_dir, ignore_errors=True)


def _raise_keyboard_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


if __name__ == "__main__":
    raise SystemExit(main())
