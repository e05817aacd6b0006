"""`--engine auto`: each engine recognised from its documented answers (shapes from each
engine's sources or API reference, as tests/fixtures/engines/README.md cites them)."""

from __future__ import annotations

import pytest

from sidecar.engine_detect import EngineIdentity, Evidence, recognise
from sidecar.metering.dialects import ENGINES, UNKNOWN, engine_profile


def models(owned_by: str, **extra) -> dict:
    return {
        "object": "list",
        "data": [{"id": "m", "object": "model", "owned_by": owned_by, **extra}],
    }


CASES = [
    # llama-cpp-python: llama_cpp/server/app.py get_models
    ("llama-cpp-python", Evidence(models=models("me", permissions=[]))),
    # llama-server (tools/server): /props and /v1/models as the built binary answers them
    (
        "llama-server",
        Evidence(
            models=models("llamacpp", meta={"n_ctx": 1024}),
            props={"default_generation_settings": {"n_ctx": 1024}, "total_slots": 1},
        ),
    ),
    # vLLM: ModelCard(owned_by="vllm", max_model_len=...); GET /version -> {"version": ...}
    ("vllm", Evidence(models=models("vllm", max_model_len=4096), version={"version": "0.6.3"})),
    ("vllm", Evidence(models={"object": "list", "data": []}, version={"version": "0.6.3"})),
    # SGLang: ModelCard(owned_by="sglang")
    ("sglang", Evidence(models=models("sglang"))),
    # Ollama: /v1/models owned_by "library" for library models; /api/version -> {"version"}
    ("ollama", Evidence(models=models("library"), api_version={"version": "0.5.7"})),
    ("ollama", Evidence(models=models("someone"), api_version={"version": "0.5.7"})),
    # TGI: GET /info -> {"model_id", "max_input_tokens", "router": "text-generation-router"}
    (
        "tgi",
        Evidence(
            models=models("tgi"),
            info={"model_id": "m", "max_input_tokens": 4095, "router": "text-generation-router"},
        ),
    ),
]


@pytest.mark.parametrize(("name", "evidence"), CASES)
def test_each_engine_is_recognised_from_its_answers(name: str, evidence: Evidence) -> None:
    found = recognise(evidence)
    assert found is not None and found[0] == name and found[1]


def test_an_engine_nobody_knows_gets_the_safe_dialect() -> None:
    assert recognise(Evidence(models=models("acme"))) is None
    assert recognise(Evidence()) is None
    assert UNKNOWN.inject_include_usage and not UNKNOWN.chunk_is_token


def test_an_explicit_engine_is_never_second_guessed() -> None:
    identity = EngineIdentity("vllm")
    assert identity.profile is engine_profile("vllm") and not identity.auto
    assert EngineIdentity("auto").profile is UNKNOWN  # until the engine answers


def test_every_dialect_is_one_complete_record() -> None:
    for profile in ENGINES.values():
        assert profile.usage_in in ("final-chunk", "every-chunk", "none")
        # Counting chunks is only exact where a chunk is a token.
        if profile.usage_in == "none":
            assert profile.chunk_is_token
