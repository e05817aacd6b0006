"""compose.yaml and the images, checked by real tools: no Docker engine runs here, so compose.yaml
goes through a real Compose implementation's ``config`` (Debian's docker-compose, which validates
against the Compose schema and resolves anchors, profiles and .env), and every Dockerfile through
hadolint. ``make test`` installs both (``make deploy-tools``)."""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import fields
from pathlib import Path
from typing import Any

import pytest
import yaml

from sidecar.config import ENV_PREFIX, Settings, load_settings

REPO = Path(__file__).resolve().parents[2]
SETTING_ENV = {ENV_PREFIX + f.name.upper() for f in fields(Settings)}
DOCKERFILES = ("Dockerfile", "upstream/Dockerfile", "devchain/Dockerfile")


def tool(name: str) -> str:
    found = shutil.which(name) or shutil.which(name, path=str(REPO / "var/deploy-tools/bin"))
    if found is None:
        pytest.fail(f"{name} is not installed: `make test` installs it (make deploy-tools)")
    return found


@pytest.fixture(scope="module")
def compose(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """``docker-compose config`` with every profile, .env from .env.example, dummy secrets."""
    folder = tmp_path_factory.mktemp("compose")
    shutil.copy(REPO / "compose.yaml", folder / "compose.yaml")
    shutil.copy(REPO / ".env.example", folder / ".env")
    (folder / "secrets").mkdir()
    for name in ("host_key", "postgres_password"):
        (folder / "secrets" / name).write_text("dummy\n")
    done = subprocess.run(
        [tool("docker-compose"), "--profile", "dev", "--profile", "replicas", "config"],
        cwd=folder,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    resolved: dict[str, Any] = yaml.safe_load(done.stdout)
    return resolved


def port_text(port: str | dict[str, Any]) -> str:
    """A port as HOST_IP:PUBLISHED:TARGET text, whichever form config printed it in."""
    if isinstance(port, str):
        return port.removesuffix("/tcp")
    host = f"{port['host_ip']}:" if port.get("host_ip") else ""
    return f"{host}{port['published']}:{port['target']}"


def test_services_and_their_profiles(compose: dict[str, Any]) -> None:
    services = compose["services"]
    profiles = {name: tuple(s.get("profiles", ())) for name, s in services.items()}
    assert profiles == {
        "upstream": (),
        "sidecar": (),
        "postgres": ("replicas",),
        "sidecar-replica": ("replicas",),
        "anvil": ("dev",),
    }


def test_only_the_sidecar_publishes_a_port_and_replicas_can_scale(
    compose: dict[str, Any],
) -> None:
    services = compose["services"]
    published = {
        name: [port_text(p) for p in s["ports"]] for name, s in services.items() if "ports" in s
    }
    assert set(published) == {"sidecar", "anvil"}
    assert published["sidecar"] == ["8080:8080"]
    assert published["anvil"] == ["127.0.0.1:8545:8545"]  # dev only, and on loopback
    assert "ports" not in services["sidecar-replica"]  # --scale needs no fixed host port
    assert services["sidecar-replica"]["expose"] == ["8080"]


def test_the_engine_gets_the_gpu_a_health_check_and_the_model_volume(
    compose: dict[str, Any],
) -> None:
    upstream = compose["services"]["upstream"]
    [device] = upstream["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
    assert "/v1/models" in " ".join(upstream["healthcheck"]["test"])
    assert any(v.endswith(":/models:ro") for v in upstream["volumes"])
    assert (REPO / "upstream/Dockerfile").is_file()


def test_sidecars_are_checked_on_readiness_and_wait_for_healthy_dependencies(
    compose: dict[str, Any],
) -> None:
    services = compose["services"]
    for name in ("sidecar", "sidecar-replica"):
        service = services[name]
        assert "/sidecar/ready" in " ".join(service["healthcheck"]["test"])
        assert {d["condition"] for d in service["depends_on"].values()} == {"service_healthy"}
        assert service["environment"]["SIDECAR_UPSTREAM"] == "http://upstream:8000"
    assert set(services["sidecar-replica"]["depends_on"]) == {"upstream", "postgres"}
    assert "pg_isready" in services["postgres"]["healthcheck"]["test"]


def test_keys_are_secrets_never_environment_values(compose: dict[str, Any]) -> None:
    assert set(compose["secrets"]) == {"host_key", "postgres_password"}
    assert all("file" in secret for secret in compose["secrets"].values())
    for name, service in compose["services"].items():
        env = service.get("environment", {})
        assert "SIDECAR_HOST_KEY" not in env and "POSTGRES_PASSWORD" not in env, name
        for value in map(str, env.values()):
            assert not re.fullmatch(r"(0x)?[0-9a-fA-F]{64}", value), name
            assert "@" not in value or ":" not in value.split("@")[0].split("//")[-1], name
    sidecar, replica = compose["services"]["sidecar"], compose["services"]["sidecar-replica"]
    assert sidecar["environment"]["SIDECAR_HOST_KEY_FILE"] == "/run/secrets/host_key"
    assert [s["source"] for s in sidecar["secrets"]] == ["host_key"]
    assert {s["source"] for s in replica["secrets"]} == {"host_key", "postgres_password"}
    ledger = replica["environment"]["SIDECAR_LEDGER"]
    assert ledger.startswith("postgresql://") and ":" not in ledger.split("//")[1].split("@")[0]
    assert replica["environment"]["SIDECAR_LEDGER_PASSWORD_FILE"].startswith("/run/secrets/")


def test_every_sidecar_variable_is_a_real_setting(compose: dict[str, Any]) -> None:
    for name, service in compose["services"].items():
        used = {k for k in service.get("environment", {}) if k.startswith(ENV_PREFIX)}
        assert used <= SETTING_ENV, (name, used - SETTING_ENV)
    example = (REPO / ".env.example").read_text()
    assert set(re.findall(r"^(SIDECAR_[A-Z_]+)=", example, re.M)) <= SETTING_ENV | {"SIDECAR_PORT"}


def test_sigterm_has_time_for_the_shutdown_grace(compose: dict[str, Any]) -> None:
    for name in ("sidecar", "sidecar-replica"):
        service = compose["services"][name]
        grace = int(service["environment"]["SIDECAR_SHUTDOWN_GRACE"])
        assert int(str(service["stop_grace_period"]).rstrip("s")) > grace


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_dockerfiles_pass_hadolint(dockerfile: str) -> None:
    done = subprocess.run(
        [tool("hadolint"), "--no-color", dockerfile],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_dockerfile_settings_are_valid() -> None:
    text = (REPO / "Dockerfile").read_text()
    env = dict(re.findall(r"(SIDECAR_[A-Z_]+)=(\S+)", text))
    assert set(env) <= SETTING_ENV
    settings = load_settings({}, env)
    assert settings.listen_host_port == ("0.0.0.0", 8080)
    assert settings.ledger_url == "sqlite:////data/ledger.db"
    assert "/sidecar/ready" in text and "[postgres]" in text
    engine = (REPO / "upstream" / "Dockerfile").read_text()
    assert "GGML_CUDA=on" in engine and "upstream/serve.py" in engine
