"""The metering core of every shell, in-process (in the style of h11's tests): no sockets.

A stub engine hands the core scripted answers (bytes, a break at a chosen point); the ledger is
the real SQLite ledger in a temporary folder. Each test drives one engine call the way a shell
does and reads back what the ledger holds, and when.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from sidecar import metered_stream
from sidecar.calls import Admission
from sidecar.config import Settings
from sidecar.errors import JobRefused, LedgerUnavailable, UpstreamBroke, UpstreamError
from sidecar.exchange import Exchange, billable_tokens
from sidecar.ledger import Ledger, RecordState, open_ledger
from sidecar.metered_stream import with_comment_before_done
from sidecar.metering import Endpoint, Source, Usage
from sidecar.metrics import Metrics
from tests.support.faulty_upstream import DONE, chat_chunk


@dataclass
class StubReply:
    """One scripted engine answer: ``parts`` are yielded as body chunks; ``break_after`` parts,
    the answer breaks off as a dropped connection would."""

    parts: list[bytes]
    status: int = 200
    event_stream: bool = True
    break_after: int | None = None
    closed: bool = False
    released: bool = False

    @property
    def is_event_stream(self) -> bool:
        return self.event_stream and self.status < 300

    async def chunks(self) -> AsyncIterator[bytes]:
        for n, part in enumerate(self.parts):
            if n == self.break_after:
                raise UpstreamBroke("the engine at stub broke off its response")
            yield part
        if self.break_after is not None and self.break_after >= len(self.parts):
            raise UpstreamBroke("the engine at stub broke off its response")

    async def read(self) -> bytes:
        if self.break_after is not None:
            raise UpstreamBroke("the engine at stub broke off its response")
        return b"".join(self.parts)

    def close(self) -> None:
        self.closed = True

    def release(self) -> None:
        self.released = True


@dataclass
class StubEngine:
    replies: list[StubReply] = field(default_factory=list)
    sent: list[tuple[str, dict]] = field(default_factory=list)

    async def post_json(self, path: str, body: bytes) -> StubReply:
        self.sent.append((path, json.loads(body)))
        return self.replies.pop(0)


@dataclass
class StubChain:
    """The chain service's side that the core uses: a budget, or a refusal."""

    budget: int = 10_000
    refuse: JobRefused | None = None
    noted: list[int] = field(default_factory=list)

    async def admit(self, job_id: int) -> int:
        if self.refuse is not None:
            raise self.refuse
        return self.budget

    def note_usage(self, job_id: int) -> None:
        self.noted.append(job_id)

    def tokens_left(self, job_id: int, metered: int) -> int | None:
        return max(0, self.budget - metered)


def chat_stream(tokens: int) -> list[bytes]:
    parts = [chat_chunk(None, role=True)]
    parts += [chat_chunk(f"t{n}") for n in range(tokens)]
    parts.append(chat_chunk(None, finish="length"))
    return [*parts, DONE]


def chat_answer(prompt: int, completion: int) -> bytes:
    return json.dumps(
        {
            "choices": [{"message": {"content": "hi"}, "finish_reason": "length"}],
            "usage": {
                "prompt_tokens": prompt,
                "completion_tokens": completion,
                "total_tokens": prompt + completion,
            },
        }
    ).encode()


@pytest.fixture
async def ledger(tmp_path: Path) -> AsyncIterator[Ledger]:
    ledger = open_ledger(f"sqlite:///{tmp_path / 'ledger.db'}")
    await ledger.open()
    yield ledger
    await ledger.close()


def make_exchange(
    ledger: Ledger, engine: StubEngine, chain: StubChain | None = None, **settings: object
) -> Exchange:
    # The stub speaks llama-cpp-python's formats (a chunk is a token, no usage in streams).
    settings.setdefault("engine", "llama-cpp-python")
    return Exchange(Settings(**settings), ledger, Metrics(), engine, chain)  # type: ignore[arg-type]


def sample(exchange: Exchange, name: str, **labels: str) -> float | None:
    return exchange.metrics.registry.get_sample_value(name, labels)


async def records(ledger: Ledger, job_id: int | None) -> list[tuple[RecordState, int]]:
    await ledger.flush()
    return [(r.state, r.completion_tokens) for r in await ledger.records(job_id)]


