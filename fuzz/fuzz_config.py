"""atheris over the settings loader: any flags, environment and TOML file give valid Settings or a
ConfigError.

Input: a selector byte (0: NUL-separated environment entries, each an option's index byte and
its value; 1: a TOML file; 2: NUL-separated command-line words, each an option's index byte and
its value), then the payload. Run from the checkout: ``python fuzz/fuzz_config.py -runs=10000
fuzz/corpus/config``.
"""

from __future__ import annotations

import sys
import tempfile
from dataclasses import fields
from pathlib import Path

import atheris  # type: ignore[import-untyped]

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout: fuzz.*, sidecar.*

with atheris.instrument_imports(include=["sidecar"]):
    from fuzz import inputs, oracles
    from sidecar.config import Settings

NAMES = [f.name for f in fields(Settings)]
WORKDIR = tempfile.TemporaryDirectory(prefix="fuzz-config-")


def _pairs(rest: bytes) -> list[tuple[str, str]]:
    """NUL-separated entries, each an option's index byte and its value (no NUL: as in argv)."""
    pairs = []
    for entry in rest.split(b"\x00")[:8]:
        if entry:
            name = NAMES[entry[0] % len(NAMES)] if entry[0] < 200 else "config"
            pairs.append((name, inputs.text(entry[1:])))
    return pairs


def TestOneInput(data: bytes) -> None:
    selector, rest = inputs.head(data)
    what = selector % 3
    workdir = Path(WORKDIR.name)
    if what == 0:
        env = {f"SIDECAR_{name.upper()}": value for name, value in _pairs(rest)}
        oracles.check_settings([], env, None, workdir)
    elif what == 1:
        oracles.check_settings([], {}, rest, workdir)
    else:
        argv = []
        for name, value in _pairs(rest):
            argv += ["--" + name.replace("_", "-"), value]
        oracles.check_settings(argv, {}, None, workdir)


if __name__ == "__main__":
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()
