"""The campaign's invariants: what must hold after every fault, read from the ledger and the chain.

Each check function reads what it needs (the ledger file with ``sqlite3`` in read-only mode, the
chain through the devnet's web3) and returns a :class:`Checks`: how many checks ran and the
violations found, each with the invariant's name and what was seen. Nothing here retries or
tolerates more than the documented bounds; a test fails by asserting that no violation was found.

The invariants (docs/RELIABILITY.md):

* ``finished_lost`` / ``finished_miscounted``: every response its client received whole (a JSON
  answer, a stream with its end) has a FINAL record with exactly the tokens the client got;
* ``open_stream_lost`` / ``open_stream_overcount``: a stream cut by the fault is recorded within
  the progress bound (64 tokens) of what its client received, and no record stays OPEN once its
  stream is over (``record_left_open``);
* ``unserved_recorded``: no record that no request accounts for, and none for more tokens than
  its request was granted;
* ``double_claim``: no claim on-chain twice, none the ledger does not hold as confirmed;
* ``claimed_unserved`` / ``claim_ranges``: claims tile the job's billable tokens from 0, never
  beyond what the ledger holds as served (finished records, and the persisted progress of a
  running stream, which the worker claims);
* ``onchain_vs_ledger``: on-chain ``tokensUsed`` equals the ledger's confirmed claims;
* ``claim_commitment``: each confirmed claim's records root is its pieces (kept in its outbox
  row) chained from the previous confirmed claim's root, and per record the pieces of all claims
  add up to at most its count now (a claim stays auditable from the ledger);
* ``claims_stalled`` / ``claim_refused``: once the fault is over, claims catch up (nothing left
  pending, less than a checkpoint unclaimed) and the contract refuses none.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PROGRESS_BOUND = 64  # sidecar/metered_stream.py PROGRESS_EVERY_TOKENS: what a kill -9 may lose


@dataclass(frozen=True, slots=True)
class Violation:
    name: str
    detail: str
    # What the violation is about (a claim, a job's books), where a later check would find the
    # same one again: the campaign counts it once. Empty: the detail itself.
    subject: str = field(default="", compare=False)

    @property
    def identity(self) -> tuple[str, str]:
        return (self.name, self.subject or self.detail)


@dataclass
class Checks:
    count: int = 0
    violations: list[Violation] = field(default_factory=list)
    peaks: dict[str, int] = field(default_factory=dict)  # figures worth reporting

    def peak(self, name: str, value: int) -> None:
        self.peaks[name] = max(value, self.peaks.get(name, 0), 0)

    def check(self, ok: bool, name: str, detail: str, subject: str = "") -> bool:
        self.count += 1
        if not ok:
            self.violations.append(Violation(name, detail, subject))
        return ok

    def extend(self, other: Checks) -> Checks:
        self.count += other.count
        self.violations.extend(other.violations)
        for name, value in other.peaks.items():
            self.peak(name, value)
        return self


# -- what the clients saw ---------------------------------------------------------------------


@dataclass
class Seen:
    """One request as its client saw it."""

    lane: str
    route: str
    job: int
    stream: bool
    max_tokens: int
    key: str | None = None  # the ledger's record key, once the client learnt it
    tokens: int = 0  # tokens the client received (content chunks / the answer's usage)
    finished: bool = False  # received whole: the JSON answer, or the stream's end
    sent: bool = False  # the request may have reached the sidecar
    status: int | None = None
    error: str | None = None
    code: str | None = None  # the sidecar's error code, when it refused with one

    def __str__(self) -> str:
        state = "finished" if self.finished else f"cut ({self.error})"
        return (
            f"{self.lane} {self.route} job {self.job} key {self.key} max {self.max_tokens}: "
            f"{self.tokens} tokens seen, {state}"
        )


# -- the ledger -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Record:
    key: str
    job: int | None
    endpoint: str
    completion: int
    billable: int
    state: str
    status: int
    started_ms: int
    rowid: int


@dataclass(frozen=True, slots=True)
class ClaimRow:
    job: int
    seq: int
    kind: str
    tokens: int
    first: int
    end: int
    payload: bytes
    state: str
    tx_hash: str | None
    error: str | None
    pieces: tuple[tuple[str, int], ...] | None = None


@dataclass
class Ledger:
    records: dict[str, Record]
    claims: list[ClaimRow]
    integrity: str = "ok"

    def of_job(self, job: int) -> list[Record]:
        """The job's records in the ledger's order (sidecar/ledger/sqlite.py ``_RECORDS``)."""
        rows = [r for r in self.records.values() if r.job == job]
        return sorted(rows, key=lambda r: (r.started_ms, r.rowid))

    def finished_billable(self, job: int) -> int:
        return sum(r.billable for r in self.of_job(job) if r.state != "open")

    def served(self, job: int) -> int:
        """The job's billable tokens as the ledger holds them: finished records, and a running
        stream's persisted progress (tokens already relayed, which the worker claims)."""
        return sum(r.billable for r in self.of_job(job))

    def claims_of(self, job: int) -> list[ClaimRow]:
        return [c for c in self.claims if c.job == job]


