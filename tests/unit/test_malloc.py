"""The allocator setting of `sidecar serve` (sidecar/malloc.py): set on glibc, a no-op elsewhere."""

from __future__ import annotations

import subprocess
import sys

import pytest

from sidecar import malloc


@pytest.mark.skipif(not malloc.is_glibc(), reason="glibc only")
def test_thresholds_are_set_on_glibc() -> None:
    # In a child: mallopt changes the whole process, and the test run should keep its own.
    code = "from sidecar.malloc import tune_for_relaying as t; print(t(), t())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["True", "True"]


def test_nothing_is_changed_off_glibc(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(malloc.sys, "platform", "darwin")
    assert malloc.is_glibc() is False
    assert malloc.tune_for_relaying() is False
