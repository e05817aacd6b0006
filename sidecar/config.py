"""One typed settings object, declared in one place.

Every option is a field of :class:`Settings` with its type, default and help text. The command
line, the environment (``SIDECAR_`` + the option name in capitals) and an optional TOML file are
all derived from these declarations, and merged with this precedence:
flags > environment > TOML file > defaults.
"""

from __future__ import annotations

import argparse
import os
import re
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import MISSING, dataclass, field, fields, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import platformdirs

from sidecar.chain.policy import DEFAULT_CHECKPOINT_TOKENS, MIN_CLAIM_TOKENS
from sidecar.metering.dialects import ENGINE_NAMES

ENV_PREFIX = "SIDECAR_"

BILL_CHOICES = ("completion", "total")
SESSION_AUTH_CHOICES = ("none", "bound", "depositor")
EVENT_LOOP_CHOICES = ("auto", "uvloop", "asyncio")


def default_ledger_url() -> str:
    data_dir = Path(platformdirs.user_data_dir("sidecar", appauthor=False))
    return f"sqlite:///{data_dir / 'ledger.db'}"


def _opt(
    default: Any,
    help: str,
    *,
    choices: Sequence[str] | None = None,
    secret: bool = False,
    metavar: str | None = None,
    flag: bool = True,
) -> Any:
    return field(
        default=default,
        metadata={
            "help": help,
            "choices": choices,
            "secret": secret,
            "metavar": metavar,
            "flag": flag,  # False: environment or file only (a key on a command line leaks)
        },
    )


class ConfigError(ValueError):
    """A setting that cannot be used; the message names the option and where it came from."""


