"""The formats of the engines that cannot run here (vLLM, SGLang, Ollama, TGI), replayed through
the real sidecar by a FAKE engine (tests/support/replay_engine.py) in random TCP pieces: each is
recognised by `--engine auto`, its usage is the count, a client that did not ask for usage does
not see the injected usage chunk, and a stream without usage whose chunks are not tokens is
counted by the engine's tokenizer (or, with the tokenizer down, estimated)."""

from __future__ import annotations

import json
from pathlib import Path

import aiohttp
import pytest

from sidecar.metering import estimate
from tests.support.replay_engine import FIXTURES, ReplayEngine

pytestmark = pytest.mark.integration

CASES = sorted(p.stem for p in FIXTURES.glob("*.sse"))


async def replay(sidecar_url: str, name: str) -> bytes:
    body = {
        "model": f"replay:{name}",
        "messages": [{"role": "user", "content": "hi"}],
        "stream": True,
        "job_id": 401,
    }
    async with aiohttp.ClientSession() as http:
        async with http.post(sidecar_url + "/v1/chat/completions", json=body) as resp:
            assert resp.status == 200
            return await resp.read()


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("seed", [1, 2])
async def test_each_engines_stream_through_the_sidecar(name: str, seed: int, sidecar_factory):
    facts = json.loads((FIXTURES / f"{name}.json").read_text())
    engine = ReplayEngine(facts["engine"], seed=seed)
    await engine.start()
    try:
        sidecar = await sidecar_factory(engine.url)  # --engine auto
        async with aiohttp.ClientSession() as http:
            async with http.get(sidecar.url + "/sidecar/health") as resp:
                dialect = (await resp.json())["upstream"]["engine"]["dialect"]
        assert dialect == facts["engine"]
        relayed = await replay(sidecar.url, name)
        assert engine.requests[-1]["stream_options"] == {"include_usage": True}  # asked for
        assert b'"choices":[],' not in relayed  # ...and hidden from a client that did not ask
        assert relayed.endswith(b"data: [DONE]\n\n")
        [record] = await sidecar.ledger.records(401)
        if facts["source"] == "reported":
            assert (record.completion_tokens, record.source.value) == (
                facts["completion_tokens"],
                "reported",
            )
            assert record.prompt_tokens == facts["prompt_tokens"]
        else:  # no usage, chunks of several tokens: the engine's tokenizer over the text
            assert (record.completion_tokens, record.source.value) == (
                facts["tokenizer_count"],
                "tokenized",
            )
    finally:
        await engine.stop()


async def test_with_the_tokenizer_down_the_estimate_is_the_last_resort(sidecar_factory):
    name = "vllm_chat_no_usage"
    facts = json.loads((FIXTURES / f"{name}.json").read_text())
    engine = ReplayEngine("vllm", tokenize_down=True)
    await engine.start()
    try:
        sidecar = await sidecar_factory(engine.url)
        await replay(sidecar.url, name)
        [record] = await sidecar.ledger.records(401)
        assert record.source.value == "estimated"
        assert record.completion_tokens == estimate.count_tokens(facts["text"])
    finally:
        await engine.stop()


def test_the_fixtures_are_what_the_generator_writes(tmp_path: Path) -> None:
    """The generator is the fixtures' definition: running it changes nothing."""
    import runpy
    import shutil

    copy = tmp_path / "engines"
    shutil.copytree(FIXTURES, copy)
    script = copy / "make_engine_streams.py"
    runpy.run_path(str(script), run_name="__main__")
    for path in FIXTURES.glob("*_chat_*"):
        assert (copy / path.name).read_bytes() == path.read_bytes(), path.name
