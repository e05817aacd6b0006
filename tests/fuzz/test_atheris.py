"""Each atheris harness (fuzz/fuzz_*.py), coverage-guided, FUZZ_EXAMPLES runs from its seeds.

A crash fails the test with the harness's output and the crashing input (libFuzzer's artifact),
to become a regression test in test_regressions.py. ``make fuzz`` runs the harnesses for longer.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.fuzz.common import EXAMPLES

pytestmark = pytest.mark.fuzz

ROOT = Path(__file__).resolve().parents[2]
HARNESSES = sorted(p.stem.removeprefix("fuzz_") for p in (ROOT / "fuzz").glob("fuzz_*.py"))
MAX_LEN = 1024  # bytes per input: the seeds are below it, the parsers' limits far above


def test_every_target_has_a_harness_and_seeds() -> None:
    assert set(HARNESSES) == {
        "sse",
        "usage",
        "jobs",
        "requests",
        "node_protocol",
        "node_e2ee",
        "tokens",
        "config",
    }
    for name in HARNESSES:
        assert any((ROOT / "fuzz" / "corpus" / name).iterdir()), f"no seeds for {name}"


@pytest.mark.parametrize("name", HARNESSES)
def test_harness(name: str, tmp_path: Path) -> None:
    corpus = tmp_path / "corpus"  # libFuzzer adds what it finds to the first folder: not ours
    corpus.mkdir()
    artifacts = tmp_path / "artifacts"
    artifacts.mkdir()
    command = [
        sys.executable,
        str(ROOT / "fuzz" / f"fuzz_{name}.py"),
        str(corpus),
        str(ROOT / "fuzz" / "corpus" / name),
        f"-runs={EXAMPLES}",
        f"-max_len={MAX_LEN}",
        f"-dict={ROOT / 'fuzz' / 'sidecar.dict'}",
        "-timeout=60",
        f"-artifact_prefix={artifacts}/",
    ]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=280)
    output = done.stdout + done.stderr
    crashes = [f"{path.name}: {path.read_bytes()!r}" for path in sorted(artifacts.iterdir())[:3]]
    if done.returncode != 0 or f"Done {EXAMPLES} runs" not in output:
        pytest.fail(
            f"fuzz/fuzz_{name}.py exited {done.returncode}; crashing inputs: {crashes}\n"
            + output[-6000:],
            pytrace=False,
        )
