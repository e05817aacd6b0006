"""The marketplace's NodeRegistry: what a host publishes so the SDK finds it (NODE_PROTOCOL §5-6).

Pure parts: model ids, the metadata JSON, and the reading of a registration as the SDK reads it
(:func:`sdk_view`). The SDK finds hosts with ``getNodesForModel(modelId)``, reads
``getNodeFullInfo``, drops hosts whose ``getModelPricing(host, model, USDC)`` reverts, takes
``metadata.publicKey`` for encrypted sessions and ``apiUrl`` (``http(s)://host:port``, no path)
as the endpoint it opens ``/v1/ws`` under.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

ZERO_ADDRESS = "0x" + "00" * 20
MIN_PRICE_NATIVE = 227_273
MAX_PRICE_NATIVE = 22_727_272_727_273_000
MIN_PRICE_STABLE = 1
MAX_PRICE_STABLE = 100_000_000
_BYTES32 = re.compile(r"0x[0-9a-fA-F]{64}")


class RegistrationError(ValueError):
    """A registration that cannot be made as asked; the message says what to change."""


def model_id(name: str) -> bytes:
    """The on-chain id of a model as the SDK computes it: ``keccak256("repo/file")`` for
    ``"repo:file"``, a 0x bytes32 as given, else keccak256 of the name."""
    from eth_utils import keccak  # not at import: `sidecar --help` needs no Ethereum library

    if _BYTES32.fullmatch(name):
        return bytes.fromhex(name[2:])
    repo, sep, file = name.partition(":")
    return keccak(text=f"{repo}/{file}" if sep else name)


def check_api_url(url: str) -> str:
    """``http(s)://host[:port]``, with no path: the SDK appends ``/v1/ws`` itself."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise RegistrationError(f"--api-url must be http(s)://HOST[:PORT], got {url!r}")
    if parts.path.strip("/") or parts.query or parts.fragment:
        raise RegistrationError(
            f"--api-url must have no path (the SDK adds /v1/ws itself), got {url!r}"
        )
    return url.rstrip("/")


def check_prices(native: int, stable: int) -> None:
    if not MIN_PRICE_NATIVE <= native <= MAX_PRICE_NATIVE:
        raise RegistrationError(
            f"--price-native must be in [{MIN_PRICE_NATIVE}, {MAX_PRICE_NATIVE}] (the "
            f"registry's range, per token x 1000), got {native}"
        )
    if not MIN_PRICE_STABLE <= stable <= MAX_PRICE_STABLE:
        raise RegistrationError(
            f"--price-stable must be in [{MIN_PRICE_STABLE}, {MAX_PRICE_STABLE}], got {stable}"
        )


def host_metadata(
    public_key: bytes, models: list[str], *, software: str, extra: dict[str, Any] | None = None
) -> str:
    """The metadata JSON the SDK reads: ``publicKey`` (66 hex digits, compressed, no 0x, as the
    SDK's own registration writes it) is what encrypted sessions are sealed to."""
    metadata: dict[str, Any] = {
        "publicKey": public_key.hex(),
        "capabilities": {"inference": True, "streaming": True, "encryption": True},
        "models": models,
        "software": software,
        **(extra or {}),
    }
    return json.dumps(metadata, separators=(",", ":"), sort_keys=True)


@dataclass(frozen=True, slots=True)
class NodeInfo:
    """``getNodeFullInfo(host)``, decoded."""

    operator: str
    staked: int
    active: bool
    metadata: str
    api_url: str
    model_ids: tuple[bytes, ...]
    min_price_native: int
    min_price_stable: int

    @classmethod
    def from_call(cls, values: Any) -> NodeInfo:
        operator, staked, active, metadata, api_url, models, native, stable = values
        return cls(
            str(operator).lower(),
            int(staked),
            bool(active),
            str(metadata),
            str(api_url),
            tuple(bytes(m) for m in models),
            int(native),
            int(stable),
        )

    @property
    def registered(self) -> bool:
        return self.operator != ZERO_ADDRESS


@dataclass
class SdkView:
    """What the marketplace SDK will make of a registration: whether it finds the host for
    each model, and every reason it would not (or could not open an encrypted session)."""

    registered: bool
    active: bool = False
    api_url: str = ""
    public_key: str | None = None
    models: dict[str, dict[str, Any]] = field(default_factory=dict)  # 0x id -> findings
    problems: list[str] = field(default_factory=list)

    @property
    def discoverable(self) -> bool:
        return self.registered and not self.problems

    def as_json(self) -> dict[str, Any]:
        return {
            "registered": self.registered,
            "active": self.active,
            "discoverable": self.discoverable,
            "api_url": self.api_url,
            "public_key": self.public_key,
            "models": self.models,
            "problems": self.problems,
        }


def sdk_view(
    info: NodeInfo,
    *,
    host_public_key: bytes,
    listed: dict[bytes, bool],
    stable_prices: dict[bytes, int | None],
    native_prices: dict[bytes, int | None],
) -> SdkView:
    """Read a registration as the SDK does. ``listed``: whether ``getNodesForModel`` lists the
    host; the prices: ``getModelPricing`` per model (None where it reverts)."""
    if not info.registered:
        return SdkView(False, problems=["not registered: run sidecar host register"])
    view = SdkView(True, info.active, info.api_url)
    if not info.active:
        view.problems.append("the registry marks this host inactive")
    try:
        check_api_url(info.api_url)
    except RegistrationError as exc:
        view.problems.append(f"apiUrl: {exc}")
    try:
        published = json.loads(info.metadata).get("publicKey")
    except (ValueError, AttributeError):
        published = None
        view.problems.append("the metadata is not a JSON object: the SDK finds no publicKey")
    if isinstance(published, str):
        view.public_key = published
        if _normalised_key(published) != host_public_key.hex():
            view.problems.append(
                "metadata.publicKey is not this host's key: encrypted sessions would be sealed "
                "to another key (run sidecar host update)"
            )
    elif published is None and not view.problems:
        view.problems.append("metadata has no publicKey: the SDK falls back to /v1/auth/challenge")
    for model in info.model_ids:
        key = "0x" + model.hex()
        stable, native = stable_prices.get(model), native_prices.get(model)
        view.models[key] = {
            "listed": listed.get(model, False),
            "price_stable": stable,
            "price_native": native,
        }
        if not listed.get(model, False):
            view.problems.append(f"getNodesForModel({key}) does not list this host")
        if stable is None:
            view.problems.append(
                f"no stable-token pricing for model {key}: the SDK drops this host for it"
            )
        if native is None:
            view.problems.append(f"no native pricing for model {key}: native sessions fail")
    return view


def _normalised_key(published: str) -> str | None:
    """A published key as 66 lowercase hex digits (compressed), or None."""
    text = published.lower().removeprefix("0x")
    try:
        raw = bytes.fromhex(text)
    except ValueError:
        return None
    if len(raw) == 33:
        return raw.hex()
    if len(raw) == 65 and raw[0] == 4:
        prefix = 2 + (raw[64] & 1)
        return bytes([prefix]).hex() + raw[1:33].hex()
    return None
