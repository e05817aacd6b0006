"""``sidecar host register | update | status``: publish this host in the marketplace's NodeRegistry.

The same settings as ``serve`` name the chain and the host key (``--rpc-url``, ``--chain-id``,
``--host-key-file``; ``--model`` gives the default model names). ``register`` approves the
registry to take the stake (FAB ``approve`` for ``MIN_STAKE``), registers with metadata holding
the host's ``publicKey``, then prices every model in the stable token and the native token
(the SDK drops a host whose ``getModelPricing`` reverts). ``update`` sends only what differs.
``status`` shows the registration as the SDK will read it. Every transaction is simulated
first, so a revert is reported with the registry's reason before any gas is spent.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import urllib.request
from dataclasses import dataclass
from importlib import resources
from typing import Any

from sidecar import __version__
from sidecar.chain.registry import (
    MIN_PRICE_NATIVE,
    MIN_PRICE_STABLE,
    ZERO_ADDRESS,
    NodeInfo,
    RegistrationError,
    SdkView,
    check_api_url,
    check_prices,
    host_metadata,
    model_id,
    sdk_view,
)
from sidecar.config import ConfigError, Settings, add_arguments, load_settings

log = logging.getLogger("sidecar.host")

RECEIPT_TIMEOUT = 120  # seconds


def add_host_parser(commands: Any) -> None:
    host = commands.add_parser(
        "host",
        allow_abbrev=False,
        help="register this host in the marketplace's NodeRegistry, update it, show it",
        description="Publish this host so the marketplace SDK finds it: its API URL, models, "
        "prices and public key, staked with FAB. Uses the chain settings of `serve`.",
    )
    actions = host.add_subparsers(dest="host_action", metavar="ACTION", required=True)
    for name, text in (
        ("register", "stake, register and price every model"),
        ("update", "bring the registration in line with these options (only what differs)"),
        ("status", "show the registration as the SDK will see it"),
    ):
        action = actions.add_parser(name, allow_abbrev=False, help=text, description=text)
        action.add_argument(
            "--registry", required=True, metavar="ADDRESS", help="the NodeRegistry address"
        )
        action.add_argument(
            "--stable-token",
            metavar="ADDRESS",
            required=name == "register",
            help="the stable token (USDC) sessions are priced in",
        )
        action.add_argument("--json", action="store_true", help="print JSON")
        if name != "status":
            action.add_argument(
                "--api-url",
                required=name == "register",
                metavar="URL",
                help="the public http(s)://HOST:PORT of this sidecar (no path)",
            )
            action.add_argument(
                "--model-id",
                action="append",
                metavar="MODEL",
                help="a model to publish: repo:file, a name or a 0x bytes32 (repeatable; "
                "default: the --model names)",
            )
            action.add_argument(
                "--price-native",
                type=int,
                default=MIN_PRICE_NATIVE if name == "register" else None,
                metavar="WEI",
                help="price per token x 1000 in the native token (wei)",
            )
            action.add_argument(
                "--price-stable",
                type=int,
                default=MIN_PRICE_STABLE if name == "register" else None,
                metavar="UNITS",
                help="price per token x 1000 in the stable token's smallest units",
            )
        add_arguments(action)


def run_host(args: argparse.Namespace) -> int:
    try:
        settings = load_settings(vars(args))
        if not settings.rpc_url:
            raise ConfigError("sidecar host needs the chain: --rpc-url, --chain-id, host key")
        registry = _Registry.connect(settings, args.registry)
        if args.host_action == "status":
            view = registry.view(args.stable_token)
            _print_view(view, registry.host_address, as_json=args.json)
            return 0 if view.discoverable else 1
        wanted = _wanted(args, settings, registry)
        if args.host_action == "register":
            registry.register(wanted)
        else:
            registry.update(wanted)
        view = registry.view(args.stable_token)
        _print_view(view, registry.host_address, as_json=args.json)
        return 0 if view.discoverable else 1
    except (ConfigError, RegistrationError) as exc:
        print(f"sidecar: {exc}", file=sys.stderr)
        return 2


@dataclass(frozen=True, slots=True)
class _Wanted:
    api_url: str | None
    models: tuple[bytes, ...]
    model_names: tuple[str, ...]
    metadata: str
    price_native: int | None
    price_stable: int | None
    stable_token: str | None


def _wanted(args: argparse.Namespace, settings: Settings, registry: _Registry) -> _Wanted:
    names = tuple(args.model_id or settings.model_names)
    if not names and args.host_action == "register":
        raise RegistrationError("name the models to publish: --model-id MODEL or --model NAME")
    api_url = None if args.api_url is None else check_api_url(args.api_url)
    if args.price_native is not None or args.price_stable is not None:
        check_prices(
            MIN_PRICE_NATIVE if args.price_native is None else args.price_native,
            MIN_PRICE_STABLE if args.price_stable is None else args.price_stable,
        )
    return _Wanted(
        api_url=api_url,
        models=tuple(model_id(n) for n in names),
        model_names=names,
        metadata=host_metadata(registry.public_key, list(names), software=f"sidecar {__version__}"),
        price_native=args.price_native,
        price_stable=args.price_stable,
        stable_token=args.stable_token,
    )


class _Registry:
    """The NodeRegistry and its stake token, as this host's key sees them (synchronous web3:
    a command, not the server's event loop)."""

    def __init__(self, w3: Any, account: Any, chain_id: int, registry: Any) -> None:
        self.w3, self.account, self.chain_id, self.registry = w3, account, chain_id, registry
        from sidecar.crypto import HostKey

        self.public_key = HostKey(bytes(account.key)).public_key

    @classmethod
    def connect(cls, settings: Settings, address: str) -> _Registry:
        import web3
        from eth_account import Account

        w3 = web3.Web3(web3.HTTPProvider(settings.rpc_url, request_kwargs={"timeout": 30}))
        try:
            chain_id = int(w3.eth.chain_id)
        except Exception as exc:
            raise RegistrationError(f"the RPC does not answer: {type(exc).__name__}") from None
        if chain_id != settings.chain_id:
            raise RegistrationError(f"the RPC is chain {chain_id}, not {settings.chain_id}")
        if not web3.Web3.is_address(address) or not w3.eth.get_code(
            web3.Web3.to_checksum_address(address)
        ):
            raise RegistrationError(f"no contract at --registry {address}")
        registry = w3.eth.contract(
            address=web3.Web3.to_checksum_address(address), abi=_abi("node_registry")
        )
        return cls(w3, Account.from_key(settings.read_host_key()), chain_id, registry)

    @property
    def host_address(self) -> str:
        return str(self.account.address)

    def info(self) -> NodeInfo:
        return NodeInfo.from_call(self.registry.functions.getNodeFullInfo(self.host_address).call())

    # -- register / update -----------------------------------------------------------------

    def register(self, wanted: _Wanted) -> None:
        if self.info().registered:
            raise RegistrationError(
                f"{self.host_address} is registered already: use sidecar host update"
            )
        assert wanted.api_url is not None and wanted.price_native is not None
        assert wanted.price_stable is not None and wanted.stable_token is not None
        stake_token = self.w3.eth.contract(
            address=self.registry.functions.fabToken().call(), abi=_abi("erc20")
        )
        stake = int(self.registry.functions.MIN_STAKE().call())
        balance = int(stake_token.functions.balanceOf(self.host_address).call())
        if balance < stake:
            raise RegistrationError(
                f"registering stakes {stake} FAB units; {self.host_address} holds {balance}"
            )
        allowed = stake_token.functions.allowance(self.host_address, self.registry.address).call()
        if int(allowed) < stake:
            self._send(
                stake_token.functions.approve(self.registry.address, stake), "the stake approval"
            )
        self._send(
            self.registry.functions.registerNode(
                wanted.metadata,
                wanted.api_url,
                list(wanted.models),
                wanted.price_native,
                wanted.price_stable,
            ),
            "registerNode",
        )
        self._price(wanted, wanted.models)

    def update(self, wanted: _Wanted) -> None:
        info = self.info()
        if not info.registered:
            raise RegistrationError(f"{self.host_address} is not registered: sidecar host register")
        functions = self.registry.functions
        if info.metadata != wanted.metadata and (wanted.models or not info.model_ids):
            self._send(functions.updateMetadata(wanted.metadata), "updateMetadata")
        if wanted.api_url is not None and info.api_url != wanted.api_url:
            self._send(functions.updateApiUrl(wanted.api_url), "updateApiUrl")
        models = wanted.models or info.model_ids
        if wanted.models and tuple(wanted.models) != info.model_ids:
            self._send(
                functions.updateSupportedModels(list(wanted.models)), "updateSupportedModels"
            )
        self._price(wanted, models)

    def _price(self, wanted: _Wanted, models: tuple[bytes, ...]) -> None:
        """setModelTokenPricing for every model, in the stable and the native token, where
        the price asked differs from the one set."""
        pairs = [(ZERO_ADDRESS, wanted.price_native)]
        if wanted.stable_token is not None:
            pairs.append((wanted.stable_token, wanted.price_stable))
        for model in models:
            for token, price in pairs:
                if price is None or self._pricing(model, token) == price:
                    continue
                self._send(
                    self.registry.functions.setModelTokenPricing(model, _checksum(token), price),
                    f"setModelTokenPricing(0x{model.hex()[:8]}..., {token})",
                )

    # -- status ----------------------------------------------------------------------------

    def view(self, stable_token: str | None) -> SdkView:
        info = self.info()
        listed, stable, native = {}, {}, {}
        for model in info.model_ids:
            hosts = self.registry.functions.getNodesForModel(model).call()
            listed[model] = self.host_address.lower() in {str(h).lower() for h in hosts}
            native[model] = self._pricing(model, ZERO_ADDRESS)
            stable[model] = None if stable_token is None else self._pricing(model, stable_token)
        view = sdk_view(
            info,
            host_public_key=self.public_key,
            listed=listed,
            stable_prices=stable,
            native_prices=native,
        )
        if stable_token is None and info.registered:
            view.problems.append("give --stable-token to check the USDC pricing the SDK reads")
        if info.registered and info.api_url:
            _probe(view, info.api_url, self.chain_id)
        return view

    def _pricing(self, model: bytes, token: str) -> int | None:
        from web3.exceptions import ContractLogicError

        try:
            price = self.registry.functions.getModelPricing(
                self.host_address, model, _checksum(token)
            ).call()
        except ContractLogicError:
            return None  # "No model pricing": what makes the SDK drop the host
        return int(price) or None

    def _send(self, call: Any, what: str) -> None:
        from web3.exceptions import ContractLogicError

        sender = {"from": self.host_address}
        try:
            call.call(sender)  # a revert is reported with its reason, before gas is spent
        except ContractLogicError as exc:
            raise RegistrationError(f"{what} would revert: {exc.message}") from None
        tx = call.build_transaction(
            {
                **sender,
                "nonce": self.w3.eth.get_transaction_count(self.host_address, "pending"),
                "chainId": self.chain_id,
            }
        )
        signed = self.account.sign_transaction(tx)
        tx_hash = self.w3.eth.send_raw_transaction(signed.raw_transaction)
        receipt = self.w3.eth.wait_for_transaction_receipt(tx_hash, timeout=RECEIPT_TIMEOUT)
        if receipt["status"] != 1:
            raise RegistrationError(f"{what} reverted in {tx_hash.hex()}")
        print(f"{what}: mined in 0x{bytes(tx_hash).hex()}", file=sys.stderr)