# -- the stream ----------------------------------------------------------------------------


async def test_stream_relays_every_byte_and_commits_before_done(ledger: Ledger) -> None:
    engine = StubEngine([StubReply(chat_stream(5))])
    exchange = make_exchange(ledger, engine)
    stream = await exchange.call_stream(Endpoint.CHAT, {"messages": []}, 7)
    relayed = b""
    seen_at_done: list[tuple[RecordState, int]] = []
    async with contextlib.aclosing(stream.chunks()) as chunks:
        async for out in chunks:
            if b"[DONE]" in out:
                # The chunk holding [DONE] is handed on only after the record is durable.
                seen_at_done = await records(ledger, 7)
            relayed += out
    assert relayed == b"".join(chat_stream(5))
    assert seen_at_done == [(RecordState.FINAL, 5)]
    [record] = await ledger.records(7)
    assert record.source is Source.COUNTED and record.billable_tokens == 5
    assert sample(exchange, "sidecar_streams_in_flight") == 0


async def test_stream_events_are_the_engines_json_chunks(ledger: Ledger) -> None:
    engine = StubEngine([StubReply(chat_stream(3))])
    exchange = make_exchange(ledger, engine)
    stream = await exchange.call_stream(Endpoint.CHAT, {"messages": []}, 8)
    async with contextlib.aclosing(stream.events()) as events:
        texts = [c["choices"][0]["delta"].get("content") async for c in events]
    assert texts == [None, "t0", "t1", "t2", None]
    assert stream.usage.completion_tokens == 3
    assert stream.reply.released  # type: ignore[attr-defined]
    assert await records(ledger, 8) == [(RecordState.FINAL, 3)]


async def test_a_long_stream_persists_progress_while_it_runs(ledger: Ledger) -> None:
    engine = StubEngine([StubReply(chat_stream(200))])
    exchange = make_exchange(ledger, engine)
    stream = await exchange.call_stream(Endpoint.CHAT, {"messages": []}, 9)
    progress: list[tuple[RecordState, int]] = []
    async with contextlib.aclosing(stream.chunks()) as chunks:
        n = 0
        async for _ in chunks:
            n += 1
            if n == 150:
                progress = await records(ledger, 9)
    # 150 chunks in (149 tokens): at least two progress writes of 64 tokens each are durable.
    assert progress and progress[0][0] is RecordState.OPEN and progress[0][1] >= 128
    assert await records(ledger, 9) == [(RecordState.FINAL, 200)]


