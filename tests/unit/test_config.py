"""Settings precedence (flags > environment > TOML > defaults), validation and secret masking."""

from __future__ import annotations

import argparse

import pytest

from sidecar.cli import build_parser
from sidecar.config import ConfigError, Settings, add_arguments, load_settings


def flags(*argv: str) -> dict:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return vars(parser.parse_args(argv))


def test_defaults() -> None:
    settings = load_settings({}, environ={})
    assert settings == Settings()
    assert settings.listen_host_port == ("127.0.0.1", 8080)
    assert settings.ledger_url.startswith("sqlite:///") and settings.ledger_url.endswith(
        "ledger.db"
    )
    assert settings.bill == "completion" and settings.require_job is False


def test_precedence_flags_over_env_over_toml(tmp_path) -> None:
    toml = tmp_path / "sidecar.toml"
    toml.write_text(
        'listen = "127.0.0.1:1111"\nupstream = "http://toml:1"\nbill = "total"\n'
        "require-job = true\nmax_body_bytes = 5\n"
    )
    env = {
        "SIDECAR_UPSTREAM": "http://env:2",
        "SIDECAR_LISTEN": "127.0.0.1:2222",
        "SIDECAR_REQUIRE_JOB": "false",
    }
    settings = load_settings(flags("--config", str(toml), "--listen", "127.0.0.1:3333"), env)
    assert settings.listen == "127.0.0.1:3333"  # flag
    assert settings.upstream == "http://env:2"  # env over TOML
    assert settings.require_job is False  # env over TOML
    assert settings.bill == "total"  # TOML over default
    assert settings.max_body_bytes == 5


def test_config_file_from_environment_and_sidecar_table(tmp_path) -> None:
    toml = tmp_path / "c.toml"
    toml.write_text('[sidecar]\nadmin_token = "tok"\n')
    settings = load_settings({}, {"SIDECAR_CONFIG": str(toml)})
    assert settings.admin_token == "tok"


