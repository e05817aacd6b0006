"""Wrong chain configuration is refused at start, each with its own clear message (the seed's
lesson: check the chain, the address and the ABI before working for nothing)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.support.llama import free_port
from tests.support.sidecar import REPO

pytestmark = pytest.mark.integration


def serve(*args: str) -> subprocess.CompletedProcess[str]:
    cmd = [
        sys.executable,
        "-m",
        "sidecar",
        "serve",
        "--listen",
        f"127.0.0.1:{free_port()}",
        "--upstream",
        f"http://127.0.0.1:{free_port()}",
        *args,
    ]
    return subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
        env={"PATH": "/usr/bin:/bin", "HOME": str(REPO)},
    )


@pytest.fixture
def chain_args(devnet, tmp_path):
    deployment = devnet.deploy("v1", dispute_window=30)
    key_file = devnet.write_host_key_file(tmp_path / "host.key")

    def build(**overrides: str) -> list[str]:
        options = {
            "--rpc-url": devnet.rpc_url,
            "--chain-id": str(devnet.chain_id),
            "--marketplace": deployment.marketplace,
            "--contract-version": "v1",
            "--host-key-file": str(key_file),
            "--ledger": f"sqlite:///{tmp_path / 'l.db'}",
            **overrides,
        }
        return [part for pair in options.items() for part in pair]

    build.devnet = devnet  # type: ignore[attr-defined]
    return build


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ({"--chain-id": "1"}, "chain id"),
        ({"--marketplace": "0x000000000000000000000000000000000000dEaD"}, "no contract at"),
        ({"--contract-version": "v2"}, "v1"),
        ({"--rpc-url": f"http://127.0.0.1:{free_port()}"}, "RPC"),
    ],
)
def test_wrong_chain_configuration_is_refused(chain_args, override, expected) -> None:
    result = serve(*chain_args(**override))
    assert result.returncode == 2, result.stderr[-2000:]
    assert "refusing to start" in result.stderr
    assert expected.lower() in result.stderr.lower(), result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    key = chain_args.devnet.host_key.removeprefix("0x")
    assert key not in result.stderr and key not in result.stdout


def test_a_bad_host_key_file_is_refused_without_showing_it(chain_args, tmp_path) -> None:
    bad = tmp_path / "bad.key"
    bad.write_text("0x1234-not-a-key-5678")
    result = serve(*chain_args(**{"--host-key-file": str(bad)}))
    assert result.returncode == 2
    assert "not 32 bytes of hex" in result.stderr and "not-a-key" not in result.stderr


async def test_a_ledger_of_another_marketplace_is_refused(chain_args, tmp_path) -> None:
    """The ledger is bound to the marketplace it was first started with; another contract (or
    chain, or version) on the same ledger would mix their job ids, so the sidecar refuses."""
    from sidecar.ledger import MarketplaceIdentity
    from sidecar.ledger.sqlite import SQLiteLedger

    devnet = chain_args.devnet
    ledger_path = tmp_path / "l.db"
    first = SQLiteLedger(ledger_path)
    await first.open()
    elsewhere = MarketplaceIdentity(devnet.chain_id, "0x" + "11" * 20, "v1")
    await first.bind_marketplace(elsewhere, 1)
    await first.close()
    result = serve(*chain_args())
    assert result.returncode == 2, result.stderr[-2000:]
    assert "refusing to start" in result.stderr
    assert "0x" + "11" * 20 in result.stderr and "would mix" in result.stderr
    assert "Traceback" not in result.stderr