async def test_a_slow_stream_notes_its_progress_each_second_without_waiting(
    ledger: Ledger, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Every chunk is "a second later": each one with a new token is noted (unawaited), so the
    # ledger's view of an open stream stays fresh below the 64-token step.
    monkeypatch.setattr(metered_stream, "PROGRESS_EVERY_SECONDS", 0.0)
    engine = StubEngine([StubReply(chat_stream(20))])
    exchange = make_exchange(ledger, engine)
    stream = await exchange.call_stream(Endpoint.CHAT, {"messages": []}, 12)
    progress: list[tuple[RecordState, int]] = []
    async with contextlib.aclosing(stream.chunks()) as chunks:
        n = 0
        async for _ in chunks:
            n += 1
            if n == 6:  # the role chunk and five tokens
                for _ in range(50):
                    progress = await records(ledger, 12)
                    if progress == [(RecordState.OPEN, 5)]:
                        break
                    await asyncio.sleep(0.02)
    assert progress == [(RecordState.OPEN, 5)]
    assert await records(ledger, 12) == [(RecordState.FINAL, 20)]


async def test_engine_break_records_what_was_relayed_as_aborted(ledger: Ledger) -> None:
    engine = StubEngine([StubReply(chat_stream(10), break_after=5)])  # role chunk + 4 tokens
    exchange = make_exchange(ledger, engine)
    stream = await exchange.call_stream(Endpoint.CHAT, {"messages": []}, 10)
    relayed = []
    with pytest.raises(UpstreamBroke):
        async with contextlib.aclosing(stream.chunks()) as chunks:
            async for out in chunks:
                relayed.append(out)
    assert len(relayed) == 5
    assert await records(ledger, 10) == [(RecordState.ABORTED, 4)]
    assert sample(exchange, "sidecar_upstream_errors_total", kind="broken_stream") == 1


async def test_consumer_departure_closes_the_engine_and_keeps_the_count(ledger: Ledger) -> None:
    reply = StubReply(chat_stream(10))
    exchange = make_exchange(ledger, StubEngine([reply]), StubChain())
    stream = await exchange.call_stream(Endpoint.CHAT, {"messages": []}, 11)
    async with contextlib.aclosing(stream.chunks()) as chunks:
        async for out in chunks:
            if b"t2" in out:
                break  # the client went away after three tokens
    assert reply.closed
    assert await records(ledger, 11) == [(RecordState.ABORTED, 3)]
    assert exchange.chain.noted == [11]  # type: ignore[union-attr]


async def test_a_stream_never_started_is_recorded_when_closed(ledger: Ledger) -> None:
    reply = StubReply(chat_stream(4))
    exchange = make_exchange(ledger, StubEngine([reply]))
    stream = await exchange.call_stream(Endpoint.CHAT, {"messages": []}, 12)
    await stream.aclose()
    assert reply.closed and reply.released
    assert await records(ledger, 12) == [(RecordState.ABORTED, 0)]


# -- the JSON answer -----------------------------------------------------------------------


async def test_json_answer_is_recorded_before_it_is_returned(ledger: Ledger) -> None:
    engine = StubEngine([StubReply([chat_answer(7, 5)], event_stream=False)])
    exchange = make_exchange(ledger, engine, StubChain())
    answer = await exchange.call_json(Endpoint.CHAT, {"messages": [], "max_tokens": 5}, 13)
    assert answer.body == chat_answer(7, 5) and answer.status == 200
    assert answer.usage == Usage(prompt_tokens=7, completion_tokens=5, source=Source.REPORTED)
    [record] = await ledger.records(13)
    assert record.state is RecordState.FINAL and record.billable_tokens == 5
    assert record.key == answer.key
    assert engine.sent == [
        ("/v1/chat/completions", {"messages": [], "max_tokens": 5, "stream": False})
    ]


async def test_json_answer_that_breaks_is_an_upstream_error(ledger: Ledger) -> None:
    engine = StubEngine([StubReply([chat_answer(1, 1)], event_stream=False, break_after=0)])
    exchange = make_exchange(ledger, engine)
    with pytest.raises(UpstreamBroke) as caught:
        await exchange.call_json(Endpoint.CHAT, {"messages": []}, 14)
    assert caught.value.status == 502 and caught.value.code == "upstream_broken_response"
    assert await ledger.records(14) == []


async def test_engine_error_instead_of_a_stream_is_an_upstream_error(ledger: Ledger) -> None:
    body = b'{"error": {"message": "model is loading"}}'
    engine = StubEngine([StubReply([body], status=503, event_stream=False)])
    exchange = make_exchange(ledger, engine)
    with pytest.raises(UpstreamError) as caught:
        await exchange.call_stream(Endpoint.COMPLETIONS, {"prompt": "x"}, 15)
    assert caught.value.status == 503
    assert "the engine answered 503: model is loading" in str(caught.value)
    assert await records(ledger, 15) == [(RecordState.FINAL, 0)]


async def test_ledger_refusal_is_ledger_unavailable(ledger: Ledger, tmp_path: Path) -> None:
    conn = sqlite3.connect(tmp_path / "ledger.db")
    conn.execute(
        "CREATE TRIGGER refuse BEFORE INSERT ON usage_records "
        "BEGIN SELECT RAISE(ABORT, 'the disk is gone'); END"
    )
    conn.commit()
    conn.close()
    engine = StubEngine(
        [StubReply([chat_answer(1, 2)], event_stream=False), StubReply(chat_stream(3))]
    )
    exchange = make_exchange(ledger, engine)
    with pytest.raises(LedgerUnavailable):
        await exchange.call_json(Endpoint.CHAT, {"messages": []}, 16)
    stream = await exchange.call_stream(Endpoint.CHAT, {"messages": []}, 16)
    relayed = b""
    with pytest.raises(LedgerUnavailable):
        async with contextlib.aclosing(stream.chunks()) as chunks:
            async for out in chunks:
                relayed += out
    assert b"[DONE]" not in relayed  # nothing is served unrecorded
    assert sample(exchange, "sidecar_ledger_errors_total") == 2
    assert await ledger.records(16) == []


# -- admission and billing -----------------------------------------------------------------


async def test_admission_lowers_max_tokens_to_the_budget(ledger: Ledger) -> None:
    exchange = make_exchange(ledger, StubEngine(), StubChain(budget=40))
    admitted = await exchange.admit(Endpoint.CHAT, 17, b'{"max_tokens": 100}')
    assert json.loads(admitted.body) == {"max_tokens": 40} and admitted.max_tokens == 40
    admitted.hold.release()
    unchanged = await exchange.admit(Endpoint.CHAT, 17, b'{"max_tokens": 30}')
    assert unchanged.body == b'{"max_tokens": 30}' and unchanged.max_tokens is None
    assert await exchange.admit(Endpoint.CHAT, None, b"{}") == Admission(b"{}")


async def test_requests_in_flight_hold_the_deposit_until_recorded(ledger: Ledger) -> None:
    """Admission grants what the deposit covers minus what others hold; a record's commit
    releases its hold (the ledger then counts its tokens)."""
    engine = StubEngine([StubReply(chat_stream(10)), StubReply(chat_stream(10))])
    exchange = make_exchange(ledger, engine, StubChain(budget=50))
    first = await exchange.call_stream(Endpoint.CHAT, {"messages": [], "max_tokens": 30}, 20)
    second = await exchange.call_stream(Endpoint.CHAT, {"messages": [], "max_tokens": 30}, 20)
    assert first.max_tokens is None and second.max_tokens == 20  # lowered to what is left
    assert engine.sent[1][1]["max_tokens"] == 20
    assert exchange.reservations.held(20) == 50
    with pytest.raises(JobRefused) as caught:
        await exchange.admit(Endpoint.CHAT, 20, b'{"max_tokens": 1}')
    assert caught.value.status == 402 and caught.value.code == "budget_spent"
    async with contextlib.aclosing(first.chunks()) as chunks:
        async for _ in chunks:
            pass
    assert exchange.reservations.held(20) == 20  # the first is recorded: its hold is gone
    await second.aclose()  # a departure releases too
    assert exchange.reservations.held(20) == 0
    # No max_tokens at all: the default cap is written in and held.
    admitted = await exchange.admit(Endpoint.CHAT, 20, b"{}")
    assert json.loads(admitted.body) == {"max_tokens": 50} and admitted.hold.tokens == 50
    admitted.hold.release()
    small = make_exchange(ledger, StubEngine(), StubChain(budget=500), default_max_tokens=64)
    admitted = await small.admit(Endpoint.CHAT, 21, b"{}")
    assert json.loads(admitted.body) == {"max_tokens": 64} and admitted.max_tokens == 64


async def test_failed_calls_release_their_hold(ledger: Ledger) -> None:
    class DeadEngine:
        async def post_json(self, path: str, body: bytes) -> StubReply:
            raise UpstreamError("the engine at stub is unreachable", code="upstream_unreachable")

    exchange = make_exchange(ledger, DeadEngine(), StubChain(budget=50))  # type: ignore[arg-type]
    with pytest.raises(UpstreamError):
        await exchange.call_json(Endpoint.CHAT, {"messages": [], "max_tokens": 30}, 22)
    broken = StubEngine([StubReply([chat_answer(1, 1)], event_stream=False, break_after=0)])
    exchange2 = make_exchange(ledger, broken, StubChain(budget=50))
    with pytest.raises(UpstreamBroke):
        await exchange2.call_json(Endpoint.CHAT, {"messages": [], "max_tokens": 30}, 22)
    assert exchange.reservations.held(22) == 0 == exchange2.reservations.held(22)


async def test_refused_job_is_counted_and_nothing_is_sent(ledger: Ledger) -> None:
    engine = StubEngine([StubReply(chat_stream(1))])
    refusal = JobRefused("job 18 belongs to another host", code="foreign_job", status=403)
    exchange = make_exchange(ledger, engine, StubChain(refuse=refusal))
    with pytest.raises(JobRefused) as caught:
        await exchange.call_stream(Endpoint.CHAT, {"messages": []}, 18)
    assert caught.value.status == 403 and caught.value.param == "job_id"
    assert engine.sent == []
    assert sample(exchange, "sidecar_rejected_requests_total", reason="foreign_job") == 1


async def test_require_job_refuses_an_unnamed_request(ledger: Ledger) -> None:
    exchange = make_exchange(ledger, StubEngine(), require_job=True)
    with pytest.raises(JobRefused) as caught:
        exchange.check_job_named(None, "name it")
    assert caught.value.status == 402 and caught.value.code == "job_required"
    exchange.check_job_named(5, "name it")


def test_billing_rule() -> None:
    usage = Usage(prompt_tokens=7, completion_tokens=5, source=Source.REPORTED)
    assert billable_tokens(Endpoint.CHAT, usage, bill_total=False) == 5
    assert billable_tokens(Endpoint.CHAT, usage, bill_total=True) == 12
    embedding = Usage(prompt_tokens=9, completion_tokens=0, source=Source.REPORTED)
    assert billable_tokens(Endpoint.EMBEDDINGS, embedding, bill_total=False) == 9
    assert billable_tokens(Endpoint.EMBEDDINGS, embedding, bill_total=True) == 9


async def test_bill_total_is_what_the_record_carries(ledger: Ledger) -> None:
    engine = StubEngine([StubReply([chat_answer(7, 5)], event_stream=False)])
    exchange = make_exchange(ledger, engine, bill="total")
    await exchange.call_json(Endpoint.CHAT, {"messages": []}, 19)
    [record] = await ledger.records(19)
    assert record.billable_tokens == 12


# -- receipts ------------------------------------------------------------------------------


async def test_a_stream_asked_for_a_receipt_gets_it_before_done(ledger: Ledger) -> None:
    engine = StubEngine([StubReply(chat_stream(4)), StubReply(chat_stream(3))])
    exchange = make_exchange(ledger, engine, StubChain(budget=100))
    for tokens in (4, 3):
        body = b'{"messages": [], "max_tokens": 10}'
        admission = await exchange.admit(Endpoint.CHAT, 30, body)
        call = exchange.start(Endpoint.CHAT, 30, None, admission)
        reply = await engine.post_json("/v1/chat/completions", admission.body)
        stream = exchange.stream(call, reply, with_receipt=tokens == 3)
        async with contextlib.aclosing(stream.chunks()) as chunks:
            relayed = b"".join([out async for out in chunks])
    expected = {
        "X-Sidecar-Job": "30",
        "X-Sidecar-Tokens": "3",
        "X-Sidecar-Job-Tokens": "7",
        "X-Sidecar-Deposit-Left": "93",
    }
    comment = b": sidecar-receipt " + json.dumps(expected, separators=(",", ":")).encode()
    assert relayed.endswith(comment + b"\n\n" + DONE)
    assert relayed.replace(comment + b"\n\n", b"") == b"".join(chat_stream(3))


async def test_json_receipt(ledger: Ledger) -> None:
    engine = StubEngine([StubReply([chat_answer(7, 5)], event_stream=False)])
    exchange = make_exchange(ledger, engine, StubChain(budget=100))
    answer = await exchange.call_json(Endpoint.CHAT, {"messages": [], "max_tokens": 5}, 31)
    assert await exchange.receipt(answer.call, answer.usage) == {
        "X-Sidecar-Job": "31",
        "X-Sidecar-Tokens": "5",
        "X-Sidecar-Job-Tokens": "5",
        "X-Sidecar-Deposit-Left": "95",
    }
    no_chain = make_exchange(
        ledger, StubEngine([StubReply([chat_answer(1, 2)], event_stream=False)])
    )
    answer = await no_chain.call_json(Endpoint.CHAT, {"messages": []}, 31)
    assert "X-Sidecar-Deposit-Left" not in await no_chain.receipt(answer.call, answer.usage)


def test_the_comment_goes_where_the_stream_stays_valid() -> None:
    note = b": r\n\n"
    assert with_comment_before_done(b"data: {}\n\ndata: [DONE]\n\n", note) == (
        b"data: {}\n\n: r\n\ndata: [DONE]\n\n"
    )
    assert with_comment_before_done(b"data:[DONE]\r\n\r\n", note) == b": r\n\ndata:[DONE]\r\n\r\n"
    # [DONE] began in a chunk already relayed: after it, never inside a line.
    assert with_comment_before_done(b"NE]\n\n", note) == b"NE]\n\n: r\n\n"