def read_ledger(path: Path, *, integrity: bool = False) -> Ledger:
    """The ledger's records and claims, read-only (the sidecar may be running, or dead)."""
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)
    try:
        verdict = "ok"
        if integrity:
            verdict = "; ".join(str(row[0]) for row in conn.execute("PRAGMA integrity_check"))
        records = {
            row[0]: Record(
                key=row[0],
                job=None if row[1] is None else int(row[1]),
                endpoint=row[2],
                completion=int(row[3]),
                billable=int(row[4]),
                state=row[5],
                status=int(row[6]),
                started_ms=int(row[7]),
                rowid=int(row[8]),
            )
            for row in conn.execute(
                "SELECT key, job_id, endpoint, completion_tokens, billable_tokens, state, status,"
                " started_ms, rowid FROM usage_records"
            )
        }
        claims = [
            ClaimRow(
                job=int(row[0]),
                seq=int(row[1]),
                kind=row[2],
                tokens=int(row[3]),
                first=int(row[4]),
                end=int(row[5]),
                payload=bytes(row[6]),
                state=row[7],
                tx_hash=row[8],
                error=row[9],
                pieces=None
                if row[10] is None
                else tuple((str(k), int(t)) for k, t in json.loads(row[10])),
            )
            for row in conn.execute(
                "SELECT job_id, seq, kind, tokens, first_token, end_token, payload, state,"
                " tx_hash, error, pieces FROM claims ORDER BY length(job_id), job_id, seq"
            )
        ]
    finally:
        conn.close()
    return Ledger(records, claims, verdict)


def check_integrity(ledger: Ledger) -> Checks:
    checks = Checks()
    checks.check(
        ledger.integrity == "ok", "ledger_integrity", f"integrity_check: {ledger.integrity}"
    )
    return checks


# -- responses against the ledger ---------------------------------------------------------


