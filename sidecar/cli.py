"""The ``sidecar`` command: ``serve`` the proxy, read the ledger with ``jobs``, ``settle`` a job.

``devnet`` and ``demo`` are the checkout's development tools (devtools/, not in the installed
package): imported only when asked for, with a one-line message where they are not importable.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import NoReturn

from sidecar import __version__, event_loop
from sidecar.backup_command import add_ledger_parser, run_ledger
from sidecar.config import ConfigError, Settings, add_arguments, load_settings
from sidecar.errors import ChainCheckError
from sidecar.host_command import add_host_parser
from sidecar.jobs_table import format_jobs_table
from sidecar.ledger import Claim, JobTotals, claim_totals, open_ledger
from sidecar.logs import setup_logging
from sidecar.metering.jobs import InvalidJobId, parse_job_id
from sidecar.token_command import add_token_parser, run_token

log = logging.getLogger("sidecar")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        if message.startswith("unrecognized arguments"):
            # argparse would echo them: one may be a secret typed as the wrong option.
            options = [a.split("=", 1)[0] for a in sys.argv[1:] if a.startswith("-")]
            known = {o for action in self._actions for o in action.option_strings}
            unknown = [o for o in options if o not in known]
            message = f"unrecognized option(s): {' '.join(unknown) or '(see --help)'}"
        super().error(message)


def build_parser() -> argparse.ArgumentParser:
    # allow_abbrev=False everywhere: an abbreviation must never turn a mistyped secret option
    # (say --host-key 0x...) into another option that logs its value.
    parser = _Parser(
        allow_abbrev=False,
        prog="sidecar",
        description="A metering proxy in front of an unchanged OpenAI-compatible LLM engine: it "
        "relays every request, counts each job's tokens from the engine's own output and records "
        "them durably before the response ends.",
    )
    parser.add_argument("--version", action="version", version=f"sidecar {__version__}")
    commands = parser.add_subparsers(
        dest="command", metavar="COMMAND", required=True, parser_class=_Parser
    )

    serve = commands.add_parser(
        "serve",
        allow_abbrev=False,
        help="run the proxy",
        description="Relay every request to the engine and meter its answers. Options come from "
        "flags, then SIDECAR_* environment variables, then a TOML file (--config), then "
        "defaults.",
    )
    add_arguments(serve)

    jobs = commands.add_parser(
        "jobs",
        allow_abbrev=False,
        help="show the tokens metered per job, from the ledger",
        description="Read the ledger (the same one `serve` writes; safe while it runs) and print "
        "each job's totals.",
    )
    jobs.add_argument("job", nargs="?", help="one job id (e.g. 164 or 164n); default: all jobs")
    jobs.add_argument("--json", action="store_true", help="print JSON instead of a table")
    add_arguments(jobs)

    settle = commands.add_parser(
        "settle",
        allow_abbrev=False,
        help="settle a job's session on-chain (asks the running sidecar)",
        description="Ask the running sidecar to settle JOB: its last claim is sent and mined "
        "first, then completeSessionJob is sent once the dispute window has passed. Uses the "
        "same settings as `serve` to find the sidecar (--listen) and its --admin-token.",
    )
    settle.add_argument("job", help="the job id (e.g. 164 or 164n)")
    add_arguments(settle)

    add_token_parser(commands)
    add_host_parser(commands)
    add_ledger_parser(commands)

    commands.add_parser(
        "devnet",
        allow_abbrev=False,
        help="run a local chain with the JobMarketplace test doubles (a checkout's development "
        "tool: python -m devtools.devnet)",
        add_help=False,
    )

    demo = commands.add_parser(
        "demo",
        allow_abbrev=False,
        help="run the end-to-end demo on a local model (a checkout's development tool: "
        "python -m devtools.demo, behind `make demo`)",
        description="Start the engine on a GGUF model and the sidecar in front of it, send "
        "streamed and non-streamed requests for two jobs with the OpenAI SDK, print what was "
        "metered, and stop everything.",
    )
    demo.add_argument("--model", required=True, help="path of a GGUF model for the engine")
    demo.add_argument(
        "--workdir",
        default=None,
        help="folder for the demo's ledger and logs (default: a temporary one)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["devnet"]:
        devnet = _devtools("devnet")
        return 2 if devnet is None else int(devnet.main(argv[1:]))
    args = build_parser().parse_args(argv)
    flags = vars(args)
    try:
        if args.command == "serve":
            settings = load_settings(flags)
            _setup_logging(settings)
            log.info("settings: %s", settings.describe())
            from sidecar.app import serve

            loop_name = event_loop.resolve(settings.event_loop)
            log.info("event loop: %s", loop_name)
            event_loop.run(serve(settings), loop_name)
            return 0
        if args.command == "settle":
            return _settle(load_settings(flags), args.job)
        if args.command == "token":
            return run_token(args)
        if args.command == "host":
            from sidecar.host_command import run_host  # web3 only for this command

            return run_host(args)
        if args.command == "ledger":
            return run_ledger(load_settings(flags), args)
        if args.command == "jobs":
            return _jobs(load_settings(flags), args.job, as_json=args.json)
        if args.command == "demo":
            demo = _devtools("demo")
            return 2 if demo is None else int(demo.run_demo(model=args.model, workdir=args.workdir))
    except ConfigError as exc:
        print(f"sidecar: configuration error: {exc}", file=sys.stderr)
        return 2
    except ChainCheckError as exc:
        print(f"sidecar: refusing to start: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 2


def _devtools(name: str) -> ModuleType | None:
    """``devtools.<name>``: the development tools of a checkout, not part of the installed
    package. None, with a one-line message, where they cannot be imported."""
    try:
        return importlib.import_module(f"devtools.{name}")
    except ModuleNotFoundError as exc:
        if exc.name not in ("devtools", f"devtools.{name}"):
            raise
        print(
            f"sidecar {name}: a development tool of a checkout, not of the installed package: "
            f"run `python -m devtools.{name}` from the repository",
            file=sys.stderr,
        )
        return None


def _setup_logging(settings: Settings) -> None:
    setup_logging(settings.log_level, settings.log_format)


def _jobs(settings: Settings, job: str | None, *, as_json: bool) -> int:
    job_id: int | None = None
    if job is not None and job != "unattributed":
        try:
            job_id = parse_job_id(job)
        except InvalidJobId as exc:
            print(f"sidecar: {exc}", file=sys.stderr)
            return 2

    path = Path(settings.ledger_url.removeprefix("sqlite:///")).expanduser()
    if not path.exists():
        print(
            f"sidecar: no ledger at {path} (has `sidecar serve` run with this --ledger?)",
            file=sys.stderr,
        )
        return 1

    async def read() -> tuple[list[JobTotals], list[Claim]]:
        ledger = open_ledger(settings.ledger_url, password=settings.read_ledger_password())
        await ledger.open()
        try:
            if job is None:
                return await ledger.jobs(), await ledger.claims()
            one = await ledger.job(job_id)
            claims = await ledger.claims(job_id) if job_id is not None else []
            return ([one] if one is not None else []), claims
        finally:
            await ledger.close()

    totals, claims = asyncio.run(read())
    if job is not None and not totals:
        print(f"sidecar: no usage recorded for job {job} in {settings.ledger_url}", file=sys.stderr)
        return 1
    by_job: dict[int, list[Claim]] = {}
    for claim in claims:
        by_job.setdefault(claim.job_id, []).append(claim)
    if as_json:
        rows = []
        for t in totals:
            row = t.as_json()
            if t.job_id is not None:
                row.update(claim_totals(by_job.get(t.job_id, [])))
                row["claims"] = [c.as_json() for c in by_job.get(t.job_id, [])]
            rows.append(row)
        print(json.dumps(rows, indent=2))
    else:
        print(format_jobs_table(totals, by_job))
    return 0


def _settle(settings: Settings, job: str) -> int:
    import urllib.error
    import urllib.request

    try:
        job_id = parse_job_id(job)
    except InvalidJobId as exc:
        print(f"sidecar: {exc}", file=sys.stderr)
        return 2
    host, port = settings.listen_host_port
    if host in ("0.0.0.0", "::"):
        host = "127.0.0.1"
    url = f"http://{host}:{port}/sidecar/jobs/{job_id}/settle"
    request = urllib.request.Request(url, method="POST", data=b"")
    token = settings.read_admin_token()
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=30) as resp:
            print(json.loads(resp.read())["settlement"])
            return 0
    except urllib.error.HTTPError as exc:
        try:
            message = json.loads(exc.read())["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = exc.reason
        print(f"sidecar: settling job {job_id} failed: {message}", file=sys.stderr)
        return 1
    except (urllib.error.URLError, OSError) as exc:
        print(f"sidecar: no sidecar answers at {url}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