def _probe(view: SdkView, api_url: str, chain_id: int) -> None:
    """What the SDK's health check sees at the published URL."""
    try:
        with urllib.request.urlopen(api_url + "/v1/health", timeout=5) as resp:
            health = json.loads(resp.read())
    except Exception as exc:  # any failure is what the SDK would see: unreachable
        view.problems.append(f"{api_url}/v1/health does not answer ({type(exc).__name__})")
        return
    if health.get("chain_id") not in (None, chain_id):
        view.problems.append(f"{api_url} serves chain {health.get('chain_id')}, not {chain_id}")


def _print_view(view: SdkView, host: str, *, as_json: bool) -> None:
    if as_json:
        print(json.dumps({"host": host, **view.as_json()}, indent=2))
        return
    state = "discoverable" if view.discoverable else "NOT discoverable"
    print(f"host {host}: {'registered' if view.registered else 'not registered'}, {state}")
    if view.registered:
        print(f"  apiUrl      {view.api_url}")
        print(f"  publicKey   {view.public_key}")
        for key, model in view.models.items():
            print(
                f"  model {key}: listed={model['listed']} stable={model['price_stable']} "
                f"native={model['price_native']}"
            )
    for problem in view.problems:
        print(f"  problem: {problem}")


def _checksum(address: str) -> str:
    import web3

    return str(web3.Web3.to_checksum_address(address))


def _abi(name: str) -> Any:
    return json.loads(resources.files("sidecar.chain").joinpath(f"abi/{name}.json").read_text())