def test_boolean_flags_and_env_values() -> None:
    assert load_settings(flags("--require-job"), {}).require_job is True
    assert (
        load_settings(flags("--no-require-job"), {"SIDECAR_REQUIRE_JOB": "1"}).require_job is False
    )
    for text in ("1", "true", "YES", "on"):
        assert load_settings({}, {"SIDECAR_REQUIRE_JOB": text}).require_job is True
    with pytest.raises(ConfigError, match="SIDECAR_REQUIRE_JOB"):
        load_settings({}, {"SIDECAR_REQUIRE_JOB": "maybe"})


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"SIDECAR_LISTEN": "nope"}, "HOST:PORT"),
        ({"SIDECAR_UPSTREAM": "ftp://x"}, "http"),
        ({"SIDECAR_BILL": "prompt"}, "bill must be one of"),
        ({"SIDECAR_MAX_BODY_BYTES": "lots"}, "integer"),
        ({"SIDECAR_MAX_BODY_BYTES": "0"}, "positive"),
        ({"SIDECAR_LEDGER": "mysql://x"}, "sqlite"),
        ({"SIDECAR_ENGINE": "gpt"}, "engine must be one of"),
    ],
)
def test_invalid_settings_name_the_option(env: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_settings({}, env)


def test_toml_errors_are_clear(tmp_path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings({"config": str(tmp_path / "missing.toml")}, {})
    bad = tmp_path / "bad.toml"
    bad.write_text("listen = ")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_settings({"config": str(bad)}, {})
    unknown = tmp_path / "unknown.toml"
    unknown.write_text("colour = 1\n")
    with pytest.raises(ConfigError, match="unknown option 'colour'"):
        load_settings({"config": str(unknown)}, {})


def test_admin_token_is_masked_when_described() -> None:
    described = load_settings({}, {"SIDECAR_ADMIN_TOKEN": "hunter2"}).describe()
    assert described["admin_token"] == "***"
    assert "hunter2" not in repr(described)


def test_help_explains_every_option(capsys) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--help"])
    text = capsys.readouterr().out
    for option in (
        "--listen",
        "--upstream",
        "--ledger",
        "--bill",
        "--require-job",
        "--admin-token",
        "--max-body-bytes",
        "--engine",
        "--config",
    ):
        assert option in text
    assert "SIDECAR_UPSTREAM" in text


def test_rpc_urls_are_redacted_when_described() -> None:
    from sidecar.config import redact_url

    assert redact_url("https://base-sepolia.g.alchemy.com/v2/KEY123") == (
        "https://base-sepolia.g.alchemy.com/***"
    )
    assert redact_url("http://127.0.0.1:8545") == "http://127.0.0.1:8545"
    assert redact_url("https://user:pw@rpc.example/") == "https://rpc.example/***"
    env = {
        "SIDECAR_RPC_URL": "https://rpc.example/KEY123",
        "SIDECAR_CHAIN_ID": "1",
        "SIDECAR_MARKETPLACE": "0x" + "ab" * 20,
        "SIDECAR_HOST_KEY": "0x" + "cd" * 32,
    }
    described = repr(load_settings({}, env).describe())
    assert "KEY123" not in described and "cd" * 32 not in described


def test_marketplace_must_be_an_address() -> None:
    env = {
        "SIDECAR_RPC_URL": "http://x",
        "SIDECAR_CHAIN_ID": "1",
        "SIDECAR_MARKETPLACE": "0x123",
        "SIDECAR_HOST_KEY": "0x" + "cd" * 32,
    }
    with pytest.raises(ConfigError, match="20-byte hex address"):
        load_settings({}, env)


def test_models_from_flags_environment_and_toml(tmp_path) -> None:
    given = flags("--model", "llama-3-8b=tiny.gguf", "--model", "tiny")
    settings = load_settings(given, {"SIDECAR_MODEL": "ignored"})
    assert settings.model_names == {"llama-3-8b": "tiny.gguf", "tiny": "tiny"}
    assert load_settings({}, {"SIDECAR_MODEL": "a=x, b"}).model_names == {"a": "x", "b": "b"}
    toml = tmp_path / "s.toml"
    toml.write_text('model = ["repo/file.gguf=tiny", "other"]\n')
    settings = load_settings(flags("--config", str(toml)), {})
    assert settings.model_names == {"repo/file.gguf": "tiny", "other": "other"}
    assert load_settings({}, {}).model_names == {}  # the engine's own names
    for bad in ("=x", "a=", "a,a"):
        with pytest.raises(ConfigError, match="model"):
            load_settings({}, {"SIDECAR_MODEL": bad})


def test_session_auth_defaults_to_bound_with_a_chain() -> None:
    chain = {
        "SIDECAR_RPC_URL": "http://127.0.0.1:8545",
        "SIDECAR_CHAIN_ID": "31337",
        "SIDECAR_MARKETPLACE": "0x" + "11" * 20,
        "SIDECAR_HOST_KEY": "0x" + "22" * 32,
    }
    assert load_settings({}, {}).session_auth_mode == "none"
    assert load_settings({}, chain).session_auth_mode == "bound"
    assert load_settings(flags("--session-auth", "none"), chain).session_auth_mode == "none"
    assert load_settings(flags("--session-auth", "bound"), {}).session_auth_mode == "bound"
    with pytest.raises(ConfigError, match="depositor needs the chain"):
        load_settings(flags("--session-auth", "depositor"), {})
    with pytest.raises(SystemExit):
        flags("--session-auth", "anyone")


def test_the_admin_token_from_a_file(tmp_path) -> None:
    secret = tmp_path / "admin_token"
    secret.write_text("s3cret-t0ken\n")
    settings = load_settings({"admin_token_file": str(secret)}, {})
    assert settings.read_admin_token() == "s3cret-t0ken"
    assert load_settings({}, {}).read_admin_token() is None
    secret.write_text("\n")
    with pytest.raises(ConfigError, match="is empty"):
        load_settings({"admin_token_file": str(secret)}, {}).read_admin_token()
    missing = load_settings({"admin_token_file": str(tmp_path / "nope")}, {})
    with pytest.raises(ConfigError, match="cannot read the admin token file") as info:
        missing.read_admin_token()
    assert "s3cret" not in str(info.value)
