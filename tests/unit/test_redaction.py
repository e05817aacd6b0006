"""An RPC provider's key (in its URL's path, query or userinfo) never reaches a log line."""

from __future__ import annotations

import aiohttp
import pytest
from yarl import URL

from sidecar.chain.sender import describe, redact_urls

KEY = "k3y-0f-the-pr0vider"


@pytest.mark.parametrize(
    "url",
    [
        f"https://base-sepolia.g.alchemy.com/v2/{KEY}",
        f"https://rpc.example.org/?apikey={KEY}",
        f"https://user:{KEY}@rpc.example.org:8545/",
        f"wss://rpc.example.org/ws/{KEY}#x",
    ],
)
def test_urls_keep_their_scheme_and_host_only(url: str) -> None:
    text = redact_urls(f"429, message='Too Many Requests', url='{url}'")
    assert KEY not in text
    assert "rpc.example.org" in text or "alchemy.com" in text


def test_an_aiohttp_error_is_described_without_the_key() -> None:
    request = aiohttp.RequestInfo(
        URL(f"https://rpc.example.org/v2/{KEY}"),
        "POST",
        {},
        URL(f"https://rpc.example.org/v2/{KEY}"),
    )
    exc = aiohttp.ClientResponseError(request, (), status=401, message="Unauthorized")
    assert KEY in str(exc)  # what aiohttp would have logged
    text = describe(exc)
    assert KEY not in text and "401" in text and "https://rpc.example.org/..." in text
