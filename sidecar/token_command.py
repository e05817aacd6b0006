"""``sidecar token``: print a job token for a client to send as its API key.

The scope (chain id, marketplace, host address) comes from flags, or from a running sidecar's
``/v1/health`` (``--sidecar URL``), which publishes what its tokens must name. The key is read
from a file (never a flag: command lines are visible to every user of the machine).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from sidecar.metering import InvalidJobId, parse_job_id

_DURATION = re.compile(r"(\d+)([smhd]?)")
_UNIT_SECONDS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def add_token_parser(commands: Any) -> None:
    token = commands.add_parser(
        "token",
        allow_abbrev=False,
        help="print a job token (a client's API key for a job on a host that binds jobs)",
        description="Sign a job token: Authorization: Bearer <token> proves to a sidecar with "
        "--session-auth bound or depositor that the request comes from the job's client. Give "
        "the host's scope with --sidecar URL (read from its /v1/health) or with --chain-id, "
        "--marketplace and --host.",
    )
    token.add_argument("--job", required=True, help="the job id (e.g. 164 or 164n)")
    token.add_argument(
        "--key-file",
        required=True,
        help="file holding the signer's hex private key: the job's depositor, or the key the "
        "job is bound to",
    )
    token.add_argument("--expires", default="1h", help="lifetime: 3600, 90s, 30m, 1h, 7d")
    token.add_argument("--sidecar", metavar="URL", help="a running sidecar to read the scope from")
    token.add_argument("--chain-id", type=int, help="the chain id the token names")
    token.add_argument("--marketplace", metavar="ADDRESS", help="the JobMarketplace address")
    token.add_argument("--host", metavar="ADDRESS", help="the host's address (its claiming key)")


def parse_duration(text: str) -> int:
    match = _DURATION.fullmatch(text.strip().lower())
    if match is None or int(match.group(1)) <= 0:
        raise ValueError(f"--expires must be like 3600, 90s, 30m, 1h or 7d, got {text!r}")
    return int(match.group(1)) * _UNIT_SECONDS[match.group(2)]


def run_token(args: argparse.Namespace) -> int:
    from sidecar.auth.tokens import make_job_token

    try:
        job_id = parse_job_id(args.job)
        expires_in = parse_duration(args.expires)
        scope = _scope(args)
        key = _read_key(Path(args.key_file))
        print(make_job_token(key, **scope, job_id=job_id, expires_in=expires_in))
    except (InvalidJobId, ValueError) as exc:
        print(f"sidecar: {exc}", file=sys.stderr)
        return 2
    return 0


def _scope(args: argparse.Namespace) -> dict[str, Any]:
    scope: dict[str, Any] = {}
    if args.sidecar:
        published = _published_scope(args.sidecar.rstrip("/"))
        scope = {
            "chain_id": published.get("chain_id"),
            "marketplace": published.get("marketplace"),
            "host": published.get("host"),
        }
    for name in ("chain_id", "marketplace", "host"):
        given = getattr(args, name)
        if given is not None:
            scope[name] = given
    missing = [name for name in ("chain_id", "marketplace", "host") if scope.get(name) is None]
    if missing:
        flags = ", ".join("--" + name.replace("_", "-") for name in missing)
        raise ValueError(f"the token's scope lacks {flags}: give them, or --sidecar URL")
    return scope


def _published_scope(base_url: str) -> dict[str, Any]:
    url = base_url + "/v1/health"
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            body = json.loads(resp.read())
    except urllib.error.HTTPError as exc:  # 503 while the engine is down still has the scope
        body = json.loads(exc.read() or b"{}")
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise ValueError(f"no sidecar answers at {url}: {exc}") from None
    auth = body.get("session_auth") if isinstance(body, dict) else None
    if not isinstance(auth, dict) or auth.get("mode") in (None, "none"):
        raise ValueError(f"the sidecar at {base_url} does not ask for job tokens")
    return auth


def _read_key(path: Path) -> str:
    try:
        raw = path.expanduser().read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ValueError(f"cannot read the key file {path}: {exc.strerror}") from None
    key = raw.removeprefix("0x").removeprefix("0X")
    if len(key) != 64 or any(c not in "0123456789abcdefABCDEF" for c in key):
        raise ValueError(f"the key in {path} is not 32 bytes of hex")
    return "0x" + key
