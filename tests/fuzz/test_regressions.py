"""Every crash the fuzz campaign found, as the exact input that found it.

Fixed in this campaign: requests.py, node_protocol.py, node_e2ee.py and config.py (each input
below now gets the module's own error: InvalidRequestBody, BadRequest, ConfigError).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from fuzz import oracles
from sidecar.config import ConfigError, load_settings
from sidecar.errors import BadRequest
from sidecar.metering import Endpoint, InvalidJobId, InvalidRequestBody, prepare_request
from sidecar.metering.requests import cap_max_tokens
from sidecar.shells.node_e2ee import ReplySealer
from sidecar.shells.node_protocol import parse_inference, token_limit_of

LONG_NUMBER = b"1" * 4301  # int() refuses more than 4300 digits with a ValueError

# -- request preparation (fixed) -----------------------------------------------------------------


def test_a_number_too_long_for_int_is_an_invalid_body() -> None:
    """hypothesis: prepare_request let json's ValueError escape (a 500, not a 400)."""
    raw = b'{"x": ' + LONG_NUMBER + b"}"
    with pytest.raises(InvalidRequestBody, match="number too long"):
        prepare_request(Endpoint.CHAT, raw, inject_include_usage=False)
    with pytest.raises(InvalidRequestBody, match="number too long"):
        cap_max_tokens(raw, 10)


@pytest.mark.parametrize(
    "raw",
    [
        b'{"job\\u005fid": 8, "job_id": 7}',  # the same key, escaped once
        b'{"\\u006aobId": true, "jobId": 7}',
        '{"job_id": 8, "job_id": 7}'.encode("utf-16"),  # json.loads reads UTF-16 too
        b'\xff\xfe{\x00"\x00j\x00o\x00b\x00I\x00d\x00"\x00:\x00 \x008\x00,\x00 \x00"\x00j\x00o'
        b'\x00b\x00I\x00d\x00"\x00:\x00 \x007\x00}\x00',
    ],
)
def test_a_job_field_repeated_in_disguise_must_agree(raw: bytes) -> None:
    """hypothesis: the duplicate-key check looked for the plain key bytes only, so a job field
    written with escapes or in UTF-16 was silently overridden by the last one."""
    with pytest.raises(InvalidJobId):
        prepare_request(Endpoint.CHAT, raw, inject_include_usage=False)
    # The same job named twice in disguise is one job.
    same = b'{"job\\u005fid": 7, "job_id": "7n", "max_tokens": 1}'
    assert prepare_request(Endpoint.CHAT, same, inject_include_usage=False).job_id == 7


# -- the host node's messages (fixed) ------------------------------------------------------------


def test_a_chain_id_too_long_for_int_is_a_bad_request() -> None:
    """hypothesis: a digit string of 4301 digits as chain_id raised int()'s ValueError."""
    request = {"prompt": "hi", "max_tokens": 1, "chain_id": LONG_NUMBER.decode()}
    with pytest.raises(BadRequest, match="chain_id"):
        parse_inference(request)
    assert parse_inference({**request, "chainId": None, "chain_id": "9" * 78}).chain_id == int(
        "9" * 78
    )


def test_an_engine_error_with_huge_numbers_is_not_a_token_limit() -> None:
    """hypothesis: token_limit_of turned 5000 digits into int() and raised ValueError."""
    message = (
        "This model's maximum context length is " + "1" * 5000 + " tokens. However, you "
        "requested x tokens (1 in the messages"
    )
    assert token_limit_of(message) is None
    assert token_limit_of("Requested tokens (12) exceed context window of " + "3" * 5000) is None
    found = token_limit_of("Requested tokens (12) exceed context window of 8")
    assert found is not None and (found.prompt_tokens, found.context_window) == (12, 8)


def test_a_lone_surrogate_in_an_encrypted_reply_is_sealed() -> None:
    """hypothesis: ReplySealer encoded the engine's text strictly, and a JSON chunk may hold a
    lone surrogate ("\\ud800"): UnicodeEncodeError in the middle of a stream."""
    oracles.check_reply_roundtrip([""], "\ud800")
    oracles.check_reply_roundtrip(["a\udfffb"], "stop")
    assert ReplySealer(oracles.SESSION_KEY).chunk("\ud800", tokens=1)["payload"]["index"] == 0


# -- the settings loader -------------------------------------------------------------------------


def _load_with_toml(tmp_path: Path, toml: bytes) -> None:
    path = tmp_path / "sidecar.toml"
    path.write_bytes(toml)
    load_settings({}, {"SIDECAR_CONFIG": str(path)})


def test_a_sidecar_key_that_is_not_a_table(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        _load_with_toml(tmp_path, b"sidecar = 1")


def test_a_config_file_that_is_not_utf8(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        _load_with_toml(tmp_path, b"\x80")


def test_an_infinite_integer_option(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        _load_with_toml(tmp_path, b"submitter_takeover = inf")


@pytest.mark.parametrize("path", ["/", "1" * 300])
def test_a_config_path_that_is_a_folder_or_too_long(path: str) -> None:
    with pytest.raises(ConfigError):
        load_settings({"config": path}, {})


@pytest.mark.parametrize("listen", ["0:²", "h:" + "1" * 4301])
def test_a_listen_port_int_cannot_read(listen: str) -> None:
    with pytest.raises(ConfigError):
        load_settings({"listen": listen}, {})


CHAIN = {
    "SIDECAR_CHAIN_ID": "31337",
    "SIDECAR_MARKETPLACE": "0x" + "ab" * 20,
    "SIDECAR_HOST_KEY": "0x" + "11" * 32,
}


@pytest.mark.parametrize("rpc_url", ["http://h:99999", "http://[", "http://::"])
def test_an_rpc_url_describe_cannot_show(rpc_url: str) -> None:
    try:
        settings = load_settings({"rpc_url": rpc_url}, CHAIN)
    except ConfigError:
        return  # refusing it at load is a fix too
    settings.describe()  # logged at start by `sidecar serve`
