"""compose.yaml and the images: no Docker engine runs here, so check what can be checked."""

from __future__ import annotations

import re
from dataclasses import fields
from pathlib import Path

import yaml

from sidecar.config import ENV_PREFIX, Settings, load_settings

REPO = Path(__file__).resolve().parents[2]
SETTING_ENV = {ENV_PREFIX + f.name.upper() for f in fields(Settings)}


def test_compose_runs_the_engine_behind_the_sidecar() -> None:
    compose = yaml.safe_load((REPO / "compose.yaml").read_text())
    services = compose["services"]
    assert set(services) == {"upstream", "sidecar"}
    assert "ports" not in services["upstream"]  # only metered traffic reaches the engine
    sidecar = services["sidecar"]
    assert sidecar["ports"] == ["8080:8080"]
    env = sidecar["environment"]
    assert env["SIDECAR_UPSTREAM"] == "http://upstream:8000"
    assert set(env) <= SETTING_ENV, set(env) - SETTING_ENV
    assert any(v.endswith(":/data") for v in sidecar["volumes"])
    assert (REPO / services["upstream"]["build"]["dockerfile"]).is_file()


def test_dockerfile_settings_are_valid() -> None:
    text = (REPO / "Dockerfile").read_text()
    env = dict(re.findall(r"(SIDECAR_[A-Z_]+)=(\S+)", text))
    assert set(env) <= SETTING_ENV
    settings = load_settings({}, env)
    assert settings.listen_host_port == ("0.0.0.0", 8080)
    assert settings.ledger_url == "sqlite:////data/ledger.db"
    engine = (REPO / "upstream" / "Dockerfile").read_text()
    assert "GGML_CUDA=on" in engine and "upstream/serve.py" in engine
