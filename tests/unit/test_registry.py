"""The NodeRegistry's pure parts: model ids as the SDK computes them, the metadata, and the
reading of a registration as the SDK reads it."""

from __future__ import annotations

import json

import coincurve
import pytest
from eth_utils import keccak

from sidecar.chain.registry import (
    NodeInfo,
    RegistrationError,
    check_api_url,
    host_metadata,
    model_id,
    sdk_view,
)
from sidecar.crypto import HostKey

HOST = HostKey(bytes.fromhex("11" * 32))
MODEL = model_id("repo:file.gguf")
HOST_UNCOMPRESSED = coincurve.PrivateKey(HOST.private_key).public_key.format(compressed=False).hex()


def test_model_ids_are_the_sdks() -> None:
    assert model_id("repo:file.gguf") == keccak(text="repo/file.gguf")
    assert model_id("0x" + "ab" * 32) == bytes.fromhex("ab" * 32)
    assert model_id("tinyllama") == keccak(text="tinyllama")


@pytest.mark.parametrize("url", ["ftp://h:1", "http://h:1/v1", "http://h:1/?x=1", "h:1"])
def test_api_urls_have_no_path(url: str) -> None:
    with pytest.raises(RegistrationError):
        check_api_url(url)
    assert check_api_url("https://host.example:8443/") == "https://host.example:8443"


def registered(metadata: str, api_url: str = "http://h:1") -> NodeInfo:
    return NodeInfo("0x" + "22" * 20, 10**21, True, metadata, api_url, (MODEL,), 300_000, 5)


def view_of(info: NodeInfo, **prices):
    return sdk_view(
        info,
        host_public_key=HOST.public_key,
        listed={MODEL: True},
        stable_prices={MODEL: prices.get("stable", 5)},
        native_prices={MODEL: prices.get("native", 300_000)},
    )


def test_a_full_registration_is_discoverable() -> None:
    metadata = host_metadata(HOST.public_key, ["repo:file.gguf"], software="sidecar 0")
    assert json.loads(metadata)["publicKey"] == HOST.public_key.hex()
    view = view_of(registered(metadata))
    assert view.discoverable and view.problems == []


def test_what_the_sdk_would_trip_on_is_named() -> None:
    other = HostKey(bytes.fromhex("33" * 32)).public_key.hex()
    view = view_of(registered(json.dumps({"publicKey": other}), "http://h:1/ws"), stable=None)
    assert not view.discoverable
    text = " ".join(view.problems)
    assert "not this host's key" in text and "apiUrl" in text and "drops this host" in text
    # An uncompressed key (with 0x) is the same key to the SDK.
    uncompressed = "0x" + HOST_UNCOMPRESSED
    assert view_of(registered(json.dumps({"publicKey": uncompressed}))).discoverable
    assert not view_of(registered("not json")).discoverable
    unregistered = NodeInfo("0x" + "00" * 20, 0, False, "", "", (), 0, 0)
    assert view_of(unregistered).problems == ["not registered: run sidecar host register"]
