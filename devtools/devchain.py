"""What devchain/ holds, for the devnet: the anvil binary that ``npm ci`` installed, the builds
of the JobMarketplace test doubles (compiled on demand by devchain/compile.js), their default
rules, anvil's funded dev accounts, and what a deployment is.

devtools/ lives in the checkout, next to devchain/; ``SIDECAR_DEVCHAIN_DIR`` points elsewhere.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

Version = Literal["v1", "v2"]
VERSIONS: tuple[Version, ...] = ("v1", "v2")

# devtools/ is part of the checkout, next to devchain/; SIDECAR_DEVCHAIN_DIR overrides.
DEVCHAIN_DIR = Path(
    os.environ.get("SIDECAR_DEVCHAIN_DIR") or Path(__file__).resolve().parents[1] / "devchain"
)
BUILD_DIR = DEVCHAIN_DIR / "build"
CONTRACTS_DIR = DEVCHAIN_DIR / "contracts"

# anvil's default mnemonic; its accounts are public test keys, never to be used on a real network.
DEFAULT_MNEMONIC = "test test test test test test test test test test test junk"
DEFAULT_CHAIN_ID = 31337
ETHER = 10**18

# Defaults that give both versions a budget of 10,000 tokens for a 0.01 ETH deposit:
# v1 pays tokensUsed * price, v2 pays tokensUsed * price / 1000 (PRICE_PRECISION).
DEFAULT_DEPOSIT = 10**16
DEFAULT_PRICE_PER_TOKEN: dict[Version, int] = {"v1": 10**12, "v2": 10**15}
# The public contracts' claim-rate caps (tokens per second since the last proof, buffer
# included): v1 10 * 2, v2 1000 * 2.
DEFAULT_RATE_PER_SECOND: dict[Version, int] = {"v1": 20, "v2": 2000}
# 30 s as in the public deployments (v1 started at 1 h); v2 refuses 0.
DEFAULT_DISPUTE_WINDOW = 30
FEE_BASIS_POINTS = 250
# v1 proofInterval is seconds (times 10 tokens >= 100); v2 proofInterval is tokens (>= 100).
DEFAULT_PROOF_INTERVAL: dict[Version, int] = {"v1": 10, "v2": 100}
DEFAULT_PROOF_TIMEOUT_WINDOW = 300
DEFAULT_MAX_DURATION = 24 * 3600
# The model every v2 deployment approves; sessions are created for it unless told otherwise.
# keccak256("sidecar-tiny"), written out so that importing this module computes nothing.
DEFAULT_MODEL_ID = bytes.fromhex("cbe6397f33a73468895b3ebd4afbc50d7b19d56e7cb580c0a51f6cf6f25a2360")

MARKETPLACE_CONTRACT: dict[Version, str] = {"v1": "JobMarketplaceV1", "v2": "JobMarketplaceV2"}
PROOF_SYSTEM_CONTRACT: dict[Version, str] = {"v1": "ProofSystemV1", "v2": "ProofSystemV2"}
# Status enums of the public contracts, by version.
SESSION_STATUS: dict[Version, tuple[str, ...]] = {
    "v1": ("Active", "Completed", "TimedOut", "Disputed", "Abandoned", "Cancelled"),
    "v2": ("Active", "Completed", "TimedOut"),
}

_ANVIL_PACKAGES = {
    ("Linux", "x86_64"): "anvil-linux-amd64",
    ("Linux", "aarch64"): "anvil-linux-arm64",
    ("Darwin", "x86_64"): "anvil-darwin-amd64",
    ("Darwin", "arm64"): "anvil-darwin-arm64",
}


class DevnetError(RuntimeError):
    """anvil did not start, a build is missing, or a devnet transaction failed."""


# -- accounts ------------------------------------------------------------------------------


@dataclass(frozen=True)
class DevAccount:
    """One of anvil's funded dev accounts. ``key`` is the hex private key with ``0x``."""

    name: str
    index: int
    address: str
    key: str

    def __repr__(self) -> str:
        # Public test keys, but a repr should not teach anyone to print keys.
        return f"DevAccount(name={self.name!r}, index={self.index}, address={self.address!r})"


