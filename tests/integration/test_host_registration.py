"""`sidecar host register | update | status` on anvil with the NodeRegistry double: after it, the
SDK's discovery calls find the host, price it, and an encrypted session sealed to the published
key works against the sidecar."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys

import aiohttp
import pytest
import web3

from devtools.devchain import load_artifact
from sidecar.chain.registry import model_id
from sidecar.crypto import HostKey
from tests.integration.test_chain_e2e import chain_options
from tests.integration.test_node_e2ee import encrypted_prompt, receive

pytestmark = pytest.mark.integration

MODEL = "tiny-org/tiny-chat:tiny.gguf"  # as the SDK names it: repo:file


async def sidecar_cli(*args: str) -> tuple[int, str, str]:
    """The real command, in a child process run from a thread (this loop, the test's own
    sidecar, keeps answering the command's requests)."""
    result = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "sidecar", *args],
        capture_output=True,
        text=True,
        timeout=180,
        env={k: v for k, v in os.environ.items() if not k.startswith("SIDECAR_")},
    )
    return result.returncode, result.stdout, result.stderr


def chain_flags(devnet, deployment, key_file) -> list[str]:
    return [
        "--rpc-url",
        devnet.rpc_url,
        "--chain-id",
        str(devnet.chain_id),
        "--marketplace",
        deployment.marketplace,
        "--host-key-file",
        str(key_file),
    ]


def contract(devnet, name: str, address: str):
    return devnet.w3.eth.contract(address=address, abi=load_artifact(name)["abi"])


async def test_register_then_the_sdk_finds_the_host_and_its_key(
    llama_server, devnet, sidecar_factory, tmp_path
) -> None:
    deployment = devnet.deploy("v2", dispute_window=30)
    registry = devnet.deploy_registry([model_id(MODEL)])
    key_file = devnet.write_host_key_file(tmp_path / "host.key")
    sidecar = await sidecar_factory(
        llama_server.base_url,
        model=(f"{MODEL}={llama_server.model_id}",),
        **chain_options(devnet, deployment, key_file, session_auth="bound"),
    )
    flags = chain_flags(devnet, deployment, key_file)
    where = ["--registry", registry.node_registry, "--stable-token", registry.stable_token]
    code, out, err = await sidecar_cli(
        "host",
        "register",
        *where,
        "--api-url",
        sidecar.url,
        "--model",
        MODEL,
        "--price-native",
        "300000",
        "--price-stable",
        "5",
        "--json",
        *flags,
    )
    assert code == 0, err
    view = json.loads(out)
    assert view["discoverable"] is True and view["problems"] == []
    assert "registerNode: mined" in err and "the stake approval: mined" in err
    assert devnet.host_key.removeprefix("0x") not in out + err

    # The SDK's discovery, call by call (NODE_PROTOCOL.md §5).
    nodes = contract(devnet, "NodeRegistry", registry.node_registry)
    host = devnet.host_account.address
    mid = model_id(MODEL)
    assert nodes.functions.getNodesForModel(mid).call() == [host]
    operator, staked, active, metadata, api_url, models, native, stable = (
        nodes.functions.getNodeFullInfo(host).call()
    )
    assert (operator, active, api_url, models) == (host, True, sidecar.url, [mid])
    assert staked == nodes.functions.MIN_STAKE().call() and (native, stable) == (300000, 5)
    usdc = web3.Web3.to_checksum_address(registry.stable_token)
    assert nodes.functions.getModelPricing(host, mid, usdc).call() == 5
    assert nodes.functions.getModelPricing(host, mid, "0x" + "00" * 20).call() == 300000
    published = json.loads(metadata)["publicKey"]
    host_key = HostKey(bytes.fromhex(devnet.host_key.removeprefix("0x")))
    assert published == host_key.public_key.hex() and len(published) == 66

    # Sealed to the published key, an encrypted session on the published URL + /v1/ws works.
    ws_url = api_url.replace("http://", "ws://") + "/v1/ws"
    job = devnet.create_session_job(deployment, requester=devnet.requester)
    async with aiohttp.ClientSession() as http, http.ws_connect(ws_url) as ws:
        assert (await receive(ws))["type"] == "connected"
        client = HostKey(os.urandom(32))
        _, _, end = await encrypted_prompt(ws, job, 3, host=host_key, client=client)
        assert end["tokens_used"] == 3

    # status shows the same; register again is refused; update sends only what differs.
    code, out, _ = await sidecar_cli("host", "status", *where, "--json", *flags)
    assert code == 0 and json.loads(out)["discoverable"] is True
    code, _, err = await sidecar_cli(
        "host", "register", *where, "--api-url", sidecar.url, "--model-id", MODEL, *flags
    )
    assert code == 2 and "registered already" in err
    code, out, err = await sidecar_cli(
        "host", "update", *where, "--api-url", "http://127.0.0.1:9", "--price-stable", "7", *flags
    )
    assert "updateApiUrl: mined" in err and "setModelTokenPricing" in err
    assert "updateMetadata" not in err and "registerNode" not in err
    assert code == 1 and "does not answer" in out  # nothing listens at the new URL
    assert nodes.functions.getModelPricing(host, mid, usdc).call() == 7


async def test_registration_errors_say_what_to_change(devnet, tmp_path) -> None:
    deployment = devnet.deploy("v2", dispute_window=30)
    registry = devnet.deploy_registry([model_id(MODEL)], stake_for=[devnet.requester])
    key_file = devnet.write_host_key_file(tmp_path / "host.key")  # the host holds no FAB here
    flags = chain_flags(devnet, deployment, key_file)
    where = ["--registry", registry.node_registry, "--stable-token", registry.stable_token]
    url = ["--api-url", "http://127.0.0.1:8080"]
    cases = [
        (["--model-id", MODEL, *url], "holds 1"),
        (["--model-id", "other:model.gguf", *url], "Model not approved"),
        (["--model-id", MODEL, "--api-url", "http://h:1/v1"], "no path"),
        (["--model-id", MODEL, *url, "--price-stable", "0"], "--price-stable must be in"),
        ([*url], "name the models"),
    ]
    devnet.transact(
        contract(devnet, "StakeToken", registry.stake_token).functions.transfer(
            devnet.host_account.address, 1
        ),
        devnet.requester,
    )
    for extra, message in cases[:1]:
        code, _, err = await sidecar_cli("host", "register", *where, *extra, *flags)
        assert code == 2 and message in err, err
    # With a stake, a model the ModelRegistry does not approve is refused before any gas.
    devnet.transact(
        contract(devnet, "StakeToken", registry.stake_token).functions.transfer(
            devnet.host_account.address, 2000 * 10**18 - 1
        ),
        devnet.requester,
    )
    for extra, message in cases[1:]:
        code, _, err = await sidecar_cli("host", "register", *where, *extra, *flags)
        assert code == 2 and message in err, (extra, err)
    code, out, _ = await sidecar_cli("host", "status", *where, *flags)
    assert code == 1 and "not registered" in out
