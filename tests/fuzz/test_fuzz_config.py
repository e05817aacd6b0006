"""The settings loader: any flags, environment and TOML file give valid Settings or a
ConfigError."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fuzz import oracles
from sidecar.config import Settings
from tests.fuzz.common import fuzz_settings

pytestmark = pytest.mark.fuzz

FIELDS = {f.name: f for f in fields(Settings)}
NAMES = list(FIELDS)
# Text a process can be given (argv and the environment hold no NUL).
text = st.text(st.characters(blacklist_characters="\x00", codec="utf-8"), max_size=12)
urls = st.text("h:[]9@/x.", max_size=8).map(lambda rest: "http://" + rest)
garbage = st.one_of(
    text,
    urls,
    st.sampled_from(
        [
            "",
            "-1",
            "1_000",
            " 8 ",
            "١٢",
            "²",
            "1" * 4301,
            "h:²",
            "h:١٢",
            ":80",
            "h:",
            "http://h:99999",
            "http://[",
            "https://h:x",
            "a=b,a",
            "=x",
            ".",
            "/",
        ]
    ),
)
# Values that pass, per option: so that several options at once reach the checks after them.
GOOD: dict[str, st.SearchStrategy[str]] = {
    "listen": st.sampled_from(["127.0.0.1:8080", "[::1]:1", "h:0"]),
    "upstream": st.sampled_from(["http://127.0.0.1:8000", "https://e"]) | urls,
    "rpc_url": st.sampled_from(["http://127.0.0.1:8545", "http://u:p@h/key?x=1"]) | urls,
    "ledger": st.sampled_from(["sqlite:///x.db", "postgresql://u:p@h:5/db", "postgres://h/d"]),
    "marketplace": st.just("0x" + "ab" * 20),
    "host_key": st.sampled_from(["0x" + "11" * 32, "11" * 32]),
    "model": st.sampled_from(["a", "a=b", "a,b", "a=b,c"]),
}


def option_values(name: str) -> st.SearchStrategy[str]:
    """Mostly values of the option's own kind, sometimes anything."""
    f = FIELDS[name]
    kind = str(f.type)
    if name in GOOD:
        good = GOOD[name]
    elif f.metadata.get("choices"):
        good = st.sampled_from(list(f.metadata["choices"]))
    elif kind.startswith("bool"):
        good = st.sampled_from(["1", "true", "YES", "on", "0", "no", "off", ""])
    elif kind.startswith("int"):
        good = st.integers(-2, 10**9).map(str)
    else:
        good = text
    return st.one_of(good, good, good, garbage)


# The chain's settings are checked only together: sometimes start from a valid set of them.
CHAIN = {
    "rpc_url": "http://127.0.0.1:8545",
    "chain_id": "31337",
    "marketplace": "0x" + "ab" * 20,
    "host_key": "0x" + "11" * 32,
}
option_sets = st.lists(st.sampled_from([*NAMES, "config"]), max_size=4, unique=True).flatmap(
    lambda names: st.fixed_dictionaries(
        {name: garbage if name == "config" else option_values(name) for name in names}
    )
)


@st.composite
def environments(draw: st.DrawFn) -> dict[str, str]:
    options = draw(option_sets)
    if draw(st.integers(0, 3)) == 0:
        options = {**CHAIN, **options}
    env = {f"SIDECAR_{name.upper()}": value for name, value in options.items()}
    if draw(st.integers(0, 9)) == 0:
        env["OTHER"] = draw(text)
    return env


@st.composite
def argvs(draw: st.DrawFn) -> list[str]:
    """Mostly well-formed command lines (FLAG VALUE or FLAG=VALUE); sometimes a stray word or
    a flag without its value, which argparse refuses."""
    argv: list[str] = []
    for name, value in draw(option_sets).items():
        flag = "--" + name.replace("_", "-")
        how = draw(st.integers(0, 9))
        if FIELDS.get(name) is not None and str(FIELDS[name].type).startswith("bool"):
            argv.append(draw(st.sampled_from([flag, "--no-" + flag[2:]])))
        elif how <= 5:
            argv += [flag, value]
        elif how <= 8:
            argv.append(f"{flag}={value}")
        else:
            argv.append(draw(st.sampled_from([flag, value, "-x"])))
    return argv


toml_values = st.one_of(
    st.sampled_from(
        [
            "1",
            "-1",
            "1.5",
            "inf",
            "nan",
            "true",
            '"x"',
            "[]",
            '["a", "b"]',
            "[1]",
            "{}",
            "1979-05-27T07:32:00Z",
            "0x10",
            '"""multi"""',
            str(2**70),
        ]
    ),
    (garbage | st.integers(-2, 100).map(str)).map(
        lambda v: '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    ),
)


@st.composite
def toml_files(draw: st.DrawFn) -> bytes | None:
    how = draw(st.integers(0, 9))
    if how <= 4:
        return None  # (a file refused stops the loader before the environment and the flags)
    if how == 5:
        return draw(st.binary(max_size=40))
    lines = []
    if draw(st.booleans()):
        table = ["[sidecar]", "sidecar = 1", 'sidecar = "x"', "[other]"]
        lines.append(draw(st.sampled_from(table)))
    for _ in range(draw(st.integers(0, 4))):
        names = [*NAMES, *(n.replace("_", "-") for n in NAMES), "unknown", "config"]
        lines.append(f"{draw(st.sampled_from(names))} = {draw(toml_values)}")
    raw = "\n".join(lines).encode()
    if draw(st.integers(0, 9)) == 0:
        at = draw(st.integers(0, len(raw)))
        raw = raw[:at] + draw(st.sampled_from([b"\xff", b"=", b"[", b'"', b"\n"])) + raw[at:]
    return raw


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("config")


@fuzz_settings()
@given(argv=argvs(), environ=environments(), toml=toml_files())
def test_any_settings(
    workdir: Path, argv: list[str], environ: dict[str, str], toml: bytes | None
) -> None:
    oracles.check_settings(argv, environ, toml, workdir)


def test_valid_settings_load(workdir: Path) -> None:
    toml = b'[sidecar]\nbill = "total"\nmodel = ["a=b"]\n'
    environ = {"SIDECAR_REQUIRE_JOB": "1"}
    settings = oracles.check_settings(["--listen", "h:1"], environ, toml, workdir)
    assert settings is not None
    assert (settings.listen, settings.bill, settings.require_job) == ("h:1", "total", True)