def check_responses(
    ledger: Ledger,
    seen: Iterable[Seen],
    before: set[str],
    *,
    streams_over: bool,
    bound: int = PROGRESS_BOUND,
    exact_cut: bool = False,
) -> tuple[Checks, dict[str, int]]:
    """What the clients saw against the ledger. ``before``: the record keys that existed before
    these requests (the rest are theirs). ``streams_over``: no stream is running any more (the
    sidecar restarted since, or every client is done): no record may be OPEN. ``exact_cut``: a
    cut stream must be recorded with exactly the tokens its client got (the engine broke off:
    nothing was in flight). Returns the checks and counters (``billed_undelivered``: JSON
    answers committed whose client never got them, the commit-before-send window the
    durability rule accepts)."""
    checks = Checks()
    counters: dict[str, int] = {}
    seen = list(seen)
    jobs = {s.job for s in seen}
    matched: set[str] = set()
    for s in seen:
        if s.key is None:
            continue
        record = ledger.records.get(s.key)
        matched.add(s.key)
        if record is not None:
            checks.check(
                record.job == s.job,
                "unserved_recorded",
                f"{s}: its record is for job {record.job}",
            )
            if streams_over:
                checks.check(
                    record.state != "open",
                    "record_left_open",
                    f"{s}: record still open, its stream over",
                )
        if s.finished:
            if not checks.check(record is not None, "finished_lost", f"{s}: no record"):
                continue
            assert record is not None
            checks.check(
                record.state == "final",
                "finished_lost",
                f"{s}: record is {record.state}, not final",
            )
            checks.check(
                record.completion == s.tokens and record.billable == s.tokens,
                "finished_miscounted",
                f"{s}: recorded {record.completion} completion / {record.billable} billable",
            )
        elif s.stream:
            _check_cut(checks, counters, s, record, bound, exact_cut)
        elif record is not None:
            # A JSON answer the client did not get whole (the fault came between the commit and
            # the last byte).
            _check_undelivered(checks, counters, s, record)

    # Records of these jobs that no known key accounts for: each must be the one request in
    # flight whose key its client never learnt (a JSON answer, or a socket's stream).
    for job in sorted(jobs):
        unmatched = [r for r in ledger.of_job(job) if r.key not in before and r.key not in matched]
        unknown = [s for s in seen if s.job == job and s.key is None and s.sent and not s.finished]
        checks.check(
            len(unmatched) <= len(unknown),
            "unserved_recorded",
            f"job {job}: {len(unmatched)} record(s) no request accounts for "
            f"({[(r.key, r.billable, r.state) for r in unmatched]}); "
            f"{len(unknown)} request(s) in flight without a key",
        )
        if streams_over:
            for r in unmatched:
                checks.check(
                    r.state != "open",
                    "record_left_open",
                    f"job {job}: record {r.key} still open, its stream over",
                )
        if len(unknown) == 1 and len(unmatched) <= 1:
            s = unknown[0]
            record = unmatched[0] if unmatched else None
            if s.stream:
                _check_cut(checks, counters, s, record, bound, exact_cut)
            elif record is not None:
                _check_undelivered(checks, counters, s, record)
        elif unknown:
            # Several requests in flight without a key (a socket's streams cut one after the
            # other): the records and what the clients saw, summed.
            most = max(s.max_tokens for s in unknown)
            for r in unmatched:
                checks.check(
                    r.billable <= most,
                    "unserved_recorded",
                    f"job {job}: record {r.key} of {r.billable} tokens > any request's grant",
                )
            streams = [s for s in unknown if s.stream]
            seen_tokens = sum(s.tokens for s in streams)
            recorded = sum(r.completion for r in unmatched)
            slack = bound * len(streams)
            checks.check(
                seen_tokens - recorded <= slack,
                "open_stream_lost",
                f"job {job}: {len(streams)} cut stream(s) without a key delivered {seen_tokens} "
                f"tokens, {recorded} recorded ({seen_tokens - recorded} lost, bound {slack}): "
                f"{[str(s) for s in streams][:4]}",
            )
            granted = sum(s.max_tokens for s in unknown if not s.stream)
            checks.check(
                recorded - seen_tokens <= slack + granted,
                "open_stream_overcount",
                f"job {job}: {recorded} tokens recorded for requests in flight whose clients "
                f"got {seen_tokens} (bound {slack} + {granted} granted to JSON answers)",
            )
    return checks, counters


def _check_undelivered(checks: Checks, counters: dict[str, int], s: Seen, record: Record) -> None:
    """A record committed for an answer its client did not get whole (the durability rule's
    commit-before-send window): at most what the request was granted; counted, not a fault."""
    checks.check(
        record.billable <= s.max_tokens,
        "unserved_recorded",
        f"{s}: recorded {record.billable} > granted {s.max_tokens}",
    )
    if record.billable:
        counters["billed_undelivered"] = counters.get("billed_undelivered", 0) + 1


def _check_cut(
    checks: Checks,
    counters: dict[str, int],
    s: Seen,
    record: Record | None,
    bound: int,
    exact: bool,
) -> None:
    recorded = 0 if record is None else record.completion
    checks.peak("most tokens a cut stream lost", s.tokens - recorded)
    checks.peak("most tokens a cut stream overcounted", recorded - s.tokens)
    if exact:
        checks.check(
            recorded == s.tokens,
            "open_stream_lost" if recorded < s.tokens else "open_stream_overcount",
            f"{s}: recorded {recorded} (the engine broke off: exactly what was relayed)",
        )
        if record is not None:
            checks.check(
                record.state != "final",
                "finished_miscounted",
                f"{s}: a broken stream recorded as final",
            )
        return
    checks.check(
        s.tokens - recorded <= bound,
        "open_stream_lost",
        f"{s}: recorded {recorded}, {s.tokens - recorded} tokens lost (bound {bound})",
    )
    if record is not None and record.state == "final":
        # The stream ended on the sidecar's side: its final record is committed before its
        # end is sent (the durability rule), and a kill -9 in between loses what the dead
        # process had written but the client not yet read. As for a JSON answer: at most its
        # grant, counted as billed but undelivered.
        _check_undelivered(checks, counters, s, record)
        return
    state = "no record" if record is None else f"a {record.state} record"
    checks.check(
        recorded - s.tokens <= bound,
        "open_stream_overcount",
        f"{s}: {state} of {recorded}, {recorded - s.tokens} more than the client got",
    )


# -- the chain against the ledger ---------------------------------------------------------


@dataclass(frozen=True, slots=True)
class OnChain:
    tokens_used: int
    status: str
    proofs: list[tuple[int, bytes, str]]  # (tokensClaimed, proofHash, tx hash) per event