@dataclass(frozen=True, slots=True)
class Settings:
    listen: str = _opt(
        "127.0.0.1:8080", "address the sidecar listens on, HOST:PORT", metavar="HOST:PORT"
    )
    upstream: str = _opt(
        "http://127.0.0.1:8000", "base URL of the unchanged OpenAI-compatible engine", metavar="URL"
    )
    engine: str = _opt(
        "auto",
        "the engine's usage dialect (docs/ENGINES.md): auto recognises it from its own answers "
        "at start and whenever it comes back; a name forces that dialect",
        choices=ENGINE_NAMES,
    )
    ledger: str = _opt(
        None,
        "durable ledger URL: sqlite:///PATH (default: a file in the user's data folder), or "
        "postgresql://USER@HOST:PORT/DB for several replicas sharing one ledger",
        metavar="URL",
    )
    ledger_password_file: str | None = _opt(
        None,
        "file holding the PostgreSQL ledger's password (keeps it out of the URL and the "
        "environment; a compose secret)",
        metavar="PATH",
    )
    submitter_takeover: int = _opt(
        15,
        "seconds within which another replica takes over sending the host's transactions "
        "when the submitting replica dies",
        metavar="SECONDS",
    )
    shutdown_grace: int = _opt(
        30,
        "on SIGTERM: seconds that streams in flight may still run before they are cut (their "
        "counts recorded)",
        metavar="SECONDS",
    )
    log_format: str = _opt(
        "text", "log lines as text, or json (one object per line)", choices=("text", "json")
    )
    bill: str = _opt(
        "completion",
        "tokens billed per response: completion (generated tokens, "
        "what hosts are paid for) or total (prompt + completion)",
        choices=BILL_CHOICES,
    )
    require_job: bool = _opt(
        False, "reject requests that name no job (402) instead of relaying them as unattributed"
    )
    admin_token: str | None = _opt(
        None,
        "bearer token required by /sidecar/* admin routes (never logged)",
        secret=True,
        metavar="TOKEN",
    )
    relay_native_generation: bool = _opt(
        False,
        "relay the engine's own generation routes (llama.cpp's /completion, Ollama's "
        "/api/generate, TGI's /generate...) unmetered; off: they are refused (403), since "
        "anyone who reaches the port could generate for free",
    )
    admin_token_file: str | None = _opt(
        None,
        "file holding the admin token (keeps it out of the command line, which every local "
        "user can read in ps; a compose secret)",
        metavar="PATH",
    )
    max_body_bytes: int = _opt(
        8 * 1024 * 1024, "largest request body accepted (413 above)", metavar="BYTES"
    )
    max_event_bytes: int = _opt(
        1024 * 1024,
        "longest SSE line or event of an engine stream that is metered; a longer one is "
        "relayed as is, not counted, and logged as an anomaly",
        metavar="BYTES",
    )
    max_streams_per_job: int = _opt(
        32, "streams one job may have open at once (429 too_many_streams above)", metavar="N"
    )
    upstream_first_byte_timeout: int = _opt(
        600,
        "seconds the engine may take to start its answer (its response headers; for a "
        "non-stream answer, the whole answer); 504 after",
        metavar="SECONDS",
    )
    upstream_idle_timeout: int = _opt(
        120,
        "seconds a streamed answer may go without a byte from the engine; then the stream is "
        "cut and its tokens so far recorded",
        metavar="SECONDS",
    )
    ws_max_message_bytes: int = _opt(
        8 * 1024 * 1024,
        "largest WebSocket message accepted on /v1/ws (the socket is closed with 1009 above)",
        metavar="BYTES",
    )
    ws_messages_per_second: int = _opt(
        20,
        "messages a second one WebSocket may send on average (bursts of twice as many); "
        "messages above it are dropped unread and the client told RATE_LIMITED",
        metavar="N",
    )
    max_connections: int = _opt(
        1024,
        "client connections open at once; a connection above it is answered 503 and closed",
        metavar="N",
    )
    upstream_connect_timeout: int = _opt(
        10, "seconds to wait for a connection to the engine", metavar="SECONDS"
    )
    log_level: str = _opt("info", "log level", choices=("debug", "info", "warning", "error"))
    event_loop: str = _opt(
        "auto",
        "the event loop: uvloop (libuv; cheaper per relayed chunk), asyncio (the standard "
        "library's), or auto: uvloop where it is installed",
        choices=EVENT_LOOP_CHOICES,
    )
    # -- the chain (off unless --rpc-url is given) -----------------------------------------------
    rpc_url: str | None = _opt(
        None, "JSON-RPC URL of the chain; enables on-chain claims and settlement", metavar="URL"
    )
    chain_id: int | None = _opt(None, "the chain id the RPC must answer with", metavar="ID")
    marketplace: str | None = _opt(
        None, "address of the JobMarketplace contract", metavar="ADDRESS"
    )
    contract_version: str = _opt(
        "v1",
        "JobMarketplace version: v1 (submitProofOfWork(uint256,uint256,bytes)) or v2 "
        "(submitProofOfWork(uint256,uint256,bytes32,string,string))",
        choices=("v1", "v2"),
    )
    host_key_file: str | None = _opt(
        None, "file holding the host's hex private key (with or without 0x)", metavar="PATH"
    )
    host_key: str | None = _opt(
        None, "the host's hex private key (prefer --host-key-file)", secret=True, flag=False
    )
    dispute_window: int = _opt(
        3600,
        "seconds after a session's start before the host may settle it (v1; read on-chain for v2)",
        metavar="SECONDS",
    )
    checkpoint_tokens: int = _opt(
        DEFAULT_CHECKPOINT_TOKENS,
        "claim once a job has this many unclaimed billable tokens (at least "
        f"{MIN_CLAIM_TOKENS}, the contract's minimum)",
        metavar="TOKENS",
    )
    fee_bump_after: int = _opt(
        30,
        "seconds a claim or settlement may wait unmined before it is replaced (same nonce, "
        "same proof, fees raised by a quarter)",
        metavar="SECONDS",
    )
    max_fee_bumps: int = _opt(
        3,
        "replacements of one transaction at most (each raises its fees by a quarter)",
        metavar="N",
    )
    settle_after_idle: int = _opt(
        0,
        "settle a session after this many seconds without requests (0: never automatically)",
        metavar="SECONDS",
    )
    session_auth: str | None = _opt(
        None,
        "who may use a job: none (whoever names it), bound (the first authenticated client, "
        "an encrypted session's signer or a job token's; then only it), depositor (the job's "
        "depositor on-chain only). Default: bound with a chain, none without",
        choices=SESSION_AUTH_CHOICES,
    )
    model: tuple[str, ...] = _opt(
        (),
        "a marketplace model name this host serves, NAME or NAME=ENGINE_MODEL (repeatable; "
        "comma-separated in the environment). Default: the engine's own model names",
        metavar="NAME[=ENGINE_MODEL]",
    )
    context_window: int = _opt(
        0,
        "the engine's context window in tokens, reported to marketplace clients (0: read it "
        "from the engine where it tells it)",
        metavar="TOKENS",
    )
    default_max_tokens: int = _opt(
        4096,
        "with a chain: the max_tokens written into a request for a job that names none, and so "
        "what it holds of the job's deposit while it runs",
        metavar="TOKENS",
    )

    def read_host_key(self) -> str:
        """The host's private key as 0x-hex, from SIDECAR_HOST_KEY or --host-key-file.

        Errors name the file, never the key.
        """
        raw = self.host_key
        if raw is None and self.host_key_file:
            try:
                raw = Path(self.host_key_file).expanduser().read_text(encoding="utf-8")
            except OSError as exc:
                raise ConfigError(
                    f"cannot read the host key file {self.host_key_file}: {exc.strerror}"
                ) from None
        if raw is None:
            raise ConfigError("no host key: set --host-key-file PATH or SIDECAR_HOST_KEY")
        key = raw.strip().removeprefix("0x").removeprefix("0X")
        if len(key) != 64 or any(c not in "0123456789abcdefABCDEF" for c in key):
            where = self.host_key_file if self.host_key is None else "SIDECAR_HOST_KEY"
            raise ConfigError(f"the host key in {where} is not 32 bytes of hex")
        return "0x" + key.lower()

    def read_ledger_password(self) -> str | None:
        """The PostgreSQL ledger's password from --ledger-password-file (None: not set)."""
        if not self.ledger_password_file:
            return None
        try:
            text = Path(self.ledger_password_file).expanduser().read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(
                f"cannot read the ledger password file {self.ledger_password_file}: {exc.strerror}"
            ) from None
        return text.strip()

    def read_admin_token(self) -> str | None:
        """The admin token, from --admin-token or --admin-token-file (None: the admin routes
        are open). Errors name the file, never the token."""
        if self.admin_token:
            return self.admin_token
        if not self.admin_token_file:
            return None
        try:
            text = Path(self.admin_token_file).expanduser().read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
            raise ConfigError(
                f"cannot read the admin token file {self.admin_token_file}: {reason}"
            ) from None
        token = text.strip()
        if not token:
            raise ConfigError(f"the admin token file {self.admin_token_file} is empty")
        return token

    @property
    def session_auth_mode(self) -> str:
        """``--session-auth``, its default resolved: bound with a chain, none without."""
        if self.session_auth is not None:
            return self.session_auth
        return "bound" if self.rpc_url else "none"

    @property
    def model_names(self) -> dict[str, str]:
        """``--model``: each marketplace name -> the engine's model it is served by."""
        names: dict[str, str] = {}
        for entry in self.model:
            name, _, engine_model = entry.partition("=")
            names[name.strip()] = engine_model.strip() or name.strip()
        return names

    @property
    def ledger_url(self) -> str:
        return self.ledger or default_ledger_url()

    @property
    def listen_host_port(self) -> tuple[str, int]:
        host, sep, port = self.listen.rpartition(":")
        # isdigit() alone takes "²" and other Unicode digits; a port is at most 5 ASCII ones.
        if not sep or not host or not (port.isascii() and port.isdigit() and len(port) <= 5):
            raise ConfigError(f"--listen must be HOST:PORT, got {_short(self.listen)}")
        if int(port) > 65535:
            raise ConfigError(f"--listen: port {port} is above 65535")
        return host.strip("[]"), int(port)

    def describe(self) -> dict[str, Any]:
        """The settings as a dict, with secrets masked: safe to log."""
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.metadata.get("secret") and value:
                value = "***"
            elif f.name == "rpc_url" and value:
                value = redact_url(value)
            out[f.name] = value
        out["ledger"] = redact_password(self.ledger_url)
        return out


