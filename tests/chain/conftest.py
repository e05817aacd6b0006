"""Fixtures for the chain tests: one real anvil per test session, fresh contracts per test.

Deploying the doubles takes about 0.1 s, so every test gets its own marketplace (its own job ids,
balances and proofs) on the shared chain instead of a chain of its own. Time only moves forward
on the shared chain (``increase_time`` / ``set_next_block_timestamp``), which no test minds: each
one reads the times it needs from its own session.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any

import pytest
from eth_utils import keccak
from web3.exceptions import ContractLogicError

from devtools.devchain import Deployment
from devtools.devnet import Devnet

ZERO_ADDRESS = "0x" + "00" * 20

Reverts = Callable[[str], AbstractContextManager[None]]


@pytest.fixture(scope="session")
def devnet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Devnet]:
    with Devnet.start(log_dir=tmp_path_factory.mktemp("anvil")) as chain:
        yield chain


@pytest.fixture
def v1(devnet: Devnet) -> Deployment:
    """A fresh v1 double with the public contract's rate cap (20 tokens/s) and a 30 s window."""
    return devnet.deploy("v1")


@pytest.fixture
def v2(devnet: Devnet) -> Deployment:
    """A fresh v2 double with the public contract's rate cap (2000 tokens/s) and a 30 s window."""
    return devnet.deploy("v2")


@contextmanager
def _reverts(reason: str) -> Iterator[None]:
    with pytest.raises(ContractLogicError) as info:
        yield
    # web3 against anvil: the message is exactly "execution reverted: <reason>".
    assert info.value.message == f"execution reverted: {reason}"


@pytest.fixture
def reverts() -> Reverts:
    """``with reverts("Not host"): ...`` asserts the exact revert string of a call or a send."""
    return _reverts


def make_proof(label: str | int, length: int = 64) -> bytes:
    """Deterministic v1 proof bytes (at least 64 are needed), distinct per label."""
    seed = keccak(text=f"proof-{label}")
    return (seed * (length // 32 + 1))[:length]


def make_proof_hash(label: str | int) -> bytes:
    """A deterministic v2 proofHash, distinct per label."""
    return keccak(text=f"proof-hash-{label}")


@pytest.fixture
def proof() -> Callable[..., bytes]:
    return make_proof


@pytest.fixture
def proof_hash() -> Callable[[str | int], bytes]:
    return make_proof_hash


def tx_cost(receipt: Any) -> int:
    """Wei the sender paid for gas."""
    return int(receipt["gasUsed"]) * int(receipt["effectiveGasPrice"])


@pytest.fixture
def cost() -> Callable[[Any], int]:
    return tx_cost


@pytest.fixture
def anvil_log_dir(tmp_path: Path) -> Path:
    """A per-test folder for anvils of a test's own (restart tests)."""
    folder = tmp_path / "anvil"
    folder.mkdir()
    return folder