def read_chain(devnet: Any, deployment: Any, job: int) -> OnChain:
    view = devnet.session_job(deployment, job)
    market = devnet.marketplace(deployment)
    events = market.events.ProofSubmitted.get_logs(
        from_block=deployment.block_number, argument_filters={"jobId": job}
    )
    proofs = [
        (
            int(e["args"]["tokensClaimed"]),
            bytes(e["args"]["proofHash"]),
            "0x" + bytes(e["transactionHash"]).hex().removeprefix("0x"),
        )
        for e in events
    ]
    return OnChain(int(view["tokensUsed"]), str(view["statusName"]), proofs)


def _norm_hash(tx: str | None) -> str | None:
    return None if tx is None else "0x" + tx.lower().removeprefix("0x")


def check_chain(
    ledger: Ledger,
    onchain: dict[int, OnChain],
    *,
    quiescent: bool,
    checkpoint: int = 100,
    settled: bool = False,
) -> Checks:
    """Each job's claims in the ledger against its session on-chain. ``quiescent``: the fault is
    over and the worker had its time (nothing may be pending, less than a checkpoint unclaimed).
    ``settled``: the sessions were settled (the books must balance)."""
    from sidecar.chain.proofs import GENESIS, ClaimProof, pieces_root

    checks = Checks()
    for job, chain in sorted(onchain.items()):
        claims = ledger.claims_of(job)
        proofs = [c for c in claims if c.kind == "proof"]
        confirmed = [c for c in proofs if c.state == "confirmed"]
        unfinished = [c for c in claims if c.state in ("pending", "sent")]
        served = ledger.served(job)
        confirmed_tokens = sum(c.tokens for c in confirmed)
        # double claims: every event is one confirmed claim of the ledger, and no proof twice
        hashes = [h for _, h, _ in chain.proofs]
        checks.check(
            len(hashes) == len(set(hashes)),
            "double_claim",
            f"job {job}: a proof hash is on-chain twice: {[h.hex()[:12] for h in hashes]}",
        )
        by_tx = {tx: tokens for tokens, _, tx in chain.proofs}
        claim_txs = [_norm_hash(c.tx_hash) for c in confirmed]
        checks.check(
            len(claim_txs) == len(set(claim_txs)),
            "double_claim",
            f"job {job}: two confirmed claims name one transaction: {claim_txs}",
        )
        for c in confirmed:
            tx = _norm_hash(c.tx_hash)
            checks.check(
                tx in by_tx and by_tx[tx] == c.tokens,
                "onchain_vs_ledger",
                f"job {job} claim #{c.seq} ({c.tokens} tokens, tx {tx}) is not on-chain as such "
                f"(events: {sorted(by_tx.items())})",
            )
        if quiescent or not unfinished:
            extra = sorted(set(by_tx) - set(claim_txs))
            checks.check(
                not extra,
                "double_claim",
                f"job {job}: on-chain claims the ledger does not hold as confirmed: "
                f"{[(tx, by_tx[tx]) for tx in extra]} "
                f"(ledger: {[(c.seq, c.tokens, c.state) for c in proofs]})",
            )
            checks.check(
                chain.tokens_used == confirmed_tokens,
                "onchain_vs_ledger",
                f"job {job}: tokensUsed {chain.tokens_used} != ledger confirmed {confirmed_tokens}",
            )
        checks.check(
            sum(t for t, _, _ in chain.proofs) == chain.tokens_used,
            "double_claim",
            f"job {job}: events sum to {sum(t for t, _, _ in chain.proofs)}, tokensUsed "
            f"{chain.tokens_used}",
        )
        # never a claim of tokens the ledger does not hold as served, and the ranges tile
        checks.check(
            chain.tokens_used <= served,
            "claimed_unserved",
            f"job {job}: tokensUsed {chain.tokens_used} > the ledger's billable {served}",
        )
        at = 0
        for c in sorted(confirmed, key=lambda c: c.seq):
            checks.check(
                c.first == at and c.end == c.first + c.tokens,
                "claim_ranges",
                f"job {job} claim #{c.seq} covers [{c.first}, {c.end}), expected from {at}",
                subject=f"job {job} claim #{c.seq}",
            )
            at = c.end
            checks.check(
                c.end <= served,
                "claimed_unserved",
                f"job {job} claim #{c.seq} ends at {c.end} > the ledger's billable {served}",
            )
        # a claim's records root is its pieces chained from the previous confirmed claim's, and
        # no record's pieces add up to more than it holds now: the claims stay auditable
        counts = {r.key: r.billable for r in ledger.of_job(job)}
        root = GENESIS
        pieced: dict[str, int] = {}
        for c in sorted(confirmed, key=lambda c: c.seq):
            committed = ClaimProof.from_payload(c.payload).records_root
            if c.pieces is None:
                checks.check(False, "claim_commitment", f"job {job} claim #{c.seq}: no pieces")
                continue
            root = pieces_root(root, c.pieces)
            checks.check(
                committed == root and sum(t for _, t in c.pieces) == c.tokens,
                "claim_commitment",
                f"job {job} claim #{c.seq} [{c.first}, {c.end}) committed to records root "
                f"{committed.hex()[:16]}; its pieces give {root.hex()[:16]}",
                subject=f"job {job} claim #{c.seq}",
            )
            for key, tokens in c.pieces:
                pieced[key] = pieced.get(key, 0) + tokens
        for key, tokens in sorted(pieced.items()):
            checks.check(
                tokens <= counts.get(key, 0),
                "claim_commitment",
                f"job {job}: claims commit {tokens} tokens of record {key}, which holds "
                f"{counts.get(key, 0)}",
                subject=f"job {job} record {key}",
            )
        for c in claims:
            checks.check(
                c.state != "failed",
                "claim_refused",
                f"job {job} claim #{c.seq} ({c.kind}, {c.tokens} tokens) failed: {c.error}",
                subject=f"job {job} claim #{c.seq}",
            )
        if quiescent:
            checks.check(
                not unfinished,
                "claims_stalled",
                f"job {job}: claims still unfinished: {[(c.seq, c.state) for c in unfinished]}",
            )
            checks.check(
                settled or served - chain.tokens_used < checkpoint,
                "claims_stalled",
                f"job {job}: {served - chain.tokens_used} tokens unclaimed "
                f"(served {served}, on-chain {chain.tokens_used})",
            )
        if settled:
            unclaimable = sum(c.tokens for c in proofs if c.state == "unclaimable")
            checks.check(
                chain.status == "Completed",
                "claims_stalled",
                f"job {job}: session {chain.status} after settlement",
            )
            checks.check(
                served == confirmed_tokens + unclaimable,
                "onchain_vs_ledger",
                f"job {job}: settled books do not balance: billable {served} != confirmed "
                f"{confirmed_tokens} + unclaimable {unclaimable}",
            )
    return checks