def redact_password(url: str) -> str:
    """The URL with the password of its user info masked (a ledger URL may carry one)."""
    scheme, sep, rest = url.partition("://")
    userinfo, at, host = rest.rpartition("@")
    if not sep or not at or ":" not in userinfo:
        return url
    return f"{scheme}://{userinfo.split(':', 1)[0]}:***@{host}"


def redact_url(url: str) -> str:
    """scheme://host[:port] only: RPC providers put API keys in the path, query or user info."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = f":{parts.port}" if parts.port else ""
    except ValueError:  # a malformed URL (a bad port, a broken IPv6 address): show nothing of it
        return "(a malformed URL)"
    hidden = "/***" if (parts.path.strip("/") or parts.query or parts.username) else ""
    return f"{parts.scheme}://{host}{port}{hidden}"


def _short(value: object, limit: int = 80) -> str:
    """A value for an error message, cut short (a fuzzer's 5000 digits are not a message)."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} characters)"


def _field_type(f: Any) -> type:
    annotation = str(f.type)
    if annotation.startswith("tuple"):
        return tuple
    if annotation.startswith("bool"):
        return bool
    if annotation.startswith("int"):
        return int
    return str


def _coerce(name: str, raw: Any, kind: type, origin: str) -> Any:
    """Turn a value from the environment or a TOML file into the option's type."""
    if kind is bool:
        if isinstance(raw, bool):
            return raw
        text = str(raw).strip().lower()
        if text in ("1", "true", "yes", "on"):
            return True
        if text in ("0", "false", "no", "off", ""):
            return False
        raise ConfigError(f"{name} from {origin}: expected true or false, got {raw!r}")
    if kind is int:
        if isinstance(raw, bool):
            raise ConfigError(f"{name} from {origin}: expected an integer, got {raw!r}")
        if isinstance(raw, float) and not raw.is_integer():  # inf, nan and 1.5 alike
            raise ConfigError(f"{name} from {origin}: expected an integer, got {raw!r}")
        try:
            return int(raw)
        except (TypeError, ValueError, OverflowError):
            raise ConfigError(
                f"{name} from {origin}: expected an integer, got {_short(raw)}"
            ) from None
    if kind is tuple:
        # The environment says "a,b"; a TOML file says ["a", "b"] (or "a,b").
        items = raw.split(",") if isinstance(raw, str) else raw
        if not isinstance(items, list | tuple) or not all(isinstance(i, str) for i in items):
            raise ConfigError(f"{name} from {origin}: expected a list of strings, got {raw!r}")
        return tuple(i.strip() for i in items if i.strip())
    if not isinstance(raw, str):
        raise ConfigError(f"{name} from {origin}: expected a string, got {raw!r}")
    return raw


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Declare every setting as a flag. Flags not given stay absent (so lower layers apply)."""
    parser.add_argument(
        "--config",
        metavar="FILE",
        default=argparse.SUPPRESS,
        help=f"TOML file of settings (or {ENV_PREFIX}CONFIG); keys are the "
        "option names, e.g. require_job = true",
    )
    for f in fields(Settings):
        if not f.metadata.get("flag", True):
            continue
        flag = "--" + f.name.replace("_", "-")
        kind = _field_type(f)
        default = None if f.default is MISSING else f.default
        shown = "" if f.metadata.get("secret") or default is None else f" (default: {default})"
        env = f" [env {ENV_PREFIX}{f.name.upper()}]"
        help_text = f.metadata["help"] + shown + env
        if kind is bool:
            parser.add_argument(
                flag,
                dest=f.name,
                action=argparse.BooleanOptionalAction,
                default=argparse.SUPPRESS,
                help=help_text,
            )
        elif kind is tuple:
            parser.add_argument(
                flag,
                dest=f.name,
                action="append",
                default=argparse.SUPPRESS,
                metavar=f.metadata.get("metavar"),
                help=help_text,
            )
        else:
            parser.add_argument(
                flag,
                dest=f.name,
                type=kind,
                default=argparse.SUPPRESS,
                choices=f.metadata.get("choices"),
                metavar=f.metadata.get("metavar"),
                help=help_text,
            )


def load_settings(flags: Mapping[str, Any], environ: Mapping[str, str] | None = None) -> Settings:
    """Merge flags > environment > TOML file > defaults into one validated Settings."""
    env = os.environ if environ is None else environ
    values: dict[str, Any] = {}

    config_path = flags.get("config") or env.get(ENV_PREFIX + "CONFIG")
    if config_path:
        values.update(_read_toml(Path(config_path)))

    for f in fields(Settings):
        key = ENV_PREFIX + f.name.upper()
        if key in env:
            values[f.name] = _coerce(f.name, env[key], _field_type(f), f"${key}")

    for f in fields(Settings):
        if f.name in flags and flags[f.name] is not None:
            value = flags[f.name]
            values[f.name] = tuple(value) if _field_type(f) is tuple else value

    settings = replace(Settings(), **values)
    _validate(settings)
    return settings


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except UnicodeDecodeError:
        raise ConfigError(f"config file {path} is not UTF-8 text") from None
    except OSError as exc:
        raise ConfigError(f"cannot read the config file {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    table = data.get("sidecar", data)
    if not isinstance(table, dict):
        raise ConfigError(f"config file {path}: [sidecar] must be a table of options")
    known = {f.name: f for f in fields(Settings)}
    values: dict[str, Any] = {}
    for raw_key, raw in table.items():
        key = raw_key.replace("-", "_")
        if key not in known:
            raise ConfigError(f"config file {path}: unknown option {raw_key!r}")
        values[key] = _coerce(key, raw, _field_type(known[key]), str(path))
    return values


def _validate(settings: Settings) -> None:
    settings.listen_host_port  # noqa: B018 - raises ConfigError when malformed
    for f in fields(Settings):
        choices = f.metadata.get("choices")
        value = getattr(settings, f.name)
        if choices and value is not None and value not in choices:
            raise ConfigError(
                f"{f.name} must be one of {', '.join(choices)}; got {getattr(settings, f.name)!r}"
            )
    if not settings.upstream.startswith(("http://", "https://")):
        raise ConfigError(f"--upstream must be an http(s) URL, got {settings.upstream!r}")
    if settings.max_body_bytes <= 0:
        raise ConfigError("--max-body-bytes must be positive")
    if settings.max_event_bytes <= 0:
        raise ConfigError("--max-event-bytes must be positive")
    for name in (
        "max_streams_per_job",
        "upstream_first_byte_timeout",
        "upstream_idle_timeout",
        "max_connections",
        "ws_max_message_bytes",
        "ws_messages_per_second",
        "fee_bump_after",
    ):
        if getattr(settings, name) <= 0:
            raise ConfigError(f"--{name.replace('_', '-')} must be positive")
    if settings.max_fee_bumps < 0:
        raise ConfigError("--max-fee-bumps must be 0 or more")
    if settings.upstream_connect_timeout <= 0:
        raise ConfigError("--upstream-connect-timeout must be positive")
    if settings.rpc_url is not None:
        if not settings.rpc_url.startswith(("http://", "https://")):
            # Not echoed: an RPC URL may carry the provider's key.
            raise ConfigError(
                f"--rpc-url must be an http(s) URL, got {redact_url(settings.rpc_url)}"
            )
        try:
            if not urlsplit(settings.rpc_url).hostname:
                raise ValueError("no host")
            urlsplit(settings.rpc_url).port  # noqa: B018 - raises ValueError when malformed
        except ValueError:
            raise ConfigError("--rpc-url is not a valid URL (its host or port)") from None
        if settings.chain_id is None:
            raise ConfigError("--chain-id is required with --rpc-url")
        if not settings.marketplace:
            raise ConfigError("--marketplace is required with --rpc-url")
        if not re.fullmatch(r"0x[0-9a-fA-F]{40}", settings.marketplace):
            raise ConfigError(
                f"--marketplace must be a 0x-prefixed 20-byte hex address, got "
                f"{settings.marketplace!r}"
            )
        if not (settings.host_key_file or settings.host_key):
            raise ConfigError(
                "the host key is required with --rpc-url: --host-key-file PATH or SIDECAR_HOST_KEY"
            )
    if settings.checkpoint_tokens < MIN_CLAIM_TOKENS:
        raise ConfigError(
            f"--checkpoint-tokens must be at least {MIN_CLAIM_TOKENS} (the contract's minimum)"
        )
    for entry in settings.model:
        name, sep, engine_model = entry.partition("=")
        if not name.strip() or (sep and not engine_model.strip()):
            raise ConfigError(f"--model must be NAME or NAME=ENGINE_MODEL, got {entry!r}")
    if len(settings.model_names) != len(settings.model):
        raise ConfigError("--model names a model twice")
    if settings.context_window < 0:
        raise ConfigError("--context-window must not be negative")
    if settings.session_auth == "depositor" and not settings.rpc_url:
        raise ConfigError("--session-auth depositor needs the chain (--rpc-url)")
    if settings.default_max_tokens < 1:
        raise ConfigError("--default-max-tokens must be at least 1")
    if settings.dispute_window < 0 or settings.settle_after_idle < 0:
        raise ConfigError("--dispute-window and --settle-after-idle must not be negative")
    if not settings.ledger_url.startswith(("sqlite:///", "postgresql://", "postgres://")):
        raise ConfigError(
            "--ledger must be sqlite:///PATH or postgresql://USER@HOST:PORT/DB, got "
            f"{redact_password(settings.ledger_url)!r}"
        )
    if settings.submitter_takeover < 1:
        raise ConfigError("--submitter-takeover must be at least 1 second")
    if settings.shutdown_grace < 0:
        raise ConfigError("--shutdown-grace must not be negative")
