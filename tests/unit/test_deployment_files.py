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
# Read by compose itself (ports, the secret's file), never by the sidecar.
COMPOSE_ONLY = {"SIDECAR_PORT", "SIDECAR_LB_PORT"}


def tool(name: str) -> str:
    found = shutil.which(name) or shutil.which(name, path=str(REPO / "var/deploy-tools/bin"))
    if found is None:
        pytest.fail(f"{name} is not installed: `make test` installs it (make deploy-tools)")
    return found


def example_env(*, dev: bool = False) -> str:
    """.env.example as an operator's .env; ``dev``: with its dev block uncommented."""
    text = (REPO / ".env.example").read_text()
    if dev:
        text = re.sub(r"^# ((?:SIDECAR|HOST)_[A-Z_]+=)", r"\1", text, flags=re.M)
    return text


def compose_config(folder: Path, env: str) -> dict[str, Any]:
    """``docker-compose config`` with every profile in a copy of the files, dummy secrets."""
    shutil.copy(REPO / "compose.yaml", folder / "compose.yaml")
    (folder / ".env").write_text(env)
    (folder / "secrets" / "dev").mkdir(parents=True)
    for name in ("host_key", "postgres_password", "dev/host_key"):
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


@pytest.fixture(scope="module")
def compose(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return compose_config(tmp_path_factory.mktemp("compose"), example_env())


def port_text(port: str | dict[str, Any]) -> str:
    """A port as HOST_IP:PUBLISHED:TARGET text, whichever form config printed it in."""
    if isinstance(port, str):
        return port.removesuffix("/tcp")
    host = f"{port['host_ip']}:" if port.get("host_ip") else ""
    return f"{host}{port['published']}:{port['target']}"


def mount_parts(volume: str | dict[str, Any]) -> tuple[str, str, bool]:
    """A volume as (source, target, read-only): v1 prints text, Compose v2 a mapping."""
    if isinstance(volume, str):
        source, target, *mode = volume.split(":")
        return source, target, mode == ["ro"]
    return volume["source"], volume["target"], bool(volume.get("read_only"))


def test_services_and_their_profiles(compose: dict[str, Any]) -> None:
    services = compose["services"]
    profiles = {name: tuple(s.get("profiles", ())) for name, s in services.items()}
    assert profiles == {
        "upstream": (),
        "sidecar": (),
        "postgres": ("replicas",),
        "sidecar-replica": ("replicas",),
        "lb": ("replicas",),
        "anvil": ("dev",),
    }


def test_only_the_sidecar_publishes_a_port_and_replicas_can_scale(
    compose: dict[str, Any],
) -> None:
    services = compose["services"]
    published = {
        name: [port_text(p) for p in s["ports"]] for name, s in services.items() if "ports" in s
    }
    assert set(published) == {"sidecar", "lb", "anvil"}
    assert published["sidecar"] == ["8080:8080"]
    assert published["lb"] == ["8090:8080"]  # the replicas' balancer, not the sidecar's port
    assert published["anvil"] == ["127.0.0.1:8545:8545"]  # dev only, and on loopback
    assert "ports" not in services["sidecar-replica"]  # --scale needs no fixed host port
    assert services["sidecar-replica"]["expose"] == ["8080"]


def test_the_lb_balances_over_every_replica(compose: dict[str, Any]) -> None:
    lb = compose["services"]["lb"]
    [mount] = map(mount_parts, lb["volumes"])
    assert Path(mount[0]).name == "nginx.conf" and mount[1:] == ("/etc/nginx/nginx.conf", True)
    conf = (REPO / "deploy/nginx.conf").read_text()
    # Resolved per request through Docker's DNS (a variable), so --scale is followed.
    assert "resolver 127.0.0.11" in conf and "proxy_pass $replicas;" in conf
    assert "set $replicas http://sidecar-replica:8080;" in conf
    assert "listen 8080;" in conf and "proxy_buffering off;" in conf  # streams not held back
    assert set(lb["depends_on"]) == {"sidecar-replica"}
    assert lb["depends_on"]["sidecar-replica"]["condition"] == "service_healthy"


def test_the_engine_gets_the_gpu_a_health_check_and_the_model_volume(
    compose: dict[str, Any],
) -> None:
    upstream = compose["services"]["upstream"]
    [device] = upstream["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
    assert "/v1/models" in " ".join(upstream["healthcheck"]["test"])
    assert [m[1:] for m in map(mount_parts, upstream["volumes"])] == [("/models", True)]
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
    for dockerfile in DOCKERFILES:
        used = set(re.findall(r"(SIDECAR_[A-Z_]+)=", (REPO / dockerfile).read_text()))
        assert used <= SETTING_ENV, (dockerfile, used - SETTING_ENV)
    named = set(re.findall(r"^#? ?(SIDECAR_[A-Z_]+)=", example_env(), re.M))
    assert named <= SETTING_ENV | COMPOSE_ONLY, named - SETTING_ENV - COMPOSE_ONLY


def test_env_example_lists_every_variable_compose_reads() -> None:
    interpolated = set(re.findall(r"\$\{([A-Z_]+)", (REPO / "compose.yaml").read_text()))
    listed = set(re.findall(r"^([A-Z_]+)=", example_env(), re.M))
    assert interpolated == listed, interpolated ^ listed


def test_the_sidecars_settings_load(compose: dict[str, Any]) -> None:
    """The image's ENV under compose's environment (.env.example's values): a valid Settings."""
    image = dict(re.findall(r"(SIDECAR_[A-Z_]+)=(\S+)", (REPO / "Dockerfile").read_text()))
    services = compose["services"]
    sidecar = load_settings({}, image | services["sidecar"]["environment"])
    assert sidecar.ledger_url == "sqlite:////data/ledger.db" and sidecar.rpc_url
    assert sidecar.log_format == "json" and sidecar.require_job
    replica = load_settings({}, image | services["sidecar-replica"]["environment"])
    assert replica.ledger_url == "postgresql://sidecar@postgres:5432/sidecar"


def test_the_dev_profile_is_an_env_override(tmp_path: Path) -> None:
    """.env.example's dev block points the same sidecar at anvil and at the devnet's key, and
    the devnet never writes over the real secrets/host_key."""
    dev = compose_config(tmp_path, example_env(dev=True))
    env = dev["services"]["sidecar"]["environment"]
    assert env["SIDECAR_RPC_URL"] == "http://anvil:8545" and env["SIDECAR_CHAIN_ID"] == "31337"
    assert Path(dev["secrets"]["host_key"]["file"]) == tmp_path / "secrets/dev/host_key"
    [mount] = map(mount_parts, dev["services"]["anvil"]["volumes"])
    assert mount[:2] == (str(tmp_path / "secrets/dev"), "/devnet")
    entrypoint = (REPO / "devchain/Dockerfile").read_text()
    for flag in (
        '"--host", "0.0.0.0"',
        '"--port", "8545"',
        '"--host-key-file", "/devnet/host_key"',
    ):
        assert flag in entrypoint
    assert "\nUSER 10001\n" in entrypoint  # the sidecar's uid: it can read the key it writes


def test_sigterm_has_time_for_the_shutdown_grace(compose: dict[str, Any]) -> None:
    for name in ("sidecar", "sidecar-replica"):
        service = compose["services"][name]
        grace = int(service["environment"]["SIDECAR_SHUTDOWN_GRACE"])
        assert int(str(service["stop_grace_period"]).rstrip("s")) > grace


def test_compose_yaml_matches_the_compose_schema() -> None:
    """The file as written (before interpolation) against the schema docker-compose ships."""
    compose_bin = tool("docker-compose")
    python = Path(compose_bin).read_text(errors="replace").splitlines()[0].removeprefix("#!")
    found = subprocess.run(
        [*python.split(), "-c", "import compose.config as c; print(c.__file__)"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert found.returncode == 0, f"no compose package next to {compose_bin}: {found.stderr}"
    schema = Path(found.stdout.strip()).with_name("compose_spec.json")
    done = subprocess.run(
        [tool("check-jsonschema"), "--schemafile", str(schema), "compose.yaml"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr


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