def dev_accounts(mnemonic: str = DEFAULT_MNEMONIC) -> dict[str, DevAccount]:
    """anvil's first four accounts of ``mnemonic``, by role."""
    from eth_account import Account
    from eth_account.hdaccount import key_from_seed, seed_from_mnemonic

    seed = seed_from_mnemonic(mnemonic, "")
    accounts = {}
    for index, name in enumerate(("deployer", "requester", "host", "stranger")):
        key = key_from_seed(seed, f"m/44'/60'/0'/0/{index}")
        address = Account.from_key(key).address
        accounts[name] = DevAccount(name, index, address, "0x" + key.hex())
    return accounts


# -- artifacts -----------------------------------------------------------------------------


def anvil_path() -> Path:
    """The anvil binary that ``npm ci`` in devchain/ installed (``SIDECAR_ANVIL`` overrides)."""
    override = os.environ.get("SIDECAR_ANVIL")
    if override:
        return Path(override)
    package = _ANVIL_PACKAGES.get((platform.system(), platform.machine()), "anvil-linux-amd64")
    return DEVCHAIN_DIR / "node_modules" / "@foundry-rs" / package / "bin" / "anvil"


def anvil_available() -> bool:
    """Whether the devchain is installed (for ``pytest.skip`` where it is not)."""
    return anvil_path().exists()


def _sources_newer_than(artifact: Path) -> bool:
    if not artifact.exists():
        return True
    built = artifact.stat().st_mtime
    return any(source.stat().st_mtime > built for source in CONTRACTS_DIR.glob("*.sol"))


_compile_lock = threading.Lock()


def compile_contracts(*, force: bool = False) -> None:
    """Run devchain/compile.js (solc-js, offline) when a build is missing or older than its
    sources. Each artifact is renamed into place, so concurrent compiles cannot tear a file."""
    with _compile_lock:
        stale = any(
            _sources_newer_than(BUILD_DIR / f"{name}.json")
            for name in (*MARKETPLACE_CONTRACT.values(), *PROOF_SYSTEM_CONTRACT.values())
        )
        if not (force or stale):
            return
        node = shutil.which("node")
        if node is None or not (DEVCHAIN_DIR / "node_modules" / "solc").exists():
            raise DevnetError(
                "the contracts are not compiled and cannot be: run `npm ci` and "
                f"`node compile.js` in {DEVCHAIN_DIR} (node and solc-js are needed)"
            )
        result = subprocess.run(
            [node, str(DEVCHAIN_DIR / "compile.js")],
            cwd=DEVCHAIN_DIR,
            capture_output=True,
            text=True,
            check=False,
        )
        if result.returncode != 0:
            raise DevnetError(f"compiling the contracts failed:\n{result.stderr}")


def load_artifact(name: str) -> dict[str, Any]:
    """``devchain/build/<name>.json`` (``abi``, ``bytecode``), compiling first if needed."""
    compile_contracts()
    path = BUILD_DIR / f"{name}.json"
    try:
        artifact: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DevnetError(f"no build of {name}: {path} is missing") from None
    return artifact


# -- deployments ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Deployment:
    """Where one version of the marketplace double lives, and the rules it was deployed with."""

    version: Version
    chain_id: int
    marketplace: str
    host_earnings: str
    proof_system: str | None
    rate_per_second: int
    dispute_window: int
    fee_basis_points: int
    # The block of the marketplace's deployment: where a log scan starts.
    block_number: int
    # v2: the model approved at deployment, as 0x-hex (None for v1).
    model_id: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True, slots=True)
class RegistryDeployment:
    """Where the host-discovery doubles live: the NodeRegistry, its stake token (FAB), the
    ModelRegistry, and a stable token (USDC) hosts price sessions in."""

    chain_id: int
    node_registry: str
    stake_token: str
    model_registry: str
    stable_token: str
    model_ids: tuple[str, ...]  # approved, as 0x-hex

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