def caught_up(ledger: Ledger, onchain: dict[int, OnChain], checkpoint: int = 100) -> bool:
    """Nothing pending and less than a checkpoint unclaimed for every job (what quiescence
    means for :func:`check_chain`)."""
    for job, chain in onchain.items():
        if any(c.state in ("pending", "sent") for c in ledger.claims_of(job)):
            return False
        if ledger.served(job) - chain.tokens_used >= checkpoint:
            return False
    return True


async def wait_caught_up(
    ledger_path: Path,
    read: Any,
    jobs: Iterable[int],
    *,
    timeout: float,
    checkpoint: int = 100,
    nudge: Any = None,
) -> tuple[Ledger, dict[int, OnChain], float]:
    """Poll until the claims caught up (or ``timeout``); the last reads and the seconds taken.
    ``read(job)`` reads one job's session on-chain; ``nudge(ledger, onchain)``, called every
    few seconds while they have not, lets chain time pass (the rate cap)."""
    import asyncio

    jobs = list(jobs)
    started = time.monotonic()
    nudged = started
    while True:
        ledger, onchain = read_both(ledger_path, read, jobs)
        elapsed = time.monotonic() - started
        if caught_up(ledger, onchain, checkpoint) or elapsed >= timeout:
            return ledger, onchain, elapsed
        if nudge is not None and time.monotonic() - nudged >= 3.0:
            nudge(ledger, onchain)
            nudged = time.monotonic()
        await asyncio.sleep(0.25)


def read_both(
    ledger_path: Path, read: Any, jobs: Iterable[int], attempts: int = 50
) -> tuple[Ledger, dict[int, OnChain]]:
    """The ledger and the chain at one moment: the chain read before and after the ledger must
    agree (a claim written, sent and mined between two reads would otherwise look like a claim
    the ledger does not know, or the other way round)."""
    jobs = list(jobs)
    for _ in range(attempts):
        first = {job: read(job) for job in jobs}
        ledger = read_ledger(ledger_path)
        second = {job: read(job) for job in jobs}
        if first == second:
            return ledger, second
        time.sleep(0.05)
    raise AssertionError("the chain kept changing while the ledger was read")
