"""The marketplace half of the demo: the host registers itself, clients prove who they are.

* ``register_host``: ``sidecar host register`` against the NodeRegistry double, then the SDK's
  own discovery calls, to show what it finds;
* ``job_tokens``: ``sidecar token`` for each job, signed by the requester (its depositor);
* ``refused_strangers``: a request with no token and one with a stranger's, both refused;
* ``encrypted_session``: the SDK's default session (encrypted, a new key before every prompt).
"""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from devtools.devchain import Deployment, RegistryDeployment
from devtools.devnet import Devnet
from sidecar.chain.registry import model_id

# The marketplace's name for the demo model ("repo:file", as the SDK names models).
MARKET_MODEL = "sidecar-demo/tiny:tiny.gguf"


def chain_flags(chain: Devnet, deployment: Deployment, key_file: Path) -> list[str]:
    return [
        "--rpc-url",
        chain.rpc_url,
        "--chain-id",
        str(chain.chain_id),
        "--marketplace",
        deployment.marketplace,
        "--host-key-file",
        str(key_file),
    ]


def _sidecar(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sidecar", *args], capture_output=True, text=True, timeout=120
    )


def register_host(
    chain: Devnet, deployment: Deployment, key_file: Path, sidecar_url: str
) -> tuple[RegistryDeployment, bytes]:
    """Register; return the registry and the public key the SDK reads from the metadata."""
    registry = chain.deploy_registry([model_id(MARKET_MODEL)])
    print(f"   NodeRegistry double at {registry.node_registry} (stake token FAB, USDC pricing)")
    result = _sidecar(
        "host",
        "register",
        "--registry",
        registry.node_registry,
        "--stable-token",
        registry.stable_token,
        "--api-url",
        sidecar_url,
        "--model-id",
        MARKET_MODEL,
        "--price-native",
        "300000",
        "--price-stable",
        "5",
        "--json",
        *chain_flags(chain, deployment, key_file),
    )
    for line in result.stderr.splitlines():
        print(f"   sidecar host register: {line}")
    if result.returncode != 0:
        raise RuntimeError(f"sidecar host register failed: {result.stderr or result.stdout}")
    view = json.loads(result.stdout)
    print(
        f"   sidecar host status: discoverable={view['discoverable']}, apiUrl {view['api_url']}, "
        f"publicKey {view['public_key'][:12]}..., problems {view['problems']}"
    )
    nodes = chain.contract("NodeRegistry", registry.node_registry)
    found = nodes.functions.getNodesForModel(model_id(MARKET_MODEL)).call()
    print(f"   the SDK's getNodesForModel({MARKET_MODEL!r}) -> {found}")
    metadata = nodes.functions.getNodeFullInfo(chain.host_account.address).call()[3]
    return registry, bytes.fromhex(json.loads(metadata)["publicKey"])


def job_tokens(
    chain: Devnet, sidecar_url: str, jobs: tuple[int, ...], key_file: Path
) -> dict[int, str]:
    """``sidecar token`` per job, the scope read from the sidecar's /v1/health."""
    tokens = {}
    for job in jobs:
        result = _sidecar(
            "token", "--job", str(job), "--key-file", str(key_file), "--sidecar", sidecar_url
        )
        if result.returncode != 0:
            raise RuntimeError(f"sidecar token failed: {result.stderr}")
        tokens[job] = result.stdout.strip()
    print(
        f"   job tokens for jobs {', '.join(map(str, jobs))} (`sidecar token`, signed by the "
        f"depositor {chain.requester.address}): {tokens[jobs[0]][:24]}..."
    )
    return tokens


def refused_strangers(sidecar_url: str, job: int, stranger_token: str) -> bool:
    ok = True
    for who, headers in (
        ("no token", {}),
        ("a stranger's token", {"Authorization": f"Bearer {stranger_token}"}),
    ):
        status, body = _post(
            sidecar_url + "/v1/completions",
            {"model": MARKET_MODEL, "prompt": "x", "max_tokens": 8, "job_id": job},
            headers,
        )
        error = body.get("error", {})
        print(f"   {who:<19} for job {job} -> {status} {error.get('code')}")
        ok &= status in (401, 403)
    return ok


def _post(url: str, body: dict[str, Any], headers: dict[str, str]) -> tuple[int, dict[str, Any]]:
    request = urllib.request.Request(
        url,
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json", **headers},
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


async def encrypted_session(
    chain: Devnet, sidecar_url: str, job: int, host_public_key: bytes, tally: Any
) -> None:
    """Three prompts in the SDK's default encrypted session, signed with the depositor's key
    (the SDK's EncryptionManager(wallet)), then a stranger's session for the same job."""
    from sidecar.session_client import EncryptedSession, SessionError

    requester_key = bytes.fromhex(chain.requester.key.removeprefix("0x"))
    async with EncryptedSession.open(
        sidecar_url, host_public_key, job, requester_key, chain_id=chain.chain_id
    ) as session:
        for max_tokens in (40, 50, 60):
            _, end = await session.prompt("Once upon a time", max_tokens=max_tokens)
            tally.requests += 1
            tally.completion_tokens += end["tokens_used"]
            usage = end["usage"]
            print(
                f"   encrypted prompt max_tokens={max_tokens:<3} -> {end['tokens_used']} tokens "
                f"in encrypted_chunks; usage prompt {usage['prompt_tokens']} / window "
                f"{usage.get('context_window_size')}; session total {end.get('session_tokens')}"
            )
        print(f"   (a new session key before every prompt; client {session.client_address})")
    stranger_key = bytes.fromhex(chain.stranger.key.removeprefix("0x"))
    try:
        async with EncryptedSession.open(
            sidecar_url, host_public_key, job, stranger_key, chain_id=chain.chain_id
        ) as stranger:
            await stranger.prompt("Spend someone else's deposit", max_tokens=8)
        print("   a stranger's encrypted session was SERVED")
    except SessionError as exc:
        print(f"   a stranger's encrypted session for job {job} -> error {exc.code}")
